"""What /proc tells about the process behind a request or a port peer.

Used where a decision depends on the caller: permission checks the kernel
leaves to the file system, port security, and filters that recognise their
own services (a scanner must not scan its scanning service's I/O).
"""

from __future__ import annotations

import os


def _status(pid: int) -> dict[bytes, bytes]:
    """The fields of /proc/PID/status (empty if the process is gone or unreadable)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, value = line.partition(b":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def groups_of(pid: int, gid: int) -> set[int]:
    """Process ``pid``'s primary group ``gid`` and its supplementary groups."""
    return {gid, *(int(g) for g in _status(pid).get(b"Groups", b"").split())}


def has_capability(pid: int, uid: int, capability: int) -> bool:
    """Whether process ``pid`` has ``capability`` in its effective set (uid 0 if it cannot be read)."""
    effective = _status(pid).get(b"CapEff")
    if effective is None:
        return uid == 0
    return bool(int(effective, 16) >> capability & 1)


def process_name(pid: int) -> str:
    """The command name of ``pid`` (``comm``), or ``"?"`` once it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().strip().decode(errors="replace") or "?"
    except OSError:
        return "?"


def is_thread_of(tid: int, pid: int) -> bool:
    """Whether thread ``tid`` belongs to process ``pid`` now (one stat, about 2 µs). The thread of a request
    is blocked in its system call until the request is answered, so its id cannot be reused meanwhile."""
    try:
        os.stat(f"/proc/{pid}/task/{tid}")
    except OSError:
        return False
    return True


def thread_group_of(tid: int) -> int:
    """The process (thread group) a thread id belongs to: FUSE names the calling thread, not its process."""
    tgid = _status(tid).get(b"Tgid")
    return int(tgid) if tgid else tid
