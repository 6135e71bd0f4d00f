"""Deferred work: moving a filter's slow work off the request path, onto the trio scheduler.

Windows counterparts: ``FltDoCompletionProcessingWhenSafe``,
``FltQueueDeferredIoWorkItem`` and ``FltQueueGenericWorkItem``.

A plain (synchronous) routine runs in one of trio's worker threads, so it may
block (file I/O, a socket, a lock) without stalling other requests; a
coroutine function runs as a task of the daemon's trio loop. Either way the
request path goes on at once. Call these from a callback, that is from the
daemon's trio thread. A routine that raises is a filter bug: it is logged with
the routine and the request, which then fails with FLT_INTERNAL_ERROR (EIO).
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Callable
from typing import Any

import trio

from .._callback_data import CANNOT_FAIL, CallbackData
from .._registration import PostopCallbackStatus, PostopFlags, PreopCallbackStatus
from .._status import NtStatus
from . import pending

log = logging.getLogger("fltfuse.stack")


def do_completion_processing_when_safe(
    cbd: CallbackData,
    objects: Any,
    context: Any,
    flags: PostopFlags,
    safe_post: Callable[[CallbackData, Any, Any, PostopFlags], Any],
) -> PostopCallbackStatus:
    """FltDoCompletionProcessingWhenSafe: finish a post-operation off the request path.

    Call it from a post-operation callback and return what it returns:
    MORE_PROCESSING_REQUIRED, and the request completes once
    ``safe_post(cbd, objects, context, flags)`` has run (in a worker thread,
    or as a trio task if it is a coroutine function). While the instance
    drains (``flags`` has DRAINING) nothing may be deferred: ``safe_post`` is
    not called and FINISHED_PROCESSING is returned, as on Windows.
    """
    if flags & PostopFlags.DRAINING:
        return PostopCallbackStatus.FINISHED_PROCESSING

    def done(failed: bool) -> None:
        if failed:
            cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
        pending.complete_pended_postoperation(cbd)

    _start(safe_post, (cbd, objects, context, flags), cbd, done)
    return PostopCallbackStatus.MORE_PROCESSING_REQUIRED


def queue_deferred_io_work_item(
    cbd: CallbackData, objects: Any, routine: Callable[[CallbackData, Any, Any], Any], context: Any = None
) -> None:
    """FltQueueDeferredIoWorkItem: run ``routine(cbd, objects, context)`` for a request a pre pends.

    The pre returns PENDING right after queueing; the routine completes the
    request with ``complete_pended_preoperation``. If it raises instead, the
    request fails with FLT_INTERNAL_ERROR. (One that returns without
    completing it leaves it pended: that is reported every 30 s, naming the
    filter.)
    """

    def done(failed: bool) -> None:
        if failed:
            cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
            pending.complete_pended_preoperation(cbd, PreopCallbackStatus.COMPLETE)

    _start(routine, (cbd, objects, context), cbd, done)


def queue_generic_work_item(objects: Any, routine: Callable[[Any, Any], Any], context: Any = None) -> None:
    """FltQueueGenericWorkItem: run ``routine(objects, context)`` off the request path; no request waits for it."""
    _start(routine, (objects, context), None, lambda failed: None)


def _start(
    routine: Callable[..., Any], args: tuple[Any, ...], cbd: CallbackData | None, done: Callable[[bool], None]
) -> None:
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        raise RuntimeError("work items are queued from a callback, in the daemon's trio thread") from None
    # a work item for a request works for its caller, still waiting (the port's deadlock detector sees it so)
    context = contextvars.copy_context() if cbd is not None else None
    trio.lowlevel.spawn_system_task(_run, routine, args, cbd, done, name=f"work item {_name(routine)}", context=context)


async def _run(
    routine: Callable[..., Any], args: tuple[Any, ...], cbd: CallbackData | None, done: Callable[[bool], None]
) -> None:
    failed = False
    try:
        if inspect.iscoroutinefunction(routine):
            await routine(*args)
        else:
            await trio.to_thread.run_sync(routine, *args)
    except Exception as exc:
        failed = cbd is not None and cbd.iopb.parameters.MAJOR not in CANNOT_FAIL
        log.error(
            "filter bug: work item %s raised %r%s", _name(routine), exc, f" for {cbd!r}" if cbd else "", exc_info=exc
        )
    try:
        done(failed)
    except Exception:  # a system task must never raise: it would end the daemon
        log.exception("work item %s: completing %r failed", _name(routine), cbd)


def _name(routine: Callable[..., Any]) -> str:
    return f"{getattr(routine, '__module__', '?')}.{getattr(routine, '__qualname__', repr(routine))}"
