"""simrep: names under one directory resolve in another, like a reparse point the file system never sees.

A port of Windows' SimRep minifilter sample (``filesys/miniFilter/simrep``).

Design and operation
--------------------

Parameters (INF ``Parameters`` key, or ``--param simrep.KEY=VALUE``), as in
the Windows sample:

* ``OldMapping`` (REG_SZ, default ``x/y``): the directory whose names are
  redirected, relative to the volume root;
* ``NewMapping`` (REG_SZ, default ``a/b``): where they resolve;
* ``RemapRenamesAndLinks`` (REG_DWORD, default 0): whether the *target* of
  a rename or link into ``OldMapping`` is redirected too.

Neither directory may be the volume root, contain ``..`` or lie inside the
other; otherwise the instance declines to attach.

On Windows the filter completes a CREATE under ``\\x\\y`` with
STATUS_REPARSE and a new name under ``\\a\\b``. On Linux a path reaches the
file system one LOOKUP at a time, as (directory inode, name) pairs, so the
filter rewrites the pairs whose directory is ``OldMapping`` (it asks the
directory's name: the check follows the directory across renames) to the same
name in ``NewMapping``, and sets the parameters dirty (the machinery,
shared with namechanger, is ``filters/_redirection.py``). Exactly
these requests are redirected:

* LOOKUP of a name in ``x/y``: every path through ``x/y`` (open, stat,
  ``cd``, ``ls x/y/sub``) continues in ``a/b``; ``.`` and ``..`` are not
  redirected;
* CREATE of a new name in ``x/y`` (create, mkdir, mknod, symlink): the object
  is made in ``a/b``;
* unlink and rmdir of a name in ``x/y``: the name in ``a/b`` goes;
* rename *from* ``x/y`` (on Windows the source is an open file, which the
  reparse already moved): the name in ``a/b`` moves;
* rename and link *into* ``x/y``: only with ``RemapRenamesAndLinks`` 1 (then
  ``mv f x/y/f`` lands in ``a/b/f``); with 0 the name is made in ``x/y``
  itself, where later lookups do not find it, as on Windows.

``a/b`` is opened with filter-initiated I/O for each redirected request (the
backend reaches directories through the kernel's lookups, and nothing may
stay pinned) and closed in its post-operation. If ``a/b`` does not exist, the
redirected requests fail with ENOENT, like a dangling reparse point.

What it does not change, and what that looks like: ``x/y`` itself is not
redirected (opening it, and listing it, gives ``x/y``'s own entries), so
``ls x/y`` lists ``x/y``'s names while ``cat x/y/f`` reads ``a/b/f``. ``stat
x/y/f`` shows ``a/b/f``'s attributes, inode number included (ENOENT if
``a/b`` has no ``f``, even though ``ls x/y`` lists one); ``stat x/y`` shows
``x/y``'s. ``ls -l x/y`` therefore lists ``x/y``'s names with the
attributes (or the "No such file or directory") of the names in ``a/b``.
A directory reached through the redirect is ``a/b``'s: ``ls x/y/sub`` lists
``a/b/sub``. The kernel keeps one name per directory, so ``pwd -P`` in such a
directory shows the name it was reached by last.

LOOKUP is registered with ``BYPASS_KERNEL_CACHE`` (the counterpart of the
Windows sample's DISALLOW_FASTIO for NETWORK_QUERY_OPEN: a stat must take the
full path): a listing of ``x/y`` hands the kernel ``x/y``'s own inodes for its
names, and without it the kernel would reuse them for later opens instead of
asking. The cost is that while an instance is attached the kernel caches no
names on the volume: every path walk step is a LOOKUP. Permissions are checked
by the kernel along the path it walks (``x/y``), not on ``a/b``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from filters._redirection import (
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
    FilterRegistration,
    Instance,
    InstanceSetupFlags,
    InstanceTeardownFlags,
    LinkParameters,
    MajorFunction,
    NtStatus,
    OperationFlags,
    OperationRegistration,
    Parameters,
    RelatedObjects,
    RenameParameters,
)

log = logging.getLogger("fltfuse.filters.simrep")

OLD_PARAMETER = "OldMapping"
NEW_PARAMETER = "NewMapping"
REMAP_PARAMETER = "RemapRenamesAndLinks"
DEFAULT_OLD = "x/y"
DEFAULT_NEW = "a/b"


@dataclass(frozen=True)
class Redirect:
    """One instance's mapping: names in ``old`` resolve in ``new``."""

    old: DirectoryPath
    new: DirectoryPath
    remap_renames_and_links: bool

    @classmethod
    def from_parameters(cls, parameters: Any) -> Redirect:
        """The mapping in the filter's parameters; ValueError if it cannot be one."""
        old = DirectoryPath.from_parameters(parameters, OLD_PARAMETER, DEFAULT_OLD)
        new = DirectoryPath.from_parameters(parameters, NEW_PARAMETER, DEFAULT_NEW)
        check_apart(old, new)
        remap = parameters.get(REMAP_PARAMETER, 0)
        if remap not in (0, 1):
            raise ValueError(f"{REMAP_PARAMETER} {remap!r} is not 0 or 1")
        return cls(old, new, bool(remap))


_REDIRECTS: dict[Instance, Redirect] = {}  # instance contexts, touched only in the daemon's trio loop


def redirect_of(instance: Instance) -> Redirect | None:
    """The mapping of an attached instance (for tests and diagnostics)."""
    return _REDIRECTS.get(instance)


async def _decide(
    objects: RelatedObjects, params: Parameters, slot: Slot, directory: int, name: bytes, held: HeldDirectories
) -> tuple[int, bytes] | None:
    """``name`` in ``OldMapping`` becomes ``name`` in ``NewMapping`` (see the module docstring)."""
    redirect = _REDIRECTS.get(objects.instance)
    if redirect is None or name == b"." or name == b"..":
        return None
    if slot.made and isinstance(params, (RenameParameters, LinkParameters)) and not redirect.remap_renames_and_links:
        return None
    where = directory_name(objects, directory)
    if where is None or not redirect.old.is_named(where):
        return None
    return await held.inode_of(redirect.new.components), name


async def pre_names(cbd: CallbackData, objects: RelatedObjects) -> Any:
    """LOOKUP, CREATE, SET_INFORMATION: redirect the names they carry."""
    return await pre_redirect(cbd, objects, _decide)


def instance_setup(
    objects: RelatedObjects, flags: InstanceSetupFlags, volume_device_type: str, volume_filesystem_type: str
) -> NtStatus:
    try:
        redirect = Redirect.from_parameters(objects.filter.parameters)
    except ValueError as exc:
        log.warning("instance %s not attached: %s", objects.instance.name, exc)
        return NtStatus.FLT_DO_NOT_ATTACH
    _REDIRECTS[objects.instance] = redirect
    log.info(
        "instance %s resolves names in %s in %s (renames and links %s)",
        objects.instance.name,
        redirect.old,
        redirect.new,
        "too" if redirect.remap_renames_and_links else "not",
    )
    return NtStatus.SUCCESS


def instance_query_teardown(objects: RelatedObjects, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def instance_teardown_complete(objects: RelatedObjects, reason: InstanceTeardownFlags) -> None:
    _REDIRECTS.pop(objects.instance, None)


def filter_unload(flags: int) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    operations=(
        OperationRegistration(MajorFunction.LOOKUP, pre_names, post_redirect, flags=OperationFlags.BYPASS_KERNEL_CACHE),
        OperationRegistration(MajorFunction.CREATE, pre_names, post_redirect),
        OperationRegistration(MajorFunction.SET_INFORMATION, pre_names, post_redirect),
    ),
    filter_unload=filter_unload,
    instance_setup=instance_setup,
    instance_query_teardown=instance_query_teardown,
    instance_teardown_complete=instance_teardown_complete,
)
