"""encryption: file contents encrypted at rest by buffer swapping (AES-256-GCM, one record per 16 KiB block).

What it shows: buffer swapping as an encryption filter does it (a pre-READ
reads a different, larger range and its post hands the caller the plaintext
slice; a pre-WRITE sends a buffer of its own down, and its post reports the
caller's count), attribute and listing transformations in post-operation
callbacks, a stream context with a reader-writer lock that spans a request's
pre and post, filter-initiated I/O on a handle of its own
(``open_file_by_id``), and an instance setup that refuses with a reason.

Design and operation
--------------------
* **Format** (``layout.py``): a 24-byte header with a random file id, then
  one record per 16 KiB block: a random nonce, the AES-256-GCM ciphertext and
  its tag, with the file id and block index as additional data. A record
  cannot be changed, moved or replayed into another file unnoticed: such a
  read fails with EIO and a log line naming the inode and block. All-zero
  record slots are holes and read as zeros, so sparse files stay sparse.
  Why GCM rather than XTS: XTS keeps sizes but cannot detect tampering, and
  cannot encrypt a tail shorter than 16 bytes; GCM costs 28 bytes per block
  and detects every change.
* **Sizes**: the plaintext size follows from the ciphertext size, so every
  attribute a request returns for a regular file (LOOKUP, CREATE,
  QUERY_INFORMATION, SET_INFORMATION, a LINK, each entry of a listing)
  shows the plaintext size. ``st_blocks`` stays the ciphertext's
  allocation.
* **Reads** (shared lock): the pre swaps the request for the records that
  cover it (with the header when reading from the start, so the file id
  comes with the data); the post opens them and gives the caller exactly
  the bytes a plain read returns, short at the end of the file.
* **Writes** (exclusive lock): the pre reads the partial first and last
  blocks (read-modify-write), re-seals a partial old last block that the
  write leaves behind (the file grows past it), seals the new blocks, and
  swaps in that buffer at the records' offset. An empty file gets its header
  with its first write. The post reports the caller's count.
* **Truncate** (SET_INFORMATION with a size): a cut inside a block re-seals
  that block shortened; growing re-seals the old partial last block padded
  with zeros; the new end is a hole. The size sent down is the ciphertext's.
* **The filter's own I/O** (header, read-modify-write, truncation) goes
  through one handle per file that the filter opens by inode with
  ``O_NOATIME`` (so it never moves the access time a plain ext4 would keep)
  and closes when the file's last handle closes; what it writes for a
  WRITE goes through the writer's own handle (its handle may be read-only
  when the daemon is not root and the file's mode forbids writing). Handles opened
  ``O_DIRECT`` reach the file system without it (records are not
  block-aligned); the filter applies ext4's rule itself: an offset that is
  not 512-aligned (or a read length that is not) is EINVAL.
* **Names stay plaintext**: only contents are encrypted; names, sizes
  rounded to blocks, times, owners and modes are visible on the device.
* **Keys** (``keys.py``): ``KeyFile``, ``Passphrase``/``PassphraseFile``
  (scrypt) or a random key file under ``KeyDirectory`` named by the volume's
  UUID, made on first mount. The volume record ``.fltfuse-encryption`` at
  the root of the backing volume (hidden from the mount: lookups do not
  find it, listings leave it out, nothing may create, rename or remove it
  there) holds the key check; a wrong key makes the instance setup refuse,
  so the mount fails with that message, and a volume that holds other files
  but no record is refused too (its files are not encrypted).
* **Detach**: refused (``fltmc detach``), and so is a non-mandatory unload:
  open files would show ciphertext. Unmount instead.

Parameters (INF ``Parameters`` key, ``--param encryption.KEY=VALUE``):
``KeyFile``, ``Passphrase``, ``PassphraseFile``, ``KeyDirectory``.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from typing import Any

import trio

from filters._contexts import find_or_create_context
from fltfuse import (
    CallbackData,
    Context,
    ContextRegistration,
    ContextType,
    CreateDisposition,
    CreateParameters,
    DirectoryControlParameters,
    DispositionParameters,
    FileAttributes,
    FileObject,
    FileType,
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupRefused,
    LinkParameters,
    LookupParameters,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    ReadParameters,
    RenameParameters,
    SetAttributesParameters,
    WriteParameters,
    close_file,
    get_context,
    open_file_by_id,
    query_information_file,
    read_file,
    reference_context,
    release_context,
    status_from_errno,
    write_file,
)

from .keys import RECORD_NAME, KeyProblem, KeySettings, open_volume_key
from .layout import (
    BLOCK_SIZE,
    HEADER_SIZE,
    RECORD_SIZE,
    FileCipher,
    NotEncrypted,
    TamperedBlock,
    cipher_size,
    new_header,
    parse_header,
    plain_size,
    record_offset,
)

log = logging.getLogger("fltfuse.filters.encryption")

ROOT = 1  # the volume root's node id
_DIRECT_IO_ALIGNMENT = 512
_WITH_CALLBACK = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
_NO_CALLBACK = PreopCallbackStatus.SUCCESS_NO_CALLBACK
_COMPLETE = PreopCallbackStatus.COMPLETE
_FINISHED = PostopCallbackStatus.FINISHED_PROCESSING
_EMPTIED = frozenset(  # the dispositions that leave the file empty
    {CreateDisposition.CREATE, CreateDisposition.OPEN_IF, CreateDisposition.OVERWRITE, CreateDisposition.OVERWRITE_IF}
)


class ReadWriteLock:
    """Many readers or one writer; not tied to a task (a post may run in the drain's task)."""

    __slots__ = ("_lot", "_readers", "_waiting_writers", "_writer")

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire_shared(self) -> None:
        while self._writer or self._waiting_writers:
            await self._lot.park()
        self._readers += 1

    def release_shared(self) -> None:
        self._readers -= 1
        if not self._readers:
            self._lot.unpark_all()

    async def acquire_exclusive(self) -> None:
        self._waiting_writers += 1
        try:
            while self._writer or self._readers:
                await self._lot.park()
        finally:
            self._waiting_writers -= 1
        self._writer = True

    def release_exclusive(self) -> None:
        self._writer = False
        self._lot.unpark_all()


@dataclasses.dataclass
class _Volume:
    """One instance's state: its cipher, and the files it holds a handle of its own on."""

    cipher: FileCipher
    origin: str
    private: dict[int, Context] = dataclasses.field(default_factory=dict)  # inode -> stream context (referenced)


_VOLUMES: dict[Any, _Volume] = {}  # by instance


def _init_stream(context: Context) -> None:
    """A file's stream context: its lock, what is known of it, and the filter's own handle on it."""
    context.lock = ReadWriteLock()
    context.size = None  # the plaintext size, None until loaded (or after a failed write)
    context.file_id = None  # None: the file has no header (it is empty) or it is not loaded yet
    context.private = None  # the filter's own FileObject on the file, open while the file has handles
    context.handles = 0  # handles open on the file through this instance


def _stream(objects: Any) -> Context:
    return find_or_create_context(objects, ContextType.STREAM, _init_stream)


def _hidden(parent: int, name: bytes) -> bool:
    return parent == ROOT and name.startswith(RECORD_NAME.encode())


def _plain(attributes: FileAttributes | None) -> FileAttributes | None:
    """The attributes with the plaintext size, for a regular file."""
    if attributes is None or not stat.S_ISREG(attributes.mode) or not attributes.size:
        return attributes
    return dataclasses.replace(attributes, size=plain_size(attributes.size))


def _fail(cbd: CallbackData, exc: Exception) -> PreopCallbackStatus:
    """Complete the request with the status ``exc`` stands for, logging damaged data."""
    if isinstance(exc, OSError):
        cbd.io_status.status = status_from_errno(exc.errno or errno.EIO)
    else:
        log.error("encryption: inode %d: %s", cbd.iopb.target_file_object.inode, exc)
        cbd.io_status.status = NtStatus.CRC_ERROR
    cbd.io_status.information = 0
    return _COMPLETE


def _misaligned(cbd: CallbackData, offset: int, length: int = 0) -> bool:
    """ext4's O_DIRECT rule, which the file system below cannot apply (its handle is not O_DIRECT).

    Pass a READ's ``length`` (page-cache reads are whole pages); never a
    WRITE's, which may be writeback of a partial last page (see the backend).
    """
    if cbd.iopb.target_file_object.flags & os.O_DIRECT and (offset | length) % _DIRECT_IO_ALIGNMENT:
        cbd.io_status.status = NtStatus.INVALID_PARAMETER
        return True
    return False


# -- the filter's own handle and reads --------------------------------------------------------------


async def _private(objects: Any, stream: Context) -> FileObject:
    """The filter's own handle on the file (opened by inode, without access-time updates)."""
    if stream.private is None:
        inode = objects.file_object.inode
        opened = None
        for flags in (os.O_RDWR | os.O_NOATIME, os.O_RDWR, os.O_RDONLY | os.O_NOATIME, os.O_RDONLY):
            try:
                opened = await open_file_by_id(objects, inode, flags)
                break
            except PermissionError:  # O_NOATIME needs the owner; a read-only file opens read-only
                continue
        if opened is None:
            raise PermissionError(errno.EACCES, f"inode {inode}: the filter cannot open it")
        if stream.private is None:
            stream.private = opened
            _VOLUMES[objects.instance].private[inode] = stream
            reference_context(stream)  # the instance's, while it holds the handle
        else:  # another request opened one meanwhile
            await close_file(objects, opened)
    private: FileObject = stream.private
    return private


async def _close_private(objects: Any, stream: Context) -> None:
    private = stream.private
    if private is None:
        return
    stream.private = None
    _VOLUMES[objects.instance].private.pop(private.inode, None)
    try:
        await close_file(objects, private)
    finally:
        release_context(stream)


async def _load(objects: Any, stream: Context) -> None:
    """Learn the file's plaintext size and file id (under the stream's lock)."""
    attributes = await query_information_file(objects, FileObject(objects.file_object.inode))
    stream.size = plain_size(attributes.size)
    if attributes.size == 0:
        stream.file_id = None
    elif stream.file_id is None:
        header = await read_file(objects, await _private(objects, stream), 0, HEADER_SIZE)
        stream.file_id = parse_header(header)


async def _read_block(objects: Any, stream: Context, index: int) -> bytearray:
    """The plaintext of block ``index`` as it is on disk (short if it is the last)."""
    volume = _VOLUMES[objects.instance]
    records = await read_file(objects, await _private(objects, stream), record_offset(index), RECORD_SIZE)
    return volume.cipher.open(stream.file_id, index, records)


async def _reseal(objects: Any, stream: Context, index: int, length: int, writer: FileObject) -> None:
    """Rewrite block ``index`` cut or zero-padded to ``length`` bytes, through ``writer``."""
    plain = await _read_block(objects, stream, index)
    plain = plain[:length] + bytes(max(0, length - len(plain)))
    records = _VOLUMES[objects.instance].cipher.seal(stream.file_id, index, plain)
    await write_file(objects, writer, record_offset(index), records)


async def _give_header(objects: Any, stream: Context, writer: FileObject) -> None:
    """Write a header to an empty file through ``writer`` (before data lands past its start)."""
    header, file_id = new_header()
    await write_file(objects, writer, 0, header)
    stream.file_id = file_id


# -- READ ---------------------------------------------------------------------------------------------


async def pre_read(cbd: CallbackData, objects: Any) -> Any:
    """Swap the request for the records that cover it; the post opens them."""
    p: ReadParameters = cbd.iopb.parameters  # type: ignore[assignment]
    if _misaligned(cbd, p.offset, p.length):
        return _COMPLETE
    if p.length == 0:
        p.data = b""
        return _COMPLETE
    stream = _stream(objects)
    await stream.lock.acquire_shared()
    try:
        first = p.offset // BLOCK_SIZE
        last = (p.offset + p.length - 1) // BLOCK_SIZE
        with_header = stream.file_id is None and first == 0
        if stream.file_id is None and not with_header:
            await _load(objects, stream)
        if stream.size == 0 or (stream.file_id is None and not with_header):
            p.data = b""  # an empty file
            stream.lock.release_shared()
            release_context(stream)
            return _COMPLETE
    except (OSError, NotEncrypted) as exc:
        stream.lock.release_shared()
        release_context(stream)
        return _fail(cbd, exc)
    start = 0 if with_header else record_offset(first)
    p.offset, p.length = start, record_offset(last + 1) - start
    cbd.set_dirty()
    return _WITH_CALLBACK, (stream, first, with_header)


def post_read(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """Copy the caller's plaintext slice out of the swapped-in records (the parameters are the caller's)."""
    stream, first, with_header = context
    p: ReadParameters = cbd.iopb.parameters  # type: ignore[assignment]
    try:
        if cbd.io_status.status:
            return _FINISHED
        records = memoryview(p.data or b"")
        if with_header:
            if not records:
                p.data = b""
                return _FINISHED
            stream.file_id = parse_header(records[:HEADER_SIZE])
            records = records[HEADER_SIZE:]
        plain = _VOLUMES[objects.instance].cipher.open(stream.file_id, first, records)
        skip = p.offset - first * BLOCK_SIZE
        p.data = memoryview(plain)[skip : skip + p.length]
        cbd.io_status.information = len(p.data)
    except (TamperedBlock, NotEncrypted) as exc:
        p.data = None
        _fail(cbd, exc)
    finally:
        stream.lock.release_shared()
        release_context(stream)
    return _FINISHED


# -- WRITE --------------------------------------------------------------------------------------------


async def pre_write(cbd: CallbackData, objects: Any) -> Any:
    """Seal the blocks the write touches (read-modify-write at its edges) and swap them in."""
    p: WriteParameters = cbd.iopb.parameters  # type: ignore[assignment]
    if _misaligned(cbd, p.offset):
        return _COMPLETE
    count = len(p.data)
    if count == 0:
        return _NO_CALLBACK
    stream = _stream(objects)
    await stream.lock.acquire_exclusive()
    try:
        swapped, new_size, header = await _seal_write(objects, stream, p.offset, p.data)
    except (OSError, NotEncrypted, TamperedBlock) as exc:
        stream.lock.release_exclusive()
        release_context(stream)
        return _fail(cbd, exc)
    p.offset = 0 if header else record_offset(p.offset // BLOCK_SIZE)
    p.data = swapped
    cbd.set_dirty()
    return _WITH_CALLBACK, (stream, count, new_size, header, len(swapped))


async def _seal_write(
    objects: Any, stream: Context, offset: int, data: bytes | bytearray | memoryview
) -> tuple[bytearray, int, bytes]:
    """The records to write for ``data`` at ``offset``, the new plaintext size, and the header they start
    with (empty unless the file gets its header with this write)."""
    if stream.size is None:
        await _load(objects, stream)
    old: int = stream.size
    end = offset + len(data)
    new_size = max(old, end)
    first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
    header = b""
    if stream.file_id is None:  # an empty file: its header comes first
        if first == 0:
            header, file_id = new_header()
            stream.file_id = file_id  # kept only if the write succeeds (see post_write)
        else:
            await _give_header(objects, stream, objects.file_object)
    old_last = old // BLOCK_SIZE
    if old % BLOCK_SIZE and old_last < first:  # the old partial last block is left behind: fill it out
        await _reseal(objects, stream, old_last, BLOCK_SIZE, objects.file_object)
    base = first * BLOCK_SIZE
    stop = min((last + 1) * BLOCK_SIZE, new_size)
    keep_head = base < old and (offset > base or end < min(base + BLOCK_SIZE, old))
    keep_tail = last != first and last * BLOCK_SIZE < old and end < min((last + 1) * BLOCK_SIZE, old)
    plain: bytes | bytearray | memoryview
    if not keep_head and not keep_tail and offset == base and end == stop:
        plain = data  # whole blocks, or the file's new end: nothing old to keep
    else:
        buffer = bytearray(stop - base)
        if keep_head:
            head = await _read_block(objects, stream, first)
            buffer[: len(head)] = head
        if keep_tail:
            tail = await _read_block(objects, stream, last)
            at = (last - first) * BLOCK_SIZE
            buffer[at : at + len(tail)] = tail
        buffer[offset - base : end - base] = data
        plain = buffer
    return _VOLUMES[objects.instance].cipher.seal(stream.file_id, first, plain, header), new_size, header


def post_write(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """Report the caller's count; a failed or short write leaves the size to be learned again."""
    stream, count, new_size, header, swapped = context
    p: WriteParameters = cbd.iopb.parameters  # type: ignore[assignment]
    try:
        written = cbd.io_status.information
        if cbd.io_status.status or written < swapped:
            stream.size = None
            if header and written < len(header):
                stream.file_id = None
        if cbd.io_status.status:
            return _FINISHED
        if written >= swapped:
            stream.size = new_size
            cbd.io_status.information = count
        else:  # short (the disk is full): count the caller's bytes in the whole records that made it
            whole = max(0, written - len(header)) // RECORD_SIZE
            done = min(count, max(0, (p.offset // BLOCK_SIZE + whole) * BLOCK_SIZE - p.offset))
            cbd.io_status.information = done
            if not done:
                cbd.io_status.status = NtStatus.DISK_FULL
    finally:
        stream.lock.release_exclusive()
        release_context(stream)
    return _FINISHED


# -- CREATE, CLOSE ------------------------------------------------------------------------------------


def pre_create(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
    """Keep the volume record out of reach; O_DIRECT does not reach the file system (records are unaligned)."""
    p: CreateParameters = cbd.iopb.parameters  # type: ignore[assignment]
    if p.name and _hidden(p.parent, p.name):
        cbd.io_status.status = NtStatus.ACCESS_DENIED
        return _COMPLETE
    if p.file_type is FileType.REGULAR and p.flags & os.O_DIRECT:
        p.flags &= ~os.O_DIRECT
        cbd.set_dirty()
    return _WITH_CALLBACK


def post_create(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    p: CreateParameters = cbd.iopb.parameters  # type: ignore[assignment]
    if cbd.io_status.status:
        return _FINISHED
    p.attributes = _plain(p.attributes)
    if p.handle is None or p.file_type is not FileType.REGULAR or flags & PostopFlags.DRAINING:
        return _FINISHED
    stream = _stream(objects)
    stream.handles += 1
    if p.disposition in _EMPTIED:
        stream.size, stream.file_id = 0, None
    release_context(stream)
    return _FINISHED


def pre_close(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
    return _NO_CALLBACK if cbd.iopb.parameters.directory else _WITH_CALLBACK  # type: ignore[attr-defined]


async def post_close(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """The file's last handle closed: close the filter's own."""
    stream = get_context(objects, ContextType.STREAM)
    if stream is None:
        return _FINISHED
    try:
        stream.handles -= 1
        if stream.handles <= 0 and stream.private is not None:
            await stream.lock.acquire_exclusive()
            try:
                if stream.handles <= 0:
                    await _close_private(objects, stream)
            finally:
                stream.lock.release_exclusive()
    finally:
        release_context(stream)
    return _FINISHED


# -- SET_INFORMATION ------------------------------------------------------------------------------------


async def pre_set_information(cbd: CallbackData, objects: Any) -> Any:
    """Truncate in plaintext terms; keep the volume record's name out of reach."""
    p = cbd.iopb.parameters
    if isinstance(p, RenameParameters):
        if _hidden(p.parent, p.name) or _hidden(p.new_parent, p.new_name):
            cbd.io_status.status = NtStatus.ACCESS_DENIED
            return _COMPLETE
        return _NO_CALLBACK
    if isinstance(p, DispositionParameters):
        if _hidden(p.parent, p.name):
            cbd.io_status.status = NtStatus.OBJECT_NAME_NOT_FOUND
            return _COMPLETE
        return _NO_CALLBACK
    if isinstance(p, LinkParameters):
        if _hidden(p.new_parent, p.new_name):
            cbd.io_status.status = NtStatus.ACCESS_DENIED
            return _COMPLETE
        return _WITH_CALLBACK, None
    if not isinstance(p, SetAttributesParameters) or p.size is None or p.size < 0:
        return _WITH_CALLBACK, None
    attributes = await query_information_file(objects, FileObject(objects.file_object.inode))
    if not stat.S_ISREG(attributes.mode):
        return _WITH_CALLBACK, None
    stream = _stream(objects)
    await stream.lock.acquire_exclusive()
    try:
        await _prepare_truncate(objects, stream, p.size)
    except (OSError, NotEncrypted, TamperedBlock) as exc:
        stream.lock.release_exclusive()
        release_context(stream)
        return _fail(cbd, exc)
    p.size = cipher_size(p.size)
    cbd.set_dirty()
    return _WITH_CALLBACK, stream


async def _prepare_truncate(objects: Any, stream: Context, size: int) -> None:
    """Re-seal the block a new end ``size`` cuts or the old partial last block it extends."""
    await _load(objects, stream)
    old: int = stream.size
    if size < old and size % BLOCK_SIZE:
        await _reseal(objects, stream, size // BLOCK_SIZE, size % BLOCK_SIZE, await _private(objects, stream))
    elif size > old:
        if stream.file_id is None:
            await _give_header(objects, stream, await _private(objects, stream))
        if old % BLOCK_SIZE:
            index = old // BLOCK_SIZE
            length = min(BLOCK_SIZE, size - index * BLOCK_SIZE)
            await _reseal(objects, stream, index, length, await _private(objects, stream))


async def post_set_information(
    cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags
) -> PostopCallbackStatus:
    """The plaintext size in the attributes; after a truncate, the size it left."""
    p = cbd.iopb.parameters
    if context is not None:  # a truncate: ``p`` holds the plaintext size the caller asked for
        stream = context
        try:
            stream.size = None if cbd.io_status.status else p.size  # type: ignore[attr-defined]
            if stream.size == 0:
                stream.file_id = None
            if stream.handles <= 0:  # a truncate by path: no handle will close the filter's own
                await _close_private(objects, stream)
        finally:
            stream.lock.release_exclusive()
            release_context(stream)
    if not cbd.io_status.status and isinstance(p, (SetAttributesParameters, LinkParameters)):
        p.attributes = _plain(p.attributes)
    return _FINISHED


# -- attributes and names -------------------------------------------------------------------------------


def pre_lookup(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
    p: LookupParameters = cbd.iopb.parameters  # type: ignore[assignment]
    if _hidden(p.parent, p.name):
        cbd.io_status.status = NtStatus.OBJECT_NAME_NOT_FOUND
        return _COMPLETE
    return _WITH_CALLBACK


def post_attributes(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """LOOKUP and QUERY_INFORMATION: the plaintext size."""
    if not cbd.io_status.status:
        p = cbd.iopb.parameters
        p.attributes = _plain(p.attributes)  # type: ignore[attr-defined]
    return _FINISHED


def post_directory_control(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    """A listing: plaintext sizes, and no volume record at the root."""
    if cbd.io_status.status:
        return _FINISHED
    p: DirectoryControlParameters = cbd.iopb.parameters  # type: ignore[assignment]
    root = objects.file_object.inode == ROOT
    p.entries = [
        dataclasses.replace(entry, attributes=_plain(entry.attributes))
        for entry in p.entries
        if not (root and entry.name.startswith(RECORD_NAME.encode()))
    ]
    return _FINISHED


# -- instance and filter --------------------------------------------------------------------------------


def instance_setup(objects: Any, flags: Any, device_type: str, filesystem_type: str) -> NtStatus:
    """Open the volume's key (or make the volume's record and key); refuse with the reason if that fails."""
    volume = objects.volume
    if volume is None:
        raise InstanceSetupRefused("encryption needs a volume with a backing directory")
    try:
        settings = KeySettings.from_parameters(objects.filter.parameters)
        key = open_volume_key(volume.backing, volume.device, settings)
    except KeyProblem as exc:
        raise InstanceSetupRefused(f"encryption of {volume.mount_point}: {exc}") from None
    _VOLUMES[objects.instance] = _Volume(FileCipher(key.content_key), key.origin)
    log.info("encryption: %s (volume %s) attached, key from %s", volume.mount_point, key.volume, key.origin)
    return NtStatus.SUCCESS


def instance_query_teardown(objects: Any, flags: Any) -> NtStatus:
    log.warning("encryption: detaching by hand is refused (open files would show ciphertext); unmount instead")
    return NtStatus.FLT_DO_NOT_DETACH


async def instance_teardown_complete(objects: Any, reason: Any) -> None:
    """Close the filter's own handles."""
    volume = _VOLUMES.get(objects.instance)
    if volume is None:
        return
    for inode, stream in list(volume.private.items()):
        try:
            await _close_private(objects, stream)
        except OSError as exc:
            log.warning("encryption: closing its handle on inode %d: %s", inode, exc)
    del _VOLUMES[objects.instance]


def filter_unload(flags: FilterUnloadFlags) -> NtStatus:
    if flags & FilterUnloadFlags.MANDATORY:
        return NtStatus.SUCCESS
    log.warning("encryption: a non-mandatory unload is refused (open files would show ciphertext)")
    return NtStatus.FLT_DO_NOT_DETACH


REGISTRATION = FilterRegistration(
    contexts=(ContextRegistration(ContextType.STREAM),),
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_complete=instance_teardown_complete,
    filter_unload=filter_unload,
    operations=(
        OperationRegistration(MajorFunction.CREATE, pre_create, post_create),
        OperationRegistration(MajorFunction.READ, pre_read, post_read),
        OperationRegistration(MajorFunction.WRITE, pre_write, post_write),
        OperationRegistration(MajorFunction.CLOSE, pre_close, post_close),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_set_information, post_set_information),
        OperationRegistration(MajorFunction.LOOKUP, pre_lookup, post_attributes),
        OperationRegistration(MajorFunction.QUERY_INFORMATION, None, post_attributes),
        OperationRegistration(MajorFunction.DIRECTORY_CONTROL, None, post_directory_control),
    ),
)
