"""Volumes come up and go down cleanly, the way users drive them.

Each test has its own image (1G, sparse) and mount points in a fresh directory
under /var/tmp, and drives the real commands: ``fltfuse volume create``,
``fltfuse mount``, ``fltfuse unmount``, ``fusermount3``, ``umount``, ``mount -t
fuse.fltfuse``, ``fltmc`` and signals. The ``site`` fixture tears down every
mount, daemon and loop device a test made, even when it failed or left a
daemon hung.

Where a test needs the daemon's state file or log, it computes their paths
before mounting: resolving a mount point's path stats it, and a stat of a
fresh mount is itself a request to the daemon (it would warm the kernel's
attribute cache and change what is being tested).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fltfuse import _volume
from fltfuse.testing import release

Runner = Callable[..., subprocess.CompletedProcess[str]]  # the ``run`` fixture
Waiter = Callable[..., Any]  # the ``wait_for`` fixture
MountTable = Callable[[], list[tuple[str, str, str, list[str]]]]  # the ``mount_table`` fixture

BIN = Path(sys.executable).parent
FLTFUSE = str(BIN / "fltfuse")
FLTMC = str(BIN / "fltmc")
NOBODY = 65534
DAEMON_EXIT_TIMEOUT = 20


def start_time(pid: int) -> str | None:
    """When ``pid`` started (field 22 of /proc/PID/stat): tells a process from a later one with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError):
        return None


class Site:
    """One test's images and mount points, and every daemon it started; cleans up after all of them."""

    def __init__(self, root: Path, run: Runner, mount_table: MountTable, wait_for: Waiter):
        self.root = root
        self.run = run
        self.mount_table = mount_table
        self.wait_for = wait_for
        self.images: list[Path] = []
        self.mountpoints: list[Path] = []
        self.states: dict[int, dict[str, Any]] = {}  # daemon pid -> what it recorded
        self.start_times: dict[int, str | None] = {}  # daemon pid -> when it started
        self.stopped: list[dict[str, Any]] = []  # daemons the test asked to stop by a signal

    # -- setting up ---------------------------------------------------------------

    def image(self, name: str = "volume.img", size: str = "1G") -> Path:
        path = self.root / name
        self.images.append(path)
        self.run(FLTFUSE, "volume", "create", path, "--size", size)
        return path

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.root / name
        path.mkdir()
        self.mountpoints.append(path)
        return path

    @staticmethod
    def state_file(mountpoint: Path) -> Path:
        """Where the daemon records the volume (compute it before mounting: it resolves the path)."""
        return _volume.state_root() / f"{_volume.volume_id(str(mountpoint))}.json"

    @staticmethod
    def log_file(mountpoint: Path) -> Path:
        return _volume.state_root() / f"{_volume.volume_id(str(mountpoint))}.log"

    def try_mount(self, source: Path, mountpoint: Path, *options: str) -> subprocess.CompletedProcess[str]:
        """``fltfuse mount`` as a user types it; the caller checks the outcome."""
        state_file = self.state_file(mountpoint)
        done = self.run(FLTFUSE, "mount", *(f"-o{o}" for o in options), source, mountpoint, check=False)
        self.note_daemon(state_file)
        return done

    def mount(self, source: Path, mountpoint: Path, *options: str) -> dict[str, Any]:
        """``fltfuse mount`` that must succeed; the daemon's state record."""
        state_file = self.state_file(mountpoint)
        done = self.try_mount(source, mountpoint, *options)
        assert done.returncode == 0, done.stderr
        state = self.note_daemon(state_file)
        assert state is not None, f"no state file {state_file} after mounting"
        return state

    def note_daemon(self, state_file: Path) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(state_file.read_text())
        except FileNotFoundError:
            return None
        self.states[state["pid"]] = state
        self.start_times.setdefault(state["pid"], start_time(state["pid"]))
        return state

    def daemon_alive(self, state: dict[str, Any]) -> bool:
        """True while any thread of the daemon runs.

        Not its cmdline: that empties when the dying process drops its memory,
        long before its files (/dev/fuse among them) are closed; and the leader
        turns zombie before the other threads are gone.
        """
        pid = state["pid"]
        if start_time(pid) != self.start_times.get(pid):
            return False  # gone, or the pid now belongs to another process
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return False
        for task in tasks:
            try:
                task_state = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if task_state not in ("Z", "X"):
                return True
        return False

    def signal(self, state: dict[str, Any], sig: signal.Signals) -> None:
        self.stopped.append(state)
        os.kill(state["pid"], sig)

    # -- checking ------------------------------------------------------------------

    def fuse_mounts_at(self, mountpoint: Path) -> list[tuple[str, str, str, list[str]]]:
        return [m for m in self.mount_table() if m[1] == str(mountpoint)]

    def attached(self, image: Path) -> list[str]:
        return self.run("losetup", "-j", image).stdout.splitlines()

    def assert_released(self, state: dict[str, Any], image: Path | None) -> None:
        """Nothing of the volume is left: daemon, FUSE mount, backing mount, loop device, state file."""
        pid = state["pid"]
        self.wait_for(lambda: not self.daemon_alive(state), f"daemon {pid} to exit", timeout=DAEMON_EXIT_TIMEOUT)
        table = self.mount_table()
        assert [m for m in table if m[1] == state["mountpoint"]] == []
        if state["kind"] != "directory":
            assert [m for m in table if m[1] == state["backing"]] == []
            assert not os.path.lexists(state["backing"])
            assert not os.path.lexists(os.path.dirname(state["backing"]))
        if state["loop_device"]:
            assert [m for m in table if m[0] == state["loop_device"]] == []
        if image is not None:
            assert self.attached(image) == []
        assert not self.state_file(Path(state["mountpoint"])).exists()

    # -- tearing down ----------------------------------------------------------------

    def clean_up(self, remove_logs: bool) -> None:
        problems = []
        for state in self.stopped:
            if self.daemon_alive(state):  # told to stop and did not: it will not answer an unmount either
                os.kill(state["pid"], signal.SIGKILL)
        for mountpoint in reversed(self.mountpoints):
            if self.fuse_mounts_at(mountpoint):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    subprocess.run([FLTFUSE, "unmount", str(mountpoint)], capture_output=True, timeout=30)
        for pid, state in self.states.items():
            if self.daemon_alive(state):
                problems.append(f"daemon {pid} still ran at teardown; killed it")
                os.kill(pid, signal.SIGKILL)
            try:
                self.wait_for(lambda state=state: not self.daemon_alive(state), f"daemon {pid} to die", timeout=10)
            except pytest.fail.Exception as exc:
                problems.append(str(exc))
        for mountpoint in self.mountpoints:
            try:
                release(str(mountpoint))
            except Exception as exc:
                problems.append(f"releasing {mountpoint}: {exc}")
        for state in self.states.values():
            problems += self._force_release(state)
        for image in self.images:
            for line in self.attached(image):
                device = line.split(":")[0]
                problems.append(f"{image} was still attached to {device}")
                subprocess.run(["losetup", "-d", device], capture_output=True)
        if remove_logs:
            for mountpoint in self.mountpoints:
                self.log_file(mountpoint).unlink(missing_ok=True)
        assert not problems, "; ".join(problems)

    def _force_release(self, state: dict[str, Any]) -> list[str]:
        """Undo what fltfuse itself left of a volume (and say what that was)."""
        problems = []
        backing = state["backing"]
        if state["kind"] != "directory":
            if any(m[1] == backing for m in self.mount_table()):
                problems.append(f"the backing ext4 was still mounted at {backing}")
                if subprocess.run(["umount", backing], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", backing], capture_output=True)
            for directory in (backing, os.path.dirname(backing)):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
        state_file = _volume.state_root() / f"{state['id']}.json"
        if state_file.exists():
            problems.append(f"the state file {state_file} was left")
            state_file.unlink()
        return problems


@pytest.fixture
def site(
    scratch: Path, run: Runner, mount_table: MountTable, wait_for: Waiter, request: pytest.FixtureRequest
) -> Iterator[Site]:
    s = Site(scratch, run, mount_table, wait_for)
    yield s
    report = getattr(request.node, "rep_call", None)
    s.clean_up(remove_logs=report is not None and report.passed)


@contextlib.contextmanager
def image_mounted_read_only(site: Site, image: Path) -> Iterator[Path]:
    """The image's ext4 mounted directly (``mount -o loop,ro``), for the duration of the block."""
    target = Path(tempfile.mkdtemp(prefix="direct-", dir=site.root))
    site.run("mount", "-o", "loop,ro", image, target)
    try:
        yield target
    finally:
        site.run("umount", target)
        site.wait_for(lambda: site.attached(image) == [], f"{image}'s loop device to be detached", timeout=10)
        target.rmdir()


def assert_no_errors_logged(log: Path) -> None:
    bad = [line for line in log.read_text().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


# -- trees written through a mount, compared with what lands on the image --------------------------------


def write_sample_tree(root: Path, *, durable: bool = False) -> None:
    """Files of many sizes, modes and owners, sparse files, symlinks, a hard link, xattrs.

    ``durable``: fsync every file and directory, as an application that needs
    its data to survive a crash does.
    """
    rng = random.Random(7)
    (root / "dir" / "nested" / "deeper").mkdir(parents=True)
    (root / "setgid").mkdir(mode=0o755)
    (root / "setgid").chmod(0o2775)
    files: dict[str, bytes] = {
        "empty": b"",
        "one": b"1",
        "dir/page-minus-one": rng.randbytes(4095),
        "dir/page": rng.randbytes(4096),
        "dir/page-plus-one": rng.randbytes(4097),
        "dir/nested/megabyte-plus": rng.randbytes(1024 * 1024 + 3),
        "dir/nested/deeper/text": b"line\n" * 1000,
        "setgid/child": b"inherits the group",
    }
    for name, data in files.items():
        with open(root / name, "wb") as f:
            f.write(data)
            if durable:
                os.fsync(f.fileno())
    with open(root / "sparse", "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(32 * 1024 * 1024)
        f.write(b"in the middle of nowhere")
        if durable:
            os.fsync(f.fileno())
    for name, mode in (("one", 0o600), ("dir/page", 0o755), ("dir/page-plus-one", 0o640), ("empty", 0o4755)):
        os.chmod(root / name, mode)
    os.chown(root / "dir" / "page-minus-one", NOBODY, NOBODY)
    os.symlink("dir/nested/deeper/text", root / "relative-link")
    os.symlink("/etc/hostname", root / "absolute-link")
    os.symlink("nowhere", root / "dir" / "dangling")
    os.link(root / "dir" / "page", root / "hard-link")
    os.setxattr(root / "one", "user.note", b"kept")
    os.utime(root / "dir" / "nested" / "deeper" / "text", ns=(1_234_567_890_123_456_789, 1_234_567_890_123_456_789))
    if durable:
        for dirpath, _, _ in os.walk(root):
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a user can see of every entry below ``root`` (but atime), lost+found aside."""
    out: dict[str, tuple[object, ...]] = {}
    first_name: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != "lost+found"]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = hashlib.file_digest(f, "sha256").hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
            same_as = first_name.setdefault(st.st_ino, rel)
            out[rel] = (
                stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns,
                content, xattrs, same_as,
            )  # fmt: skip
    return out


# -- mounting ------------------------------------------------------------------------------------------


def test_mount_shows_a_fuse_mount_over_ext4_on_a_loop_device(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    assert state["kind"] == "image" and site.daemon_alive(state)
    [(source, _, fstype, options)] = site.fuse_mounts_at(mnt)
    assert (source, fstype) == (str(image), "fuse.fltfuse")
    assert {"rw", "default_permissions", "allow_other"} <= set(options)
    device = state["loop_device"]
    assert device and device.startswith("/dev/loop")
    assert [(m[0], m[2]) for m in site.mount_table() if m[1] == state["backing"]] == [(device, "ext4")]
    assert site.run("losetup", "-n", "-O", "BACK-FILE", device).stdout.strip() == str(image)
    attached = site.attached(image)
    assert len(attached) == 1 and attached[0].startswith(f"{device}:")
    # The mount serves the backing ext4.
    (mnt / "hello").write_text("hello\n")
    assert Path(state["backing"], "hello").read_text() == "hello\n"
    a, b = os.statvfs(mnt), os.statvfs(state["backing"])
    assert (a.f_bsize, a.f_blocks, a.f_files, a.f_namemax) == (b.f_bsize, b.f_blocks, b.f_files, b.f_namemax)
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    assert_no_errors_logged(site.log_file(mnt))


def _stop(site: Site, how: str, state: dict[str, Any], mnt: Path) -> None:
    if how == "fltfuse unmount":
        site.run(FLTFUSE, "unmount", mnt)
    elif how == "fusermount3 -u":
        site.run("fusermount3", "-u", mnt)
    elif how == "umount":
        site.run("umount", mnt)
    else:
        site.signal(state, signal.Signals[how])


STOPS = ["fltfuse unmount", "fusermount3 -u", "umount", "SIGTERM", "SIGINT"]


@pytest.mark.parametrize("how", STOPS)
def test_stopping_an_idle_volume_leaves_nothing(site: Site, how: str) -> None:
    """Stopped right after mounting, before anything used the mount (as a service manager might)."""
    image, mnt = site.image(), site.mountpoint()
    log = site.log_file(mnt)
    state = site.mount(image, mnt)
    _stop(site, how, state, mnt)
    site.assert_released(state, image)
    assert_no_errors_logged(log)


@pytest.mark.parametrize("how", STOPS)
def test_stopping_a_used_volume_leaves_nothing_and_keeps_the_data(site: Site, how: str) -> None:
    image, mnt = site.image(), site.mountpoint()
    log = site.log_file(mnt)
    state = site.mount(image, mnt)
    write_sample_tree(mnt)
    written = manifest(mnt)
    _stop(site, how, state, mnt)
    site.assert_released(state, image)
    assert_no_errors_logged(log)
    with image_mounted_read_only(site, image) as direct:
        assert manifest(direct) == written


def test_unmount_of_a_busy_volume_fails_and_lazy_unmount_finishes_at_the_last_close(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    log = site.log_file(mnt)
    state = site.mount(image, mnt)
    (mnt / "open").write_text("still readable")
    with open(mnt / "open") as held:
        busy = site.run(FLTFUSE, "unmount", mnt, check=False)
        assert busy.returncode != 0 and "busy" in busy.stderr
        assert len(site.fuse_mounts_at(mnt)) == 1
        assert (mnt / "open").read_text() == "still readable"
        site.run(FLTFUSE, "unmount", "-l", mnt)
        assert site.fuse_mounts_at(mnt) == []  # detached at once ...
        assert site.daemon_alive(state)  # ... but served until the last file closes
        assert held.read() == "still readable"
    site.assert_released(state, image)
    assert_no_errors_logged(log)
    with image_mounted_read_only(site, image) as direct:
        assert (direct / "open").read_text() == "still readable"


def test_after_kill_9_unmount_cleans_up_and_fsynced_data_is_on_the_image(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    write_sample_tree(mnt, durable=True)
    written = manifest(mnt)
    site.signal(state, signal.SIGKILL)
    site.wait_for(lambda: not site.daemon_alive(state), "the killed daemon to go")
    # Anything that needs the daemon (a cached attribute may still be served without it).
    for access in (os.listdir, lambda p: open(p / "one", "rb"), lambda p: os.stat(p / "never-looked-up")):
        with pytest.raises(OSError) as info:
            access(mnt)
        assert info.value.errno == errno.ENOTCONN
    ls = site.run("ls", mnt, check=False)
    assert ls.returncode != 0 and "Transport endpoint is not connected" in ls.stderr
    assert len(site.fuse_mounts_at(mnt)) == 1  # the dead mount stays until someone cleans up
    row = next(line for line in site.run(FLTMC, "volumes").stdout.splitlines() if line.startswith(f"{mnt} "))
    assert row.split()[-2:] == [str(state["pid"]), "(dead)"]
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    with image_mounted_read_only(site, image) as direct:
        assert manifest(direct) == written


def test_after_clean_unmount_the_image_holds_exactly_what_was_written(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    write_sample_tree(mnt)
    # Some churn first: renames, deletes, truncation, overwrites in place.
    os.rename(mnt / "dir" / "page-minus-one", mnt / "renamed")
    (mnt / "dir" / "nested" / "megabyte-plus").unlink()
    os.truncate(mnt / "dir" / "page-plus-one", 100)
    with open(mnt / "dir" / "nested" / "deeper" / "text", "r+b") as f:
        f.seek(2000)
        f.write(b"OVERWRITTEN")
    written = manifest(mnt)
    assert len(written) >= 15
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    with image_mounted_read_only(site, image) as direct:
        assert manifest(direct) == written


# -- refusing to mount twice --------------------------------------------------------------------------


def _assert_still_serves(site: Site, state: dict[str, Any], image: Path, mnt: Path) -> None:
    assert site.daemon_alive(state)
    [(source, _, fstype, _)] = site.fuse_mounts_at(mnt)
    assert (source, fstype) == (str(image), "fuse.fltfuse")
    (mnt / "still-works").write_text("yes")
    assert (mnt / "still-works").read_text() == "yes"
    assert Path(state["backing"], "still-works").read_text() == "yes"
    assert json.loads(site.state_file(mnt).read_text()) == state


def test_mounting_at_a_busy_fltfuse_mountpoint_fails_clearly(site: Site) -> None:
    first, second, mnt = site.image("first.img"), site.image("second.img"), site.mountpoint()
    state = site.mount(first, mnt)
    done = site.try_mount(second, mnt)
    assert done.returncode != 0
    assert f"{mnt} is already served by fltfuse daemon {state['pid']}" in done.stderr
    _assert_still_serves(site, state, first, mnt)
    assert site.attached(second) == []
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, first)


def test_mounting_over_another_file_system_fails_clearly(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    site.run("mount", "-t", "tmpfs", "-o", "size=1m", "busy", mnt)
    try:
        done = site.try_mount(image, mnt)
        assert done.returncode != 0
        assert f"something is already mounted at {mnt}" in done.stderr
        assert [(m[0], m[2]) for m in site.fuse_mounts_at(mnt)] == [("busy", "tmpfs")]
        (mnt / "tmpfs-file").write_text("tmpfs still works")
        assert site.attached(image) == []
        assert not site.state_file(mnt).exists()
    finally:
        site.run("umount", mnt)


def test_mounting_the_same_image_twice_fails_clearly(site: Site) -> None:
    image, first, second = site.image(), site.mountpoint("first"), site.mountpoint("second")
    state = site.mount(image, first)
    done = site.try_mount(image, second)
    assert done.returncode != 0
    assert f"{image} is already attached" in done.stderr
    assert site.fuse_mounts_at(second) == []
    assert not site.state_file(second).exists()
    assert len(site.attached(image)) == 1
    _assert_still_serves(site, state, image, first)
    site.run(FLTFUSE, "unmount", first)
    site.assert_released(state, image)


# -- options and other ways in -------------------------------------------------------------------------


def _write_attempts(mnt: Path) -> dict[str, Callable[[], object]]:
    return {
        "open for writing": lambda: open(mnt / "f", "r+b"),
        "create": lambda: open(mnt / "new", "wb"),
        "mkdir": lambda: os.mkdir(mnt / "newdir"),
        "unlink": lambda: os.unlink(mnt / "f"),
        "rmdir": lambda: os.rmdir(mnt / "d"),
        "rename": lambda: os.rename(mnt / "f", mnt / "g"),
        "symlink": lambda: os.symlink("f", mnt / "s"),
        "link": lambda: os.link(mnt / "f", mnt / "h"),
        "chmod": lambda: os.chmod(mnt / "f", 0o600),
        "chown": lambda: os.chown(mnt / "f", NOBODY, NOBODY),
        "utime": lambda: os.utime(mnt / "f", (1, 1)),
        "truncate": lambda: os.truncate(mnt / "f", 0),
        "setxattr": lambda: os.setxattr(mnt / "f", "user.x", b"1"),
        "mknod fifo": lambda: os.mkfifo(mnt / "fifo"),
    }


def test_read_only_mount_refuses_writes_with_erofs(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    (mnt / "f").write_text("original")
    (mnt / "d").mkdir()
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    image_mtime = image.stat().st_mtime_ns

    state = site.mount(image, mnt, "ro")
    [(_, _, _, options)] = site.fuse_mounts_at(mnt)
    assert "ro" in options
    assert "ro" in next(m[3] for m in site.mount_table() if m[1] == state["backing"])
    assert site.run("losetup", "-n", "-O", "RO", state["loop_device"]).stdout.strip() == "1"
    assert (mnt / "f").read_text() == "original"
    outcomes = {}
    for what, attempt in _write_attempts(mnt).items():
        try:
            result = attempt()
            if hasattr(result, "close"):
                result.close()
            outcomes[what] = "succeeded"
        except OSError as exc:
            outcomes[what] = errno.errorcode[exc.errno or 0]
    assert outcomes == dict.fromkeys(outcomes, "EROFS")
    assert (mnt / "f").read_text() == "original"
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    assert image.stat().st_mtime_ns == image_mtime


def test_mount_t_fuse_fltfuse(site: Site) -> None:
    # mount(8) hands fuse.TYPE to fuse3's mount.fuse3, which runs TYPE from PATH;
    # scripts/install.sh links the venv's fltfuse into /usr/local/bin.
    found = shutil.which("fltfuse")
    assert found is not None and Path(found).resolve() == (BIN / "fltfuse").resolve()
    image, mnt = site.image(), site.mountpoint()
    state_file = site.state_file(mnt)
    site.run("mount", "-t", "fuse.fltfuse", image, mnt)
    state = site.note_daemon(state_file)
    assert state is not None
    [(source, _, fstype, _)] = site.fuse_mounts_at(mnt)
    assert (source, fstype) == (str(image), "fuse.fltfuse")
    (mnt / "via-mount").write_text("mount(8) works")
    assert Path(state["backing"], "via-mount").read_text() == "mount(8) works"
    site.run("umount", mnt)
    site.assert_released(state, image)


def test_an_fstab_line_mounts_with_mount_t_and_its_options(site: Site) -> None:
    """An /etc/fstab line works as documented (here in an alternative fstab: mount -T)."""
    image, mnt = site.image(), site.mountpoint()
    fstab = site.root / "fstab"
    fstab.write_text(f"{image}  {mnt}  fuse.fltfuse  defaults,nofail,noatime  0  0\n")
    state_file = site.state_file(mnt)
    site.run("mount", "-T", fstab, mnt)
    state = site.note_daemon(state_file)
    assert state is not None
    [(source, _, fstype, options)] = site.fuse_mounts_at(mnt)
    assert (source, fstype) == (str(image), "fuse.fltfuse")
    assert "noatime" in options and "nofail" not in options
    backing = [m for m in site.mount_table() if m[1] == state["backing"]]
    assert backing and "noatime" in backing[0][3], "atime options also apply to the backing ext4"
    (mnt / "from-fstab").write_text("fstab works")
    site.run("umount", mnt)
    site.assert_released(state, image)


def test_a_block_device_source_is_mounted_and_left_attached(site: Site) -> None:
    """A block device (here a loop device the test attached) is served; only what fltfuse attached is detached."""
    image, mnt = site.image(), site.mountpoint()
    device = site.run("losetup", "--find", "--show", image).stdout.strip()
    try:
        state = site.mount(Path(device), mnt)
        assert (state["kind"], state["loop_device"]) == ("block", None)
        (mnt / "on-the-device").write_bytes(b"block source")
        site.run(FLTFUSE, "unmount", mnt)
        site.wait_for(lambda: not site.daemon_alive(state), "the daemon to exit", timeout=DAEMON_EXIT_TIMEOUT)
        assert site.attached(image), "fltfuse must not detach a device it did not attach"
        assert [m for m in site.mount_table() if m[1] in (str(mnt), state["backing"])] == []
    finally:
        site.run("losetup", "-d", device, check=False)
    with tempfile.TemporaryDirectory(dir=site.root) as check:
        site.run("mount", "-o", "loop,ro", image, check)
        try:
            assert Path(check, "on-the-device").read_bytes() == b"block source"
        finally:
            site.run("umount", check)


def test_directory_fallback(site: Site) -> None:
    source, mnt = site.root / "plain", site.mountpoint()
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "existing").write_text("was here")
    log = site.log_file(mnt)
    state = site.mount(source, mnt)
    assert (state["kind"], state["loop_device"], state["backing"]) == ("directory", None, str(source))
    [(fsname, _, fstype, _)] = site.fuse_mounts_at(mnt)
    assert (fsname, fstype) == (str(source), "fuse.fltfuse")
    fallback_lines = [line for line in log.read_text().splitlines() if "fallback" in line]
    assert len(fallback_lines) == 1 and str(source) in fallback_lines[0]
    assert (mnt / "sub" / "existing").read_text() == "was here"
    (mnt / "sub" / "new").write_text("through the mount")
    assert (source / "sub" / "new").read_text() == "through the mount"
    row = next(line for line in site.run(FLTMC, "volumes").stdout.splitlines() if line.startswith(f"{mnt} "))
    assert "directory (fallback)" in row and row.split()[-1] == str(state["pid"])
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, None)
    assert sorted(p.name for p in (source / "sub").iterdir()) == ["existing", "new"]
    assert_no_errors_logged(log)


def test_fltmc_volumes_lists_the_mount(site: Site) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    lines = site.run(FLTMC, "volumes").stdout.splitlines()
    assert lines[0].split() == ["Dos", "Name", "Volume", "Name", "FileSystem", "Daemon"]
    rows = [line.split() for line in lines[2:]]
    assert [str(mnt), state["loop_device"], "ext4", str(state["pid"])] in rows
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
    assert str(mnt) not in site.run(FLTMC, "volumes").stdout


# -- other users ---------------------------------------------------------------------------------------


def _prepare_permissions(root: Path, run: Runner) -> None:
    """The same files on both sides: modes, owners and one ACL."""
    root.mkdir()
    (root / "public").write_text("for everyone")
    (root / "private").write_text("root only")
    (root / "private").chmod(0o600)
    (root / "private-dir").mkdir(mode=0o700)
    (root / "private-dir" / "inner").write_text("hidden")
    (root / "group-readable").write_text("group")
    os.chown(root / "group-readable", 0, NOBODY)
    (root / "group-readable").chmod(0o640)
    (root / "acl-granted").write_text("granted by an ACL")
    (root / "acl-granted").chmod(0o600)
    run("setfacl", "-m", f"u:{NOBODY}:r", root / "acl-granted")
    (root / "world-writable").write_text("")
    (root / "world-writable").chmod(0o666)
    (root / "owned-by-nobody").write_text("mine")
    os.chown(root / "owned-by-nobody", NOBODY, NOBODY)


_PERMISSION_PROBES: dict[str, Callable[[Path], object]] = {
    "read public": lambda r: (r / "public").read_text(),
    "read private": lambda r: (r / "private").read_text(),
    "access private": lambda r: os.access(r / "private", os.R_OK),
    "access acl-granted": lambda r: os.access(r / "acl-granted", os.R_OK),
    "list private-dir": lambda r: os.listdir(r / "private-dir"),
    "stat private-dir/inner": lambda r: os.stat(r / "private-dir" / "inner"),
    "read group-readable": lambda r: (r / "group-readable").read_text(),
    "read acl-granted": lambda r: (r / "acl-granted").read_text(),
    "write acl-granted": lambda r: open(r / "acl-granted", "a").close(),
    "write world-writable": lambda r: (r / "world-writable").write_text("nobody was here"),
    "write public": lambda r: open(r / "public", "a").close(),
    "create in root's directory": lambda r: open(r / "new", "w").close(),
    "unlink public": lambda r: os.unlink(r / "public"),
    "chmod public": lambda r: os.chmod(r / "public", 0o777),
    "chmod owned-by-nobody": lambda r: os.chmod(r / "owned-by-nobody", 0o600),
    "setxattr public": lambda r: os.setxattr(r / "public", "user.x", b"1"),
}


def _probe_as_nobody(root: Path) -> dict[str, str]:
    """Each probe's outcome for uid/gid 65534 without supplementary groups: "ok", "refused" or the errno name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, probe, report, and never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            results = {}
            for name, probe in _PERMISSION_PROBES.items():
                try:
                    results[name] = "refused" if probe(root) is False else "ok"
                except OSError as exc:
                    results[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            os.write(write_end, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else {"child": "failed"}


def test_allow_other_users_get_ext4_permissions(site: Site, run: Runner) -> None:
    image, mnt = site.image(), site.mountpoint()
    state = site.mount(image, mnt)
    _prepare_permissions(mnt / "m", run)
    # The reference: the same files on an ext4 other users can reach (the backing mount is private to root).
    reference = site.root / "on-ext4"
    assert run("stat", "-f", "-c", "%T", site.root).stdout.strip() == "ext2/ext3"
    _prepare_permissions(reference, run)
    through_mount = _probe_as_nobody(mnt / "m")
    on_ext4 = _probe_as_nobody(reference)
    assert through_mount["read public"] == "ok"
    assert through_mount["read private"] == "EACCES"
    assert through_mount["read acl-granted"] == "ok"
    assert through_mount == on_ext4
    # setpriv, as a user would switch: the same answers.
    ok = run("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", mnt / "m" / "public")
    assert ok.stdout == "for everyone"
    denied = run(
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", mnt / "m" / "private", check=False
    )
    assert denied.returncode == 1 and "Permission denied" in denied.stderr
    site.run(FLTFUSE, "unmount", mnt)
    site.assert_released(state, image)
