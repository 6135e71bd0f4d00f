"""Test harness: real fltfuse volumes for tests, with guaranteed cleanup.

``mounted_volume`` creates an ext4 image, mounts it through a real fltfuse
daemon (a separate process, exactly as ``fltfuse mount`` does), and on exit
unmounts it and checks that no mount or loop device is left, even when the
test failed or the daemon died.

``why_no_mount()`` says why this machine cannot mount (no /dev/fuse, not root,
no loop device), or returns ``None`` when it can.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import _volume

_ERROR_LINE = re.compile(r" (ERROR|CRITICAL) |Traceback")


def why_no_mount() -> str | None:
    """The reason mounted tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "mounting an ext4 image on a loop device needs root"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices on this machine (/dev/loop-control is missing)"
    return None


@dataclass
class MountedVolume:
    """A live fltfuse mount: where it is, what backs it, and its daemon."""

    image: str
    mountpoint: str
    backing: str
    pid: int
    log_path: str
    loop_device: str | None

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def errors_logged(self, since: int = 0) -> list[str]:
        """The ERROR and CRITICAL lines and traceback starts in the daemon's log after ``log_text()[since:]``."""
        return [line for line in self.log_text()[since:].splitlines() if _ERROR_LINE.search(line)]

    def assert_no_errors_logged(self, since: int = 0) -> None:
        """Fail (AssertionError, listing them) if the daemon logged an error or a traceback after ``since``."""
        bad = self.errors_logged(since)
        assert not bad, "the daemon logged errors:\n" + "\n".join(bad)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (as a crash would) and wait until it is gone."""
        os.kill(self.pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise TimeoutError(f"daemon {self.pid} did not die")

    def unmount(self) -> None:
        _fltfuse("unmount", self.mountpoint)


def _fltfuse(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "fltfuse", *args], capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise RuntimeError(f"fltfuse {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def mount(
    source: str,
    mountpoint: str,
    *options: str,
    filters: tuple[str, ...] = (),
    filter_path: tuple[str, ...] = (),
    parameters: Mapping[str, Mapping[str, str]] | None = None,
    log_file: str | os.PathLike[str] | None = None,
) -> MountedVolume:
    """Mount ``source`` at ``mountpoint`` with ``filters`` attached, in the background; describe the live mount.

    ``parameters`` overrides filters' INF parameters: ``{"name": {"KEY": "VALUE"}}`` (``--param name.KEY=VALUE``).
    ``log_file`` is where the daemon logs (``fltfuse mount``'s default when None).
    """
    params = [
        f"--param={name}.{key}={value}" for name, values in (parameters or {}).items() for key, value in values.items()
    ]
    _fltfuse(
        "mount",
        *(f"-o{o}" for o in options),
        *(f"--filter={f}" for f in filters),
        *(f"--filter-path={d}" for d in filter_path),
        *params,
        *([f"--log-file={log_file}"] if log_file is not None else []),
        source,
        mountpoint,
    )
    state = _volume.VolumeState.load(mountpoint)
    if state is None:
        raise RuntimeError(f"fltfuse mounted {mountpoint} but left no state file")
    return MountedVolume(source, state.mountpoint, state.backing, state.pid, state.log or "", state.loop_device)


@contextlib.contextmanager
def mounted_volume(
    directory: str | os.PathLike[str],
    *,
    size: str = "2G",
    inodes: int | None = None,
    options: tuple[str, ...] = (),
    filters: tuple[str, ...] = (),
    filter_path: tuple[str, ...] = (),
    parameters: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[MountedVolume]:
    """A fresh ext4 image in ``directory``, mounted at ``directory/mnt`` (with ``filters``) for the ``with`` body.

    The daemon logs to ``directory/daemon.log``, so a test's logs go with its directory.

    After the unmount, a context any filter leaked (the daemon's verifier logs
    each one at teardown) fails the caller with :class:`ContextLeakError`.
    """
    directory = Path(directory)
    image = str(directory / "volume.img")
    mountpoint = directory / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)
    _volume.create_image(image, _volume.parse_size(size), force=True, inodes=inodes)
    vol = mount(
        image,
        str(mountpoint),
        *options,
        filters=filters,
        filter_path=filter_path,
        parameters=parameters,
        log_file=directory / "daemon.log",
    )
    try:
        yield vol
    finally:
        release(str(mountpoint), image)
    leaks = [line for line in vol.log_text().splitlines() if "filter bug:" in line and " leaked " in line]
    if leaks:
        raise ContextLeakError("\n".join(leaks))


class ContextLeakError(AssertionError):
    """A filter on a mounted test volume left contexts referenced at teardown (the daemon log's lines)."""


def release(mountpoint: str, image: str | None = None) -> None:
    """Unmount and clean up whatever is left at ``mountpoint``; raise if anything stays attached."""
    for lazy in (False, True):
        try:
            _volume.unmount(mountpoint, lazy=lazy)
            break
        except _volume.VolumeError as exc:
            if "no fltfuse volume" in str(exc):
                break
    state = _volume.VolumeState.load(mountpoint)
    if state is not None:
        deadline = time.monotonic() + 30
        while state.daemon_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        _volume.recover(state)
    left = []
    if _volume.is_mounted(mountpoint):
        left.append(f"{mountpoint} is still mounted")
    if image is not None:
        attached = subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout.strip()
        if attached:
            left.append(f"{image} is still attached: {attached}")
    if left:
        raise RuntimeError("; ".join(left))
