"""A real clamd for tests, with a signature database made on the spot (no downloads), and clamscan for comparison.

``running_clamd(directory)`` writes into ``directory``:

* ``db/``: the database. ``test.hdb`` is ``sigtool --md5`` of the EICAR test file (signature
  :data:`EICAR_SIGNATURE`: the file itself, byte for byte, and nothing else); ``test.ndb`` has one body
  pattern, :data:`TEST_PATTERN` anywhere in a file (signature :data:`TEST_PATTERN_SIGNATURE`), plus the
  caller's ``signatures``. :meth:`Clamd.add_signature` adds more later (clamd sees them after a reload).
* ``clamd.conf`` (socket, database, log, pid file and temporary directory all in ``directory``; no ``User``
  line, so clamd keeps running as the caller), ``clamd.log``, ``clamd.out`` (its stdout and stderr).

clamd runs in the foreground as a child process; the context manager waits until it answers PING (about
0.1 s with this database) and kills it on exit, whatever happens in the body. clamd reports signatures of
databases it does not know as official with ``.UNOFFICIAL`` appended, hence the names below.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from filters.scanner.engines import eicar

TEST_PATTERN = b"fltfuse-test-virus"
TEST_PATTERN_SIGNATURE = "Fltfuse-Test-Virus.UNOFFICIAL"
EICAR_SIGNATURE = "Fltfuse-Test-EICAR.UNOFFICIAL"
UNOFFICIAL = ".UNOFFICIAL"


@dataclass
class Clamd:
    """A clamd started by :func:`running_clamd`."""

    socket: Path
    database: Path
    log_path: Path
    config: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def add_signature(self, name: str, body: bytes) -> str:
        """Add a body-pattern signature (``body`` anywhere in a file) to ``db/added.ndb``; return the name
        clamd will report. clamd loads it at its next reload (e.g. :class:`ClamdEngine`'s fingerprint)."""
        with open(self.database / "added.ndb", "a") as f:
            f.write(_ndb_line(name, body))
        return name + UNOFFICIAL

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of clamd's log and of its stdout/stderr."""
        parts = []
        for path in (self.log_path, self.config.with_name("clamd.out")):
            with contextlib.suppress(FileNotFoundError):
                parts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL clamd (if still running) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """SIGSTOP clamd: it keeps its socket but answers nothing (a hung service)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _ndb_line(name: str, body: bytes) -> str:
    return f"{name}:0:*:{body.hex()}\n"


def ping(socket_path: Path, timeout: float = 1.0) -> bool:
    """Whether clamd answers PING with PONG on ``socket_path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(socket_path))
            sock.sendall(b"zPING\0")
            return sock.recv(16) == b"PONG\0"
    except OSError:
        return False


@contextlib.contextmanager
def running_clamd(
    directory: Path,
    *,
    signatures: Mapping[str, bytes] | None = None,
    stream_max_length: str = "1M",
    config: Sequence[str] = (),
    start_timeout: float = 15.0,
) -> Iterator[Clamd]:
    """Start clamd with the test database in ``directory`` (created if needed, must be fresh).

    ``signatures``: extra body patterns, name -> bytes, for ``db/test.ndb`` (reported as name + ``.UNOFFICIAL``).
    ``stream_max_length``: clamd's StreamMaxLength (INSTREAM size limit), in clamd.conf syntax.
    ``config``: extra clamd.conf lines (e.g. ``"ConcurrentDatabaseReload no"``).
    Raises RuntimeError with the tail of clamd's log if clamd does not answer PING within ``start_timeout``.
    """
    directory = Path(directory).absolute()
    database = directory / "db"
    database.mkdir(parents=True)
    sock = directory / "clamd.sock"
    if len(os.fsencode(sock)) > 107:
        raise ValueError(f"{sock}: too long for a Unix socket path")
    sample = directory / "Fltfuse-Test-EICAR"
    sample.write_bytes(eicar())
    hdb = subprocess.run(["sigtool", "--md5", sample.name], check=True, capture_output=True, cwd=directory).stdout
    sample.unlink()
    (database / "test.hdb").write_bytes(hdb)
    body_patterns = {"Fltfuse-Test-Virus": TEST_PATTERN, **(signatures or {})}
    (database / "test.ndb").write_text("".join(_ndb_line(name, body) for name, body in body_patterns.items()))
    conf = directory / "clamd.conf"
    log_path = directory / "clamd.log"
    conf.write_text(
        "\n".join(
            [
                f"LocalSocket {sock}",
                f"DatabaseDirectory {database}",
                "Foreground yes",
                f"LogFile {log_path}",
                f"TemporaryDirectory {directory}",
                f"PidFile {directory / 'clamd.pid'}",
                f"StreamMaxLength {stream_max_length}",
                *config,
            ]
        )
        + "\n"
    )
    with open(directory / "clamd.out", "wb") as out:
        process = subprocess.Popen(["clamd", "-c", conf], stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    clamd = Clamd(sock, database, log_path, conf, process)
    try:
        deadline = time.monotonic() + start_timeout
        while not ping(sock):
            if process.poll() is not None:
                raise RuntimeError(f"clamd exited with status {process.returncode}:\n{clamd.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"clamd did not answer PING within {start_timeout:g} s:\n{clamd.log_tail()}")
            time.sleep(0.01)
        yield clamd
    finally:
        clamd.kill()


def clamscan_verdicts(paths: Sequence[Path], database: Path) -> dict[Path, str | None]:
    """What ``clamscan --no-summary -d database`` says of each file: the signature found, or None if clean
    (or empty).

    One clamscan run for all of ``paths``; RuntimeError if it reports an error for any of them."""
    run = subprocess.run(
        ["clamscan", "--no-summary", "-d", database, *paths], capture_output=True, text=True, check=False
    )
    if run.returncode not in (0, 1):
        raise RuntimeError(f"clamscan failed ({run.returncode}): {run.stdout}{run.stderr}")
    verdicts: dict[Path, str | None] = {}
    for path in paths:
        prefix = f"{path}: "
        (line,) = (line for line in run.stdout.splitlines() if line.startswith(prefix))
        result = line[len(prefix) :]
        if result in ("OK", "Empty file"):  # clamscan skips empty files; clamd calls them OK
            verdicts[path] = None
        elif result.endswith(" FOUND"):
            verdicts[path] = result[: -len(" FOUND")]
        else:
            raise RuntimeError(f"clamscan: {line}")
    return verdicts


def clamscan_verdict(path: Path, database: Path) -> str | None:
    """What ``clamscan --no-summary -d database path`` says: the signature found, or None if clean."""
    return clamscan_verdicts([path], database)[path]
