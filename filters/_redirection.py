"""Rewriting the names requests carry: the machinery namechanger and simrep share.

Both samples move names from one directory of the volume to another, and on
Linux every request that names something by path carries it as a pair
(directory inode, name): LOOKUP (each step of a path walk), a CREATE of a new
object, unlink/rmdir, rename (source and target) and link (target). A filter
that redirects a name rewrites that pair in its pre-operation (and calls
``set_dirty``); everything else (open, read, write, stat of what the kernel
already looked up) names an inode and follows by itself.

What this module gives the two filters:

* :class:`DirectoryPath`: a directory named by a filter parameter, parsed and
  checked (``"a/b"``, ``"/a/b"`` or Windows' ``"\\a\\b"``; never the volume
  root, never ``..``), and compared with the full names name queries return.
* :class:`Slot` and :func:`slots_of`: which (directory, name) pairs a request
  carries, and whether the request makes that name.
* :func:`pre_redirect` and :func:`post_redirect`: the pre-operation that
  walks the slots, asks the filter's ``decide`` what to do with each, rewrites
  or fails the request, and the post-operation that gives back what the
  rewrite held open.
* :class:`HeldDirectories`: a rewritten pair must name a directory the file
  system knows (the backend reaches directories by the kernel's lookups), so
  the directory the name moves to is opened with filter-initiated I/O
  (``create_file``: LOOKUPs below this instance, then an open) for as long as
  the request needs it, and closed in its post-operation (``close_file`` gives
  every counted lookup back): nothing is left pinned, nothing leaks.

Directory identity is by name, not by inode number: each check asks the name
of the request's directory (``get_file_name_information_unsafe``, answered
from the name cache, which renames and removals through the volume keep
right), so a mapping follows the directories it names even when they are
removed and made again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fltfuse import (
    CallbackData,
    CreateParameters,
    DispositionParameters,
    FileNameError,
    FileNameInformation,
    FileObject,
    LinkParameters,
    LookupParameters,
    NtStatus,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    close_file,
    create_file,
    get_file_name_information_unsafe,
    status_from_errno,
)

log = logging.getLogger("fltfuse.filters.redirection")

ROOT_INODE = 1  # FUSE's node id of the volume root
_SEPARATORS = re.compile(r"[/\\]+")


@dataclass(frozen=True)
class DirectoryPath:
    """A directory of the volume named by a filter parameter: its components from the volume root (never empty)."""

    parameter: str
    components: tuple[bytes, ...]

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], parameter: str, default: str) -> DirectoryPath:
        """The path in ``parameters[parameter]`` (``default`` if absent); ValueError if it is not one."""
        value = parameters.get(parameter, default)
        if not isinstance(value, str):
            raise ValueError(f"{parameter} {value!r} is not a string")
        components = tuple(os.fsencode(part) for part in _SEPARATORS.split(value) if part not in ("", "."))
        if not components:
            raise ValueError(f"{parameter} {value!r} names the volume root, which cannot be mapped")
        if b".." in components:
            raise ValueError(f"{parameter} {value!r} may not contain '..'")
        return cls(parameter, components)

    def __str__(self) -> str:
        return "/" + "/".join(os.fsdecode(c) for c in self.components)

    @property
    def name(self) -> bytes:
        """Its last component: the name it has in its parent directory."""
        return self.components[-1]

    @property
    def parent(self) -> tuple[bytes, ...]:
        """The components of its parent directory (empty: the volume root)."""
        return self.components[:-1]

    def is_named(self, info: FileNameInformation, components: tuple[bytes, ...] | None = None) -> bool:
        """Whether ``info`` (a full name) is this directory, or the directory ``components`` if given."""
        path = self.components if components is None else components
        return info.name == info.volume + "".join("/" + os.fsdecode(c) for c in path)

    def contains(self, other: DirectoryPath) -> bool:
        """Whether ``other`` is this directory or lies below it."""
        return other.components[: len(self.components)] == self.components


def check_apart(first: DirectoryPath, second: DirectoryPath) -> None:
    """ValueError unless neither directory is, or lies inside, the other."""
    if first.contains(second) or second.contains(first):
        raise ValueError(f"{first.parameter} {first} and {second.parameter} {second} overlap")


def directory_name(objects: RelatedObjects, inode: int) -> FileNameInformation | None:
    """The full name of directory ``inode`` as this instance sees it; None if it has none (removed)."""
    try:
        return get_file_name_information_unsafe(objects, FileObject(inode))
    except FileNameError:
        return None


class HeldDirectories:
    """Directories a request's rewrite opened (filter-initiated I/O), closed by :meth:`close` in its post."""

    def __init__(self, objects: RelatedObjects):
        self._objects = objects
        self._open: dict[tuple[bytes, ...], FileObject] = {}

    def __bool__(self) -> bool:
        return bool(self._open)

    async def inode_of(self, components: tuple[bytes, ...]) -> int:
        """The inode of directory ``components`` (opened once per request); OSError as open(2) would fail."""
        if not components:
            return ROOT_INODE  # the root is always known
        held = self._open.get(components)
        if held is None:
            held = await create_file(self._objects, b"/".join(components), os.O_RDONLY | os.O_DIRECTORY)
            self._open[components] = held
        return held.inode

    async def close(self) -> None:
        """Close every directory held (never raises: a failed close is logged)."""
        held, self._open = list(self._open.values()), {}
        for file_object in held:
            try:
                await close_file(self._objects, file_object)
            except OSError as exc:
                log.error("instance %s could not close %r: %s", self._objects.instance.name, file_object, exc)


@dataclass(frozen=True)
class Slot:
    """A (directory, name) pair a request carries: the parameter fields that hold it, and what the request does.

    ``made`` is true where the request makes the name (a CREATE of a new
    object, the target of a rename or link), false where it finds or removes
    an existing one (LOOKUP, unlink, rmdir, the source of a rename).
    """

    parent_field: str
    name_field: str
    made: bool


_SOURCE = Slot("parent", "name", made=False)
_NEW = Slot("parent", "name", made=True)
_TARGET = Slot("new_parent", "new_name", made=True)
_SLOTS: dict[type[Parameters], tuple[Slot, ...]] = {
    LookupParameters: (_SOURCE,),
    DispositionParameters: (_SOURCE,),
    RenameParameters: (_SOURCE, _TARGET),
    LinkParameters: (_TARGET,),
}


def slots_of(params: Parameters) -> tuple[Slot, ...]:
    """The (directory, name) pairs ``params`` carries; none for requests that name an inode."""
    if isinstance(params, CreateParameters):
        return (_NEW,) if params.name else ()  # an open names the inode the kernel looked up
    return _SLOTS.get(type(params), ())


Decision = tuple[int, bytes] | NtStatus | None
"""What a filter decides for one slot: a new (directory inode, name), a failure status, or None (unchanged)."""

Decide = Callable[[RelatedObjects, Parameters, Slot, int, bytes, HeldDirectories], Awaitable[Decision]]
"""``decide(objects, params, slot, directory, name, held)``: may open directories with ``held.inode_of``."""


async def pre_redirect(
    cbd: CallbackData, objects: RelatedObjects, decide: Decide
) -> PreopCallbackStatus | tuple[PreopCallbackStatus, HeldDirectories]:
    """Rewrite (or fail) each pair the request carries as ``decide`` says.

    A rewrite sets the parameters dirty. A failure status, or an ``OSError``
    from opening a directory (its errno, e.g. ENOENT when the directory the
    name moves to does not exist), completes the request. If directories are
    held open, the post-operation (:func:`post_redirect`) gets them.
    """
    params = cbd.iopb.parameters
    slots = slots_of(params)
    if not slots:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    held = HeldDirectories(objects)
    failure: NtStatus | None = None
    try:
        for slot in slots:
            decision = await decide(
                objects, params, slot, getattr(params, slot.parent_field), getattr(params, slot.name_field), held
            )
            if isinstance(decision, NtStatus):
                failure = decision
                break
            if decision is not None:
                setattr(params, slot.parent_field, decision[0])
                setattr(params, slot.name_field, decision[1])
                cbd.set_dirty()
    except OSError as exc:
        failure = status_from_errno(exc.errno or errno.EIO)
    if failure is not None:
        await held.close()
        cbd.io_status.status = failure
        cbd.io_status.information = 0
        return PreopCallbackStatus.COMPLETE
    if held:
        return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, held
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


async def post_redirect(
    cbd: CallbackData, objects: RelatedObjects, held: HeldDirectories | None, flags: PostopFlags
) -> PostopCallbackStatus:
    """Close what the pre held open (also while draining: nothing else would)."""
    if held is not None:
        await held.close()
    return PostopCallbackStatus.FINISHED_PROCESSING
