"""File names: what a filter learns with a name query, the name cache, and name providers.

Windows counterparts: ``FltGetFileNameInformation``,
``FltGetFileNameInformationUnsafe``, ``FltGetDestinationFileNameInformation``,
``FLT_FILE_NAME_INFORMATION`` (already parsed: ``FltParseFileNameInformation``
has nothing left to do), ``FltPurgeFileNameInformationCache``, and the name
provider callbacks ``GenerateFileName`` and ``NormalizeNameComponent``.

Formats (:class:`NameFormat`):

* NORMALIZED: the full path from the volume root, prefixed with the volume
  name (the mount point), e.g. ``/mnt/fltfuse/src/main.c``. The directories in
  it are the real ones (the kernel has already followed symlinks in the
  path); a symlink as the final component is named, not followed; no trailing
  slash (the root's name is the volume name). A file with several hard links
  is named by the link the volume last reached it through that still names it.
* OPENED: the path the caller used to open the handle, e.g. through one
  particular hard link. Where the request has no handle, or the caller's link
  no longer names the file, it is the normalized name.
* SHORT: 8.3 names do not exist on ext4: always :class:`FileNameError` with
  ``NtStatus.NOT_SUPPORTED``.

What a request names: its file (``FileObject.inode``), except for a LOOKUP,
a CREATE of a new object, an unlink, an rmdir and a rename, which name
``parent/name`` from their parameters (the object may not exist yet, or any
more). The destination of a rename or link comes from
:func:`get_destination_file_name_information` in its pre-operation.

Query methods (:class:`NameQuery`): DEFAULT answers from the cache, else asks
the file system (and caches); CACHE_ONLY answers from the cache or fails with
``FLT_NAME_CACHE_MISS``; FILESYSTEM_ONLY always asks the file system (and
refreshes the cache). The cache is invalidated by every successful rename
(of the object or of any directory above it), unlink and rmdir that reaches
the file system through the volume, and by the kernel forgetting an inode.
Changes made to the backing file system behind the volume's back are not
seen by the cache; a FILESYSTEM_ONLY query always sees them.

Name providers: an instance whose filter registers ``generate_file_name``
decides the names every instance *above* it sees (its own queries, and those
of instances below it, see the names from below). ``normalize_name_component``
maps the final component of a name that does not exist yet (a LOOKUP, a
CREATE, a destination). Each provider level has its own cache entries; a
provider that changes its mapping calls :func:`purge_name_cache`.
"""

from __future__ import annotations

import enum
import errno
import os
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from .._callback_data import (
    CallbackData,
    CreateParameters,
    DispositionParameters,
    FileObject,
    LinkParameters,
    LookupParameters,
    RenameParameters,
)
from .._status import NtStatus, status_from_errno


class NameFormat(enum.Enum):
    """FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED, FLT_FILE_NAME_SHORT."""

    NORMALIZED = 0x01
    OPENED = 0x02
    SHORT = 0x03


class NameQuery(enum.Enum):
    """FLT_FILE_NAME_QUERY_DEFAULT, _CACHE_ONLY, _FILESYSTEM_ONLY."""

    DEFAULT = 0x0100
    CACHE_ONLY = 0x0200
    FILESYSTEM_ONLY = 0x0300


class FileNameError(Exception):
    """A name query that cannot be answered; ``status`` is the FltMgr status."""

    def __init__(self, status: NtStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class FileNameInformation:
    """FLT_FILE_NAME_INFORMATION, parsed: ``name == volume + parent_dir + final_component``.

    ``parent_dir`` starts and ends with "/" ("" for the root), ``extension``
    is what follows the last "." of the final component ("" if none), and
    ``share`` and ``stream`` are always "" (no network shares; one data stream).
    """

    name: str
    format: NameFormat
    volume: str
    parent_dir: str
    final_component: str
    extension: str
    share: str = ""
    stream: str = ""

    @classmethod
    def parse(cls, name: str, volume: str, name_format: NameFormat) -> FileNameInformation:
        """Split a full name (``volume`` + path from the volume root) into its parts."""
        if not name.startswith(volume):
            raise FileNameError(NtStatus.OBJECT_NAME_INVALID, f"{name!r} is not on volume {volume!r}")
        path = name[len(volume) :]
        if path in ("", "/"):
            return cls(volume, name_format, volume, "", "", "")
        if not path.startswith("/") or path.endswith("/"):
            raise FileNameError(NtStatus.OBJECT_NAME_INVALID, f"{name!r}: a path from the volume root, no trailing /")
        slash = path.rfind("/")
        final = path[slash + 1 :]
        dot = final.rfind(".")
        extension = final[dot + 1 :] if dot > 0 else ""
        return cls(name, name_format, volume, path[: slash + 1], final, extension)


_ROOT = 1  # the volume root's node id


class NameCache:
    """The names of one volume's files, per provider level, and their invalidation.

    An entry is keyed by (provider instance or None, inode, link) and keeps
    the file system path it was computed from, so that a rename, unlink or
    rmdir of that path or of any directory above it drops it, at every level.
    Every operation costs the same however full the cache is, except the
    rename of a directory that has cached names below it (one scan).
    """

    SIZE = 4096

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[Any, ...], tuple[bytes, FileNameInformation]] = OrderedDict()
        self._by_path: dict[bytes, set[tuple[Any, ...]]] = {}
        self._by_inode: dict[int, set[tuple[Any, ...]]] = {}
        self._below: Counter[bytes] = Counter()  # directory path -> how many entries are below it
        self._lock = threading.Lock()  # work items may query names from threads
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[Any, ...]) -> FileNameInformation | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]

    def put(self, key: tuple[Any, ...], fs_path: bytes, info: FileNameInformation) -> None:
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (fs_path, info)
            self._by_path.setdefault(fs_path, set()).add(key)
            self._by_inode.setdefault(key[1], set()).add(key)
            self._below.update(_directories_above(fs_path))
            if len(self._entries) > self.SIZE:
                self._remove(next(iter(self._entries)))

    def invalidate_path(self, fs_path: bytes) -> None:
        """``fs_path`` (from the volume root) was renamed or removed: drop it and everything under it."""
        with self._lock:
            gone = set(self._by_path.get(fs_path, ()))
            if self._below.get(fs_path):
                below = fs_path + b"/"
                gone.update(k for k, (p, _) in self._entries.items() if p.startswith(below))
            for key in gone:
                self._remove(key)

    def purge(self, ino: int | None = None) -> None:
        """Drop every entry of ``ino`` (at every level), or every entry."""
        with self._lock:
            if ino is None:
                self._entries.clear()
                self._by_path.clear()
                self._by_inode.clear()
                self._below.clear()
                return
            for key in list(self._by_inode.get(ino, ())):
                self._remove(key)

    def _remove(self, key: tuple[Any, ...]) -> None:
        fs_path, _ = self._entries.pop(key)
        _discard(self._by_path, fs_path, key)
        _discard(self._by_inode, key[1], key)
        above = _directories_above(fs_path)
        self._below.subtract(above)
        for directory in above:
            if not self._below[directory]:
                del self._below[directory]


def _discard(index: dict[Any, set[tuple[Any, ...]]], value: Any, key: tuple[Any, ...]) -> None:
    keys = index[value]
    keys.discard(key)
    if not keys:
        del index[value]


def _directories_above(fs_path: bytes) -> list[bytes]:
    """b"/a/b/c" -> [b"/a", b"/a/b"]."""
    parts = fs_path.split(b"/")[1:-1]
    return [b"/" + b"/".join(parts[: i + 1]) for i in range(len(parts))]


# -- resolving a name ---------------------------------------------------------------------


def _target(cbd: CallbackData) -> tuple[int, bytes | None]:
    """What a request names: (inode, None), or (directory, name) for a name that may not exist."""
    p = cbd.iopb.parameters
    cls = p.__class__
    if cls is LookupParameters or cls is DispositionParameters or cls is RenameParameters:
        return p.parent, p.name  # type: ignore[attr-defined]
    if cls is CreateParameters and p.name:  # type: ignore[attr-defined]
        return p.parent, p.name  # type: ignore[attr-defined]
    return cbd.iopb.target_file_object.inode, None


class _Resolver:
    """One name query, from the point of view of the instance ``querier`` (None: the top of the stack)."""

    def __init__(self, stack: Any, querier: Any, query: NameQuery):
        self.stack = stack
        self.cache: NameCache = stack.names
        self.volume = stack.volume.mount_point.rstrip("/") if stack.volume is not None else ""
        self.query = query
        self.provider = _provider_below(stack, querier)

    def file_system_path(self, ino: int) -> bytes:
        try:
            return self.stack.backend.name_of(ino)  # type: ignore[no-any-return]
        except FileNotFoundError as exc:
            raise FileNameError(NtStatus.FILE_DELETED, f"inode {ino} has no name: {exc.strerror}") from None
        except OSError as exc:
            raise FileNameError(status_from_errno(exc.errno or errno.EIO), f"inode {ino}: {exc.strerror}") from None

    def of_inode(self, ino: int, file_object: FileObject | None, cbd: CallbackData | None) -> FileNameInformation:
        key = (self.provider, ino, None)
        if self.query is not NameQuery.FILESYSTEM_ONLY:
            info = self.cache.get(key)
            if info is not None:
                return info
            if self.query is NameQuery.CACHE_ONLY:
                raise FileNameError(NtStatus.FLT_NAME_CACHE_MISS, f"the name of inode {ino} is not cached")
        fs_path = self.file_system_path(ino)
        if self.provider is None:
            name = self.volume + os.fsdecode(fs_path)
        else:
            name = self.generated(ino, file_object, cbd)
        info = FileNameInformation.parse(name, self.volume, NameFormat.NORMALIZED)
        self.cache.put(key, fs_path, info)
        return info

    def of_link(self, parent: int, component: bytes, name_format: NameFormat) -> FileNameInformation:
        """The name of ``component`` in directory ``parent`` (which need not exist)."""
        directory = self.of_inode(parent, None, None)
        text = os.fsdecode(component)
        if self.provider is not None:
            normalize = self.provider.filter.registration.normalize_name_component
            if normalize is not None:
                text = _checked_str(
                    self.provider,
                    "normalize_name_component",
                    normalize(self.stack.objects_of(self.provider, None), directory.name, text),
                )
        separator = "" if directory.name.endswith("/") else "/"
        return FileNameInformation.parse(directory.name + separator + text, self.volume, name_format)

    def generated(self, ino: int, file_object: FileObject | None, cbd: CallbackData | None) -> str:
        provider = self.provider
        file_object = file_object if file_object is not None and file_object.inode == ino else FileObject(ino)
        objects = self.stack.objects_of(provider, file_object)
        answer = provider.filter.registration.generate_file_name(objects, file_object, cbd, NameFormat.NORMALIZED)
        if answer is None:  # the provider leaves this name as it is below it
            return get_file_name_information_unsafe(objects, file_object).name
        return _checked_str(provider, "generate_file_name", answer)


def _checked_str(provider: Any, callback: str, answer: Any) -> str:
    if not isinstance(answer, str):
        raise FileNameError(
            NtStatus.FLT_INTERNAL_ERROR, f"filter {provider.filter.name}: {callback} returned {answer!r}, not a str"
        )
    return answer


def _provider_below(stack: Any, querier: Any) -> Any:
    """The highest instance below ``querier`` that provides names (None: the file system names them)."""
    for instance in stack.instances:  # highest altitude first
        if querier is not None and instance.altitude >= querier.altitude:
            continue
        if instance.filter.registration.generate_file_name is not None:
            return instance
    return None


def _check_format(name_format: NameFormat) -> None:
    if name_format is NameFormat.SHORT:
        raise FileNameError(NtStatus.NOT_SUPPORTED, "ext4 has no short (8.3) names")
    if not isinstance(name_format, NameFormat):
        raise FileNameError(NtStatus.INVALID_PARAMETER, f"{name_format!r} is not a NameFormat")


def _stack_of(objects: Any) -> Any:
    stack = getattr(objects.instance, "stack", None)
    if stack is None:
        raise FileNameError(NtStatus.FLT_DELETING_OBJECT, f"instance {objects.instance.name} is not attached")
    return stack


def _opened(resolver: _Resolver, file_object: FileObject, cbd: CallbackData | None) -> FileNameInformation | None:
    """The opened name through the link the caller used, if that link still names the file."""
    link = file_object.link
    if link is None:
        return None
    parent, component = link
    key = (resolver.provider, file_object.inode, link)
    query = resolver.query
    if query is not NameQuery.FILESYSTEM_ONLY:
        info = resolver.cache.get(key)
        if info is not None:
            return info
        if query is NameQuery.CACHE_ONLY:
            raise FileNameError(NtStatus.FLT_NAME_CACHE_MISS, f"the opened name of {file_object!r} is not cached")
    if not resolver.stack.backend.is_name_of(parent, component, file_object.inode):
        return None
    info = resolver.of_link(parent, component, NameFormat.OPENED)
    resolver.cache.put(key, resolver.file_system_path(parent) + b"/" + component, info)
    return info


def _name(
    stack: Any,
    querier: Any,
    file_object: FileObject,
    cbd: CallbackData | None,
    name_format: NameFormat,
    query: NameQuery,
) -> FileNameInformation:
    _check_format(name_format)
    resolver = _Resolver(stack, querier, query)
    if cbd is not None:
        ino, component = _target(cbd)
        if component is not None:
            return resolver.of_link(ino, component, name_format)
    if name_format is NameFormat.OPENED:
        info = _opened(resolver, file_object, cbd)
        if info is not None:
            return info
    info = resolver.of_inode(file_object.inode, file_object, cbd)
    if name_format is NameFormat.OPENED:
        return FileNameInformation.parse(info.name, info.volume, NameFormat.OPENED)
    return info


# -- the API filters call -------------------------------------------------------------------


def get_file_name_information(
    cbd: CallbackData,
    objects: Any,
    name_format: NameFormat = NameFormat.NORMALIZED,
    query: NameQuery = NameQuery.DEFAULT,
) -> FileNameInformation:
    """FltGetFileNameInformation: the name of what ``cbd`` names, as the instance in ``objects`` sees it.

    Raises :class:`FileNameError`: NOT_SUPPORTED for SHORT, FLT_NAME_CACHE_MISS
    for a CACHE_ONLY query the cache cannot answer, FILE_DELETED for a file
    whose last name is gone (an unlinked file still open).
    """
    return _name(_stack_of(objects), objects.instance, cbd.iopb.target_file_object, cbd, name_format, query)


def get_file_name_information_unsafe(
    objects: Any,
    file_object: FileObject,
    name_format: NameFormat = NameFormat.NORMALIZED,
    query: NameQuery = NameQuery.DEFAULT,
) -> FileNameInformation:
    """FltGetFileNameInformationUnsafe: the name of ``file_object`` outside a request (or in a provider)."""
    return _name(_stack_of(objects), objects.instance, file_object, None, name_format, query)


def get_destination_file_name_information(
    cbd: CallbackData, objects: Any, name_format: NameFormat = NameFormat.NORMALIZED
) -> FileNameInformation:
    """FltGetDestinationFileNameInformation: the new name a rename or link will give, in its pre-operation."""
    params = cbd.iopb.parameters
    if not isinstance(params, (RenameParameters, LinkParameters)):
        raise FileNameError(NtStatus.INVALID_PARAMETER, f"{params.MAJOR.name} has no destination name")
    _check_format(name_format)
    resolver = _Resolver(_stack_of(objects), objects.instance, NameQuery.DEFAULT)
    return resolver.of_link(params.new_parent, params.new_name, name_format)


def purge_name_cache(objects: Any, file_object: FileObject | None = None) -> None:
    """FltPurgeFileNameInformationCache: forget the cached names of ``file_object``, or of every file."""
    stack = _stack_of(objects)
    stack.names.purge(None if file_object is None else file_object.inode)


def renamed_or_removed(stack: Any, cbd: CallbackData) -> None:
    """A rename, unlink or rmdir succeeded in the file system: drop the names it changed.

    Called by the instance stack right after the backend performed it (the
    parent directories still have the names they had).
    """
    names: NameCache = stack.names
    if not len(names):
        return
    p = cbd.iopb.parameters
    paths = [(p.parent, p.name)]  # type: ignore[attr-defined]
    if isinstance(p, RenameParameters):
        paths.append((p.new_parent, p.new_name))  # a replaced or exchanged target
    for parent, component in paths:
        try:
            prefix = stack.backend.name_of(parent)
        except OSError:
            names.purge()  # the directory itself went: nothing cached can be trusted below it
            return
        names.invalidate_path(prefix + b"/" + component)
