"""cancelsafe: pend reads under a configured path in a cancel-safe queue; a worker thread completes them later.

A port of Windows' cancelSafe minifilter sample (``filesys/miniFilter/cancelSafe``).

Design and operation
--------------------

Parameters (INF ``Parameters`` key, or ``--param cancelsafe.KEY=VALUE``):

* ``OperatingPath`` (REG_SZ, default ``slow``): the directory, relative to the
  volume root, whose files have their reads pended. ``""`` or ``/`` means the
  whole volume. A path with a ``..`` component makes the instance decline to
  attach.
* ``OperatingDelay`` (REG_DWORD, milliseconds, default 2000): how long each
  read waits in the queue before the worker lets it go on.

Each instance has its own state (Windows keeps it in an instance context):
a :class:`~fltfuse.CancelSafeQueue`, the set of inodes whose reads it pends, a
schedule of when each queued read is due, and one worker thread.

* **Which reads.** There are no name queries yet, so the instance tracks
  inode numbers. At instance setup it walks ``OperatingPath`` in the backing
  directory (``os.walk``; ``st_ino`` of the directory and of everything below
  it, without following symbolic links) and then keeps the set up to date from
  post-CREATE (an object made in a tracked directory: ``create``, ``mkdir``,
  ``mknod``, ``symlink``) and post-LOOKUP (a name looked up in a tracked
  directory). If ``OperatingPath`` does not exist at setup, the instance
  remembers the deepest existing ancestor and the missing names, and starts
  tracking the directory as soon as it is created or looked up (so a fresh
  volume works: ``mkdir slow`` after mounting is enough).
* **Pre-READ.** A read of a tracked inode is inserted into the queue (with the
  time it becomes due, now + ``OperatingDelay``) and the pre returns
  ``PENDING``. Every ``read(2)`` is pended on its own, so a ``cat`` of a small
  file waits twice: once for the read that returns the data and once for the
  read that finds the end of the file. Other reads pass with
  ``SUCCESS_NO_CALLBACK``.
* **The worker** (a Python thread, as the Windows sample's system worker
  thread) sleeps until the oldest scheduled read is due, takes that very
  request out of the queue with ``CancelSafeQueue.remove`` (FltCbdqRemoveIo)
  and completes it from the thread with
  ``complete_pended_preoperation(cbd, SUCCESS_NO_CALLBACK)``: the read goes on
  down to the file system. It takes the request it scheduled rather than
  ``remove_next``'s oldest one, so a read never leaves the queue (where it is
  cancellable) before it is due. A request that is no longer in the queue was
  cancelled meanwhile, or taken by the teardown, and is skipped.
* **Cancellation.** While a read is queued, the filter manager watches its
  caller (the process that opened the file). When that process is
  interrupted (a signal it does not block, e.g. Ctrl-C or an alarm, or
  SIGKILL) the queue's cancel routine takes the read out and completes it with
  ``STATUS_CANCELLED``: the caller gets ``EINTR`` at once, or dies at once,
  instead of waiting for the delay.
* **Teardown and unload.** Instance teardown start (fltmc detach or unload,
  unmount) and the filter's unload callback disable the queue (later reads of
  the instance pass through), tell the worker to stop, and complete every read
  still queued with ``SUCCESS_NO_CALLBACK``, as the Windows sample does: the
  readers get their data early, nobody waits for the delay, nothing hangs.
  Nothing waits for the worker thread to end (it is a daemon thread and ends
  on its own): it completes requests through the daemon's trio loop, which
  the teardown callbacks run in, so joining it there could deadlock.
  ``instance_query_teardown`` allows ``fltmc detach`` and ``filter_unload``
  never refuses.
* **Why READ is registered with ``BYPASS_KERNEL_CACHE | SKIP_PAGING_IO``.**
  Without the first the kernel reads a file through its page cache: a ``read(2)``
  the cache answers never reaches the filter, and one that misses is sent as
  readahead, which the caller cannot abandon on a signal it survives (only a
  fatal signal ends its wait). With the flag, files opened while an instance
  is attached use direct I/O: every ``read(2)`` is one request, as the caller
  made it, and its caller waits for it interruptibly, so Ctrl-C works. The
  cost is that no file of the volume opened meanwhile uses the page cache.
  The second is the Windows sample's own: files opened before the instance
  attached still use the page cache, and their reads (page fills and
  readahead: paging I/O) pass the filter without being held, since their
  callers could not be interrupted while held.

Limits (mostly from tracking inode numbers instead of names):

* a file renamed or hard-linked into the directory is tracked only once its
  name is looked up there (the kernel may keep the name cached up to the
  mount's ``entry_timeout``); one renamed out, or deleted, stays tracked until
  the instance detaches, and so does its inode number if ext4 reuses it for a
  new file elsewhere;
* a file with a hard link elsewhere is pended whichever name it was opened by;
* reads of files opened before the instance attached are not held (above);
* the walk at setup costs time in proportion to the size of the tree under
  ``OperatingPath``.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

from fltfuse import (
    CallbackData,
    CancelSafeQueue,
    CreateDisposition,
    CreateParameters,
    FileAttributes,
    FilterRegistration,
    FilterUnloadFlags,
    Instance,
    InstanceSetupFlags,
    InstanceTeardownFlags,
    LookupParameters,
    MajorFunction,
    NtStatus,
    OperationFlags,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    complete_pended_preoperation,
)

log = logging.getLogger("fltfuse.filters.cancelsafe")

PATH_PARAMETER = "OperatingPath"
DELAY_PARAMETER = "OperatingDelay"
DEFAULT_PATH = "slow"
DEFAULT_DELAY_MS = 2000
ROOT_INODE = 1  # FUSE's name for the volume root (ext4's root is 2 in the backing directory)

_NEW_OBJECT = frozenset({CreateDisposition.CREATE, CreateDisposition.OPEN_IF, CreateDisposition.OVERWRITE_IF})


def configuration(parameters: Mapping[str, Any]) -> tuple[tuple[bytes, ...], float]:
    """(path components, delay in seconds) from the filter's parameters; ValueError if they make no sense."""
    path = parameters.get(PATH_PARAMETER, DEFAULT_PATH)
    if not isinstance(path, str):
        raise ValueError(f"{PATH_PARAMETER} {path!r} is not a string")
    components = tuple(os.fsencode(part) for part in path.split("/") if part not in ("", "."))
    if b".." in components:
        raise ValueError(f"{PATH_PARAMETER} {path!r} may not contain '..'")
    delay = parameters.get(DELAY_PARAMETER, DEFAULT_DELAY_MS)
    try:
        delay_ms = int(str(delay), 0) if isinstance(delay, str) else int(delay)
    except (TypeError, ValueError):
        raise ValueError(f"{DELAY_PARAMETER} {delay!r} is not a number of milliseconds") from None
    if delay_ms < 0:
        raise ValueError(f"{DELAY_PARAMETER} {delay!r} is negative")
    return components, delay_ms / 1000


class InstanceState:
    """What one instance keeps (Windows' instance context): the queue, the tracked inodes, the worker.

    ``schedule`` holds ``(due, cbd)`` for every read inserted into ``queue``, in
    insertion order (all reads wait the same delay, so that is also the order
    they are due in); entries of reads cancelled meanwhile stay in it until
    they are due and are then skipped.
    """

    def __init__(self, name: str, components: tuple[bytes, ...], delay: float):
        self.name = name
        self.components = components
        self.delay = delay
        self.everything = not components  # OperatingPath is the volume root: every read is pended
        self.tracked: set[int] = set()
        self.anchor: tuple[int, tuple[bytes, ...]] | None = None  # (deepest existing ancestor, missing names)
        self.queue = CancelSafeQueue()  # cancelled reads complete with STATUS_CANCELLED: EINTR
        self.schedule: deque[tuple[float, CallbackData]] = deque()
        self.stopping = False
        self.completed = 0  # reads the worker let go on after the delay
        self._wakeup = threading.Condition()
        self.worker = threading.Thread(target=self._work, name=f"cancelsafe worker ({name})", daemon=True)

    # -- which inodes ----------------------------------------------------------------

    def scan(self, backing: str) -> None:
        """Track ``OperatingPath`` and everything below it, as the backing directory has it now."""
        if self.everything:
            return
        inode, path = ROOT_INODE, os.fsencode(backing)
        for i, name in enumerate(self.components):
            path = os.path.join(path, name)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                self.anchor = (inode, self.components[i:])  # tracked once it is created or looked up
                return
            inode = st.st_ino
        self.tracked.add(inode)
        if not stat.S_ISDIR(st.st_mode):
            return  # OperatingPath names one file
        for directory, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                try:
                    self.tracked.add(os.lstat(os.path.join(directory, name)).st_ino)
                except FileNotFoundError:
                    pass  # deleted during the walk

    def learn(self, parent: int, name: bytes, attributes: FileAttributes | None) -> None:
        """``name`` in directory ``parent`` is the object ``attributes.ino`` (from a post-CREATE or post-LOOKUP)."""
        if attributes is None or self.everything:
            return
        if parent in self.tracked:
            self.tracked.add(attributes.ino)
        elif self.anchor is not None and self.anchor[0] == parent and self.anchor[1][0] == name:
            missing = self.anchor[1][1:]
            if missing:
                self.anchor = (attributes.ino, missing)
            else:
                self.anchor = None
                self.tracked.add(attributes.ino)

    def wants(self, inode: int) -> bool:
        return self.everything or inode in self.tracked

    # -- the queue ---------------------------------------------------------------------

    def pend(self, cbd: CallbackData) -> bool:
        """Queue a read (FltCbdqInsertIo) and schedule it; False if it was already cancelled."""
        due = time.monotonic() + self.delay
        if not self.queue.insert(cbd, due):
            return False
        with self._wakeup:
            self.schedule.append((due, cbd))
            self._wakeup.notify()
        return True

    def stop(self) -> int:
        """Disable the queue, stop the worker, complete every queued read (it goes on down). Returns how many."""
        with self._wakeup:
            self.stopping = True  # pre-READ lets reads pass from now on (FltCbdqDisable)
            self.schedule.clear()
            self._wakeup.notify()
        released = 0
        while (item := self.queue.remove_next()) is not None:
            complete_pended_preoperation(item[0], PreopCallbackStatus.SUCCESS_NO_CALLBACK)
            released += 1
        return released

    def _next_due(self) -> CallbackData | None:
        """Wait until the oldest scheduled read is due and take its entry; None once told to stop."""
        with self._wakeup:
            while not self.stopping:
                if not self.schedule:
                    self._wakeup.wait()
                    continue
                due, cbd = self.schedule[0]
                left = due - time.monotonic()
                if left > 0:
                    self._wakeup.wait(left)
                    continue
                self.schedule.popleft()
                return cbd
            return None

    def _work(self) -> None:
        while (cbd := self._next_due()) is not None:
            try:
                self.queue.remove(cbd)  # FltCbdqRemoveIo: ours to complete now, no longer cancellable
            except KeyError:
                continue  # cancelled meanwhile (its cancel routine completed it), or taken by the teardown
            self.completed += 1  # counted first: the reader may run on before this thread returns from completing
            try:
                complete_pended_preoperation(cbd, PreopCallbackStatus.SUCCESS_NO_CALLBACK)
            except Exception:
                log.exception("instance %s could not complete %r", self.name, cbd)


_STATES: dict[Instance, InstanceState] = {}  # instance contexts, touched only in the daemon's trio loop


def state_of(instance: Instance) -> InstanceState | None:
    """The state of an attached instance (for tests and diagnostics)."""
    return _STATES.get(instance)


# -- operation callbacks --------------------------------------------------------------------


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    state = _STATES.get(objects.instance)
    if state is None or state.stopping or not state.wants(cbd.iopb.target_file_object.inode):
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    if not state.pend(cbd):
        cbd.io_status.status = NtStatus.CANCELLED  # the caller gave up already: EINTR
        cbd.io_status.information = 0
        return PreopCallbackStatus.COMPLETE
    return PreopCallbackStatus.PENDING


def post_create(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """A new object (file, directory, node, symlink) in a tracked directory is tracked too."""
    p = cbd.iopb.parameters
    if isinstance(p, CreateParameters) and p.disposition in _NEW_OBJECT:
        _learn(cbd, objects, flags, p.parent, p.name, p.attributes)
    return PostopCallbackStatus.FINISHED_PROCESSING


def post_lookup(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """A name found in a tracked directory (made behind the filter's back, or moved there) is tracked too."""
    p = cbd.iopb.parameters
    if isinstance(p, LookupParameters):
        _learn(cbd, objects, flags, p.parent, p.name, p.attributes)
    return PostopCallbackStatus.FINISHED_PROCESSING


def _learn(
    cbd: CallbackData,
    objects: RelatedObjects,
    flags: PostopFlags,
    parent: int,
    name: bytes,
    attributes: FileAttributes | None,
) -> None:
    state = _STATES.get(objects.instance)
    if state is not None and not flags & PostopFlags.DRAINING and cbd.io_status.status == NtStatus.SUCCESS:
        state.learn(parent, name, attributes)


# -- instance and filter callbacks ------------------------------------------------------------


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    try:
        components, delay = configuration(objects.filter.parameters)
    except ValueError as exc:
        log.warning("instance %s not attached: %s", objects.instance.name, exc)
        return NtStatus.FLT_DO_NOT_ATTACH
    state = InstanceState(objects.instance.name, components, delay)
    if objects.volume is not None:
        state.scan(objects.volume.backing)
    state.worker.start()
    _STATES[objects.instance] = state
    where = "/" + "/".join(os.fsdecode(c) for c in components)
    log.info(
        "instance %s pends reads under %s for %d ms (%s)",
        objects.instance.name,
        where,
        round(delay * 1000),
        "the whole volume"
        if state.everything
        else f"{len(state.tracked)} inodes tracked"
        if state.anchor is None
        else "waiting for it to be created",
    )
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach may take any instance away


def instance_teardown_start(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    state = _STATES.get(objects.instance)
    if state is not None and not state.stopping:
        released = state.stop()
        log.info("instance %s tearing down: %d queued reads let go", state.name, released)


def instance_teardown_complete(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    _STATES.pop(objects.instance, None)


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    """Complete what every instance still has queued and stop the workers; never refuses."""
    for state in list(_STATES.values()):
        if not state.stopping:
            released = state.stop()
            log.info("unloading: instance %s let %d queued reads go", state.name, released)
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(
            MajorFunction.READ, pre_read, flags=OperationFlags.BYPASS_KERNEL_CACHE | OperationFlags.SKIP_PAGING_IO
        ),
        OperationRegistration(MajorFunction.CREATE, post=post_create),
        OperationRegistration(MajorFunction.LOOKUP, post=post_lookup),
    ),
    filter_unload=filter_unload,
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_start=instance_teardown_start,
    instance_teardown_complete=instance_teardown_complete,
)
