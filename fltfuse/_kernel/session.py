"""One FUSE session: mount options, the pyfuse3 main loop, signals, unmount.

pyfuse3 serves one mount per process, so a daemon is one volume. ``serve``
mounts, calls ``on_ready`` once the mount is live, runs the main loop on trio
until the mount goes away (``fusermount3 -u``, ``umount``) or SIGTERM, SIGINT or
SIGHUP arrives, and always unmounts before it returns.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

from .._volume import is_mounted
from .operations import KernelAdapter

log = logging.getLogger("fltfuse.kernel")

# Options fltfuse itself consumes; every other option goes to libfuse and the kernel.
_OWN_OPTIONS = {"attr_timeout", "entry_timeout", "stall_report"}
# Options that also apply to the backing ext4 (the kernel keeps no atime for FUSE).
_BACKING_OPTIONS = {"noatime", "relatime", "strictatime", "nodiratime", "lazytime"}


@dataclass
class FuseOptions:
    """Mount options, split into fltfuse's own and those passed to the kernel."""

    kernel: list[str] = field(default_factory=list)
    attr_timeout: float = 60.0
    entry_timeout: float = 60.0
    stall_report: float = 5.0  # seconds the event loop may be blocked before the loop watchdog reports it (0: off)

    @classmethod
    def parse(cls, specs: list[str], *, fsname: str) -> FuseOptions:
        """Parse ``-o`` values (comma-separated); add the defaults a root mount needs.

        As root the volume is mounted ``allow_other,dev,suid`` so that other
        users and device nodes work as on ext4; ``default_permissions`` is always
        on, because the daemon acts as root on the backing file system and the
        kernel must check every caller's permissions.
        """
        out = cls()
        given: dict[str, str | None] = {}
        for spec in specs:
            for item in spec.split(","):
                item = item.strip()
                if not item:
                    continue
                key, _, value = item.partition("=")
                given[key] = value if _ else None
        for key in _OWN_OPTIONS & given.keys():
            try:
                setattr(out, key, float(given.pop(key) or ""))
            except ValueError as exc:
                raise ValueError(f"mount option {key} needs a number of seconds") from exc
        for key in ("rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser"):
            given.pop(key, None)  # fstab's words for mount(8), not for the file system
        for key in [k for k in given if k.startswith(("x-", "comment="))]:
            del given[key]
        given.setdefault("fsname", fsname)
        given.setdefault("subtype", "fltfuse")
        given["default_permissions"] = None
        if os.geteuid() == 0:
            for key in ("allow_other", "dev", "suid"):
                if "no" + key not in given:
                    given.setdefault(key, None)
        out.kernel = [k if v is None else f"{k}={v}" for k, v in given.items()]
        return out

    @property
    def read_only(self) -> bool:
        return "ro" in self.kernel

    @property
    def backing(self) -> tuple[str, ...]:
        """The options the backing ext4 is mounted with too: how atime is kept."""
        return tuple(o for o in self.kernel if o in _BACKING_OPTIONS)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def serve(
    adapter: KernelAdapter,
    mountpoint: str,
    options: FuseOptions,
    on_ready: Callable[[], None],
    *,
    services: Sequence[Callable[..., Awaitable[None]]] = (),
    before_stop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Mount ``adapter`` at ``mountpoint`` (resolved) and serve until unmounted or signalled.

    ``services`` are started in the trio loop beside the FUSE session (each is
    started with ``nursery.start``, so it reports when it is ready) and
    cancelled when it ends. ``before_stop`` runs when a stop signal arrives,
    before the session is told to end, while requests are still served.
    """
    early: list[int] = []  # a stop signal that arrives before the trio loop listens for it
    previous = {sig: signal.signal(sig, lambda signum, _frame: early.append(signum)) for sig in _STOP_SIGNALS}
    try:
        pyfuse3.init(adapter, mountpoint, set(options.kernel))
        unmounted = False
        try:
            try:
                trio.run(_main_loop, early, services, before_stop, on_ready)
            except BaseExceptionGroup as group:  # the nursery's: a service that failed to start, alone
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
            unmounted = True
        finally:
            pyfuse3.close(unmount=not unmounted or is_mounted(mountpoint))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _main_loop(
    early: list[int],
    services: Sequence[Callable[..., Awaitable[None]]],
    before_stop: Callable[[], Awaitable[None]] | None,
    on_ready: Callable[[], None],
) -> None:
    async with trio.open_nursery() as nursery:
        for service in services:
            await nursery.start(service)
        await nursery.start(_stop_on_signal, early, before_stop)
        on_ready()
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


async def _stop_on_signal(
    early: list[int],
    before_stop: Callable[[], Awaitable[None]] | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        task_status.started()
        signum = early[0] if early else await signals.__anext__()
        log.info("%s received: unmounting", signal.Signals(signum).name)
        if before_stop is not None:
            await before_stop()
        pyfuse3.terminate()
