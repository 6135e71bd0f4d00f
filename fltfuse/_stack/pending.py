"""Pended requests: parking, completion from any task or thread, and cancellation.

Windows counterparts: ``FLT_PREOP_PENDING`` with ``FltCompletePendedPreOperation``,
``FLT_POSTOP_MORE_PROCESSING_REQUIRED`` with ``FltCompletePendedPostOperation``,
``FltSetCancelCompletion``/``FltClearCancelCompletion``, and the cancel-safe
callback data queue (``FltCbdqInitialize``, ``FltCbdqInsertIo``,
``FltCbdqRemoveIo``, ``FltCbdqRemoveNextIo``).

Contracts:

* A filter may complete a request it pends from any trio task of the daemon or
  from any thread, and even before its pre-operation callback has returned
  PENDING (a worker can be that fast): the completion is kept until the walk
  parks.
* Cancellation. While a request is pended, the filter manager watches its
  caller. When the caller is interrupted (a signal it does not block is pending
  on it, e.g. Ctrl-C or an alarm, or it is being killed or is gone) the cancel
  routine the filter set with :func:`set_cancel_completion` runs, once, in the
  daemon's trio loop. It must complete the request (typically with
  ``STATUS_CANCELLED``, which the caller sees as ``EINTR``) unless the filter
  is already completing it. Without a cancel routine a pended request is not
  cancellable, as on Windows. pyfuse3 does not pass the kernel's
  FUSE_INTERRUPT on, so the caller is watched through ``/proc`` (every
  :data:`WATCH_INTERVAL` seconds); for READ and WRITE the caller is the process
  that opened the handle (FUSE gives no caller for them). Only a request the
  caller waits for synchronously can be interrupted by a signal the caller
  survives: page-cache reads are not, so a filter that pends reads registers
  READ with ``OperationFlags.BYPASS_KERNEL_CACHE`` (each read(2) is then sent
  as it is, and waited for interruptibly).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from .._callback_data import CANNOT_FAIL, CallbackData, MajorFunction, Requestor
from .._registration import PostopCallbackStatus, PreopCallbackStatus
from .._status import NtStatus

WATCH_INTERVAL = 0.02  # seconds between looks at a pended request's caller
REPORT_AFTER = 30.0  # seconds a request may stay pended before each warning naming its filter

log = logging.getLogger("fltfuse.stack")

_lock = threading.Lock()  # guards Pended state shared with worker threads; taken only on the pending path
_SIGKILL_BIT = 1 << 8


class Pended:
    """The filter manager's record of one pended pre- or post-operation."""

    __slots__ = ("cancel_routine", "cancelled", "context", "done", "event", "since", "status", "token", "waiting")

    def __init__(self, waiting: str):
        self.waiting = waiting  # "pre-operation" or "post-operation"
        self.event: trio.Event | None = None  # set once the walk parks
        self.token: trio.lowlevel.TrioToken | None = None
        self.done = False
        self.status: Any = None
        self.context: Any = None
        self.cancel_routine: Callable[[CallbackData], None] | None = None
        self.cancelled = False
        self.since = 0.0


def _record(cbd: CallbackData) -> Pended:
    """The request's Pended record, made on first use (call with ``_lock`` held)."""
    pended = cbd.pended
    if pended is None:
        pended = cbd.pended = Pended("")
    return pended  # type: ignore[no-any-return]


async def park(cbd: CallbackData, waiting: str, watch: bool, holder: str) -> tuple[Any, Any]:
    """Wait until the pended ``waiting`` operation of ``cbd`` is completed; return (status, context).

    ``watch``: cancel through the filter's cancel routine when the caller is
    interrupted. ``holder`` names the filter and instance for the warning
    logged every :data:`REPORT_AFTER` seconds the request stays pended.
    """
    with _lock:
        pended = _record(cbd)
        if pended.done:  # completed before the callback even returned
            cbd.pended = None
            return pended.status, pended.context
        pended.waiting = waiting
        pended.event = event = trio.Event()
        pended.token = trio.lowlevel.current_trio_token()
        pended.since = trio.current_time()
    try:
        if watch:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_caller, cbd, pended)
                await _wait(event, cbd, waiting, holder)
                nursery.cancel_scope.cancel()
        else:
            await _wait(event, cbd, waiting, holder)
    finally:
        cbd.pended = None
    return pended.status, pended.context


async def _wait(event: trio.Event, cbd: CallbackData, waiting: str, holder: str) -> None:
    waited = 0.0
    while True:
        with trio.move_on_after(REPORT_AFTER):
            await event.wait()
            return
        waited += REPORT_AFTER
        log.warning("%s has kept %r pended (%s) for %.0f s and not completed it", holder, cbd, waiting, waited)


def resume(cbd: CallbackData, waiting: str, status: Any, context: Any) -> None:
    """Complete a pended operation of ``cbd`` (from any trio task or thread)."""
    with _lock:
        pended = _record(cbd)
        if pended.done or (pended.waiting and pended.waiting != waiting):
            raise RuntimeError(f"{cbd!r} has no pended {waiting} to complete")
        pended.waiting = waiting
        pended.status, pended.context, pended.done = status, context, True
        event, token = pended.event, pended.token
    if event is None:
        return  # the walk has not parked yet: it will find the completion
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:  # a worker thread: wake the request in the daemon's trio loop
        assert token is not None
        trio.from_thread.run_sync(event.set, trio_token=token)
    else:
        event.set()


def discard(cbd: CallbackData) -> bool:
    """Forget pending state a callback left without pending (e.g. a cancel routine set before it
    decided to complete the request itself). True if it held a completion: a filter bug."""
    with _lock:
        pended, cbd.pended = cbd.pended, None
        return isinstance(pended, Pended) and pended.done


def is_pended(cbd: CallbackData, waiting: str) -> bool:
    """Whether ``cbd`` is parked at a ``waiting`` operation that nobody has completed yet."""
    pended = cbd.pended
    return isinstance(pended, Pended) and pended.event is not None and not pended.done and pended.waiting == waiting


def complete_pended_preoperation(cbd: CallbackData, status: PreopCallbackStatus, context: Any = None) -> None:
    """FltCompletePendedPreOperation: give the final decision for a pre that returned PENDING.

    ``status`` is SUCCESS_WITH_CALLBACK (``context`` goes to the post),
    SUCCESS_NO_CALLBACK or COMPLETE (set ``cbd.io_status`` first). Call it once,
    from any trio task of the daemon or any thread.
    """
    resume(cbd, "pre-operation", status, context)


def complete_pended_postoperation(cbd: CallbackData) -> None:
    """FltCompletePendedPostOperation: finish a post that returned MORE_PROCESSING_REQUIRED."""
    resume(cbd, "post-operation", PostopCallbackStatus.FINISHED_PROCESSING, None)


def complete_cancelled(cbd: CallbackData) -> None:
    """Complete a pended pre-operation as cancelled: the caller gets EINTR."""
    cbd.io_status.status = NtStatus.CANCELLED
    cbd.io_status.information = 0
    complete_pended_preoperation(cbd, PreopCallbackStatus.COMPLETE)


def set_cancel_completion(cbd: CallbackData, routine: Callable[[CallbackData], None]) -> NtStatus:
    """FltSetCancelCompletion: run ``routine(cbd)`` if the caller is interrupted while the request is pended.

    Returns ``SUCCESS``, or ``CANCELLED`` if the request was already cancelled
    (then the routine is not set, and the filter completes the request itself).
    """
    with _lock:
        pended = _record(cbd)
        if pended.cancelled:
            return NtStatus.CANCELLED
        pended.cancel_routine = routine
        return NtStatus.SUCCESS


def clear_cancel_completion(cbd: CallbackData) -> bool:
    """FltClearCancelCompletion: take the cancel routine back.

    Returns False if cancellation has already begun: the cancel routine owns
    the request then, and the caller must not complete it.
    """
    with _lock:
        pended = _record(cbd)
        pended.cancel_routine = None
        return not pended.cancelled


def cancel(cbd: CallbackData) -> bool:
    """Cancel a pended request: run its cancel routine once. False if it has none (or already ran)."""
    with _lock:
        pended = cbd.pended
        if not isinstance(pended, Pended) or pended.cancelled or pended.cancel_routine is None or pended.done:
            return False
        pended.cancelled = True
        routine, pended.cancel_routine = pended.cancel_routine, None
    routine(cbd)
    return True


def interrupted(requestor: Requestor, synchronous: bool) -> bool:
    """Whether the caller has given up: gone, being killed, or (``synchronous``) signalled.

    ``synchronous`` is for requests the caller waits for interruptibly; for the
    others (page-cache reads the kernel sends as readahead) only a fatal
    signal counts, since the caller survives other signals and still waits.
    """
    try:
        with open(f"/proc/{requestor.pid}/status", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        return False
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        if key in (b"State", b"SigPnd", b"ShdPnd", b"SigBlk"):
            fields[key] = value.strip()
    if fields.get(b"State", b"").startswith((b"Z", b"X")):
        return True
    pending = int(fields.get(b"SigPnd", b"0"), 16) | int(fields.get(b"ShdPnd", b"0"), 16)
    if pending & _SIGKILL_BIT:
        return True
    return synchronous and bool(pending & ~int(fields.get(b"SigBlk", b"0"), 16))


_NOT_CANCELLABLE = CANNOT_FAIL | {MajorFunction.WRITE}


def watches_caller(cbd: CallbackData) -> bool:
    """Whether a pended ``cbd`` can be cancelled when its caller is interrupted.

    Never WRITE (pyfuse3 does not say whether a write is the kernel's page
    writeback, and cancelling that would lose data), CLEANUP or CLOSE (they
    cannot fail), nor what the kernel asks on its own (pid 0), nor
    filter-initiated I/O (the daemon's own).
    """
    return cbd.requestor.pid != 0 and cbd.initiator is None and cbd.iopb.parameters.MAJOR not in _NOT_CANCELLABLE


async def _watch_caller(cbd: CallbackData, pended: Pended) -> None:
    synchronous = cbd.iopb.parameters.MAJOR is not MajorFunction.READ or cbd.iopb.target_file_object.uncached
    while not pended.done:
        await trio.sleep(WATCH_INTERVAL)
        if pended.cancel_routine is not None and interrupted(cbd.requestor, synchronous):
            cancel(cbd)
            return


class CancelSafeQueue:
    """FLT_CALLBACK_DATA_QUEUE: pended requests that cancel themselves safely.

    ``insert`` pends a request (call it in a pre-operation callback that then
    returns PENDING); ``remove_next`` hands the oldest one to a worker, which
    completes it. If the caller is interrupted first, the request leaves the
    queue and ``on_cancel`` completes it (by default as cancelled: the caller
    gets EINTR). Every method may be called from any thread.
    """

    def __init__(self, on_cancel: Callable[[CallbackData], None] = complete_cancelled):
        self._items: deque[tuple[CallbackData, Any]] = deque()
        self._lock = threading.Lock()
        self._on_cancel = on_cancel

    def __len__(self) -> int:
        return len(self._items)

    def insert(self, cbd: CallbackData, context: Any = None) -> bool:
        """FltCbdqInsertIo. False if the request was already cancelled (complete it yourself)."""
        with self._lock:
            if set_cancel_completion(cbd, self._cancelled) != NtStatus.SUCCESS:
                return False
            self._items.append((cbd, context))
            return True

    def remove_next(self) -> tuple[CallbackData, Any] | None:
        """FltCbdqRemoveNextIo: the oldest request not being cancelled, now the caller's to complete."""
        with self._lock:
            while self._items:
                cbd, context = self._items.popleft()
                if clear_cancel_completion(cbd):
                    return cbd, context
            return None

    def remove(self, cbd: CallbackData) -> Any:
        """FltCbdqRemoveIo: take ``cbd`` out; returns its context, or raises KeyError if it is not queued."""
        with self._lock:
            for i, (queued, context) in enumerate(self._items):
                if queued is cbd:
                    del self._items[i]
                    if clear_cancel_completion(cbd):
                        return context
                    break
            raise KeyError(f"{cbd!r} is not in the queue")

    def _cancelled(self, cbd: CallbackData) -> None:
        with self._lock:
            for i, (queued, _) in enumerate(self._items):
                if queued is cbd:
                    del self._items[i]
                    break
            # Not found: remove_next()/remove() met it after its cancellation began (their
            # clear_cancel_completion() said False) and dropped it. A worker that took it
            # first would have cleared the cancel routine, and this would not run: it is ours.
        self._on_cancel(cbd)
