"""The daemon: one volume, one stack, one FUSE session, in one process.

Where it sits: it assembles the data flow for one mount (volume -> backend ->
instance stack -> kernel adapter, with the filter manager and its control
socket beside the stack), serves it, and tears it down in order when
the mount goes away: FUSE mount, backend descriptors, backing mount, loop
device.
"""

from __future__ import annotations

import logging
import os
import resource
from collections.abc import Callable, Mapping, Sequence

import trio

from ._backend.passthrough import PassthroughBackend
from ._control import ControlServer
from ._kernel import FuseOptions, KernelAdapter, serve
from ._loader import LoadedFilter
from ._manager import FilterManager
from ._registration import InstanceSetupFlags
from ._stack import InstanceStack
from ._stack.loop_watchdog import LoopWatchdog
from ._volume import Volume, make_private_dir

log = logging.getLogger("fltfuse.daemon")


def _raise_descriptor_limit() -> None:
    """Every inode the kernel knows is pinned by a descriptor: allow as many as the system does."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = max(hard, int(f.read()))
        except OSError:
            pass
    for limit in (hard, 1 << 20, 1 << 16):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
            return
        except (ValueError, OSError):
            continue


def run(
    source: str,
    mountpoint: str,
    options: FuseOptions,
    *,
    log_path: str | None,
    on_ready: Callable[[], None],
    filters: Sequence[LoadedFilter] = (),
    filter_path: Sequence[str] = (),
    parameters: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Serve ``source`` at ``mountpoint`` with ``filters`` loaded until unmounted; then clean up.

    The filter manager answers fltmc on the volume's control socket meanwhile.
    """
    volume = Volume(
        source, mountpoint, read_only=options.read_only, backing_options=options.backing
    )  # resolves relative paths: before chdir
    os.umask(0)  # the kernel already applied the caller's umask to every mode we get
    os.chdir("/")  # the daemon must not keep any directory busy
    _raise_descriptor_limit()
    backing = volume.bring_up(log_path)
    try:
        backend = PassthroughBackend(backing)
        try:
            stack = InstanceStack(backend, volume=volume.properties(backing))
            adapter = KernelAdapter(
                stack, backend, attr_timeout=options.attr_timeout, entry_timeout=options.entry_timeout
            )
            assert volume.state is not None
            make_private_dir(volume.state.ports_path)
            manager = FilterManager(
                stack,
                filter_path=filter_path,
                parameters=parameters,
                on_change=adapter.refresh_cache_policy,
                port_directory=str(volume.state.ports_path),
            )
            control = ControlServer(manager, volume.state.control_path)

            async def start_filters(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                """The mount's filters start in the trio loop (they may create ports), before it serves."""
                at_mount = InstanceSetupFlags.AUTOMATIC_ATTACHMENT | InstanceSetupFlags.NEWLY_MOUNTED_VOLUME
                for loaded in filters:
                    manager.start(loaded, at_mount)
                task_status.started()

            log.info("serving %s at %s (backing %s)", source, volume.mountpoint, backing)
            try:
                serve(
                    adapter,
                    volume.mountpoint,
                    options,
                    on_ready,
                    services=[LoopWatchdog(options.stall_report).serve, start_filters, control.serve],
                    before_stop=manager.dismount,
                )
            finally:
                manager.shutdown()
            log.info("%s unmounted", volume.mountpoint)
        finally:
            backend.close()
    finally:
        volume.tear_down()
