"""The deadlock detector of FltSendMessage: a send whose reply could wait on the request it is made for.

A kernel request holds its caller's thread in a system call until the
daemon answers it. When a filter, handling that request, sends a message to
a port client and waits for the reply, the caller's process waits on the
client's. If the client's process is the caller's own, or is itself waiting
(in a request of its own) on the caller's process, the reply may never come:
the scanner's classic self-deadlock, where the service opens the file it was
asked to scan and its open is sent back to it. Windows leaves it to the
filter to exclude its service's I/O (``IoThreadToProcess(Data->Thread)``)
and otherwise hangs for the send's timeout, or forever.

fltfuse keeps the graph of these waits (which thread waits, in a request,
on which client process) and refuses a send that would close a cycle at
once: :func:`send_message <fltfuse._port.server.send_message>` raises
:class:`~fltfuse._port.wire.PortDeadlockError` (STATUS_POSSIBLE_DEADLOCK,
EDEADLK) naming every wait of the cycle, instead of holding the caller for
the timeout. "Possible": a client with several threads may answer from
another one; a filter that knows its service does passes
``deadlock_check=False``.

Only kernel requests count (the kernel adapter sets
:data:`requesting_thread` to each one's calling thread): filter-initiated
I/O is the daemon's own, and the in-process harness blocks no thread. Work items and
pended operations carry the request they were queued for. The graph is the
daemon's, for all its volumes: threads and processes are the system's.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from .._process import is_thread_of, process_name, thread_group_of
from .wire import PortDeadlockError

log = logging.getLogger("fltfuse.port")

requesting_thread: contextvars.ContextVar[int] = contextvars.ContextVar("fltfuse_requesting_thread", default=0)
"""The thread id of the kernel request the current task works for (0: none). Set by the kernel adapter."""

_waits: list[tuple[int, int]] = []  # (thread blocked in a request, client process a send for it waits on)


@contextmanager
def waiting_on(client_pid: int, port_name: str) -> Iterator[None]:
    """Record, for as long as the block runs, that the current request's thread waits on ``client_pid``.

    Raises :class:`PortDeadlockError` first if that process is the request's
    own or waits (through other requests) on it. Outside a kernel request it
    records nothing.
    """
    tid = requesting_thread.get()
    if not tid:
        yield
        return
    cycle = _cycle(tid, client_pid)
    if cycle is not None:
        message = f"port {port_name}: possible deadlock, send refused: " + "; ".join(_describe(*w) for w in cycle)
        log.warning("%s", message)
        raise PortDeadlockError(message)
    wait = (tid, client_pid)
    _waits.append(wait)
    try:
        yield
    finally:
        _waits.remove(wait)


def _cycle(tid: int, client_pid: int) -> list[tuple[int, int]] | None:
    """The waits from ``tid`` back to its own process if it waited on ``client_pid``, else None."""
    path = [(tid, client_pid)]
    if is_thread_of(tid, client_pid):
        return path
    # depth first over the processes client_pid waits on (a handful of waits at most are recorded at once)
    pending = [(client_pid, path)]
    seen = {client_pid}
    while pending:
        pid, path = pending.pop()
        for waiter, target in _waits:
            if target in seen or not is_thread_of(waiter, pid):
                continue
            longer = [*path, (waiter, target)]
            if is_thread_of(tid, target):
                return longer
            seen.add(target)
            pending.append((target, longer))
    return None


def _describe(tid: int, client_pid: int) -> str:
    pid = thread_group_of(tid)
    return (
        f"thread {tid} of pid {pid} ({process_name(pid)}) waits in a request on port client "
        f"pid {client_pid} ({process_name(client_pid)})"
    )
