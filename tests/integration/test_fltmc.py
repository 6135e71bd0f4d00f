"""fltmc against live volumes: what it lists, what it changes, and what the filter manager does meanwhile.

The tests drive ``fltmc`` (its ``main`` in this process, and where it
matters as its own process; where a test needs raw bytes on the wire or many
quick changes, the control socket itself) against real daemons serving real
loop-backed ext4 volumes:

* listings: ``fltmc filters`` / ``instances [VOLUME]`` tables, with the
  attach reason (mount, automatic, manual) and decoded instance flags;
* load, unload, attach and detach, and each refusal with its status;
* stack changes while other processes hammer the volume (no failed or wrong
  I/O, no filter bug);
* draining: a request a filter never completes is reported and cancelled
  within the drain timeout, and a post that is owed while an instance detaches
  runs with PostopFlags.DRAINING;
* the control socket: root-only, and robust against bad clients;
* reloading a filter's edited code; SIGTERM with a request pended.

Helper filters live in ``fltmc_filters/`` (see its README). Two volumes are
shared by the tests that leave them as they found them (``volumes``); the
tests that stop, crash or wedge a daemon have their own.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fltfuse._control import MAX_LINE, PROTOCOL_VERSION, ControlError, request
from fltfuse._volume import VolumeState, is_mounted
from fltfuse.fltmc import main as fltmc_main
from fltfuse.testing import MountedVolume, mounted_volume, why_no_mount
from tests.child import PythonChild

from .conftest import _wait_for as until

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

FILTERS = Path(__file__).resolve().parent / "fltmc_filters"
FILTER_PATH = (str(FILTERS / "inf"),)
DRAIN_TIMEOUT = 5.0  # InstanceStack.drain_timeout: how long a detach waits for a request an instance holds
MARGIN = 4.0  # what a daemon may take beyond the drain timeout (fltmc's start, the cancel, the unmount)
PEND_OFFSET = 1048593  # PendOffset in fltmctest_stuck.inf and fltmctest_drain.inf
NOBODY = 65534

INSTANCES_HEADER = ["Filter", "Volume Name", "Altitude", "Instance Name", "Frame", "Attached", "Flags"]
FILTERS_HEADER = ["Filter Name", "Num Instances", "Altitude", "Frame"]
BAD_LOG_LINE = re.compile(r" (ERROR|CRITICAL) |Traceback|filter bug|internal error")


# -- running fltmc and reading its tables ------------------------------------------------------------


def fltmc(
    *args: str | os.PathLike[str], rc: int = 0, process: bool = False, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``fltmc ARGS``; fail unless it exits with ``rc``.

    By default the command's ``main`` runs in this process (the same code, without the second or so
    that starting Python takes on a busy machine); with ``process`` it runs as ``python -m fltfuse.fltmc``.
    """
    argv = [os.fspath(a) for a in args]
    if process:
        done = subprocess.run(
            [sys.executable, "-m", "fltfuse.fltmc", *argv], capture_output=True, text=True, timeout=timeout
        )
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = fltmc_main(argv)
        done = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    assert done.returncode == rc, (
        f"fltmc {' '.join(argv)} exited {done.returncode}, expected {rc}\n"
        f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
    )
    return done


def refused(*args: str | os.PathLike[str], status: str, message: str, process: bool = False) -> None:
    """``fltmc ARGS`` fails: exit 1, and one ``fltmc: VOLUME: MESSAGE (STATUS)`` line on stderr."""
    done = fltmc(*args, rc=1, process=process)
    assert done.stdout == ""
    assert done.stderr.startswith("fltmc: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and done.stderr.rstrip().endswith(f"({status})"), done.stderr


def parse_table(text: str) -> tuple[list[str], list[tuple[str, ...]]]:
    """fltmc's table: a header, a rule of dashes, rows; columns two spaces apart, each as wide as its widest cell."""
    lines = text.splitlines()
    assert len(lines) >= 2, f"no table: {text!r}"
    header, rule, *body = lines
    assert re.fullmatch(r"-+(  -+)*", rule), f"the second line is no rule of dashes: {rule!r}"
    spans = [m.span() for m in re.finditer(r"-+", rule)]

    def cells(line: str) -> tuple[str, ...]:
        assert line == line.rstrip(), f"trailing blanks: {line!r}"
        assert len(line) > spans[-1][0], f"a row without its last column: {line!r}"
        for start, _ in spans[1:]:
            assert line[start - 2 : start] == "  " and line[start] != " ", f"misaligned at column {start}: {line!r}"
        return tuple(line[start:end].strip() for start, end in spans)

    names = list(cells(header))
    rows = [cells(line) for line in body]
    for i, (start, end) in enumerate(spans):
        assert end - start == max(len(r[i]) for r in [names, *rows]), f"column {names[i]!r} is not as wide as its text"
    return names, rows


def instances(volume: str | None = None, *, process: bool = False) -> list[tuple[str, ...]]:
    """``fltmc instances [VOLUME]``: its rows, after checking the header."""
    header, rows = parse_table(fltmc("instances", *([volume] if volume else []), process=process).stdout)
    assert header == INSTANCES_HEADER
    return rows


def filters(*, process: bool = False) -> dict[str, tuple[str, ...]]:
    header, rows = parse_table(fltmc("filters", process=process).stdout)
    assert header == FILTERS_HEADER
    assert [r[0].lower() for r in rows] == sorted(r[0].lower() for r in rows), "filters are listed by name"
    return {row[0]: row for row in rows}


def row(vol: MountedVolume, flt: str, altitude: str, name: str, attached: str, flags: str = "0x0") -> tuple[str, ...]:
    return (flt, vol.mountpoint, altitude, name, "0", attached, flags)


# -- helpers for volumes and daemons -------------------------------------------------------------------


def control_path(vol: MountedVolume) -> Path:
    state = VolumeState.load(vol.mountpoint)
    assert state is not None, f"no state file for {vol.mountpoint}"
    return state.control_path


def bad_lines(text: str, allowed: Sequence[str] = ()) -> list[str]:
    """Error lines (and tracebacks) in a daemon log, but those that contain one of ``allowed``."""
    return [line for line in text.splitlines() if BAD_LOG_LINE.search(line) and not any(ok in line for ok in allowed)]


def daemon_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def serves(vol: MountedVolume, name: str = "still-serving") -> None:
    """The mount still creates, writes, lists, reads and deletes."""
    path = Path(vol.mountpoint) / name
    data = os.urandom(10000)
    path.write_bytes(data)
    assert name in os.listdir(vol.mountpoint)
    assert path.read_bytes() == data
    path.unlink()
    assert not path.exists()


# A reader that reports an interrupted read(2) instead of retrying it, as Python's os.pread would (PEP 475):
# it prints "open" once the file is open, then one JSON line with the outcome of one pread.
READER = r"""
import ctypes, json, os, sys
path, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
libc.pread.restype = ctypes.c_ssize_t
fd = os.open(path, os.O_RDONLY)
buf = ctypes.create_string_buffer(length)
print("open", flush=True)
n = libc.pread(fd, buf, length, offset)
print(json.dumps({"n": n, "errno": ctypes.get_errno() if n < 0 else 0, "data": buf.raw[: max(n, 0)].hex()}))
"""


@contextlib.contextmanager
def reader(vol: MountedVolume, path: Path, offset: int, length: int = 100) -> Iterator[PythonChild]:
    """A process blocked in (or done with) one pread of ``path`` (its ``outcome`` is READER's JSON) that is gone
    when the block ends: killed, and if a pended request pins it, with its daemon."""
    r = PythonChild(READER, path, offset, length)
    try:
        r.expect("open\n")
        yield r
    finally:
        if r.running():
            r.proc.kill()
            try:
                r.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:  # in a FUSE request the daemon never answers: end the daemon
                with contextlib.suppress(ProcessLookupError):
                    os.kill(vol.pid, signal.SIGKILL)
                r.proc.wait(timeout=30)
        r.proc.communicate()


def wait_for_log(vol: MountedVolume, *parts: str, since: int = 0, timeout: float = 20) -> str:
    """The first daemon log line (after offset ``since``) that contains every one of ``parts``, once there is one."""

    def find() -> str | None:
        return next((ln for ln in vol.log_text()[since:].splitlines() if all(p in ln for p in parts)), None)

    return until(find, f"a log line with {parts}", timeout)  # type: ignore[no-any-return]


def log_lines(vol: MountedVolume, *parts: str) -> list[str]:
    return [ln for ln in vol.log_text().splitlines() if all(p in ln for p in parts)]


def big_file(path: Path, size: int = 2 * 1024 * 1024) -> bytes:
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    return data


# -- two shared volumes ------------------------------------------------------------------------------


@dataclass
class Volumes:
    a: MountedVolume  # mounted with passthrough and fltmctest_sticky
    b: MountedVolume  # mounted with nullfilter


@pytest.fixture(scope="module")
def volumes() -> Iterator[Volumes]:
    reason = why_no_mount()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="fltfuse-fltmc-", dir="/var/tmp"))
    root.chmod(0o755)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(
            mounted_volume(
                root / "a", size="256M", filters=("passthrough", "fltmctest_sticky"), filter_path=FILTER_PATH
            )
        )
        b = stack.enter_context(
            mounted_volume(root / "b", size="256M", filters=("nullfilter",), filter_path=FILTER_PATH)
        )
        yield Volumes(a, b)
    shutil.rmtree(root)  # reached only when both volumes were released completely


@pytest.fixture
def clean_logs(volumes: Volumes) -> Iterator[None]:
    """The shared daemons log no error while a test runs."""
    start = {vol.pid: len(vol.log_text()) for vol in (volumes.a, volumes.b)}
    yield
    for vol in (volumes.a, volumes.b):
        bad = bad_lines(vol.log_text()[start[vol.pid] :])
        assert not bad, f"the daemon of {vol.mountpoint} logged errors:\n" + "\n".join(bad)


# -- 1. listings -----------------------------------------------------------------------------------


def test_instances_lists_each_volume_with_reason_and_flags(volumes: Volumes, clean_logs: None) -> None:
    a, b = volumes.a, volumes.b
    on_a = [
        row(a, "passthrough", "370030", "PassThrough Instance", "mount"),
        row(a, "fltmctest_sticky", "46000", "Sticky Instance", "mount", "0x2 (no manual attach)"),
    ]
    on_b = [row(b, "nullfilter", "47000", "NullFilter Instance", "mount")]
    everything = instances(process=True)
    assert [r for r in everything if r[1] == a.mountpoint] == on_a  # highest altitude first
    assert [r for r in everything if r[1] == b.mountpoint] == on_b
    assert instances(a.mountpoint, process=True) == on_a  # only that volume
    assert instances(b.mountpoint, process=True) == on_b
    assert fltmc("instances", a.mountpoint).stdout == fltmc("instances", a.mountpoint, process=True).stdout
    done = fltmc("instances", "/var/tmp/no-such-fltfuse-volume", rc=1, process=True)
    assert done.stderr == "fltmc: /var/tmp/no-such-fltfuse-volume is not a mounted fltfuse volume\n"


def test_filters_sums_instances_over_volumes(volumes: Volumes, clean_logs: None) -> None:
    a, b = volumes.a, volumes.b
    listed = filters(process=True)
    assert listed["fltmctest_sticky"] == ("fltmctest_sticky", "1", "46000", "0")
    assert listed["passthrough"][2:] == ("370030", "0") and int(listed["passthrough"][1]) >= 1
    assert listed["nullfilter"][2:] == ("47000", "0") and int(listed["nullfilter"][1]) >= 1
    assert fltmc("load", "fltmctest_sticky", b.mountpoint).stdout == f"loaded fltmctest_sticky on {b.mountpoint}\n"
    try:
        assert filters()["fltmctest_sticky"] == ("fltmctest_sticky", "2", "46000", "0")
        assert instances(b.mountpoint) == [
            row(b, "nullfilter", "47000", "NullFilter Instance", "mount"),
            row(b, "fltmctest_sticky", "46000", "Sticky Instance", "automatic", "0x2 (no manual attach)"),
        ]
    finally:
        fltmc("unload", "fltmctest_sticky", b.mountpoint, "--force")
    assert filters()["fltmctest_sticky"] == ("fltmctest_sticky", "1", "46000", "0")
    assert instances(a.mountpoint)[1][0] == "fltmctest_sticky"


# -- 2. changing the stack ---------------------------------------------------------------------------


def _unload_quietly(vol: MountedVolume, name: str) -> None:
    with contextlib.suppress(ControlError):
        request(control_path(vol), "unload", name=name, force=True)


def test_load_and_unload(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    mnt = b.mountpoint
    base = [row(b, "nullfilter", "47000", "NullFilter Instance", "mount")]
    try:
        assert fltmc("load", "passthrough", mnt).stdout == f"loaded passthrough on {mnt}\n"
        assert instances(mnt) == [row(b, "passthrough", "370030", "PassThrough Instance", "automatic"), *base]
        serves(b)
        refused(
            "load",
            "passthrough",
            mnt,
            status="OBJECT_NAME_COLLISION",
            message=f"{mnt}: filter passthrough is already loaded",
            process=True,
        )
        refused("load", "PassThrough", mnt, status="OBJECT_NAME_COLLISION", message="is already loaded")
        assert fltmc("unload", "passthrough", mnt).stdout == f"unloaded passthrough on {mnt}\n"
        assert instances(mnt) == base
        refused("unload", "passthrough", mnt, status="FLT_FILTER_NOT_FOUND", message="filter passthrough is not loaded")
        refused("load", "nosuchfilter", mnt, status="FLT_FILTER_NOT_FOUND", message="no INF for filter 'nosuchfilter'")
        assert instances(mnt) == base
        serves(b)
    finally:
        _unload_quietly(b, "passthrough")


def test_several_instances_of_one_filter(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    mnt = b.mountpoint
    null = row(b, "nullfilter", "47000", "NullFilter Instance", "mount")
    default = row(b, "passthrough", "370030", "PassThrough Instance", "automatic")
    high = row(b, "passthrough", "380000", "PT High", "manual")
    low = row(b, "passthrough", "360000.5", "PT Low", "manual")
    try:
        fltmc("load", "passthrough", mnt)
        done = fltmc("attach", "passthrough", mnt, "-i", "PT Low", "-a", "360000.5")
        assert done.stdout == f"attached passthrough 'PT Low' at altitude 360000.5 to {mnt}\n"
        fltmc("attach", "passthrough", mnt, "-i", "PT High", "-a", "380000")
        assert instances(mnt) == [high, default, low, null]
        assert [r["instances"] for r in request(control_path(b), "filters") if r["name"] == "passthrough"] == [3]
        serves(b)

        for args, status, message in [
            (["-i", "PT Same", "-a", "370030.0"], "ALTITUDE_COLLISION", "is taken by passthrough/PassThrough Instance"),
            (["-i", "PT Null", "-a", "47000"], "ALTITUDE_COLLISION", "taken by nullfilter/NullFilter Instance"),
            (["-i", "PT Low", "-a", "361000"], "NAME_COLLISION", "an instance named 'PT Low' is attached"),
            (["-a", "370031"], "NAME_COLLISION", "an instance named 'PassThrough Instance' is attached"),
            (["-i", "PT Nowhere"], "NOT_FOUND", "has no instance 'PT Nowhere' (its instances: 'PassThrough Instance')"),
        ]:
            refused("attach", "passthrough", mnt, *args, status=f"FLT_INSTANCE_{status}", message=message)
        odd = ["-i", "PT Odd", "-a", "high"]
        refused("attach", "passthrough", mnt, *odd, status="INVALID_PARAMETER", message="'high' is not a decimal")
        refused("attach", "nosuch", mnt, status="FLT_FILTER_NOT_FOUND", message="filter nosuch is not loaded")
        assert instances(mnt) == [high, default, low, null]

        assert fltmc("detach", "passthrough", mnt).stdout == f"detached passthrough from {mnt}\n"  # its default
        assert instances(mnt) == [high, low, null]
        refused(
            "detach",
            "passthrough",
            mnt,
            status="FLT_INSTANCE_NOT_FOUND",
            message="passthrough has instances PT High, PT Low: name one with -i",
        )
        fltmc("detach", "passthrough", mnt, "-i", "pt low")  # instance names are case-insensitive
        assert instances(mnt) == [high, null]
        refused(
            "detach",
            "passthrough",
            mnt,
            "-i",
            "PT Low",
            status="FLT_INSTANCE_NOT_FOUND",
            message="filter passthrough has no instance 'PT Low' attached",
        )
        serves(b)
        fltmc("unload", "passthrough", mnt)  # takes its last instance with it
        assert instances(mnt) == [null]
    finally:
        _unload_quietly(b, "passthrough")


def test_instance_names_collide_regardless_of_case(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    mnt = b.mountpoint
    try:
        fltmc("load", "passthrough", mnt)
        fltmc("attach", "passthrough", mnt, "-i", "Twin", "-a", "380000")
        refused(
            "attach",
            "passthrough",
            mnt,
            "-i",
            "twin",
            "-a",
            "381000",
            status="FLT_INSTANCE_NAME_COLLISION",
            message="an instance named",
        )
    finally:
        _unload_quietly(b, "passthrough")


def test_a_filter_without_teardown_or_unload_callbacks(volumes: Volumes, clean_logs: None) -> None:
    a = volumes.a
    mnt = a.mountpoint
    passthrough = row(a, "passthrough", "370030", "PassThrough Instance", "mount")
    sticky = row(a, "fltmctest_sticky", "46000", "Sticky Instance", "mount", "0x2 (no manual attach)")
    manual = row(a, "fltmctest_sticky", "46100", "Sticky Manual", "manual", "0x1 (no automatic attach)")
    assert instances(mnt) == [passthrough, sticky]
    try:
        refused(
            "detach",
            "fltmctest_sticky",
            mnt,
            status="FLT_DO_NOT_DETACH",
            message="filter fltmctest_sticky has no instance query teardown callback: it cannot be detached by hand",
        )
        # Flags 0x2 (the default instance) and 0x3: never attached by hand, with or without an altitude.
        for extra in ([], ["-i", "Sticky Pinned"], ["-i", "sticky pinned", "-a", "46300"]):
            refused(
                "attach",
                "fltmctest_sticky",
                mnt,
                *extra,
                status="FLT_DO_NOT_ATTACH",
                message="of fltmctest_sticky forbids manual attachment",
            )
        # Flags 0x1: not at mount, but by hand.
        done = fltmc("attach", "fltmctest_sticky", mnt, "-i", "Sticky Manual")
        assert done.stdout == f"attached fltmctest_sticky 'Sticky Manual' at altitude 46100 to {mnt}\n"
        assert instances(mnt) == [passthrough, manual, sticky]
        refused("detach", "fltmctest_sticky", mnt, "-i", "Sticky Manual", status="FLT_DO_NOT_DETACH", message="by hand")
        refused(
            "unload",
            "fltmctest_sticky",
            mnt,
            status="FLT_DO_NOT_DETACH",
            message="filter fltmctest_sticky has no unload callback: not unloaded (use --force)",
        )
        assert instances(mnt) == [passthrough, manual, sticky]
        serves(a)
        assert fltmc("unload", "fltmctest_sticky", mnt, "--force").stdout == f"unloaded fltmctest_sticky on {mnt}\n"
        assert instances(mnt) == [passthrough]
        assert "fltmctest_sticky" in log_lines(a, "unloaded filter fltmctest_sticky (mandatory)")[0]
        serves(a)
    finally:
        _unload_quietly(a, "fltmctest_sticky")
        fltmc("load", "fltmctest_sticky", mnt)  # as the other tests expect it (attached automatically now)
    assert instances(mnt) == [passthrough, (*sticky[:5], "automatic", sticky[6])]


# -- 5. the control socket ---------------------------------------------------------------------------

CLIENT = r"""
import socket, sys
from fltfuse._control import ControlError, request
path, how = sys.argv[1], sys.argv[2]
if how == "request":  # fltmc's client
    try:
        result = request(path, "instances", timeout=10)
    except ControlError as exc:
        print("ControlError", exc.status, exc)
    except OSError as exc:
        print(type(exc).__name__, exc.errno)
    else:
        print("ok", result)
else:  # connect and only listen: a refused peer is told so at once
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    print(data.decode().strip())
"""


def as_nobody(path: Path, how: str, *, dac_override: bool = False) -> str:
    """What user nobody gets from the control socket at ``path`` (``how``: "request" or "listen")."""
    argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if dac_override:  # past the socket's file mode: then only the daemon's own check is left
        argv += ["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [*argv, sys.executable, "-c", CLIENT, str(path), how],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Conn:
    """A raw connection to a control socket: bytes out, reply lines in."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buffer = b""

    def send(self, data: bytes) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the daemon may hang up first
            self.sock.sendall(data)

    def reply(self) -> dict[str, Any] | None:
        """The next reply, or None if the daemon closed the connection first."""
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def closed_by_daemon(self) -> bool:
        try:
            return self.buffer == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def line(op: Any, **args: Any) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": args}).encode() + b"\n"


def test_control_socket_is_root_only(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    path = control_path(b)
    since = len(b.log_text())
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    assert as_nobody(path, "request") == f"PermissionError {errno.EACCES}"  # the file mode stops it
    # Past the file mode (CAP_DAC_OVERRIDE), the daemon checks the peer's uid, refuses and hangs up.
    assert json.loads(as_nobody(path, "listen", dac_override=True)) == {
        "ok": False,
        "status": "ACCESS_DENIED",
        "error": "permission denied",
    }
    wait_for_log(b, "WARNING fltfuse.control: control socket: refused pid", f"(uid {NOBODY})", since=since)
    # fltmc's client sees the refusal, or (when the hang-up beats its request) a broken connection.
    assert as_nobody(path, "request", dac_override=True) in (
        "ControlError ACCESS_DENIED permission denied",
        f"BrokenPipeError {errno.EPIPE}",
        f"ConnectionResetError {errno.ECONNRESET}",
    )
    assert instances(b.mountpoint) == [row(b, "nullfilter", "47000", "NullFilter Instance", "mount")]
    serves(b)


BAD_REQUESTS = {
    "garbage bytes": (b"\x00\xff\xfe\x80\x01garbage\x02\n", "bad request: "),
    "not JSON": (b"fltmc instances\n", "bad request: "),
    "not an object": (b"[1, 2, 3]\n", "bad request: a request is a JSON object"),
    "wrong version": (b'{"v": 2, "op": "instances"}\n', "bad request: protocol version 2 (this daemon speaks 1)"),
    "no version": (b'{"op": "instances"}\n', "bad request: protocol version None"),
    "unknown op": (line("format", name="passthrough"), "bad request: unknown op 'format'"),
    "args not strings": (line("load", name=["passthrough"]), "bad request: args must be an object of strings"),
    "args not an object": (b'{"v": 1, "op": "load", "args": "passthrough"}\n', "bad request: args must be an object"),
}


@pytest.mark.parametrize("payload, message", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_gets_an_error_and_a_hangup(
    volumes: Volumes, clean_logs: None, payload: bytes, message: str
) -> None:
    b = volumes.b
    since = len(b.log_text())
    conn = Conn(control_path(b))
    try:
        conn.send(payload)
        reply = conn.reply()
        assert reply is not None and reply["ok"] is False, reply
        assert reply["status"] == "INVALID_PARAMETER" and reply["error"].startswith(message), reply
        assert conn.closed_by_daemon()
    finally:
        conn.close()
    wait_for_log(b, f"control socket: bad request from pid {os.getpid()} (uid 0): ", "; disconnected", since=since)
    assert instances(b.mountpoint) == [row(b, "nullfilter", "47000", "NullFilter Instance", "mount")]
    serves(b)


def test_the_control_socket_outlives_broken_clients(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    path = control_path(b)
    base = [row(b, "nullfilter", "47000", "NullFilter Instance", "mount")]
    since = len(b.log_text())

    # A request of 1 MiB: refused once it passes the limit, and the connection is closed.
    conn = Conn(path)
    conn.send(line("instances", pad="x" * (1 << 20)))
    reply = conn.reply()
    assert reply is None or (reply["ok"], reply["status"], reply["error"]) == (
        False,
        "INVALID_PARAMETER",
        "request too long",
    )
    assert conn.closed_by_daemon()
    conn.close()
    wait_for_log(b, f"{os.getpid()} (uid 0) sent a request over {MAX_LINE} bytes; disconnected", since=since)

    # A client that hangs up mid-line, and one that hangs up before reading its reply.
    for payload in (b'{"v": 1, "op": "inst', line("instances")):
        conn = Conn(path)
        conn.send(payload)
        conn.close()
        assert request(path, "instances")[0]["filter"] == "nullfilter"

    # An idle client blocks nobody; the line it finishes later is one request.
    idle = Conn(path)
    try:
        request_line = line("instances")
        idle.send(request_line[:10])
        assert instances(b.mountpoint) == base
        idle.send(request_line[10:])
        reply = idle.reply()
        assert reply is not None and reply["ok"] is True and reply["result"][0]["filter"] == "nullfilter"

        # Several requests in one write are answered in order; a failed one does not end the connection.
        idle.send(line("unload", name="nosuchfilter") + line("load") + line("filters"))
        failed, bad_args, listed = idle.reply(), idle.reply(), idle.reply()
        assert failed is not None and (failed["ok"], failed["status"]) == (False, "FLT_FILTER_NOT_FOUND")
        assert bad_args is not None and bad_args["ok"] is False and "bad arguments for load" in bad_args["error"]
        assert listed is not None and listed["ok"] is True
        assert [r["name"] for r in listed["result"]] == ["nullfilter"]
    finally:
        idle.close()

    assert instances(b.mountpoint) == base
    serves(b)


def test_a_request_just_over_the_limit_is_refused(volumes: Volumes, clean_logs: None) -> None:
    b = volumes.b
    empty = len(line("instances", pad=""))
    payload = line("instances", pad="x" * (MAX_LINE + 2 - empty))
    assert len(payload) == MAX_LINE + 2  # a line of MAX_LINE + 1 bytes, and its newline
    conn = Conn(control_path(b))
    try:
        conn.send(payload)
        reply = conn.reply()
        assert reply is None or (reply["ok"], reply["error"]) == (False, "request too long"), reply
    finally:
        conn.close()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(
            line(["instances"]),
            id="op is a list",
        ),
        pytest.param(
            b"[" * 30000 + b"]" * 30000 + b"\n",
            id="deeply nested JSON",
        ),
    ],
)
def test_a_malformed_request_never_stops_the_daemon(scratch: Path, payload: bytes) -> None:
    with mounted_volume(scratch, size="64M") as vol:
        assert len(payload) <= MAX_LINE
        conn = Conn(control_path(vol))
        try:
            conn.send(payload)
            reply = conn.reply()
        finally:
            conn.close()
        assert reply is not None and (reply["ok"], reply["status"]) == (False, "INVALID_PARAMETER"), reply
        assert daemon_alive(vol.pid)
        assert instances(vol.mountpoint) == []
        serves(vol)


# -- 3. changing the stack under I/O -----------------------------------------------------------------


class Workload:
    """Threads that keep a volume busy and check everything they get back.

    Two threads churn small files (create, write, stat, read back, rename,
    list, delete); one copies a 24 MiB file onto the volume and within it with
    cp(1) and checks both copies. ``ops`` counts the file operations done.
    """

    def __init__(self, root: Path, source: Path):
        self.root = root
        self.source = source
        self.digest = hashlib.sha256(source.read_bytes()).hexdigest()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ops = 0
        self.copies = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(self._churn, i)) for i in range(2)]
        self.threads.append(threading.Thread(target=self._guard, args=(self._copy, 0)))

    def __enter__(self) -> Workload:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a workload thread hangs"

    def _guard(self, body: Callable[[int], None], k: int) -> None:
        try:
            body(k)
        except BaseException as exc:
            self.failures.append(f"{body.__name__}[{k}]: {exc!r}")
            self.stop.set()

    def _done(self, n: int) -> None:
        with self.lock:
            self.ops += n

    def _churn(self, k: int) -> None:
        rng = random.Random(k)
        directory = self.root / f"churn{k}"
        directory.mkdir()
        i = 0
        while not self.stop.is_set():
            path, moved = directory / f"f{i}", directory / f"f{i}.old"
            data = rng.randbytes(rng.choice((0, 1, 4095, 4096, 70000, rng.randrange(300000))))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            assert os.stat(path).st_size == len(data), f"{path}: wrong size"
            with open(path, "rb") as f:
                assert f.read() == data, f"{path}: wrong bytes read back"
            os.rename(path, moved)
            assert os.listdir(directory) == [moved.name], f"{directory}: wrong listing"
            assert moved.read_bytes() == data, f"{moved}: wrong bytes after rename"
            os.unlink(moved)
            i += 1
            self._done(8)

    def _copy(self, _: int) -> None:
        i = 0
        while not self.stop.is_set():
            first, second = self.root / f"copy{i}.bin", self.root / f"copy{i}.again"
            for src, dst in ((self.source, first), (first, second)):
                done = subprocess.run(["cp", str(src), str(dst)], capture_output=True, text=True, timeout=120)
                assert done.returncode == 0, f"cp {src} {dst}: {done.stderr}"
                assert hashlib.sha256(dst.read_bytes()).hexdigest() == self.digest, f"{dst}: wrong bytes"
            first.unlink()
            second.unlink()
            i += 1
            with self.lock:
                self.copies += 1

    def progress(self, ops: int, copies: int = 0, timeout: float = 30) -> None:
        """Wait until at least ``ops`` operations and ``copies`` copies are done (failing on the first error)."""
        until(lambda: self.failures or (self.ops >= ops and self.copies >= copies), f"{ops} operations", timeout)
        assert not self.failures, self.failures


# One cycle: every kind of change, with passthrough and nullfilter; each step runs while the workload goes on.
CYCLE: list[tuple[str, dict[str, str]]] = [
    ("load", {"name": "passthrough"}),
    ("attach", {"name": "passthrough", "instance": "PT Second", "altitude": "380000"}),
    ("load", {"name": "nullfilter"}),
    ("detach", {"name": "passthrough"}),
    ("detach", {"name": "passthrough", "instance": "PT Second"}),
    ("attach", {"name": "passthrough"}),
    ("unload", {"name": "nullfilter"}),
    ("unload", {"name": "passthrough"}),
]


def _fltmc_argv(mnt: str, op: str, args: dict[str, str]) -> list[str]:
    argv = [op, args["name"], mnt]
    if "instance" in args:
        argv += ["-i", args["instance"]]
    if "altitude" in args:
        argv += ["-a", args["altitude"]]
    return argv


def test_stack_changes_under_io(scratch: Path) -> None:
    source = scratch / "source.bin"
    big_file(source, 24 * 1024 * 1024)
    with mounted_volume(scratch / "vol", size="1G") as vol:
        path = control_path(vol)
        with Workload(Path(vol.mountpoint), source) as work:
            work.progress(100)
            for cycle in range(12):
                for op, args in CYCLE:
                    if cycle in (0, 6):  # through fltmc's code, the others straight to the control socket
                        fltmc(*_fltmc_argv(vol.mountpoint, op, args))
                    else:
                        request(path, op, **args)
                    work.progress(work.ops + 40)
                if cycle % 3 == 2:  # copies overlap the cycles: at least one in every three
                    work.progress(work.ops, copies=work.copies + 1)
            work.progress(4000, copies=4, timeout=60)
        assert not work.failures, work.failures
        assert work.ops >= 4000 and work.copies >= 4
        assert request(path, "instances") == [] and request(path, "filters") == []
        assert len(log_lines(vol, "fltfuse.manager: loaded filter passthrough")) == 12
        assert len(log_lines(vol, "detached passthrough/PT Second by hand")) == 12
        assert not bad_lines(vol.log_text()), bad_lines(vol.log_text())
        serves(vol)


# -- 4. draining -------------------------------------------------------------------------------------

ALLOWED_DRAIN_ERRORS = ("still holds",)  # the one error a drain that times out must log


def _check_cancelled(vol: MountedVolume, r: PythonChild, how: Sequence[str], started: float) -> None:
    """``how`` (fltmc's arguments) returned within the drain timeout after cancelling what the reader waits for."""
    elapsed = time.monotonic() - started
    assert DRAIN_TIMEOUT - 0.5 <= elapsed <= DRAIN_TIMEOUT + MARGIN, f"fltmc {' '.join(how)} took {elapsed:.1f}s"
    held = log_lines(vol, "ERROR", "filter fltmctest_stuck (instance Stuck Instance) still holds", f"pid={r.pid})")
    assert len(held) == 1, vol.log_text()
    assert f"CallbackData(READ, FileObject(inode={os.stat(vol.mountpoint + '/data.bin').st_ino}" in held[0]
    assert f"ReadParameters(offset={PEND_OFFSET}, length=100" in held[0]
    assert "it never completed its pended pre-operation; the request is cancelled" in held[0]
    outcome = r.outcome(timeout=10)
    assert (outcome["n"], outcome["errno"]) == (-1, errno.EINTR), outcome


def test_a_request_held_forever_is_cancelled_by_detach_and_unload(scratch: Path) -> None:
    with mounted_volume(scratch, size="256M", filters=("fltmctest_stuck",), filter_path=FILTER_PATH) as vol:
        mnt = vol.mountpoint
        data = big_file(Path(mnt) / "data.bin")
        stuck = row(vol, "fltmctest_stuck", "370200", "Stuck Instance", "mount")
        assert instances(mnt) == [stuck]
        with open(Path(mnt) / "data.bin", "rb") as f:  # a read elsewhere in the file passes
            assert os.pread(f.fileno(), 100, 4096) == data[4096:4196]

        # fltmc detach: returns once the drain timeout has passed and the request is cancelled.
        with reader(vol, Path(mnt) / "data.bin", PEND_OFFSET) as r:
            wait_for_log(vol, "fltmctest: Stuck Instance pended", f"pid={r.pid})")
            started = time.monotonic()
            detach = subprocess.Popen(
                [sys.executable, "-m", "fltfuse.fltmc", "detach", "fltmctest_stuck", mnt],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                # At once the instance is off the stack; meanwhile fltmc answers and the volume serves.
                until(lambda: request(control_path(vol), "instances") == [], "the instance to leave the stack")
                assert instances(mnt) == []
                serves(vol, "during-detach")
                assert r.running(), "the held request ended before the drain timeout"
                out, err = detach.communicate(timeout=DRAIN_TIMEOUT + MARGIN + 5)
            finally:
                if detach.poll() is None:
                    detach.kill()
                    detach.communicate()
            assert (detach.returncode, out, err) == (0, f"detached fltmctest_stuck from {mnt}\n", "")
            _check_cancelled(vol, r, ("detach",), started)
        serves(vol)

        # fltmc unload --force of an instance attached by hand: the same.
        fltmc("attach", "fltmctest_stuck", mnt)
        assert instances(mnt) == [(*stuck[:5], "manual", "0x0")]
        with reader(vol, Path(mnt) / "data.bin", PEND_OFFSET) as r:
            wait_for_log(vol, "fltmctest: Stuck Instance pended", f"pid={r.pid})")
            started = time.monotonic()
            done = fltmc("unload", "fltmctest_stuck", mnt, "--force", process=True, timeout=DRAIN_TIMEOUT + MARGIN + 5)
            assert done.stdout == f"unloaded fltmctest_stuck on {mnt}\n"
            _check_cancelled(vol, r, ("unload", "--force"), started)
        assert instances(mnt) == []
        assert request(control_path(vol), "filters") == []
        serves(vol)
        assert (Path(mnt) / "data.bin").read_bytes() == data
        assert not bad_lines(vol.log_text(), ALLOWED_DRAIN_ERRORS), vol.log_text()


def test_a_post_owed_by_a_detaching_instance_runs_with_draining(scratch: Path) -> None:
    with mounted_volume(scratch, size="256M", filters=("fltmctest_drain",), filter_path=FILTER_PATH) as vol:
        mnt = vol.mountpoint
        path = Path(mnt) / "data.bin"
        data = big_file(path)
        expected = data[PEND_OFFSET : PEND_OFFSET + 100].hex()

        # Nothing pended below it: the upper instance's post runs when the read completes, without DRAINING.
        with reader(vol, path, PEND_OFFSET) as r:
            assert r.outcome(timeout=10) == {"n": 100, "errno": 0, "data": expected}
        (post,) = log_lines(vol, "post READ", f"context of pid {r.pid}")
        assert post.endswith(f"fltmctest: post READ instance=Drain Upper flags=NONE context=context of pid {r.pid}")

        fltmc("attach", "fltmctest_drain", mnt, "-i", "Drain Lower")
        assert instances(mnt) == [
            row(vol, "fltmctest_drain", "370100", "Drain Upper", "mount"),
            row(vol, "fltmctest_drain", "370050", "Drain Lower", "manual", "0x1 (no automatic attach)"),
        ]
        with reader(vol, path, PEND_OFFSET) as r:
            wait_for_log(vol, "fltmctest: Drain Lower pended", f"pid={r.pid})")
            assert not log_lines(vol, "post READ", f"context of pid {r.pid}")
            # The upper instance does not hold the request (the lower one does): its detach does not wait,
            # and the post it owes runs now, with DRAINING, while the request is still pended below.
            started = time.monotonic()
            fltmc("detach", "fltmctest_drain", mnt, "-i", "Drain Upper")
            assert time.monotonic() - started < DRAIN_TIMEOUT
            posts = log_lines(vol, "post READ", f"context of pid {r.pid}")
            assert len(posts) == 1, posts
            assert posts[0].endswith(f"post READ instance=Drain Upper flags=DRAINING context=context of pid {r.pid}")
            assert r.running()
            os.setxattr(path, "user.fltmctest.release", b"now")
            assert r.outcome(timeout=10) == {"n": 100, "errno": 0, "data": expected}
        assert log_lines(vol, "post READ", f"context of pid {r.pid}") == posts  # and never again
        assert instances(mnt) == [
            row(vol, "fltmctest_drain", "370050", "Drain Lower", "manual", "0x1 (no automatic attach)")
        ]
        fltmc("unload", "fltmctest_drain", mnt)
        assert instances(mnt) == []
        serves(vol)
        assert not bad_lines(vol.log_text()), vol.log_text()


# -- 6. reloading a filter ---------------------------------------------------------------------------


def test_a_filter_loaded_again_runs_its_edited_code(scratch: Path) -> None:
    filters_dir = scratch / "filters"
    (filters_dir / "inf").mkdir(parents=True)
    module = filters_dir / "fltmctest_reload.py"
    inf = filters_dir / "inf" / "fltmctest_reload.inf"
    shutil.copy(FILTERS / "fltmctest_reload.py", module)
    shutil.copy(FILTERS / "inf" / "fltmctest_reload.inf", inf)
    with mounted_volume(
        scratch / "vol", size="64M", filters=("fltmctest_reload",), filter_path=(str(filters_dir / "inf"),)
    ) as vol:
        mnt = vol.mountpoint
        target = Path(mnt) / "file"
        target.write_text("some text")
        assert os.getxattr(target, "user.fltmctest.version") == b"one:hello"

        fltmc("unload", "fltmctest_reload", mnt)
        with pytest.raises(OSError) as gone:
            os.getxattr(target, "user.fltmctest.version")
        assert gone.value.errno == errno.ENODATA  # ext4 answers now: the filter is gone

        code = module.read_text()
        assert 'VERSION = "one"' in code
        module.write_text(code.replace('VERSION = "one"', 'VERSION = "two, edited"'))
        text = inf.read_text()
        assert '"Greeting",0x00000000,"hello"' in text
        inf.write_text(text.replace('"Greeting",0x00000000,"hello"', '"Greeting",0x00000000,"bonjour"'))

        fltmc("load", "fltmctest_reload", mnt)
        assert os.getxattr(target, "user.fltmctest.version") == b"two, edited:bonjour"
        assert instances(mnt) == [row(vol, "fltmctest_reload", "370300", "Reload Instance", "automatic")]
        assert target.read_text() == "some text"
        assert not bad_lines(vol.log_text()), vol.log_text()


# -- 7. SIGTERM with a request pended ----------------------------------------------------------------


def test_sigterm_with_a_request_held_forever(scratch: Path) -> None:
    with mounted_volume(scratch, size="256M", filters=("fltmctest_stuck",), filter_path=FILTER_PATH) as vol:
        mnt = vol.mountpoint
        assert vol.loop_device is not None
        big_file(Path(mnt) / "data.bin")
        with reader(vol, Path(mnt) / "data.bin", PEND_OFFSET) as r:
            wait_for_log(vol, "fltmctest: Stuck Instance pended", f"pid={r.pid})")
            started = time.monotonic()
            os.kill(vol.pid, signal.SIGTERM)
            until(lambda: not daemon_alive(vol.pid), "the daemon to exit", DRAIN_TIMEOUT + MARGIN + 10)
            elapsed = time.monotonic() - started
            assert DRAIN_TIMEOUT - 0.5 <= elapsed <= DRAIN_TIMEOUT + MARGIN, f"the daemon took {elapsed:.1f}s"
            outcome = r.outcome(timeout=10)
            assert (outcome["n"], outcome["errno"]) == (-1, errno.EINTR), outcome
        log = vol.log_text()
        assert "SIGTERM received: unmounting" in log
        assert "filter fltmctest_stuck (instance Stuck Instance) still holds CallbackData(READ" in log
        assert f"{mnt} unmounted" in log
        assert not bad_lines(log, ALLOWED_DRAIN_ERRORS), log
        # It cleaned up after itself: no FUSE mount, no backing mount, no loop device, no state.
        assert not is_mounted(mnt)
        assert not is_mounted(vol.backing)
        assert VolumeState.load(mnt) is None
        attached = subprocess.run(["losetup", "-j", vol.image], capture_output=True, text=True).stdout
        assert attached == ""


def test_a_slow_filter_import_does_not_stall_the_mount(volumes: Volumes) -> None:
    """fltmc load imports the module in a worker thread: requests keep being answered meanwhile."""
    b = volumes.b
    began = time.monotonic()
    loader = subprocess.Popen(
        [sys.executable, "-m", "fltfuse.fltmc", "load", "fltmctest_slowimport", b.mountpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        slowest, served = 0.0, 0
        while loader.poll() is None:
            start = time.monotonic()
            serves(b, "during-import")
            slowest, served = max(slowest, time.monotonic() - start), served + 1
        _, err = loader.communicate(timeout=30)
        assert loader.returncode == 0, err
        assert time.monotonic() - began >= 3.0  # the import's sleep happened while we were serving
        assert slowest < 1.0, f"a request waited {slowest:.1f} s for the import"
        assert served > 10
        names = [row[3] for row in parse_table(fltmc("instances", b.mountpoint).stdout)[1]]
        assert names.count("SlowImport Instance") == 1
    finally:
        loader.kill()
        loader.wait()
        _unload_quietly(b, "fltmctest_slowimport")


# -- 8. a callback that blocks the event loop ---------------------------------------------------------

BLOCK_SECONDS = 3  # BlockSeconds in fltmctest_blocking.inf


def test_a_callback_that_blocks_the_event_loop_is_reported_naming_its_filter(scratch: Path) -> None:
    """The loop watchdog (``-o stall_report=1``) logs the filter, the instance, the callback, the request and
    where it blocks, while it blocks; and how long it blocked once the loop runs again. The volume then serves."""
    with mounted_volume(
        scratch, size="256M", options=("stall_report=1",), filters=("fltmctest_blocking",), filter_path=FILTER_PATH
    ) as vol:
        data = big_file(Path(vol.mountpoint) / "data.bin")
        with reader(vol, Path(vol.mountpoint) / "data.bin", PEND_OFFSET) as r:
            started = time.monotonic()
            blocked = wait_for_log(vol, "ERROR", "has blocked the event loop", timeout=BLOCK_SECONDS + 5)
            assert time.monotonic() - started < BLOCK_SECONDS, "reported only after the callback returned"
            assert blocked.split(" ERROR ", 1)[1].startswith(
                "fltfuse.watchdog: filter fltmctest_blocking (instance Blocking Instance) has blocked the event "
                "loop for 1."
            )
            assert "in its callback pre_read for CallbackData(READ" in blocked
            assert f"ReadParameters(offset={PEND_OFFSET}, length=100" in blocked and f"pid={r.pid})" in blocked
            outcome = r.outcome(timeout=BLOCK_SECONDS + 10)
            assert outcome["n"] == 100 and bytes.fromhex(outcome["data"]) == data[PEND_OFFSET : PEND_OFFSET + 100]
        resumed = wait_for_log(vol, "WARNING", "the event loop runs again after")
        assert BLOCK_SECONDS - 0.5 <= float(resumed.split("after ")[1].split()[0]) <= BLOCK_SECONDS + 1.5
        assert 'time.sleep(parameters["BlockSeconds"])' in vol.log_text()  # the innermost frames
        serves(vol, "after-the-block")
        assert instances(vol.mountpoint) == [row(vol, "fltmctest_blocking", "370230", "Blocking Instance", "mount")]
