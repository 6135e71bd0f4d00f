"""Volumes: an ext4 image on a loop device (or a block device, or a directory) behind one mount.

Where it sits: below the backend. A volume brings up the backing directory the
passthrough backend serves (attach the image to a free loop device, mount its
ext4 at a private directory under the state root), records what it did in a
state file, and tears it all down in order: FUSE mount, backing mount, loop
device. ``recover`` does the same teardown for a daemon that died (kill -9),
from the state file alone.

Windows counterpart: the volume a filter instance attaches to (``FLT_VOLUME``),
and the mount manager that brings it up.

A plain directory as the source is the fallback for machines without loop
devices: it is served as it is, and the daemon logs that it is a fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("fltfuse.volume")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)


class VolumeError(Exception):
    """A volume could not be created, brought up or torn down; the message says why."""


def parse_size(text: str) -> int:
    """``"512M"``, ``"4G"``, ``"1.5GiB"`` or a byte count, in bytes (powers of 1024)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise VolumeError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    factor = 1024 ** " KMGTP".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * factor)


def state_root() -> Path:
    """Where daemons keep their state files and backing mounts: /run/fltfuse as root."""
    if os.geteuid() == 0:
        return Path("/run/fltfuse")
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"fltfuse-{os.geteuid()}"


def make_private_dir(path: Path, mode: int = 0o755) -> None:
    """Create ``path`` (and its parents) owned by us with exactly ``mode``, whatever the umask."""
    path.mkdir(parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise VolumeError(f"{path} is not a directory owned by uid {os.geteuid()}")
    os.chmod(path, mode)


def resolve_mountpoint(path: str) -> str:
    """The absolute, symlink-free path of a mount point, without touching the mount point itself.

    Resolving the last component would stat it: on a live FUSE mount that is a
    request to the daemon, which may be the caller, or wedged.
    """
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def volume_id(mountpoint: str) -> str:
    """A stable, readable id for the volume mounted at ``mountpoint``."""
    real = resolve_mountpoint(mountpoint)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", real).strip("-")[-40:] or "root"
    return f"{slug}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"


# mount(8) runs helpers with no PATH; losetup, mkfs.ext4 and umount live in the sbin directories.
_TOOL_ENV = {**os.environ, "PATH": os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin:/usr/bin:/sbin:/bin"])}


def _tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a system tool, capturing its output."""
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=_TOOL_ENV)


def _run(argv: list[str], what: str) -> str:
    try:
        done = _tool(argv)
    except FileNotFoundError as exc:
        raise VolumeError(f"{what}: {argv[0]} is not installed") from exc
    if done.returncode != 0:
        raise VolumeError(f"{what}: {' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def create_image(path: str, size: int, *, force: bool = False, inodes: int | None = None) -> None:
    """Make a sparse file of ``size`` bytes holding an empty ext4 file system."""
    if os.path.exists(path) and not force:
        raise VolumeError(f"{path} exists (use --force to overwrite it)")
    if size < 8 * 1024 * 1024:
        raise VolumeError(f"{size} bytes is too small for an ext4 volume (at least 8M)")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    argv = ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"]
    if inodes:
        argv += ["-N", str(inodes)]
    _run([*argv, path], f"formatting {path}")


def mounts() -> list[tuple[str, str, str, str]]:
    """(source, mountpoint, fstype, options) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            src, mnt, fstype, opts = line.split()[:4]
            out.append((_unescape(src), _unescape(mnt), fstype, opts))
    return out


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def is_mounted(path: str) -> bool:
    real = resolve_mountpoint(path)
    return any(mnt == real for _, mnt, _, _ in mounts())


@dataclass(frozen=True)
class VolumeProperties:
    """What an instance learns of its volume (FLT_VOLUME_PROPERTIES): one fltfuse mount."""

    filesystem_type: str  # "ext4", or the backing directory's file system type
    device: str | None  # the loop or block device, None for a directory
    mount_point: str
    backing: str


@dataclass
class VolumeState:
    """What a daemon set up for one volume: enough to tear it down after a crash."""

    id: str
    source: str
    kind: str  # "image", "block" or "directory"
    mountpoint: str
    backing: str
    loop_device: str | None
    backing_mounted: bool
    pid: int
    log: str | None
    read_only: bool

    @property
    def path(self) -> Path:
        return state_root() / f"{self.id}.json"

    @property
    def control_path(self) -> Path:
        """The daemon's control socket (what fltmc talks to)."""
        return state_root() / f"{self.id}.sock"

    @property
    def ports_path(self) -> Path:
        """The directory where the volume's filters' communication ports listen."""
        return state_root() / f"{self.id}.ports"

    def save(self) -> None:
        """Write the state atomically, readable and writable by its owner only.

        Root acts on it later (umount, losetup -d), so nobody else may change it,
        whatever the umask of the process that writes it.
        """
        make_private_dir(self.path.parent)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.write(json.dumps(asdict(self), indent=2))
        tmp.replace(self.path)

    @classmethod
    def load(cls, mountpoint: str) -> VolumeState | None:
        path = state_root() / f"{volume_id(mountpoint)}.json"
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise VolumeError(f"state file {path} is damaged: {exc}") from exc

    @classmethod
    def all(cls) -> list[VolumeState]:
        out = []
        root = state_root()
        if root.is_dir():
            for path in sorted(root.glob("*.json")):
                with contextlib.suppress(ValueError, TypeError, OSError):
                    out.append(cls(**json.loads(path.read_text())))
        return out

    def daemon_alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A recycled pid is not our daemon: check it still serves this mountpoint.
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"fltfuse" in cmdline


class Volume:
    """Brings up the backing directory for one mount and tears it down again."""

    def __init__(self, source: str, mountpoint: str, *, read_only: bool = False, backing_options: tuple[str, ...] = ()):
        self.source = os.path.realpath(source)
        self.mountpoint = resolve_mountpoint(mountpoint)
        self.read_only = read_only
        self.backing_options = backing_options
        self.id = volume_id(self.mountpoint)
        self.state: VolumeState | None = None
        if not os.path.exists(self.source):
            raise VolumeError(f"source {source} does not exist")
        mode = os.stat(self.source).st_mode
        if stat.S_ISDIR(mode):
            self.kind = "directory"
        elif stat.S_ISBLK(mode):
            self.kind = "block"
        elif stat.S_ISREG(mode):
            self.kind = "image"
        else:
            raise VolumeError(f"source {source} is neither an image file, a block device nor a directory")

    def bring_up(self, log_path: str | None) -> str:
        """Attach and mount the backing file system; return the backing directory."""
        if not os.path.isdir(self.mountpoint):
            raise VolumeError(f"mountpoint {self.mountpoint} is not a directory")
        old = VolumeState.load(self.mountpoint)
        if old is not None:
            if old.daemon_alive():
                raise VolumeError(f"{self.mountpoint} is already served by fltfuse daemon {old.pid}")
            log.warning("a previous daemon (pid %d) for %s died; cleaning up after it", old.pid, self.mountpoint)
            recover(old)
        if is_mounted(self.mountpoint):
            raise VolumeError(f"something is already mounted at {self.mountpoint}")
        state = VolumeState(
            self.id,
            self.source,
            self.kind,
            self.mountpoint,
            self.source,
            None,
            False,
            os.getpid(),
            log_path,
            self.read_only,
        )
        self.state = state
        if self.kind == "directory":
            log.warning(
                "serving the plain directory %s: this is the fallback backend (no loop device or ext4 image)",
                self.source,
            )
            state.save()
            return self.source
        if os.geteuid() != 0:
            raise VolumeError(f"mounting the {self.kind} {self.source} needs root (a directory source does not)")
        device = self.source
        if self.kind == "image":
            users = _run(["losetup", "-j", self.source], "checking loop devices").strip()
            if users:
                raise VolumeError(
                    f"{self.source} is already attached ({users.splitlines()[0]}); is it mounted elsewhere?"
                )
            argv = ["losetup", "--find", "--show", "--direct-io=on"]
            if self.read_only:
                argv.append("--read-only")
            device = _run([*argv, self.source], f"attaching {self.source} to a loop device").strip()
            state.loop_device = device
            state.save()
        make_private_dir(state_root() / self.id, 0o700)  # the backing mount is not for other users
        backing = str(state_root() / self.id / "backing")
        os.makedirs(backing, exist_ok=True)
        state.backing = backing
        state.save()
        opts = ",".join(["ro" if self.read_only else "rw", *self.backing_options])
        try:
            _run(["mount", "-t", "ext4", "-o", opts, device, backing], f"mounting {device}")
        except VolumeError:
            self.tear_down()
            raise
        state.backing_mounted = True
        state.save()
        log.info("backing ext4 %s (%s) mounted at %s", device, self.source, backing)
        return backing

    def properties(self, backing: str) -> VolumeProperties:
        """What filter instances are told of this volume when they attach."""
        fstype = "ext4" if self.kind != "directory" else _filesystem_of(backing)
        device = (self.state.loop_device if self.state else None) or (self.source if self.kind == "block" else None)
        return VolumeProperties(fstype, device, self.mountpoint, backing)

    def tear_down(self) -> None:
        """Unmount the backing file system, detach the loop device, remove the state."""
        if self.state is not None:
            _release(self.state)
            self.state = None


def _filesystem_of(path: str) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    for _, mnt, kind, _ in mounts():
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, fstype = mnt, kind
    return fstype


def _release(state: VolumeState) -> None:
    errors = []
    if state.backing_mounted:
        for attempt in range(50):
            done = _tool(["umount", state.backing])
            if done.returncode == 0 or not is_mounted(state.backing):
                state.backing_mounted = False
                break
            if "busy" not in done.stderr or attempt == 49:
                errors.append(f"umount {state.backing}: {done.stderr.strip()}")
                break
            time.sleep(0.1)
    if state.loop_device and not state.backing_mounted:
        done = _tool(["losetup", "-d", state.loop_device])
        if done.returncode != 0 and "No such device" not in done.stderr:
            errors.append(f"losetup -d {state.loop_device}: {done.stderr.strip()}")
        else:
            state.loop_device = None
    if state.kind != "directory" and not state.backing_mounted:
        with contextlib.suppress(OSError):
            os.rmdir(state.backing)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(state.backing))
    if errors:
        state.save()
        raise VolumeError("; ".join(errors))
    with contextlib.suppress(FileNotFoundError):
        state.control_path.unlink()
    shutil.rmtree(state.ports_path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state.path.unlink()


def detach_fuse(mountpoint: str, *, lazy: bool) -> None:
    """Unmount the FUSE mount at ``mountpoint`` (lazily for a dead daemon's)."""
    if not is_mounted(mountpoint):
        return
    if shutil.which("fusermount3", path=_TOOL_ENV["PATH"]):
        argv = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    else:
        argv = ["umount", "-l", mountpoint] if lazy else ["umount", mountpoint]
    done = _tool(argv)
    if done.returncode != 0 and is_mounted(mountpoint):
        raise VolumeError(f"unmounting {mountpoint}: {done.stderr.strip()}")


def recover(state: VolumeState) -> None:
    """Clean up after a daemon that is gone: dead FUSE mount, backing mount, loop device."""
    detach_fuse(state.mountpoint, lazy=True)
    _release(state)


def unmount(mountpoint: str, *, lazy: bool = False, timeout: float = 60.0) -> None:
    """Unmount a volume: FUSE mount, then (by its daemon, or here) backing mount and loop device.

    ``lazy`` detaches the mount even while files on it are open; the daemon then
    finishes when the last of them is closed (and ``timeout`` does not apply).
    """
    state = VolumeState.load(mountpoint)
    if state is None:
        if is_mounted(mountpoint):
            detach_fuse(mountpoint, lazy=False)
            return
        raise VolumeError(f"no fltfuse volume is mounted at {mountpoint}")
    if not state.daemon_alive():
        recover(state)
        return
    detach_fuse(state.mountpoint, lazy=lazy)
    if lazy:
        return
    deadline = time.monotonic() + timeout
    while state.daemon_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if state.daemon_alive():
        raise VolumeError(f"daemon {state.pid} for {mountpoint} did not exit within {timeout:.0f}s")
    leftover = VolumeState.load(mountpoint)
    if leftover is not None:
        recover(leftover)
