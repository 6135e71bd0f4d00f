"""The control socket: how ``fltmc`` talks to a running daemon's filter manager.

Each daemon listens on a Unix stream socket next to its state file
(``<state root>/<volume id>.sock``), mode 0600 and owned by the daemon's user;
the server also checks each peer's credentials (SO_PEERCRED): only root and
the daemon's own user may connect. So on a root mount, only root controls the
filters.

Wire format, version 1: one JSON object per line each way, UTF-8, at most
:data:`MAX_LINE` bytes. A request is ``{"v": 1, "op": OP, "args": {...}}``;
the reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "status":
NTSTATUS_NAME, "error": MESSAGE}``. OPs: ``filters``, ``instances``,
``load {name}``, ``unload {name, force}``, ``attach {name, instance,
altitude}``, ``detach {name, instance}``. A malformed or oversized request is
answered with an error and the connection is closed; the daemon logs the peer
and goes on serving.

Windows counterpart: the FltMgr control interface behind fltmc.exe and
FilterLoad/FilterAttach in fltlib.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ._manager import FilterManager, ManagerError
from ._status import NtStatus

log = logging.getLogger("fltfuse.control")

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024


class ControlError(Exception):
    """A control request failed; ``status`` is the NTSTATUS name the daemon gave."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# -- the server (in the daemon) ---------------------------------------------------------


class ControlServer:
    """Serves ``manager`` on the Unix socket at ``path``; one request at a time changes the stack."""

    def __init__(self, manager: FilterManager, path: str | os.PathLike[str]):
        self.manager = manager
        self.path = Path(path)
        self._changing = trio.Lock()
        self._ops: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "filters": self._filters,
            "instances": self._instances,
            "load": self._load,
            "unload": self._unload,
            "attach": self._attach,
            "detach": self._detach,
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        log.info("control socket %s", self.path)
        try:
            task_status.started()
            await trio.serve_listeners(self._connection, [trio.SocketListener(sock)])
        finally:
            self.path.unlink(missing_ok=True)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client. Nothing it sends may take the daemon down: every failure ends only this connection."""
        peer = "a client"
        try:
            async with stream:
                pid, uid, _ = struct.unpack(
                    "3i", stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                )
                peer = f"pid {pid} (uid {uid})"
                if uid not in (0, os.geteuid()):
                    log.warning(
                        "control socket: refused %s: only root and uid %d may control filters", peer, os.geteuid()
                    )
                    await self._reply(stream, _failure(NtStatus.ACCESS_DENIED, "permission denied"))
                    return
                await self._requests(stream, peer)
        except Exception:
            log.exception("control socket: connection of %s failed; disconnected", peer)

    async def _requests(self, stream: trio.SocketStream, peer: str) -> None:
        buffer = b""
        while True:
            try:
                chunk = await stream.receive_some(MAX_LINE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                return
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end > MAX_LINE or (end < 0 and len(buffer) > MAX_LINE):
                    log.warning("control socket: %s sent a request over %d bytes; disconnected", peer, MAX_LINE)
                    await self._reply(stream, _failure(NtStatus.INVALID_PARAMETER, "request too long"))
                    return
                if end < 0:
                    break
                line, buffer = buffer[:end], buffer[end + 1 :]
                reply, keep = await self._handle(line, peer)
                if not await self._reply(stream, reply) or not keep:
                    return

    async def _handle(self, line: bytes, peer: str) -> tuple[dict[str, Any], bool]:
        """The reply to one request line, and whether the connection may go on."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            if request.get("v") != PROTOCOL_VERSION:
                raise ValueError(f"protocol version {request.get('v')!r} (this daemon speaks {PROTOCOL_VERSION})")
            name = request.get("op")
            op = self._ops.get(name) if isinstance(name, str) else None
            if op is None:
                raise ValueError(f"unknown op {name!r}")
            args = request.get("args", {})
            if not isinstance(args, dict) or not all(isinstance(v, (str, bool, type(None))) for v in args.values()):
                raise ValueError("args must be an object of strings and booleans")
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            log.warning("control socket: bad request from %s: %s; disconnected", peer, exc)
            return _failure(NtStatus.INVALID_PARAMETER, f"bad request: {exc}"), False
        try:
            result = await op(args)
        except ManagerError as exc:
            log.info("control socket: %s %s failed: %s", request["op"], args, exc)
            return _failure(exc.status, str(exc)), True
        except TypeError as exc:
            return _failure(NtStatus.INVALID_PARAMETER, f"bad arguments for {request['op']}: {exc}"), True
        except Exception as exc:  # a filter's module that fails to import, an INF error...
            log.error("control socket: %s %s failed", request["op"], args, exc_info=True)
            return _failure(NtStatus.UNSUCCESSFUL, f"{type(exc).__name__}: {exc}"), True
        return {"ok": True, "result": result}, True

    @staticmethod
    async def _reply(stream: trio.SocketStream, reply: dict[str, Any]) -> bool:
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def _filters(self, args: dict[str, Any]) -> Any:
        return self.manager.filters()

    async def _instances(self, args: dict[str, Any]) -> Any:
        return self.manager.instances()

    async def _load(self, args: dict[str, Any]) -> Any:
        async with self._changing:
            name = _text(args, "name")
            loaded = await trio.to_thread.run_sync(self.manager.prepare, name)  # importing may be slow
            self.manager.start(loaded)
            return loaded.filter.name

    async def _unload(self, args: dict[str, Any]) -> Any:
        async with self._changing:
            await self.manager.unload(_text(args, "name"), mandatory=bool(args.get("force")))

    async def _attach(self, args: dict[str, Any]) -> Any:
        async with self._changing:
            instance = self.manager.attach(_text(args, "name"), args.get("instance"), args.get("altitude"))
            return {"instance": instance.name, "altitude": str(instance.altitude)}

    async def _detach(self, args: dict[str, Any]) -> Any:
        async with self._changing:
            await self.manager.detach(_text(args, "name"), args.get("instance"))


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key!r} must be a non-empty string")
    return value


def _failure(status: NtStatus, message: str) -> dict[str, Any]:
    return {"ok": False, "status": status.name, "error": message}


# -- the client (in fltmc) -------------------------------------------------------------------


def request(path: str | os.PathLike[str], op: str, timeout: float = 120.0, **args: Any) -> Any:
    """Send one request to the daemon listening at ``path``; return its result or raise ControlError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlError("CONNECTION_REFUSED", f"no daemon listens on {path}") from exc
        try:
            sock.sendall(json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": args}).encode() + b"\n")
        except BrokenPipeError:
            pass  # the daemon refused us and hung up: its reply says why
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("CONNECTION_RESET", f"the daemon at {path} closed the connection")
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise ControlError(reply.get("status", "UNSUCCESSFUL"), reply.get("error", "failed"))
    return reply.get("result")
