"""minispy: an activity monitor that logs every request its instances see, for a user-mode reader.

A port of Windows' MiniSpy sample (``filesys/miniFilter/minispy``); the
reader is the ``minispy`` command (:mod:`filters.minispy.user`), the port's
messages are in :mod:`filters.minispy.protocol`.

Design and operation
--------------------

Parameters (INF ``Parameters`` key, or ``--param minispy.KEY=VALUE``):

* ``MaxRecords`` (REG_DWORD, default 10000): how many records the buffer
  holds before it drops new ones (Windows' minispy has the same parameter).
* ``NameQueryMethod`` (REG_DWORD, default 0x100): how names are asked for:
  0x100 DEFAULT (the name cache, else the file system), 0x200 CACHE_ONLY,
  0x300 FILESYSTEM_ONLY (the ``NameQuery`` values).

Instances (the INF's): "Minispy - Top Instance" at 385100, the default,
attached when the filter loads; "Minispy - Middle Instance" at 370000 and
"Minispy - Bottom Instance" at 361000, attached only by hand (``minispy
--attach MNT --instance middle``, or ``fltmc attach``). Each logs on its own:
with all three attached every request is logged three times.

* **The state** (Windows' global MINISPY_DATA) is a :class:`MiniSpy` in
  ``Filter.data``, made by ``filter_load``: the log buffer, the sequence
  counter and the port's one client. Two volumes in one process
  (tests) each have their own.
* **What is registered.** A pre and a post for every major function a filter
  may register (POWER, DEVICE_CHANGE and FORGET it may not; SHUTDOWN, which
  may have no post, no request ever makes), with no I/O flags: READ and
  WRITE of every kind are seen. What the kernel answers from its caches (a
  cached ``stat``, a cached read) never reaches a filter, so it is not logged.
* **Pre-operation.** Takes the next sequence number (so the sequence order is
  the pre order, across instances), the time, the requestor (FUSE names a
  thread: its process, ``thread_group_of``, and command name,
  ``process_name``; remembered, so that a CLOSE that comes after its opener
  exited still names it), the normalized name (``get_file_name_information``
  with ``NameQueryMethod``; when no name can be had the record has none, and
  the target's inode number is the clue: a query never fails a request), the
  callback data flags and the arguments (every parameter that is not an
  output and not at its default: offset and length of a READ, disposition,
  type and open flags of a CREATE, the fields a SET_INFORMATION changes, the
  destination name of a rename or link, the name of an extended attribute
  and the length of its value). It returns SUCCESS_WITH_CALLBACK with
  the unfinished record as the completion context.
* **Post-operation.** Adds the status (NTSTATUS name and the caller's errno),
  the information (bytes read or written) and the time, encodes the record
  (JSON) and puts it in the buffer. Records are logged at post, so they come
  in post order. A post called with DRAINING (the instance is detaching while
  the request is below it) logs the record without its outcome, flagged
  ``DRAINING`` (Windows' minispy frees it instead: here the request is at
  least seen). A request a filter above completes never reaches minispy.
* **The buffer** (:class:`LogBuffer`) keeps at most ``MaxRecords`` records,
  oldest first. When it is full new records are dropped and counted (their
  sequence numbers are skipped): in the pre-operation, which then asks for no
  post (Windows' minispy cannot allocate a record then), or in the post if the
  buffer filled meanwhile; where they would have been, the reader finds
  one "dropped" entry with their count (Windows' minispy marks a record "out
  of memory"). It fills whether or not a reader is connected, as on Windows.
* **The port** ``MiniSpyPort``: created in ``filter_load`` with the default
  security (root only) and one connection at most (a second ``minispy`` is
  refused). It closes when the filter unloads: ``filter_unload`` agrees and
  the filter manager closes the filter's ports and disconnects the reader
  (the callback gets no Filter to reach the port by; on Windows FilterUnload
  closes it from the driver's globals).
  Its message callback answers GET_LOG (as many of the oldest entries as fit
  the reader's reply capacity; when there are none it waits up to the
  request's ``wait_ms`` for one, so the reader streams without polling) and
  GET_STATS.
* **Teardown.** ``instance_query_teardown`` allows any instance to be detached
  by hand; ``filter_unload`` never refuses.

Limits: Windows' minispy also logs fast I/O, FsFilter callbacks and
transactions, none of which exist here; process and command names come from
/proc at the time of the pre-operation (a thread that exited before its
request is named by its id).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import platform
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

import trio

from fltfuse import (
    CallbackData,
    CallbackDataFlags,
    ClientPort,
    CreateParameters,
    FileNameError,
    Filter,
    FilterRegistration,
    FilterUnloadFlags,
    LinkParameters,
    MajorFunction,
    NameFormat,
    NameQuery,
    NtStatus,
    OperationRegistration,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    close_client_port,
    create_communication_port,
    errno_from_status,
    get_destination_file_name_information,
    get_file_name_information,
)
from fltfuse._process import process_name, thread_group_of

from . import protocol

log = logging.getLogger("fltfuse.filters.minispy")

MAX_RECORDS_PARAMETER = "MaxRecords"
NAME_QUERY_PARAMETER = "NameQueryMethod"
DEFAULT_MAX_RECORDS = 10_000


def configuration(parameters: Mapping[str, Any]) -> tuple[int, NameQuery]:
    """(MaxRecords, name query method) from the filter's parameters; ValueError if they make no sense."""
    max_records = parameters.get(MAX_RECORDS_PARAMETER, DEFAULT_MAX_RECORDS)
    method = parameters.get(NAME_QUERY_PARAMETER, NameQuery.DEFAULT.value)
    try:
        max_records = int(str(max_records), 0)
        query = NameQuery(int(str(method), 0))
    except ValueError:
        raise ValueError(
            f"{MAX_RECORDS_PARAMETER} {max_records!r} or {NAME_QUERY_PARAMETER} {method!r} is not valid "
            f"(a positive number; one of {', '.join(hex(q.value) for q in NameQuery)})"
        ) from None
    if max_records <= 0:
        raise ValueError(f"{MAX_RECORDS_PARAMETER} {max_records} is not positive")
    return max_records, query


class LogBuffer:
    """The entries waiting for the reader: at most ``capacity`` records, oldest first, and what did not fit.

    ``logged`` counts the records put in since the filter loaded, ``dropped``
    those that found it full. Drop notices are entries too (not counted
    against the capacity): one before the next record that fits, or at the
    end of what a reader takes, for the records dropped since the last notice.
    Used only in the daemon's trio thread.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: deque[tuple[bool, bytes]] = deque()  # (a record, not a drop notice; its encoding)
        self.records = 0  # records in ``entries``
        self.logged = 0
        self.dropped = 0
        self._unreported = 0  # dropped since the last drop notice
        self._arrival: trio.Event | None = None

    @property
    def full(self) -> bool:
        return self.records >= self.capacity

    def drop(self) -> None:
        """Count a record that found the buffer full."""
        self.dropped += 1
        self._unreported += 1

    def add(self, record: dict[str, Any], now: int) -> None:
        """Put a record in (encoded), or count it dropped if the buffer is full."""
        if self.full:
            self.drop()
            return
        self._report_drops(now)
        self.entries.append((True, protocol.entry(record)))
        self.records += 1
        self.logged += 1
        if self._arrival is not None:
            self._arrival.set()
            self._arrival = None

    def _report_drops(self, now: int) -> None:
        if self._unreported:
            self.entries.append((False, protocol.entry({"type": "dropped", "count": self._unreported, "time": now})))
            self._unreported = 0

    async def wait(self, seconds: float) -> None:
        """Return when there is something to take, or after ``seconds``."""
        if self.entries or self._unreported or seconds <= 0:
            return
        if self._arrival is None:
            self._arrival = trio.Event()
        with trio.move_on_after(seconds):
            await self._arrival.wait()

    def take(self, capacity: int, now: int) -> bytes:
        """A GET_LOG answer of at most ``capacity`` bytes, made of the oldest entries (which leave the buffer)."""
        room = capacity - protocol.ANSWER_OVERHEAD
        taken: list[bytes] = []
        while True:
            if not self.entries:
                self._report_drops(now)  # drops after the last record: the notice comes last
                if not self.entries:
                    break
            is_record, data = self.entries[0]
            needed = len(data) + (1 if taken else 0)  # and a comma
            if needed > room:
                if not taken:
                    why = f"reply capacity {capacity} is too small for the next entry ({len(data)} bytes)"
                    return protocol.encode({"error": why})
                break
            room -= needed
            self.entries.popleft()
            if is_record:
                self.records -= 1
            taken.append(data)
        return protocol.log_answer(taken, bool(self.entries))


class Processes:
    """Who made a request: the process and command name of a thread id, as /proc says.

    FUSE names the calling thread; READ, WRITE, CLEANUP and CLOSE carry the
    opener's. The command name is read for every request (an exec changes
    it); the process a thread belongs to is read at most once per
    :data:`RECHECK` seconds (parsing /proc/TID/status costs more than the rest
    of a record). What was learned of a thread is remembered (the last
    :data:`SIZE` threads) for the requests that come after it exited: a CLOSE
    comes when the last descriptor goes, often after its process has gone.
    """

    SIZE = 4096
    RECHECK = 1.0

    def __init__(self) -> None:
        self._known: OrderedDict[int, tuple[int, str, float]] = OrderedDict()  # tid -> (pid, name, pid read at)

    def identify(self, tid: int) -> tuple[int, str]:
        """(process id, command name) of thread ``tid``; (``tid``, "?") for one that is gone and was never seen."""
        known = self._known.get(tid)
        now = time.monotonic()
        if known is not None and now - known[2] < self.RECHECK:
            pid, read_at = known[0], known[2]
        else:
            pid, read_at = thread_group_of(tid), now
        name = process_name(pid)
        if name == "?":
            return (known[0], known[1]) if known is not None else (pid, name)
        self._known[tid] = (pid, name, read_at)
        self._known.move_to_end(tid)
        if len(self._known) > self.SIZE:
            self._known.popitem(last=False)
        return pid, name


class MiniSpy:
    """The filter's state (Windows' MINISPY_DATA), one per loaded filter: ``Filter.data``."""

    def __init__(self, max_records: int, query: NameQuery):
        self.log = LogBuffer(max_records)
        self.query = query
        self.sequence = 0  # the last sequence number given
        self.processes = Processes()
        self.client: ClientPort | None = None
        self._epoch = time.time_ns() - time.monotonic_ns()  # times are monotonic, shown as wall-clock times

    def now(self) -> int:
        """Nanoseconds since the epoch, never going back while the filter is loaded."""
        return time.monotonic_ns() + self._epoch

    def stats(self) -> dict[str, int]:
        return {
            "logged": self.log.logged,
            "dropped": self.log.dropped,
            "buffered": self.log.records,
            "capacity": self.log.capacity,
            "sequence": self.sequence,
        }


# -- what a record says ---------------------------------------------------------------------------

_FLAGS = tuple(
    (int(flag), str(flag.name))
    for flag in CallbackDataFlags
    if flag not in (CallbackDataFlags.DIRTY, CallbackDataFlags.POST_OPERATION)  # the walk's own bookkeeping
)
_MINOR_FIELDS = ("information_class", "minor", "control_code")
_NOT_ARGUMENTS = frozenset({"parent", "new_parent", "new_name", *_MINOR_FIELDS})  # named elsewhere
_CONTENTS = frozenset({"data", "value"})  # what is written, shown as its length
_ACCESS_MODES = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
# The kernel's O_LARGEFILE (which 64-bit callers get on every open): Python's os.O_LARGEFILE is 0 on 64-bit
# machines, and the bit differs between architectures (the generic value elsewhere).
_O_LARGEFILE = {"aarch64": 0o400000, "armv7l": 0o400000, "ppc64le": 0o200000, "ppc64": 0o200000}.get(
    platform.machine(), 0o100000
)
_OPEN_FLAGS = (
    *(
        (getattr(os, name), name)
        for name in (
            "O_SYNC",  # before O_DSYNC, whose bit it includes
            "O_DSYNC",
            "O_CREAT",
            "O_EXCL",
            "O_NOCTTY",
            "O_TRUNC",
            "O_APPEND",
            "O_NONBLOCK",
            "O_DIRECT",
            "O_DIRECTORY",
            "O_NOFOLLOW",
            "O_NOATIME",
            "O_CLOEXEC",
            "O_PATH",
        )
    ),
    (_O_LARGEFILE, "O_LARGEFILE"),
)


def open_flags(flags: int) -> str:
    """open(2) flags as text: ``O_WRONLY|O_CREAT|O_LARGEFILE`` (bits without a name in octal)."""
    names = [_ACCESS_MODES.get(flags & os.O_ACCMODE, f"0o{flags & os.O_ACCMODE:o}")]
    rest = flags & ~os.O_ACCMODE
    for bit, name in _OPEN_FLAGS:
        if rest & bit == bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"0o{rest:o}")
    return "|".join(names)


def _minor(params: Parameters) -> str | None:
    for field in _MINOR_FIELDS:
        value = getattr(params, field, None)
        if value is not None:
            return str(value.name)
    return None


_NO_DEFAULT = object()
_INPUTS: dict[type[Parameters], tuple[tuple[str, Any], ...]] = {}  # (name, default) of the fields worth showing


def _inputs(params: Parameters) -> tuple[tuple[str, Any], ...]:
    inputs = _INPUTS.get(type(params))
    if inputs is None:
        fields = dataclasses.fields(params)  # type: ignore[arg-type]
        names_an_entry = any(f.name == "parent" for f in fields)  # its "name" is the record's (an EA's is not)
        inputs = _INPUTS[type(params)] = tuple(
            (f.name, _NO_DEFAULT if f.default is dataclasses.MISSING else f.default)
            for f in fields
            if f.name not in _NOT_ARGUMENTS
            and f.name not in params.OUTPUTS
            and not (f.name == "name" and names_an_entry)
        )
    return inputs


def _arguments(cbd: CallbackData, objects: RelatedObjects) -> dict[str, Any]:
    """The request's parameters worth showing: inputs not at their default, readable."""
    params = cbd.iopb.parameters
    arguments: dict[str, Any] = {}
    for name, default in _inputs(params):
        value = getattr(params, name)
        if value is default or value == default:
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            if name in _CONTENTS:
                name, value = "length", len(value)
            else:
                value = os.fsdecode(bytes(value))
        elif isinstance(value, enum.Enum):
            value = value.name
        elif name == "mode":
            value = f"0o{value:o}"
        elif name == "flags" and isinstance(params, CreateParameters):
            value = open_flags(value)
        arguments[name] = value
    if isinstance(params, (RenameParameters, LinkParameters)):
        try:
            arguments["destination"] = get_destination_file_name_information(cbd, objects).name
        except FileNameError:
            arguments["destination"] = os.fsdecode(params.new_name)
    return arguments


def _start_record(spy: MiniSpy, cbd: CallbackData, objects: RelatedObjects) -> dict[str, Any]:
    """The record of a request, as much of it as the pre-operation knows."""
    pre_time = spy.now()
    spy.sequence += 1
    params = cbd.iopb.parameters
    tid = cbd.requestor.pid
    pid, process = spy.processes.identify(tid)
    try:
        name: str | None = get_file_name_information(cbd, objects, NameFormat.NORMALIZED, spy.query).name
    except FileNameError:
        name = None
    return {
        "type": "record",
        "seq": spy.sequence,
        "instance": objects.instance.name,
        "altitude": str(objects.instance.altitude),
        "major": params.MAJOR.name,
        "minor": _minor(params),
        "name": name,
        "inode": cbd.iopb.target_file_object.inode,
        "pid": pid,
        "tid": tid,
        "process": process,
        "status": None,
        "errno": None,
        "information": None,
        "pre_time": pre_time,
        "post_time": None,
        "flags": [text for bit, text in _FLAGS if cbd.flags & bit],
        "record_flags": [],
        "arguments": _arguments(cbd, objects),
    }


def status_name(status: int) -> str:
    try:
        return NtStatus(status).name
    except ValueError:
        return f"0x{status:08X}"


# -- operation callbacks --------------------------------------------------------------------------


def pre_operation(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus | tuple[PreopCallbackStatus, Any]:
    spy: MiniSpy = objects.filter.data
    if spy.log.full:  # no room for its record: dropped now, as Windows' minispy fails to allocate one
        spy.sequence += 1
        spy.log.drop()
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, _start_record(spy, cbd, objects)


def post_operation(
    cbd: CallbackData, objects: RelatedObjects, record: dict[str, Any], flags: PostopFlags
) -> PostopCallbackStatus:
    spy: MiniSpy = objects.filter.data
    now = record["post_time"] = spy.now()
    if flags & PostopFlags.DRAINING:
        record["record_flags"].append("DRAINING")  # the request is still below: no outcome yet
    else:
        status = cbd.io_status.status
        code = errno_from_status(status)
        record["status"] = status_name(status)
        record["errno"] = errno.errorcode.get(code, str(code)) if code else None
        record["information"] = cbd.io_status.information
    spy.log.add(record, now)
    return PostopCallbackStatus.FINISHED_PROCESSING


# -- the port ---------------------------------------------------------------------------------------


def connect_notify(client: ClientPort, spy: MiniSpy, context: bytes) -> MiniSpy:
    """A reader connected (the port admits one at a time); its connection cookie is the filter's state."""
    spy.client = client
    log.info("minispy reader connected: %s", client.peer)
    return spy


def disconnect_notify(spy: MiniSpy) -> None:
    close_client_port(spy.client)
    spy.client = None


async def message_notify(spy: MiniSpy, data: bytes, reply_capacity: int) -> bytes:
    """GET_LOG and GET_STATS (see :mod:`filters.minispy.protocol`); anything else gets an error answer."""
    try:
        request = protocol.decode(data)
        op = request.get("op")
        if op not in protocol.OPS:
            raise protocol.ProtocolError(f"unknown op {op!r} (known: {', '.join(sorted(protocol.OPS))})")
        wait_ms = request.get("wait_ms", 0)
        if op == protocol.GET_LOG and not (isinstance(wait_ms, int) and 0 <= wait_ms <= protocol.MAX_WAIT_MS):
            raise protocol.ProtocolError(f"wait_ms {wait_ms!r} is not a number of milliseconds up to 60000")
    except protocol.ProtocolError as exc:
        return protocol.encode({"error": str(exc)})
    if op == protocol.GET_STATS:
        return protocol.encode({"stats": spy.stats()})
    await spy.log.wait(wait_ms / 1000)
    return spy.log.take(reply_capacity, spy.now())


# -- filter and instance callbacks ----------------------------------------------------------------


def filter_load(filter_: Filter) -> NtStatus:
    """DriverEntry's second half: the state, from the parameters, and the port."""
    try:
        max_records, query = configuration(filter_.parameters)
    except ValueError as exc:
        log.error("minispy not loaded: %s", exc)
        return NtStatus.INVALID_PARAMETER
    spy = filter_.data = MiniSpy(max_records, query)
    create_communication_port(  # it closes when the filter unloads
        filter_,
        protocol.PORT_NAME,
        connect_notify=connect_notify,
        disconnect_notify=disconnect_notify,
        message_notify=message_notify,
        max_connections=1,
        server_cookie=spy,
    )
    log.info("minispy: %d records at most, names by %s", max_records, query.name)
    return NtStatus.SUCCESS


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    """Never refuses. The port closes once the unload is agreed (the callback gets no Filter to reach it
    by), and its reader is disconnected."""
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # any instance may be detached by hand


# Every major function a filter may register, but SHUTDOWN (no post allowed, and no request makes it):
# POWER and DEVICE_CHANGE are not registrable, FORGET is the kernel's and never dispatched.
_UNREGISTERED = frozenset(
    {MajorFunction.POWER, MajorFunction.DEVICE_CHANGE, MajorFunction.FORGET, MajorFunction.SHUTDOWN}
)

REGISTRATION = FilterRegistration(
    operations=tuple(
        OperationRegistration(major, pre_operation, post_operation)
        for major in MajorFunction
        if major not in _UNREGISTERED
    ),
    filter_load=filter_load,
    filter_unload=filter_unload,
    instance_query_teardown=instance_query_teardown,
)
