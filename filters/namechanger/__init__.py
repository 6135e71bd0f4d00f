"""namechanger: graft a real directory at another place in the namespace, and name its files there.

A port of Windows' NameChanger minifilter sample (``filesys/miniFilter/NameChanger``).

Design and operation
--------------------

Parameters (INF ``Parameters`` key, or ``--param namechanger.KEY=VALUE``),
directories relative to the volume root, as in the Windows sample:

* ``RealMapping`` (REG_SZ, default ``a/b``): the directory that moves. Its
  real place is hidden: a lookup of it fails with ENOENT and its parent's
  listing does not show it.
* ``UserMapping`` (REG_SZ, default ``x/y``): where it appears. Its parent
  (``x``) must exist for the graft to be reachable; a real ``x/y``, if there
  is one, is shadowed.

Neither may be the volume root, contain ``..``, or lie inside the other;
otherwise the instance declines to attach. Unlike the Windows sample, attaching
does not need the directories to exist: the graft shows whenever they do.

The mapping is applied to the requests that carry a (directory, name) pair
(``filters/_redirection.py``); everything below the grafted directory is reached by
inode and needs nothing:

* **LOOKUP** of ``x/y`` is rewritten to a LOOKUP of ``a/b`` (``set_dirty``):
  the kernel gets the real directory's inode under the name ``x/y``, so its
  dentry, and with it ``getcwd`` and ``pwd -P`` inside, is ``x/y``. A LOOKUP
  of ``a/b`` is completed with ENOENT; a LOOKUP of ``..`` in ``a/b`` (the
  kernel sends one only for NFS export) answers ``x``.
* **CREATE** of ``x/y`` (``mkdir x/y`` when ``a/b`` does not exist) makes
  ``a/b``. **rmdir** and **unlink** of ``x/y`` remove ``a/b``; **rename** of
  ``x/y`` (source or target) and **link** to ``x/y`` use ``a/b``. Making the
  hidden name ``a/b`` (create, rename or link target) fails with EACCES: it is
  reserved for the graft; removing or renaming it fails with ENOENT, as for
  any name that does not exist. While ``a/b`` exists, ``rmdir x`` fails with
  ENOTEMPTY (``x`` holds the graft) and renaming ``x`` with EBUSY (like a
  mount point: the graft cannot follow it).
* **DIRECTORY_CONTROL**: directories opened (post-CREATE) as ``a``, ``x`` or
  ``a/b`` get a stream handle context saying what their listings need. ``a``'s
  listing drops ``b``; ``x``'s drops a real ``y`` and ends with the graft
  ``y`` (the real directory's attributes, from filter-initiated I/O); the
  ``..`` entry of ``a/b``'s listing gets ``x``'s attributes. The graft entry comes
  when the file system reports the end of the listing, with an offset of the
  filter's own (``AFTER_GRAFT``: above every ext4 hash cookie, below ext4's
  end-of-directory cookie), which its pre-operation answers with the end. A
  batch whose entries were all dropped is read on (filter-initiated
  DIRECTORY_CONTROL at the next offset), because an empty answer ends a
  listing. The kernel counts a lookup of each entry it takes from a listing
  and the backend must know that inode then: the filter keeps the grafted
  directory open from the batch with its entry until the next request on the
  same handle (the next batch, or its CLOSE), which the kernel sends only
  after it has taken the entries.
* **Names**: the filter is a name provider. ``generate_file_name`` asks the
  name below it and replaces the ``a/b`` prefix with ``x/y``, so instances
  above it see ``/mnt/x/y/f`` and instances below it (and the file system)
  ``/mnt/a/b/f``. It registers no ``normalize_name_component``: the mapping
  moves a directory and never renames a final component, so a name that does
  not exist yet is its parent's name (mapped) plus the component, which is
  what the filter manager builds without one.

Limits: ``stat x`` shows ext4's link count of ``x`` (the graft is not
counted), and ``a``'s still counts ``b``. Attaching to a live volume (``fltmc
load`` or ``attach``) does not reach what the kernel already caches: a name it
looked up before (``a/b``) keeps resolving until its entry timeout runs out, a
listing of ``x`` opened before does not show the graft, and a process whose
working directory is ``a/b`` from before keeps it, with ``pwd -P`` there
showing the real place (the kernel keeps the directory's old name even once
``x/y`` has been looked up). Renaming a directory above ``x`` or ``a`` moves
the mapping's paths away from them: the graft disappears until the paths name
directories again. An instance that detaches between the batch that carried
the graft's entry and the next request on that listing handle leaves the
grafted directory open until unmount (logged).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from filters._redirection import (
    ROOT_INODE,
    DirectoryPath,
    HeldDirectories,
    Slot,
    check_apart,
    directory_name,
    post_redirect,
    pre_redirect,
)
from fltfuse import (
    CallbackData,
    Context,
    ContextRegistration,
    ContextType,
    CreateParameters,
    DirectoryControlParameters,
    DirectoryEntry,
    DispositionParameters,
    FileAttributes,
    FileNameError,
    FileNameInformation,
    FileObject,
    FileType,
    FilterRegistration,
    Instance,
    InstanceSetupFlags,
    InstanceTeardownFlags,
    LookupParameters,
    MajorFunction,
    NameFormat,
    NtStatus,
    OperationRegistration,
    Parameters,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    RenameParameters,
    SetContext,
    allocate_callback_data,
    allocate_context,
    close_file,
    create_file,
    get_context,
    get_file_name_information,
    get_file_name_information_unsafe,
    perform_io_synchronously,
    query_information_file,
    release_context,
    set_context,
)

log = logging.getLogger("fltfuse.filters.namechanger")

REAL_PARAMETER = "RealMapping"
USER_PARAMETER = "UserMapping"
DEFAULT_REAL = "a/b"
DEFAULT_USER = "x/y"
# The offset after the graft's entry in its parent's listing: no ext4 directory hands it out (hash cookies
# stay below 0x7FFFFFFF00000000, the end-of-directory cookie is 0x7FFFFFFFFFFFFFFF; other file systems
# count entries from 0).
AFTER_GRAFT = 0x7FFF_FFFF_FFFF_FFFE


@dataclass(frozen=True)
class Graft:
    """One instance's mapping: ``real`` appears as ``user``."""

    real: DirectoryPath
    user: DirectoryPath

    @classmethod
    def from_parameters(cls, parameters: Any) -> Graft:
        """The mapping in the filter's parameters; ValueError if it cannot be one."""
        real = DirectoryPath.from_parameters(parameters, REAL_PARAMETER, DEFAULT_REAL)
        user = DirectoryPath.from_parameters(parameters, USER_PARAMETER, DEFAULT_USER)
        check_apart(real, user)
        return cls(real, user)

    def user_name(self, info: FileNameInformation) -> str:
        """The name above the filter of what is named ``info`` below it."""
        real = info.volume + str(self.real)
        if info.name == real or info.name.startswith(real + "/"):
            return info.volume + str(self.user) + info.name[len(real) :]
        return info.name


_GRAFTS: dict[Instance, Graft] = {}  # instance contexts, touched only in the daemon's trio loop


def graft_of(instance: Instance) -> Graft | None:
    """The mapping of an attached instance (for tests and diagnostics)."""
    return _GRAFTS.get(instance)


# -- names a request carries ----------------------------------------------------------------


async def _decide(
    objects: RelatedObjects, params: Parameters, slot: Slot, directory: int, name: bytes, held: HeldDirectories
) -> tuple[int, bytes] | NtStatus | None:
    """What the mapping does to ``name`` in ``directory`` (see the module docstring)."""
    graft = _GRAFTS.get(objects.instance)
    if graft is None:
        return None
    real, user = graft.real, graft.user
    is_up = name == b".." and isinstance(params, LookupParameters)
    guards_user_parent = (
        bool(user.parent)
        and name == user.parent[-1]
        and not slot.made
        and isinstance(params, (DispositionParameters, RenameParameters))
    )
    if not (is_up or name == user.name or name == real.name or guards_user_parent):
        return None  # the common case: no name query at all
    where = directory_name(objects, directory)
    if where is None:
        return None
    if is_up:
        return (await held.inode_of(user.parent), b".") if real.is_named(where) else None
    if name == user.name and user.is_named(where, user.parent):
        return await held.inode_of(real.parent), real.name
    if name == real.name and real.is_named(where, real.parent):
        return NtStatus.ACCESS_DENIED if slot.made else NtStatus.OBJECT_NAME_NOT_FOUND
    if guards_user_parent and user.is_named(where, user.parent[:-1]):
        if isinstance(params, DispositionParameters) and params.directory and await _exists(objects, real):
            return NtStatus.DIRECTORY_NOT_EMPTY  # rmdir x: it holds the graft
        if isinstance(params, RenameParameters) and await _exists(objects, real):
            return NtStatus.DEVICE_BUSY  # mv x ...: the graft cannot follow it
    return None


async def _exists(objects: RelatedObjects, path: DirectoryPath) -> bool:
    """Whether directory ``path`` exists (opened and closed again)."""
    try:
        file_object = await create_file(objects, b"/".join(path.components), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    await close_file(objects, file_object)
    return True


async def pre_names(cbd: CallbackData, objects: RelatedObjects) -> Any:
    """LOOKUP, SET_INFORMATION, and CREATE of a new object: apply the mapping to the names they carry."""
    return await pre_redirect(cbd, objects, _decide)


async def pre_create(cbd: CallbackData, objects: RelatedObjects) -> Any:
    """A directory opened with a handle: its post decides what its listings need; a new name: the mapping."""
    p = cbd.iopb.parameters
    if isinstance(p, CreateParameters) and not p.name:
        wanted = p.file_type is FileType.DIRECTORY and p.handle_requested and objects.instance in _GRAFTS
        return (PreopCallbackStatus.SUCCESS_WITH_CALLBACK, None) if wanted else PreopCallbackStatus.SUCCESS_NO_CALLBACK
    return await pre_redirect(cbd, objects, _decide)


async def post_create(
    cbd: CallbackData, objects: RelatedObjects, held: HeldDirectories | None, flags: PostopFlags
) -> PostopCallbackStatus:
    await post_redirect(cbd, objects, held, flags)
    if held is None and not flags & PostopFlags.DRAINING and cbd.io_status.status == NtStatus.SUCCESS:
        _remember_listing(cbd, objects)  # a directory opened (see pre_create)
    return PostopCallbackStatus.FINISHED_PROCESSING


# -- listings ------------------------------------------------------------------------------


@dataclass
class Listing:
    """What a directory handle's listings need (kept in its stream handle context as ``context.listing``).

    ``hide``: names dropped from it; ``shows_graft``: it is the user
    mapping's parent (the graft is its last entry); ``is_graft``: it is the
    real directory (its ``..`` is the user mapping's parent); ``held``: the
    grafted directory, open while the kernel may still count the entry it gave.
    """

    hide: frozenset[bytes]
    shows_graft: bool
    is_graft: bool
    held: FileObject | None = None


def _remember_listing(cbd: CallbackData, objects: RelatedObjects) -> None:
    graft = _GRAFTS.get(objects.instance)
    if graft is None:
        return
    try:
        where = get_file_name_information(cbd, objects)
    except FileNameError:
        return
    real, user = graft.real, graft.user
    hide = set()
    if real.is_named(where, real.parent):
        hide.add(real.name)
    shows_graft = user.is_named(where, user.parent)
    if shows_graft:
        hide.add(user.name)  # a real directory there is shadowed
    is_graft = real.is_named(where)
    if not (hide or is_graft):
        return
    context = allocate_context(objects, ContextType.STREAM_HANDLE)
    context.listing = Listing(frozenset(hide), shows_graft, is_graft)  # type: ignore[attr-defined]
    _, old = set_context(objects, context, SetContext.REPLACE_IF_EXISTS)
    if old is not None:  # the handle number was reused before its last handle's contexts went
        release_context(old)
    release_context(context)


def _listing(context: Context) -> Listing:
    listing: Listing = context.listing  # type: ignore[attr-defined]
    return listing


async def _let_go(objects: RelatedObjects, listing: Listing) -> None:
    """Close the grafted directory the last batch kept open: the kernel has counted its entry by now."""
    held, listing.held = listing.held, None
    if held is not None:
        try:
            await close_file(objects, held)
        except OSError as exc:
            log.error("instance %s could not close %r: %s", objects.instance.name, held, exc)


async def pre_directory_control(cbd: CallbackData, objects: RelatedObjects) -> Any:
    context = get_context(objects, ContextType.STREAM_HANDLE)
    if context is None:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    listing = _listing(context)
    await _let_go(objects, listing)
    p = cbd.iopb.parameters
    assert isinstance(p, DirectoryControlParameters)
    if listing.shows_graft and p.offset == AFTER_GRAFT:
        release_context(context)
        p.entries = []  # the graft was the last entry
        cbd.io_status.status = NtStatus.SUCCESS
        return PreopCallbackStatus.COMPLETE
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, context


async def post_directory_control(
    cbd: CallbackData, objects: RelatedObjects, context: Context, flags: PostopFlags
) -> PostopCallbackStatus:
    try:
        if not flags & PostopFlags.DRAINING and cbd.io_status.status == NtStatus.SUCCESS:
            await _edit_listing(cbd, objects, _listing(context))
    finally:
        release_context(context)
    return PostopCallbackStatus.FINISHED_PROCESSING


async def _edit_listing(cbd: CallbackData, objects: RelatedObjects, listing: Listing) -> None:
    graft = _GRAFTS.get(objects.instance)
    p = cbd.iopb.parameters
    assert isinstance(p, DirectoryControlParameters)
    if graft is None:
        return
    if listing.hide:
        await _drop(cbd, objects, p, listing.hide)
    if listing.shows_graft and not p.entries:
        p.entries = await _graft_entry(objects, graft, listing)
    if listing.is_graft:
        for i, entry in enumerate(p.entries):
            if entry.name == b"..":
                try:
                    parent = await _directory_attributes(objects, graft.user.parent)
                except OSError:
                    break  # the user mapping's parent is gone: the real one stays
                p.entries[i] = DirectoryEntry(b"..", parent, entry.next_offset)


async def _drop(
    cbd: CallbackData, objects: RelatedObjects, p: DirectoryControlParameters, hide: frozenset[bytes]
) -> None:
    """Drop the entries named in ``hide``; if that leaves none, read on (an empty batch ends a listing)."""
    entries = [e for e in p.entries if e.name not in hide]
    while not entries and p.entries:
        more = DirectoryControlParameters(p.entries[-1].next_offset)
        request = allocate_callback_data(objects, cbd.iopb.target_file_object, more)
        await perform_io_synchronously(objects, request)
        if request.io_status.status != NtStatus.SUCCESS:
            cbd.io_status.status = request.io_status.status
            break
        p.entries = more.entries
        entries = [e for e in p.entries if e.name not in hide]
    p.entries = entries


async def _graft_entry(objects: RelatedObjects, graft: Graft, listing: Listing) -> list[DirectoryEntry]:
    """The graft's entry, its directory kept open in ``listing.held``; none if the real directory is missing."""
    try:
        held = await create_file(objects, b"/".join(graft.real.components), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return []
    listing.held = held  # until the next request on the handle (see _let_go)
    try:
        attributes = await query_information_file(objects, held)
    except OSError:
        return []
    return [DirectoryEntry(graft.user.name, attributes, AFTER_GRAFT)]


async def _directory_attributes(objects: RelatedObjects, components: tuple[bytes, ...]) -> FileAttributes:
    """The attributes of directory ``components`` (opened for the query, and closed)."""
    if not components:
        return await query_information_file(objects, FileObject(ROOT_INODE))
    held = await create_file(objects, b"/".join(components), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return await query_information_file(objects, held)
    finally:
        await close_file(objects, held)


async def pre_close(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    """A listing handle goes: close what its last batch kept open."""
    context = get_context(objects, ContextType.STREAM_HANDLE)
    if context is not None:
        try:
            await _let_go(objects, _listing(context))
        finally:
            release_context(context)
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def listing_cleanup(context: Context, context_type: ContextType) -> None:
    listing = _listing(context)
    if listing.held is not None:
        log.warning("a listing handle went without its CLOSE reaching the filter: %r stays open", listing.held)


# -- names the instances above see ----------------------------------------------------------


def generate_file_name(
    objects: RelatedObjects, file_object: FileObject, cbd: CallbackData | None, name_format: NameFormat
) -> str | None:
    """The name below, with the real mapping's prefix replaced by the user mapping's."""
    graft = _GRAFTS.get(objects.instance)
    if graft is None:
        return None
    return graft.user_name(get_file_name_information_unsafe(objects, file_object))


# -- instance callbacks --------------------------------------------------------------------


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    try:
        graft = Graft.from_parameters(objects.filter.parameters)
    except ValueError as exc:
        log.warning("instance %s not attached: %s", objects.instance.name, exc)
        return NtStatus.FLT_DO_NOT_ATTACH
    _GRAFTS[objects.instance] = graft
    log.info("instance %s shows %s as %s", objects.instance.name, graft.real, graft.user)
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def instance_teardown_complete(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    _GRAFTS.pop(objects.instance, None)


def filter_unload(flags: int) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.LOOKUP, pre_names, post_redirect),
        OperationRegistration(MajorFunction.CREATE, pre_create, post_create),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_names, post_redirect),
        OperationRegistration(MajorFunction.DIRECTORY_CONTROL, pre_directory_control, post_directory_control),
        OperationRegistration(MajorFunction.CLOSE, pre_close),
    ),
    contexts=(ContextRegistration(ContextType.STREAM_HANDLE, cleanup=listing_cleanup),),
    filter_unload=filter_unload,
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_complete=instance_teardown_complete,
    generate_file_name=generate_file_name,
)
