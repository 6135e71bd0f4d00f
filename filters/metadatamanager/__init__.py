"""metadatamanager: keeps a per-volume metadata file open with filter-initiated I/O, hidden and protected.

A port of Windows' MetadataManager minifilter sample (``filesys/miniFilter/MetadataManager``, "fmm").

Design and operation
--------------------

Parameter (INF ``Parameters`` key, or ``--param metadatamanager.KEY=VALUE``):

* ``MetadataFile`` (REG_SZ, default ``.fltmeta``): the name of the metadata
  file in the volume root (one name: no ``/``, not ``.`` or ``..``). A bad
  name makes the instance decline to attach.

**The volume context.** At instance setup the instance allocates a VOLUME
context and keeps a :class:`MetadataFile` in it: the metadata file's
:class:`~fltfuse.FileObject` while it is open, and what the instance knows of
the file. Every callback finds it with ``get_context`` (and releases it). One
instance per volume: a second instance of the filter finds the context set
and declines to attach. Teardown complete closes the file and deletes the
context, so its cleanup callback runs exactly once (at unmount: in the
dismount), and checks that the file was closed.

**The file, opened with filter-initiated I/O.** The instance opens the file
with ``create_file(objects, name, O_RDWR | O_CREAT)`` (Windows:
``FltCreateFile`` with ``FILE_OPEN_IF``), reads it whole with ``read_file``
to learn where it ends and how many sessions it holds (Windows: "here the
filter may read the metadata contents"), and keeps the handle until teardown.
Its I/O starts just below the instance: the instances above it never see any
of it, the ones below see it flagged ``GENERATED_IO`` with ``cbd.initiator``.
Instance setup is a plain function, called before the daemon's trio loop
runs when the volume is mounted, so the open is made by the first request
the instance sees (any use of the volume starts with a LOOKUP or a CREATE);
Windows' ``FmmInstanceSetup`` opens it at once. If the open fails (a
read-only volume, a full one, a directory by that name), the failure is
logged and the file is released (below) until it is reacquired.

**What it records.** One text line per event, appended at the end of the file
with ``write_file``:

* ``open N`` when the instance opens it: N counts the opens of this file,
  across mounts (the remount appends ``open 2``);
* ``create TYPE PATH`` for each object a post-CREATE sees made (a file,
  directory, symlink or node: TYPE is ``regular``, ``directory``, ...); PATH
  is its normalized name from ``get_file_name_information``, from the volume
  root, with ``\\`` and newlines escaped as ``\\\\`` and ``\\n``;
* ``close N WHY`` before it closes the file, flushed with ``flush_buffers``
  (fsync): WHY is ``released``, or the teardown's reason
  (``volume_dismount``, ``filter_unload``, ``manual``).

Records made while the file is not open (before the first open, or while it
is released) are kept in memory and written when it is next opened. A
partial last line (a crash in the middle of a write) is ended before the
next record.

**The file is protected**, as Windows keeps ``System Volume
Information\\FilterMetadata.md`` from users (its ACL, and the filter's
share-read-only handle). Here, through the volume:

* a LOOKUP of the name in the root fails with ``OBJECT_NAME_NOT_FOUND``
  (ENOENT: ``ls``, ``cat``, ``rm`` and ``stat`` do not find it), and the root's
  listings leave it out (post-DIRECTORY_CONTROL; when a batch held only that
  entry, an empty answer would end the listing, so the instance asks below
  for the next batch with ``perform_io_synchronously``);
* a CREATE of the name (``touch``, ``mkdir``, ``ln -s``), a rename to or from
  it and a link to it fail with ``ACCESS_DENIED`` (EACCES), and so does an
  unlink of it (the kernel sends one only for a name it looked up before the
  instance attached);
* while the file is open, every open, attribute change, link and xattr
  change of its inode fails with ``ACCESS_DENIED`` too.

**Releasing the file on request.** Windows' sample closes its file when the
volume is locked or dismounted (``FSCTL_LOCK_VOLUME``, an exclusive volume
open, PnP query-remove) and reopens it on unlock. Linux has no volume lock
and pyfuse3 passes no ioctl, so the port's control is an xattr on the volume
root, which the instance answers itself (it never reaches ext4):

* ``setfattr -n user.metadatamanager -v release MOUNT`` writes ``close N
  released``, flushes and closes the file: the daemon no longer has it open
  (it may be copied or checked on the backing ext4 meanwhile); requests do
  not reopen it;
* ``setfattr -n user.metadatamanager -v reacquire MOUNT`` opens it again at
  once (and the setxattr fails with the open's errno if it cannot).

Any other value, or removing the xattr, is EINVAL. Who may: whoever may
write the root directory (the kernel checks, under ``default_permissions``).

**Teardown.** Teardown complete is a coroutine function, which the filter
manager awaits (at an unmount by ``fusermount -u`` the daemon's trio loop has
ended, and the filter manager runs it in a loop of its own): on unmount,
``fltmc unload`` and ``fltmc detach`` it writes ``close N REASON``, flushes
and closes the file (``close_file``: CLEANUP and CLOSE below the instance),
then deletes the volume context. Records still waiting in memory (the file
was released) are lost, with a warning.

Differences from the Windows sample: the INF is demand-start (the Windows one
is boot-start; here that would put the filter on every volume's default
stack); the file is created on any attachment (Windows creates it only on a
manual attachment and attaches automatically only where it exists); there
is no snapshot freeze (no ``IOCTL_VOLSNAP_FLUSH_AND_HOLD_WRITES`` on Linux).

Limits: a descriptor of the file opened before the instance attached keeps
working; a name of it the kernel cached before then still answers ``stat``
(from the kernel's caches, for up to the mount's ``entry_timeout``), though
opens and changes through it are refused; records made while the file is
released are held in memory without bound until it is reacquired.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import trio

from fltfuse import (
    CallbackData,
    Context,
    ContextRegistration,
    ContextType,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DispositionParameters,
    EaMinor,
    FileNameError,
    FileObject,
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupFlags,
    InstanceTeardownFlags,
    LinkParameters,
    LookupParameters,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    SetEaParameters,
    allocate_callback_data,
    allocate_context,
    close_file,
    create_file,
    delete_context,
    flush_buffers,
    get_context,
    get_file_name_information,
    perform_io_synchronously,
    read_file,
    release_context,
    set_context,
    status_from_errno,
    write_file,
)

log = logging.getLogger("fltfuse.filters.metadatamanager")

FILE_PARAMETER = "MetadataFile"
DEFAULT_FILE = ".fltmeta"
CONTROL = b"user.metadatamanager"  # the xattr on the volume root that releases and reacquires the file
RELEASE = b"release"
REACQUIRE = b"reacquire"
ROOT_INODE = 1
READ_CHUNK = 64 * 1024

_NEW_OBJECT = frozenset({CreateDisposition.CREATE, CreateDisposition.OPEN_IF, CreateDisposition.OVERWRITE_IF})


def configuration(parameters: Mapping[str, Any]) -> bytes:
    """The metadata file's name in the volume root, from the filter's parameters; ValueError if it is not one name."""
    name = parameters.get(FILE_PARAMETER, DEFAULT_FILE)
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"{FILE_PARAMETER} {name!r} is not a file name in the volume root")
    return os.fsencode(name)


def _escaped(path: str) -> bytes:
    return os.fsencode(path).replace(b"\\", b"\\\\").replace(b"\n", b"\\n")


def _names(params: Parameters) -> tuple[tuple[int, bytes], ...]:
    """The (directory, name) pairs a request names: what it looks up, makes, removes, renames or links."""
    if isinstance(params, RenameParameters):
        return (params.parent, params.name), (params.new_parent, params.new_name)
    if isinstance(params, LinkParameters):
        return ((params.new_parent, params.new_name),)
    if isinstance(params, (LookupParameters, CreateParameters, DispositionParameters)):
        return ((params.parent, params.name),)
    return ()


class MetadataFile:
    """What the volume context holds: the metadata file's FileObject while it is open, and what is known of it.

    Every change of the open file (open, append, close) happens under ``lock``,
    a trio lock: callbacks of concurrent requests take turns.
    """

    def __init__(self, name: bytes):
        self.name = name
        self.file_object: FileObject | None = None  # the instance's own handle (create_file), while open
        self.released = False  # closed on request, or after a failed open, until reacquired
        self.closing = False  # teardown has closed it for good
        self.session = 0  # this open's number: 1 for the file's first
        self.end = 0  # where the next record goes
        self.pending: list[bytes] = []  # records made while the file was not open
        self.lock = trio.Lock()

    def protects(self, cbd: CallbackData) -> bool:
        """Whether ``cbd`` names the file: by its name in the root, or by its inode while it is open."""
        inode = cbd.iopb.target_file_object.inode
        if self.file_object is not None and inode == self.file_object.inode:
            return True
        return any(parent == ROOT_INODE and name == self.name for parent, name in _names(cbd.iopb.parameters))

    async def open_if_wanted(self, objects: RelatedObjects) -> None:
        """Open the file unless it is open or released (the first request of the instance opens it).

        A failure is logged, and the file stays released until reacquired.
        """
        if not self._wanted():
            return
        async with self.lock:
            if not self._wanted():  # another request opened it (or it was released) while this one waited
                return
            try:
                await self._open(objects)
            except OSError as exc:
                self.released = True
                log.warning(
                    "instance %s: metadata file %s could not be opened (%s); released until reacquired",
                    objects.instance.name,
                    os.fsdecode(self.name),
                    exc,
                )

    def _wanted(self) -> bool:
        return self.file_object is None and not self.released and not self.closing

    async def reacquire(self, objects: RelatedObjects) -> None:
        """Open the file now if it is not open; OSError if that fails (it stays released)."""
        async with self.lock:
            if self.file_object is None and not self.closing:
                self.released = False
                try:
                    await self._open(objects)
                except OSError:
                    self.released = True
                    raise

    async def release(self, objects: RelatedObjects) -> None:
        """Close the file until reacquired: the daemon no longer holds it."""
        async with self.lock:
            self.released = True
            await self._close(objects, "released")

    async def close_for_teardown(self, objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
        """Close the file for good: teardown complete."""
        async with self.lock:
            self.closing = True
            await self._close(objects, (reason.name or str(int(reason))).lower())
            if self.pending:
                log.warning(
                    "instance %s: %d records made while metadata file %s was released are lost",
                    objects.instance.name,
                    len(self.pending),
                    os.fsdecode(self.name),
                )

    async def record(self, objects: RelatedObjects, line: bytes) -> None:
        """Append one record, or keep it for the next open if the file is not open."""
        async with self.lock:
            if self.file_object is None:
                self.pending.append(line)
                return
            try:
                await self._append(objects, self.file_object, line)
            except OSError as exc:
                log.warning("instance %s: record %r not written: %s", objects.instance.name, line, exc)

    async def _open(self, objects: RelatedObjects) -> None:
        file_object = await create_file(objects, self.name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            content = await self._read_all(objects, file_object)
            lines = content.split(b"\n")[:-1]  # complete lines only
            self.session = 1 + sum(line.startswith(b"open ") for line in lines)
            self.end = len(content)
            torn = b"\n" if content and not content.endswith(b"\n") else b""
            await self._append(objects, file_object, torn + b"open %d\n" % self.session + b"".join(self.pending))
        except OSError:
            await close_file(objects, file_object)
            raise
        self.pending.clear()
        self.file_object = file_object
        log.info(
            "instance %s: metadata file %s opened (open %d; %d names recorded)",
            objects.instance.name,
            os.fsdecode(self.name),
            self.session,
            sum(line.startswith(b"create ") for line in lines),
        )

    @staticmethod
    async def _read_all(objects: RelatedObjects, file_object: FileObject) -> bytes:
        chunks = []
        offset = 0
        while chunk := await read_file(objects, file_object, offset, READ_CHUNK):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    async def _append(self, objects: RelatedObjects, file_object: FileObject, data: bytes) -> None:
        written = await write_file(objects, file_object, self.end, data)
        self.end += written
        if written < len(data):
            raise OSError(errno.ENOSPC, f"{written} of {len(data)} bytes written")

    async def _close(self, objects: RelatedObjects, why: str) -> None:
        file_object = self.file_object
        if file_object is None:
            return
        self.file_object = None
        try:
            await self._append(objects, file_object, b"close %d %s\n" % (self.session, why.encode()))
            await flush_buffers(objects, file_object)
        except OSError as exc:
            log.warning("instance %s: metadata file not flushed before closing: %s", objects.instance.name, exc)
        finally:
            await close_file(objects, file_object)
        log.info("instance %s: metadata file %s closed (%s)", objects.instance.name, os.fsdecode(self.name), why)


@contextlib.contextmanager
def _metadata(objects: RelatedObjects) -> Iterator[MetadataFile | None]:
    """The volume context's MetadataFile for the length of the block (None once the instance tore down)."""
    context = get_context(objects, ContextType.VOLUME)
    if context is None:
        yield None
        return
    try:
        yield context.metadata  # type: ignore[attr-defined]
    finally:
        release_context(context)


def _complete(cbd: CallbackData, status: NtStatus) -> PreopCallbackStatus:
    cbd.io_status.status = status
    cbd.io_status.information = 0
    return PreopCallbackStatus.COMPLETE


# -- operation callbacks ------------------------------------------------------------------------


async def _guard(cbd: CallbackData, objects: RelatedObjects, refusal: NtStatus) -> PreopCallbackStatus:
    """Open the file if it is not open yet (so its inode is known), then refuse ``cbd`` if it names the file."""
    with _metadata(objects) as metadata:
        if metadata is not None:
            await metadata.open_if_wanted(objects)
            if metadata.protects(cbd):
                return _complete(cbd, refusal)
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


async def pre_lookup(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """The metadata file is not found."""
    return await _guard(cbd, objects, NtStatus.OBJECT_NAME_NOT_FOUND)


async def pre_create(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """No one makes or opens the metadata file; a new object gets its post (recorded there)."""
    status = await _guard(cbd, objects, NtStatus.ACCESS_DENIED)
    params = cbd.iopb.parameters
    assert isinstance(params, CreateParameters)
    if status is PreopCallbackStatus.SUCCESS_NO_CALLBACK and params.disposition in _NEW_OBJECT:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK
    return status


async def post_create(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """Record the new object's type and normalized name."""
    if flags & PostopFlags.DRAINING or cbd.io_status.status != NtStatus.SUCCESS:
        return PostopCallbackStatus.FINISHED_PROCESSING
    params = cbd.iopb.parameters
    assert isinstance(params, CreateParameters)
    try:
        name = get_file_name_information(cbd, objects)
    except FileNameError as exc:  # its directory went meanwhile
        log.warning("instance %s: no name for %r: %s", objects.instance.name, cbd, exc)
        return PostopCallbackStatus.FINISHED_PROCESSING
    line = b"create %s %s\n" % (params.file_type.name.lower().encode(), _escaped(name.name[len(name.volume) :]))
    with _metadata(objects) as metadata:
        if metadata is not None:
            await metadata.record(objects, line)
    return PostopCallbackStatus.FINISHED_PROCESSING


async def pre_set_information(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """No rename to or from the metadata file, no link to it, no unlink of it, no change of its attributes."""
    return await _guard(cbd, objects, NtStatus.ACCESS_DENIED)


async def pre_set_ea(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """``user.metadatamanager`` on the root releases or reacquires the file; no xattr of the file changes."""
    params = cbd.iopb.parameters
    assert isinstance(params, SetEaParameters)
    if cbd.iopb.target_file_object.inode == ROOT_INODE and params.name == CONTROL:
        with _metadata(objects) as metadata:
            if metadata is not None:
                return _complete(cbd, await _control(objects, metadata, params))
    return await _guard(cbd, objects, NtStatus.ACCESS_DENIED)


async def _control(objects: RelatedObjects, metadata: MetadataFile, params: SetEaParameters) -> NtStatus:
    if params.minor is EaMinor.SET and params.value == RELEASE:
        await metadata.release(objects)
        return NtStatus.SUCCESS
    if params.minor is EaMinor.SET and params.value == REACQUIRE:
        try:
            await metadata.reacquire(objects)
        except OSError as exc:
            log.warning("instance %s: reacquire failed: %s", objects.instance.name, exc)
            return status_from_errno(exc.errno or errno.EIO)
        return NtStatus.SUCCESS
    return NtStatus.INVALID_PARAMETER


async def post_directory_control(
    cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """Leave the metadata file out of the root's listings."""
    params = cbd.iopb.parameters
    assert isinstance(params, DirectoryControlParameters)
    if cbd.iopb.target_file_object.inode != ROOT_INODE or cbd.io_status.status != NtStatus.SUCCESS:
        return PostopCallbackStatus.FINISHED_PROCESSING
    with _metadata(objects) as metadata:
        if metadata is None:
            return PostopCallbackStatus.FINISHED_PROCESSING
        entries = [entry for entry in params.entries if entry.name != metadata.name]
        if len(entries) == len(params.entries):
            return PostopCallbackStatus.FINISHED_PROCESSING
        if not entries and not flags & PostopFlags.DRAINING:
            # The batch was only the metadata file: an empty answer would end the listing. Ask for the next batch.
            again = DirectoryControlParameters(params.entries[-1].next_offset)
            more = allocate_callback_data(objects, cbd.iopb.target_file_object, again)
            await perform_io_synchronously(objects, more)
            cbd.io_status.status = more.io_status.status
            entries = [entry for entry in again.entries if entry.name != metadata.name]
        params.entries = entries
    return PostopCallbackStatus.FINISHED_PROCESSING


# -- instance callbacks and the volume context ---------------------------------------------------


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    """Keep a MetadataFile in the volume context; decline a bad name, or a second instance on the volume."""
    try:
        name = configuration(objects.filter.parameters)
    except ValueError as exc:
        log.warning("instance %s not attached: %s", objects.instance.name, exc)
        return NtStatus.FLT_DO_NOT_ATTACH
    existing = get_context(objects, ContextType.VOLUME)
    if existing is not None:
        release_context(existing)
        log.warning("instance %s not attached: another instance keeps this volume's metadata", objects.instance.name)
        return NtStatus.FLT_DO_NOT_ATTACH
    context = allocate_context(objects, ContextType.VOLUME)
    context.metadata = MetadataFile(name)  # type: ignore[attr-defined]
    set_context(objects, context)
    release_context(context)  # the volume keeps its own reference
    log.info("instance %s keeps its metadata in %s", objects.instance.name, name.decode(errors="replace"))
    return NtStatus.SUCCESS


async def instance_teardown_complete(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    """Close the file (a last record, flushed), then take the context off the volume: its cleanup runs."""
    context = get_context(objects, ContextType.VOLUME)
    if context is None:
        return
    try:
        await context.metadata.close_for_teardown(objects, reason)  # type: ignore[attr-defined]
        delete_context(context)
    finally:
        release_context(context)


def cleanup_volume_context(context: Context, context_type: ContextType) -> None:
    """Runs once, when the volume context's last reference goes; the file must be closed by then."""
    metadata: MetadataFile = context.metadata  # type: ignore[attr-defined]
    if metadata.file_object is not None:
        log.error("metadata file %s is still open at the volume context's cleanup", os.fsdecode(metadata.name))
    log.info("metadata volume context cleaned up")


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # fltmc detach: teardown complete closes the file


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS  # each instance's teardown closes its file


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.LOOKUP, pre_lookup),
        OperationRegistration(MajorFunction.CREATE, pre_create, post_create),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information),
        OperationRegistration(MajorFunction.SET_EA, pre_set_ea),
        OperationRegistration(MajorFunction.DIRECTORY_CONTROL, post=post_directory_control),
    ),
    contexts=(ContextRegistration(ContextType.VOLUME, cleanup_volume_context),),
    filter_unload=filter_unload,
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_complete=instance_teardown_complete,
)
