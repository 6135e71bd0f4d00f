"""A user-mode port client in a process of its own, driven line by line (for the port tests).

The program (``python porttest_client.py TARGET CONTEXT [--volume MOUNTPOINT]``)
connects to a port with :func:`fltfuse.port.connect_communication_port`
(TARGET: a port name, or a socket path) and prints one JSON object per line:
first ``{"connected": PID}`` or the error, then one per command read from
stdin:

* ``send TEXT`` -> ``{"answer": TEXT}`` (FilterSendMessage);
* ``get`` -> ``{"message": {"id": N, "data": TEXT, "capacity": N or null}}``
  (FilterGetMessage, waiting up to 30 s);
* ``reply ID TEXT`` -> ``{"replied": ID}`` (FilterReplyMessage);
* ``open PATH`` -> ``{"opened": PATH}``: opens and closes the file, in the
  program's one thread (which meanwhile reads no message).

A failure prints ``{"error": CLASS, "status": NTSTATUS, "errno": ERRNO, "message": TEXT}``.
The end of stdin closes the port and ends the program.

:class:`ClientProcess` runs it (optionally as another user) and talks to it
with deadlines, so that a test never hangs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any


def _error(exc: BaseException) -> dict[str, Any]:
    status, code = getattr(exc, "status", None), getattr(exc, "errno", None)
    return {"error": type(exc).__name__, "status": status, "errno": code, "message": str(exc)}


def _run(port: Any, line: str) -> dict[str, Any]:
    verb, _, rest = line.partition(" ")
    if verb == "send":
        return {"answer": port.send_message(rest.encode(), timeout=30).decode()}
    if verb == "get":
        message = port.get_message(timeout=30)
        message.close()
        data = message.data.decode(errors="replace")
        return {"message": {"id": message.message_id, "data": data, "capacity": message.reply_capacity}}
    if verb == "reply":
        message_id, _, text = rest.partition(" ")
        port.reply_message(int(message_id), text.encode())
        return {"replied": int(message_id)}
    if verb == "open":
        try:
            os.close(os.open(rest, os.O_RDONLY))
        except OSError as exc:
            return _error(exc)
        return {"opened": rest}
    return {"error": "usage", "status": None, "message": f"unknown command {line!r}"}


def main() -> None:
    from fltfuse.port import PortError, connect_communication_port

    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("context")
    parser.add_argument("--volume")
    args = parser.parse_args()
    try:
        port = connect_communication_port(args.target, args.context.encode(), volume=args.volume)
    except PortError as exc:
        print(json.dumps(_error(exc)), flush=True)
        return
    with port:
        print(json.dumps({"connected": os.getpid()}), flush=True)
        for line in sys.stdin:
            try:
                outcome = _run(port, line.rstrip("\n"))
            except PortError as exc:
                outcome = _error(exc)
            print(json.dumps(outcome), flush=True)


class ClientProcess:
    """The client program running in a child process; ``first`` is what its connect printed.

    ``user``, ``group`` and ``extra_groups`` are subprocess.Popen's: the child
    switches to them (setgid, setgroups, setuid) before it starts.
    """

    def __init__(
        self,
        target: str,
        context: str = "v1",
        *,
        volume: str | None = None,
        user: int | None = None,
        group: int | None = None,
        extra_groups: list[int] | None = None,
    ):
        argv = [sys.executable, __file__, target, context, *(["--volume", volume] if volume else [])]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=user,
            group=group,
            extra_groups=extra_groups,
            cwd="/",
        )
        self._buffer = b""
        self.first = self.read()

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, timeout: float = 30) -> dict[str, Any]:
        """Its next line, parsed; TimeoutError if none comes within ``timeout``, EOFError if it ended."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError(f"client {self.pid} printed nothing within {timeout} s")
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError(f"client {self.pid} ended (exit status {self.process.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        outcome: dict[str, Any] = json.loads(line)
        return outcome

    def write(self, line: str) -> None:
        """Send it a command without waiting for the outcome (``read`` it later)."""
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def command(self, line: str, timeout: float = 30) -> dict[str, Any]:
        self.write(line)
        return self.read(timeout)

    def close(self) -> int:
        """End it (its port closes as it exits); its exit status."""
        assert self.process.stdin is not None and self.process.stdout is not None
        if not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            status = self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.process.stdout.close()
        return status

    def kill(self) -> None:
        """SIGKILL, as a crash: it never gets to close its port."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()
