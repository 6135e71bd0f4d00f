"""The loop watchdog: reports whatever blocks the daemon's event loop, naming the filter.

Every callback of every filter runs in the daemon's one trio loop. A
synchronous callback that blocks (a sleep, a lock, a busy loop, blocking
I/O or a blocking socket) holds up every request on the volume until it
returns, and nothing in the scheduler can end it: only awaited waits can be
cancelled. On Windows such a filter hangs the machine's file I/O just the
same; there the tool to find it is a kernel debugger. Here a task in the
loop beats every :data:`BEAT` seconds and a thread watches the beat. When
the loop has not run for ``threshold`` seconds the thread logs, once per
stall, where the loop's thread is:

* ERROR, when it is inside a filter's callback: the filter, the instance,
  the callback, the request, and the innermost frames;
* WARNING, when it is elsewhere (the file system itself, e.g. an unlink
  freeing a huge file), with the innermost frames.

When the loop runs again it logs a WARNING with how long it was blocked.
The daemon's threshold is the mount option ``stall_report`` (seconds;
0 turns the watchdog off).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from types import FrameType

import trio

from .._callback_data import CallbackData
from .instance_stack import Instance, InstanceStack, _Walk

log = logging.getLogger("fltfuse.watchdog")

BEAT = 0.25  # seconds between the loop's heartbeats (and the thread's looks at them)
_FRAMES_SHOWN = 8
_WALK = InstanceStack._walk.__code__
_CALL_POST = InstanceStack._call_post.__code__


class LoopWatchdog:
    """Start :meth:`serve` in the daemon's trio loop; it runs until the loop's nursery is cancelled, and its
    watcher thread has ended when it returns."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._beat = time.monotonic()
        self._stop = threading.Event()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Beat in the loop, watched from a thread (none when the threshold is 0)."""
        if self.threshold <= 0:
            task_status.started()
            return
        loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        self._stop.clear()
        watcher = threading.Thread(target=self._watch, args=(loop_thread,), name="fltfuse loop watchdog", daemon=True)
        watcher.start()
        task_status.started()
        try:
            while True:
                self._beat = time.monotonic()
                await trio.sleep(BEAT)
        finally:
            self._stop.set()
            watcher.join(timeout=1.0)  # it wakes at once (it waits on the event): gone when serve returns

    def _watch(self, loop_thread: int) -> None:
        stalled_since: float | None = None  # the last beat before the stall being reported
        while not self._stop.wait(BEAT):
            beat = self._beat
            if stalled_since is not None:
                if beat != stalled_since:
                    log.warning("the event loop runs again after %.1f s blocked", beat - stalled_since)
                    stalled_since = None
                continue
            blocked = time.monotonic() - beat
            if blocked >= self.threshold:
                frame = sys._current_frames().get(loop_thread)
                if frame is None:  # the loop's thread has ended
                    return
                stalled_since = beat
                _report(blocked, frame)


def _report(blocked: float, frame: FrameType) -> None:
    """Log what the loop's thread is doing: a filter's callback (ERROR) or something else (WARNING)."""
    frames: list[FrameType] = []  # innermost first
    current: FrameType | None = frame
    while current is not None:
        frames.append(current)
        current = current.f_back
    for depth, candidate in enumerate(frames[1:], start=1):
        running = _callback_running(candidate)
        if running is not None:
            instance, cbd = running
            log.error(
                "filter %s (instance %s) has blocked the event loop for %.1f s in its callback %s for %r: every "
                "request on the volume waits until it returns (a callback must not block: await, or use a work "
                "item). Innermost frames:\n%s",
                instance.filter.name,
                instance.name,
                blocked,
                frames[depth - 1].f_code.co_name,  # what the stack's frame called: the filter's callback
                cbd,
                _format(frames[:depth]),
            )
            return
    log.warning(
        "the event loop has been blocked for %.1f s, not in a filter's callback; every request waits. "
        "Innermost frames:\n%s",
        blocked,
        _format(frames),
    )


def _callback_running(frame: FrameType) -> tuple[Instance, CallbackData] | None:
    """The instance and request whose callback ``frame`` (one of the stack's) is calling, if it is calling one."""
    if frame.f_code is _CALL_POST:
        local = frame.f_locals
        return local["instance"], local["cbd"]
    if frame.f_code is _WALK:
        walk = frame.f_locals.get("walk")
        if isinstance(walk, _Walk) and walk.at is not None:  # at: whose callback runs (None: the file system)
            return walk.at, walk.cbd
    return None


def _format(frames: list[FrameType]) -> str:
    """The innermost :data:`_FRAMES_SHOWN` of ``frames`` (innermost first), outermost first, as a traceback."""
    shown = reversed(frames[:_FRAMES_SHOWN])
    return "".join(traceback.format_list(traceback.StackSummary.extract((f, f.f_lineno) for f in shown))).rstrip()
