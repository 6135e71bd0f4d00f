"""Communication ports on a real mount: the daemon's port sockets, clients in processes of their own, fltmc unload.

The helper filter ``porttest`` (``port_filters/``) creates one port in its
``filter_load`` and logs each connect and disconnect in the daemon's log; the
clients are ``port_filters/porttest_client.py`` processes. Each mount names
its port after the test process, so that a bare port name finds this mount's
port even while other tests' daemons have ports of their own. The daemon's
robustness is checked from outside: the unit fuzzer's bad clients and
hundreds of connect/disconnect cycles against its port (its descriptor count
in /proc/PID/fd, its log, the mount still serving), and a kill -9 of the
daemon followed by the next mount of the volume.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fltfuse._port.wire import Frame, FrameKind, encode
from fltfuse._volume import state_root, volume_id
from fltfuse.port import PortNotFoundError, PortRefusedError, connect_communication_port, find_ports
from fltfuse.testing import MountedVolume, mount, mounted_volume, why_no_mount
from tests.integration.port_filters.porttest_client import ClientProcess
from tests.unit.test_port_fuzz import SEED, Case, cases, play

pytestmark = pytest.mark.skipif(why_no_mount() is not None, reason=str(why_no_mount()))

FILTER_PATH = (str(Path(__file__).resolve().parent / "port_filters" / "inf"),)
PORT = f"PortTest-{os.getpid()}"
MOUNTED_CASES = 150  # of the unit fuzzer's cases, played against the daemon


def ports_directory(vol: MountedVolume) -> Path:
    """Where the daemon of ``vol`` keeps its filters' port sockets."""
    return state_root() / f"{volume_id(vol.mountpoint)}.ports"


def parameters(port: str, mode: str = "0640") -> dict[str, dict[str, str]]:
    return {"porttest": {"PortName": port, "PortMode": mode}}


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MountedVolume]:
    directory = tmp_path_factory.mktemp("ports", numbered=True)
    with mounted_volume(
        directory, size="128M", filters=("porttest",), filter_path=FILTER_PATH, parameters=parameters(PORT)
    ) as mounted:
        yield mounted


@pytest.fixture(autouse=True)
def clean_log(vol: MountedVolume) -> Iterator[None]:
    """The daemon logs no error or traceback during the test."""
    start = len(vol.log_text())
    yield
    vol.assert_no_errors_logged(start)


def fltmc(*argv: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "fltfuse.fltmc", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"fltmc {' '.join(argv)}: {done.stderr}"
    return done


def test_the_port_is_a_socket_in_the_volumes_ports_directory(vol: MountedVolume) -> None:
    directory = ports_directory(vol)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # other users reach the sockets the security allows
    socket_file = (directory / PORT).stat()
    assert stat.S_ISSOCK(socket_file.st_mode) and stat.S_IMODE(socket_file.st_mode) == 0o640
    assert socket_file.st_uid == 0 and socket_file.st_gid == os.getegid()
    assert f"filter porttest: port {PORT} listening on {directory / PORT} (mode 640)" in vol.log_text()
    assert find_ports(PORT) == [directory / PORT]  # the one volume with a port of that name
    with ClientProcess(PORT, "v1", user=65534, group=65534, extra_groups=[]) as stranger:  # finds it by name
        assert stranger.first["error"] == "PortRefusedError", stranger.first
        assert stranger.first["status"] == 0xC0000022  # ACCESS_DENIED: mode 0640 lets no other user write to it
        assert stranger.first["errno"] == errno.EACCES


@pytest.mark.parametrize("how", ["volume", "bare name", "backslash name", "path"])
def test_a_client_process_connects_by_name(
    vol: MountedVolume, wait_for: Callable[..., Any], how: str, tmp_path: Path
) -> None:
    target = {"volume": PORT, "bare name": PORT, "backslash name": "\\" + PORT, "path": ""}[how]
    if how == "path":
        target = str(ports_directory(vol) / PORT)
    volume = vol.mountpoint if how == "volume" else None
    with ClientProcess(target, f"by {how}", volume=volume) as client:
        assert client.first == {"connected": client.pid}
        assert client.command("send hello") == {"answer": "echo:hello"}
        wait_for(lambda: f"porttest: connected pid {client.pid} context by {how}" in vol.log_text(), "its connect")
    wait_for(lambda: f"porttest: disconnected pid {client.pid}" in vol.log_text(), "its disconnect callback")


def test_names_that_find_no_port(vol: MountedVolume, tmp_path: Path) -> None:
    with ClientProcess("NoSuchPort", "v1", volume=vol.mountpoint) as client:
        assert client.first["error"] == "PortNotFoundError", client.first
        assert f"no port NoSuchPort on the volume mounted at {vol.mountpoint}" in client.first["message"]
    with ClientProcess(PORT, "v1", volume=str(tmp_path)) as client:  # not a mounted volume
        assert client.first["error"] == "PortNotFoundError", client.first
    with ClientProcess(PORT, "bad", volume=vol.mountpoint) as client:
        assert client.first["error"] == "PortRefusedError", client.first
        assert "porttest speaks no context b'bad'" in client.first["message"]


def test_a_bad_client_does_not_harm_the_mount(vol: MountedVolume, wait_for: Callable[..., Any]) -> None:
    data = Path(vol.mountpoint) / "survivor.txt"
    data.write_bytes(b"still here\n")
    with ClientProcess(PORT, "good", volume=vol.mountpoint) as good:
        for garbage in (b"\xff" * 100, encode(Frame(FrameKind.CONNECT, payload=b"v1")) + b"FP\x09" + b"\0" * 21):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
                bad.settimeout(10)
                bad.connect(str(ports_directory(vol) / PORT))
                bad.sendall(garbage)
                while bad.recv(4096):  # the daemon hangs up on it
                    pass
        wait_for(lambda: len(re.findall(r"broke the protocol", vol.log_text())) >= 2, "the protocol errors' log lines")
        assert "bad magic" in vol.log_text() and "wire format version 9" in vol.log_text()
        assert subprocess.run(["cat", str(data)], capture_output=True, timeout=30).stdout == b"still here\n"
        assert good.command("send after") == {"answer": "echo:after"}


def test_fltmc_unload_disconnects_the_client_and_removes_the_socket(
    tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    port = f"PortUnload-{os.getpid()}"
    with mounted_volume(
        tmp_path, size="128M", filters=("porttest",), filter_path=FILTER_PATH, parameters=parameters(port, "0600")
    ) as mounted:
        path = ports_directory(mounted) / port
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with ClientProcess(port, "unloaded", volume=mounted.mountpoint) as client:
            assert client.first == {"connected": client.pid}
            client.write("get")
            fltmc("unload", "porttest", mounted.mountpoint)
            outcome = client.read()  # its get_message waited, and got the disconnection
            assert outcome["error"] == "PortDisconnectedError", outcome
            assert not path.exists()
            wait_for(lambda: f"porttest: disconnected pid {client.pid}" in mounted.log_text(), "its disconnect")
        directory = ports_directory(mounted)
        assert directory.is_dir() and not any(directory.iterdir())
    assert not directory.exists()  # the unmount removed the volume's ports directory


def daemon_descriptors(vol: MountedVolume) -> int:
    return len(os.listdir(f"/proc/{vol.pid}/fd"))


async def play_within_30s(path: str, case: Case, spare_fd: int) -> None:
    """One fuzz case against the daemon; TooSlowError if the daemon does not hang up on it."""
    with trio.fail_after(30):
        await play(path, case, spare_fd)


def test_fuzzed_clients_never_harm_the_mount(vol: MountedVolume, wait_for: Callable[..., Any]) -> None:
    """The unit fuzzer's bad clients against the real daemon: each is disconnected with a log line naming
    it (this process's pid) and its problem; a client that sends nothing is dropped after the handshake
    timeout without holding up the others; the good client, the mount's files and the daemon's
    descriptor count are as before."""
    data = Path(vol.mountpoint) / "fuzz-survivor.txt"
    data.write_bytes(b"still here\n")
    path = str(ports_directory(vol) / PORT)
    peer = f"pid {os.getpid()} (uid {os.geteuid()})"
    spare_read, spare_write = os.pipe()
    try:
        with connect_communication_port(path, b"good") as good, socket.socket(socket.AF_UNIX) as silent:
            before = daemon_descriptors(vol)
            silent.connect(path)  # and sends nothing, ever
            played = [case for case in cases(SEED, MOUNTED_CASES) if case.name != "no CONNECT"]
            for number, case in enumerate(played):
                start = len(vol.log_text())
                trio.run(play_within_30s, path, case, spare_read)
                said = wait_for(
                    lambda s=start: [
                        line for line in vol.log_text()[s:].splitlines() if "WARNING" in line and peer in line
                    ],
                    f"the log line about case {number} ({case.name})",
                )
                assert any(case.expect in line for line in said), (number, case, said)
                assert good.send_message(b"%d" % number, timeout=30) == b"echo:%d" % number
                if number % 10 == 0:
                    assert subprocess.run(["cat", str(data)], capture_output=True, timeout=30).stdout == b"still here\n"
            wait_for(lambda: f"{peer} sent no CONNECT within 5.0 s" in vol.log_text(), "the silent client's drop")
            assert silent.recv(1) == b""  # the daemon hung up on it
            wait_for(lambda: daemon_descriptors(vol) <= before, f"the daemon's {before} descriptors again")
    finally:
        os.close(spare_read)
        os.close(spare_write)
    assert data.read_bytes() == b"still here\n"


def test_connect_disconnect_cycles_leak_no_descriptor(vol: MountedVolume, wait_for: Callable[..., Any]) -> None:
    """Hundreds of accepted, refused (by the filter, or at MaxConnections 4) and abandoned connections: the
    daemon's descriptor count (/proc/PID/fd) comes back to where it was, and the port still serves."""
    path = str(ports_directory(vol) / PORT)
    before = daemon_descriptors(vol)  # may count an earlier test's client the daemon is still closing: "at most"
    for n in range(300):
        with connect_communication_port(path, b"cycle %d" % n) as port:
            if n % 30 == 0:
                assert port.send_message(b"%d" % n, timeout=30) == b"echo:%d" % n
    for _ in range(50):
        with pytest.raises(PortRefusedError):
            connect_communication_port(path, b"bad")
    with contextlib.ExitStack() as held:
        for n in range(4):
            held.enter_context(connect_communication_port(path, b"held %d" % n))
        for _ in range(50):
            with pytest.raises(PortRefusedError):
                connect_communication_port(path, b"one too many")
    for _ in range(50):  # connect and hang up before CONNECT
        with socket.socket(socket.AF_UNIX) as abandoned:
            abandoned.connect(path)
    wait_for(lambda: daemon_descriptors(vol) <= before, f"the daemon's {before} descriptors again")
    with connect_communication_port(path, b"after") as port:
        assert port.send_message(b"after", timeout=30) == b"echo:after"


def test_after_the_daemon_is_killed_the_next_daemon_creates_the_port_again(
    tmp_path: Path, wait_for: Callable[..., Any]
) -> None:
    """kill -9 of the daemon: its client gets PortDisconnectedError and its socket file stays behind, on
    which nobody listens. ``fltfuse unmount`` recovers the dead mount (and removes its ports); a stale
    socket planted where the port goes (what a crash leaves when its state file is lost, so that no
    recovery knows of it) does not stop the next daemon of the volume from creating the port."""
    port = f"PortCrash-{os.getpid()}"
    with mounted_volume(
        tmp_path, size="128M", filters=("porttest",), filter_path=FILTER_PATH, parameters=parameters(port)
    ) as crashed:
        path = ports_directory(crashed) / port
        with ClientProcess(port, "before", volume=crashed.mountpoint) as client:
            assert client.first == {"connected": client.pid}
            client.write("get")
            crashed.kill()
            outcome = client.read()
            assert outcome["error"] == "PortDisconnectedError", outcome
        assert stat.S_ISSOCK(path.lstat().st_mode)  # stale: nobody listens on it
        with pytest.raises(PortNotFoundError, match="no daemon listens"):
            connect_communication_port(str(path), b"v1")
        crashed.unmount()
        assert not path.parent.exists()
        path.parent.mkdir(mode=0o755)
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))
        again = mount(
            crashed.image,
            crashed.mountpoint,
            filters=("porttest",),
            filter_path=FILTER_PATH,
            parameters=parameters(port),
            log_file=crashed.log_path,
        )
        assert again.pid != crashed.pid
        with ClientProcess(port, "after", volume=again.mountpoint) as client:
            assert client.first == {"connected": client.pid}
            assert client.command("send again") == {"answer": "echo:again"}
        wait_for(lambda: f"porttest: disconnected pid {client.pid}" in again.log_text(), "its disconnect callback")


# -- the deadlock detector (section 3: a service deadlocking on its own opens) ---------------------------------
# porttest asks client PID before a lookup of a name ask-PID-...; a client's one thread in open(2) cannot answer.


def command_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_a_client_whose_own_lookup_would_wait_on_it_gets_edeadlk_at_once(
    vol: MountedVolume, wait_for: Callable[..., Any]
) -> None:
    with ClientProcess(PORT, "self", volume=vol.mountpoint) as client:
        start = time.monotonic()
        outcome = client.command(f"open {vol.mountpoint}/ask-{client.pid}-mine")
        assert time.monotonic() - start < 5, "refused at once, not after the filter's 60 s send timeout"
        assert outcome["error"] == "OSError" and outcome["errno"] == errno.EDEADLK, outcome
        me = f"pid {client.pid} ({command_name(client.pid)})"
        waits = f"thread {client.pid} of {me} waits in a request on port client {me}"
        wait_for(lambda: f"port {PORT}: possible deadlock, send refused: {waits}" in vol.log_text(), "the log line")
        assert client.command("send after") == {"answer": "echo:after"}  # the client and the mount serve on


def test_a_cycle_between_two_clients_is_refused_and_the_waits_before_it_complete(
    vol: MountedVolume, wait_for: Callable[..., Any]
) -> None:
    mountpoint = vol.mountpoint
    with ClientProcess(PORT, "a", volume=mountpoint) as a, ClientProcess(PORT, "b", volume=mountpoint) as b:
        # each looks up in a directory of its own: the kernel holds a directory's other lookups while one waits
        # (pyfuse3's libfuse does not ask for FUSE_PARALLEL_DIROPS), a wait the detector cannot see
        a_dir, b_dir = (Path(mountpoint) / f"lookups-of-{c.pid}" for c in (a, b))
        a_dir.mkdir()
        b_dir.mkdir()
        a.write(f"open {a_dir}/ask-{b.pid}-from-a")  # A's thread waits in the lookup on B
        message = b.command("get")["message"]
        assert message["data"] == f"lookup ask-{b.pid}-from-a", message
        start = time.monotonic()
        outcome = b.command(f"open {b_dir}/ask-{a.pid}-from-b")  # B's lookup would wait on A: a cycle
        assert time.monotonic() - start < 5
        assert outcome["error"] == "OSError" and outcome["errno"] == errno.EDEADLK, outcome
        log = vol.log_text()
        a_is, b_is = (f"pid {c.pid} ({command_name(c.pid)})" for c in (a, b))
        assert f"thread {b.pid} of {b_is} waits in a request on port client {a_is}; " in log
        assert f"thread {a.pid} of {a_is} waits in a request on port client {b_is}" in log
        assert b.command(f"reply {message['id']} go on") == {"replied": message["id"]}
        outcome = a.read()  # A's lookup went on (and found no such file)
        assert outcome["error"] == "FileNotFoundError" and outcome["errno"] == errno.ENOENT, outcome
        # A waits no more: B's lookup may wait on A now, and A answers it
        b.write(f"open {b_dir}/ask-{a.pid}-again")
        message = a.command("get")["message"]
        assert message["data"] == f"lookup ask-{a.pid}-again", message
        assert a.command(f"reply {message['id']} go on") == {"replied": message["id"]}
        outcome = b.read()
        assert outcome["error"] == "FileNotFoundError" and outcome["errno"] == errno.ENOENT, outcome


@pytest.mark.xfail(
    strict=True,
    reason="platform limit: the kernel serializes a FUSE directory's lookups (fuse_lock_inode) unless the daemon "
    "negotiates FUSE_PARALLEL_DIROPS, which pyfuse3 3.5's session does not",
)
def test_a_held_lookup_holds_no_other_lookup_in_its_directory(vol: MountedVolume) -> None:
    directory = Path(vol.mountpoint) / f"held-{os.getpid()}"
    directory.mkdir()
    with ClientProcess(PORT, "holder", volume=vol.mountpoint) as holder, ClientProcess(PORT, "asked") as asked:
        holder.write(f"open {directory}/ask-{asked.pid}-held")  # held in the filter until ASKED replies
        message = asked.command("get")["message"]
        # a name the kernel has never seen: its stat sends a LOOKUP (the waiting stat cannot be killed)
        other = subprocess.Popen(["stat", str(directory / "never-looked-up")], stdout=subprocess.DEVNULL)
        try:
            other.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        finally:
            held = other.poll() is None
            asked.command(f"reply {message['id']} go on")
            holder.read()
            other.wait(timeout=30)
        assert not held, "a lookup of another name in the directory waited for the held one"
