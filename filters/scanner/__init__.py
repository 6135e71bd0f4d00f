"""scanner: the anti-virus filter (Windows' scanner sample, with avscan's verdict cache).

What it shows: a filter and its user-mode service over a communication port;
FltSendMessage with a timeout and a policy for when no verdict comes;
FltCancelFileOpen; filter-initiated reads feeding a scan; a per-handle
context; recognising the service's own I/O.

Design and operation
--------------------
* ``filter_load`` creates the port ``ScannerPort`` (one connection, root
  only, as the sample's default security descriptor). ``fltfuse-scanner``
  connects; its process is the *service*: requests whose caller belongs to it
  (``port.client_of(cbd.requestor)``, any of its threads) are never scanned
  (the sample compares the requesting process too), so the service can never
  deadlock on its own I/O. Were one sent to it anyway, the port's deadlock
  detector would refuse that send at once (PortDeadlockError) rather than
  hold the service's I/O for the scan timeout.
* **Open** (post-CREATE of a regular file opened for reading, whose name has a
  configured extension; ``*``, the default, means every file): the file's
  data is read below the scanner (``read_file``, so a lower filter such as
  an encryption layer hands over plaintext) into a pipe whose read end goes
  to the service with the SCAN message (a descriptor, the way avscan hands
  its service a section to map). The service reads it to its end while it
  judges, so a large file never sits in memory and other requests on the
  mount go on meanwhile. Infected: ``cancel_file_open`` (EACCES). An empty
  file is clean without a scan.
* **Writes**: each WRITE's data is scanned before it reaches the file system;
  infected data fails the write with EACCES. Without the kernel's write-back
  cache (fltfuse does not enable it) every write(2) is one WRITE, so the
  error shows at that write(2). A pattern split across two writes is caught
  by the rescan at close.
* **Close**: a handle that wrote is rescanned at its CLEANUP (each close(2));
  an infected file is then unopenable (and quarantined if configured). The
  close itself succeeds: the data is already written. A handle written
  after its last CLEANUP (a shared mapping's pages written back after
  close(2), at the latest at munmap) is rescanned at its CLOSE (RELEASE).
* **Verdict cache** (avscan-like): per inode, the verdict with the file's
  mtime, ctime and size and the service's signature-database fingerprint. An
  open of a file whose marker and fingerprint match sends no scan. A write
  or truncate through the mount drops the entry at once; anything else that
  changes the file (even on the backing volume behind the mount's back)
  changes its ctime; a rename over a name puts another inode there. A new
  fingerprint (in the service's connection or a ``database`` message)
  empties the cache; a verdict whose reply names another fingerprint than
  the current one (judged just before or after a change) is obeyed but not
  cached.
* **No verdict** (no service connected, no reply within ``ScanTimeout``
  milliseconds, the service dying mid-scan, an engine error): ``Policy``
  decides, ``allow`` (open or write proceeds, logged) or ``deny`` (EACCES).
  A dying service is seen at once (its socket closes), not at the timeout.
* **Quarantine** (``Quarantine`` = a directory name at the volume root,
  empty to disable): a file found infected is renamed there as
  ``<inode>-<name>``, or ``<inode>-<n>-<name>`` when that is taken (another
  link to it was quarantined first); never over another file.

Parameters (INF ``Parameters`` key, ``--param scanner.KEY=VALUE``):
``Extensions``, ``Policy``, ``ScanTimeout``, ``ScanWrites``, ``Quarantine``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio

from filters._contexts import find_or_create_context
from fltfuse import (
    CallbackData,
    ClientPort,
    CommunicationPort,
    ContextRegistration,
    ContextType,
    FileAttributes,
    FileNameError,
    FileObject,
    FileType,
    Filter,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PortError,
    PortRefusedError,
    PortTimeoutError,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    Requestor,
    allocate_callback_data,
    cancel_file_open,
    close_client_port,
    close_file,
    create_communication_port,
    create_file,
    get_context,
    get_file_name_information,
    perform_io_synchronously,
    query_information_file,
    read_file,
    release_context,
    send_message,
)

from . import protocol
from .protocol import ProtocolError, ScanResult

log = logging.getLogger("fltfuse.filters.scanner")

CHUNK = 1024 * 1024  # bytes read below the scanner per step of a file scan
CACHE_ENTRIES = 65536


@dataclass
class _Verdict:
    infected: bool
    marker: tuple[int, int, int]  # mtime_ns, ctime_ns, size when judged
    fingerprint: str
    signature: str | None


@dataclass
class ScannerData:
    """The filter's globals (``Filter.data``): its port, its service and its verdicts."""

    extensions: frozenset[str] | None  # None: every file
    deny_without_verdict: bool
    timeout: float
    scan_writes: bool
    quarantine: str
    port: CommunicationPort | None = None
    client: ClientPort | None = None
    fingerprint: str = ""
    verdicts: OrderedDict[int, _Verdict] = field(default_factory=OrderedDict)
    stats: Counter[str] = field(default_factory=Counter)

    def wants(self, name: str) -> bool:
        if self.extensions is None:
            return True
        final = name.rsplit("/", 1)[-1]
        return "." in final and final.rsplit(".", 1)[1].lower() in self.extensions

    def from_service(self, requestor: Requestor) -> bool:
        return self.port is not None and self.port.client_of(requestor) is not None

    def cached(self, ino: int, attributes: FileAttributes) -> _Verdict | None:
        verdict = self.verdicts.get(ino)
        if verdict is None or verdict.marker != _marker(attributes) or verdict.fingerprint != self.fingerprint:
            return None
        self.verdicts.move_to_end(ino)
        return verdict

    def record(self, ino: int, attributes: FileAttributes, result: ScanResult) -> None:
        """Cache a verdict judged with the current signature database (one judged with another is not kept)."""
        if result.fingerprint != self.fingerprint:
            return
        self.verdicts[ino] = _Verdict(
            result.verdict == "infected", _marker(attributes), self.fingerprint, result.signature
        )
        self.verdicts.move_to_end(ino)
        while len(self.verdicts) > CACHE_ENTRIES:
            self.verdicts.popitem(last=False)

    def use_fingerprint(self, fingerprint: str) -> None:
        """The service's signature database: a new one makes every cached verdict stale."""
        if fingerprint and fingerprint != self.fingerprint:
            if self.verdicts:
                log.info("scanner: signature database changed; %d cached verdict(s) dropped", len(self.verdicts))
            self.verdicts.clear()
            self.fingerprint = fingerprint


def _marker(attributes: FileAttributes) -> tuple[int, int, int]:
    return attributes.mtime_ns, attributes.ctime_ns, attributes.size


def _data(objects: RelatedObjects) -> ScannerData:
    data: ScannerData = objects.filter.data
    return data


# -- loading: parameters and the port ------------------------------------------------------------


def _settings(parameters: Any) -> ScannerData:
    """The filter's parameters, checked; a bad value raises ValueError naming it."""
    extensions = str(parameters.get("Extensions", "*")).strip()
    policy = str(parameters.get("Policy", "allow")).strip().lower()
    if policy not in ("allow", "deny"):
        raise ValueError(f"parameter Policy is {policy!r}: use allow or deny")
    try:
        timeout = int(parameters.get("ScanTimeout", 10000)) / 1000
    except (TypeError, ValueError):
        raise ValueError(f"parameter ScanTimeout is {parameters.get('ScanTimeout')!r}: milliseconds") from None
    if timeout <= 0:
        raise ValueError("parameter ScanTimeout must be positive (milliseconds)")
    quarantine = str(parameters.get("Quarantine", "")).strip().strip("/")
    if "/" in quarantine or quarantine in (".", ".."):
        raise ValueError(f"parameter Quarantine is {quarantine!r}: a directory name at the volume root")
    wanted = None
    if extensions != "*":
        wanted = frozenset(e.strip().lstrip(".").lower() for e in extensions.split(",") if e.strip())
    scan_writes = str(parameters.get("ScanWrites", 1)).strip() not in ("0", "no", "false")
    return ScannerData(wanted, policy == "deny", timeout, scan_writes, quarantine)


def filter_load(filter_: Filter) -> None:
    data = filter_.data = _settings(filter_.parameters)

    def connect(client: ClientPort, server_cookie: Any, context: bytes) -> ClientPort:
        try:
            hello, _ = protocol.decode(context)
        except ProtocolError as exc:
            raise PortRefusedError(f"not a scanner service: {exc}") from None
        data.client = client
        data.use_fingerprint(str(hello.get("fingerprint", "")))
        log.info("scanner: service %s (pid %d) connected", hello.get("service", "?"), client.pid)
        return client

    def disconnect(client: ClientPort) -> None:
        if data.client is client:
            data.client = None
        close_client_port(client)
        log.info("scanner: service pid %d disconnected", client.pid)

    def message(client: ClientPort, raw: bytes, reply_capacity: int) -> bytes:
        try:
            header, _ = protocol.decode(raw)
        except ProtocolError as exc:  # the client's mistake, answered as such: not a filter bug
            return protocol.encode({"ok": False, "error": str(exc)})
        if header.get("op") == "database":
            data.use_fingerprint(str(header.get("fingerprint", "")))
            return protocol.encode({"ok": True})
        if header.get("op") == "stats":
            return protocol.encode({"ok": True, "stats": dict(data.stats), "cached": len(data.verdicts)})
        return protocol.encode({"ok": False, "error": f"unknown op {header.get('op')!r}"})

    data.port = create_communication_port(
        filter_,
        protocol.PORT_NAME,
        connect_notify=connect,
        disconnect_notify=disconnect,
        message_notify=message,
        max_connections=1,
    )


def filter_unload(flags: FilterUnloadFlags) -> None:
    """Agree to unload: fltfuse then closes the port and disconnects the service."""
    return None


# -- scanning ------------------------------------------------------------------------------------


async def _feed(
    objects: RelatedObjects, file_object: FileObject, pipe: trio.lowlevel.FdStream, failed: list[str]
) -> None:
    """Copy the file's data, read below this instance, into the pipe the service reads; close it at the end."""
    offset = 0
    try:
        while chunk := await read_file(objects, file_object, offset, CHUNK):
            await pipe.send_all(chunk)
            offset += len(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the service stopped reading: its reply says why
    except OSError as exc:
        failed.append(f"reading at offset {offset} failed: {exc}")
    finally:
        pipe.close()


async def _ask(
    data: ScannerData, header: dict[str, Any], body: bytes = b"", fds: tuple[int, ...] = ()
) -> ScanResult | None:
    """Send one scan to the service; its result, or None when none came (no service, timeout, failure)."""
    client = data.client
    if client is None:
        data.stats["unscanned"] += 1
        return None
    data.stats["scans"] += 1
    try:
        reply = await send_message(
            client,
            protocol.encode({"op": "scan", **header}, body),
            reply_capacity=protocol.REPLY_CAPACITY,
            timeout=data.timeout,
            fds=fds,
        )
        assert reply is not None
        result = ScanResult.from_reply(reply)
    except PortTimeoutError:
        data.stats["timeouts"] += 1
        log.warning("scanner: no verdict for %s within %s s", header.get("name"), data.timeout)
        return None
    except (PortError, ProtocolError) as exc:
        data.stats["failures"] += 1
        log.warning("scanner: no verdict for %s: %s", header.get("name"), exc)
        return None
    if result.verdict == "error":
        data.stats["failures"] += 1
        log.warning("scanner: the service could not scan %s: %s", header.get("name"), result.error)
        return None
    return result


async def _scan_file(
    objects: RelatedObjects, file_object: FileObject, name: str, size: int, pid: int, reason: str
) -> ScanResult | None:
    data = _data(objects)
    if data.client is None:
        return await _ask(data, {})
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pipe = trio.lowlevel.FdStream(write_end)
    failed: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, objects, file_object, pipe, failed)
            header = {"kind": "file", "name": name, "size": size, "pid": pid, "reason": reason}
            try:
                result = await _ask(data, header, fds=(read_end,))
            finally:
                nursery.cancel_scope.cancel()
    finally:
        pipe.close()
        os.close(read_end)
    if failed:
        data.stats["failures"] += 1
        log.warning("scanner: %s: %s; no verdict", name, failed[0])
        return None
    return result


def _name(cbd: CallbackData, objects: RelatedObjects) -> str:
    """The file's path from the volume root (what the service logs, and extensions are matched on)."""
    try:
        info = get_file_name_information(cbd, objects)
    except FileNameError:
        return f"<inode {cbd.iopb.target_file_object.inode}>"
    return info.name[len(info.volume) :] or "/"


def _refuses(data: ScannerData, result: ScanResult | None, name: str, what: str) -> bool:
    """Whether the request fails: an infected verdict, or none and the policy denies."""
    if result is None:
        if data.deny_without_verdict:
            data.stats["denied"] += 1
            log.warning("scanner: %s of %s denied: no verdict (Policy=deny)", what, name)
            return True
        log.info("scanner: %s of %s allowed without a verdict (Policy=allow)", what, name)
        return False
    if result.verdict == "infected":
        data.stats["infected"] += 1
        data.stats["denied"] += 1
        log.warning("scanner: %s of %s denied: %s found by %s", what, name, result.signature, result.engine)
        return True
    return False


NAME_MAX = 255  # the longest name ext4 takes
RENAME_NOREPLACE = 1  # RenameParameters.flags: fail with OBJECT_NAME_COLLISION rather than replace
QUARANTINE_ATTEMPTS = 100  # names tried before the move is given up


def quarantine_name(inode: int, name: bytes, attempt: int) -> bytes:
    """The name a file gets in quarantine: ``<inode>-<name>`` at the first attempt, ``<inode>-<attempt>-<name>``
    after (the name was taken: another link to the same file, or an earlier file with the same inode number).
    A long name loses bytes from its front, so the result fits NAME_MAX and keeps its extension."""
    prefix = f"{inode}-{attempt}-" if attempt > 1 else f"{inode}-"
    return prefix.encode() + name[max(0, len(prefix) + len(name) - NAME_MAX) :]


async def _quarantine(objects: RelatedObjects, data: ScannerData, file_object: FileObject, name: str) -> None:
    """Move an infected file into the quarantine directory under ``quarantine_name``, never over another file."""
    if not data.quarantine or file_object.link is None:
        return
    parent, final = file_object.link
    try:
        directory = await create_file(objects, data.quarantine, os.O_RDONLY | os.O_DIRECTORY | os.O_CREAT, 0o700)
    except OSError as exc:
        log.error("scanner: quarantine directory %s: %s", data.quarantine, exc)
        return
    try:
        for attempt in range(1, QUARANTINE_ATTEMPTS + 1):
            new_name = quarantine_name(file_object.inode, final, attempt)
            move = RenameParameters(parent, final, directory.inode, new_name, RENAME_NOREPLACE)
            cbd = allocate_callback_data(objects, FileObject(parent), move)
            await perform_io_synchronously(objects, cbd)
            if cbd.io_status.status != NtStatus.OBJECT_NAME_COLLISION:
                break
        if cbd.io_status.status:
            log.error("scanner: moving %s into quarantine failed: %s", name, NtStatus(cbd.io_status.status).name)
        else:
            log.warning("scanner: %s quarantined as %s/%s", name, data.quarantine, new_name.decode(errors="replace"))
    finally:
        await close_file(objects, directory)


# -- callbacks -----------------------------------------------------------------------------------


async def post_create(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """Scan a regular file opened for reading, unless its verdict is cached; refuse it if infected."""
    params = cbd.iopb.parameters
    file_object = cbd.iopb.target_file_object
    data = _data(objects)
    if (
        flags & PostopFlags.DRAINING
        or cbd.io_status.status
        or params.file_type is not FileType.REGULAR
        or file_object.handle is None
        or params.flags & os.O_ACCMODE == os.O_WRONLY
        or params.flags & os.O_TRUNC
        or data.from_service(cbd.requestor)
    ):
        return PostopCallbackStatus.FINISHED_PROCESSING
    name = _name(cbd, objects)
    if not data.wants(name):
        return PostopCallbackStatus.FINISHED_PROCESSING
    attributes = await query_information_file(objects, file_object)
    if attributes.size == 0:
        return PostopCallbackStatus.FINISHED_PROCESSING
    verdict = data.cached(file_object.inode, attributes)
    if verdict is not None:
        data.stats["cache_hits"] += 1
        result: ScanResult | None = ScanResult("infected" if verdict.infected else "clean", verdict.signature, "cache")
    else:
        result = await _scan_file(objects, file_object, name, attributes.size, cbd.requestor.pid, "open")
        if result is not None:
            data.record(file_object.inode, attributes, result)
    if _refuses(data, result, name, "open"):
        await cancel_file_open(objects, cbd, NtStatus.ACCESS_DENIED)
        if result is not None and verdict is None:
            await _quarantine(objects, data, file_object, name)
    return PostopCallbackStatus.FINISHED_PROCESSING


async def pre_write(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """Drop the file's verdict, mark the handle for a rescan at close, and scan the data before it is written."""
    params = cbd.iopb.parameters
    file_object = cbd.iopb.target_file_object
    data = _data(objects)
    data.verdicts.pop(file_object.inode, None)
    if data.from_service(cbd.requestor):
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    name = _name(cbd, objects)
    if not data.wants(name):
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    if file_object.handle is not None:
        handle_context = find_or_create_context(objects, ContextType.STREAM_HANDLE, lambda context: None)
        handle_context.rescan = True  # set on each write: an earlier close(2) of this handle (a dup) cleared it
        release_context(handle_context)
    if not data.scan_writes:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    header = {"kind": "buffer", "name": name, "offset": params.offset, "pid": cbd.requestor.pid, "reason": "write"}
    result = await _ask(data, header, bytes(params.data))
    if _refuses(data, result, name, "write"):
        cbd.io_status.status = NtStatus.ACCESS_DENIED
        cbd.io_status.information = 0
        return PreopCallbackStatus.COMPLETE
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def post_set_information(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """A truncate, chmod or other change through the mount: the file's verdict goes."""
    if not cbd.io_status.status:
        _data(objects).verdicts.pop(cbd.iopb.target_file_object.inode, None)
    return PostopCallbackStatus.FINISHED_PROCESSING


async def _rescan_if_written(cbd: CallbackData, objects: RelatedObjects, reason: str) -> None:
    """Rescan the file if this handle wrote since its last rescan; an infected one becomes unopenable (and
    quarantined)."""
    handle_context = get_context(objects, ContextType.STREAM_HANDLE)
    if handle_context is None:
        return
    rescan = handle_context.rescan
    handle_context.rescan = False
    release_context(handle_context)
    if not rescan:
        return
    file_object = cbd.iopb.target_file_object
    name = _name(cbd, objects)
    own = None
    try:
        reader = file_object
        if file_object.flags & os.O_ACCMODE == os.O_WRONLY:  # the writer cannot read: open a handle of our own
            reader = own = await create_file(objects, name)
        attributes = await query_information_file(objects, reader)
        if attributes.size == 0:
            return
        result = await _scan_file(objects, reader, name, attributes.size, cbd.requestor.pid, reason)
    except OSError as exc:
        log.warning("scanner: rescan of %s at %s failed: %s", name, reason, exc)
        return
    finally:
        if own is not None:
            await close_file(objects, own)
    if result is not None:
        data = _data(objects)
        data.record(file_object.inode, attributes, result)
        if result.verdict == "infected":
            data.stats["infected"] += 1
            log.warning(
                "scanner: %s is infected after writes (%s, %s): it can no longer be opened",
                name,
                result.signature,
                result.engine,
            )
            await _quarantine(objects, data, file_object, name)


async def post_cleanup(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """A handle that wrote is closing (each close(2) of a descriptor of it): rescan the file."""
    if not flags & PostopFlags.DRAINING:
        await _rescan_if_written(cbd, objects, "close")
    return PostopCallbackStatus.FINISHED_PROCESSING


async def pre_close(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """The handle goes (FUSE's RELEASE): rescan the file if it was written after its last CLEANUP.

    Pages of a shared mapping written after close(2) reach the file system after the CLEANUP (when the
    kernel writes them back, at the latest at munmap), so the rescan at CLEANUP never sees them (the
    coverage hole of Windows-driver-samples #1371); the handle's last request is this CLOSE.
    """
    await _rescan_if_written(cbd, objects, "release")
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.CREATE, post=post_create),
        OperationRegistration(MajorFunction.WRITE, pre=pre_write),
        OperationRegistration(MajorFunction.SET_INFORMATION, post=post_set_information),
        OperationRegistration(MajorFunction.CLEANUP, post=post_cleanup),
        OperationRegistration(MajorFunction.CLOSE, pre=pre_close),
    ),
    contexts=(ContextRegistration(ContextType.STREAM_HANDLE),),
    filter_load=filter_load,
    filter_unload=filter_unload,
    instance_query_teardown=lambda objects, flags: NtStatus.SUCCESS,
)
