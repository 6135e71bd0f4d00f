"""Filter registration: what a minifilter declares, checked once when it is loaded.

Where it sits: before any instance attaches. A filter module exposes one
:class:`FilterRegistration` (data, not code): its operations table, its
contexts table and its filter and instance callbacks. :func:`validate` checks
it and returns the compiled form the instance stack dispatches from, or raises
:class:`RegistrationError` naming the filter, the entry and the problem.

Windows counterpart: ``FLT_REGISTRATION`` with its ``FLT_OPERATION_REGISTRATION``
array, as handed to ``FltRegisterFilter``; ``FLT_PREOP_CALLBACK_STATUS`` and
``FLT_POSTOP_CALLBACK_STATUS``.

Callback contracts (each may be a plain function or a coroutine function):

* pre-operation ``pre(cbd, objects)`` returns a :class:`PreopCallbackStatus`,
  or ``(status, completion_context)`` to hand a value to its post.
  SUCCESS_WITH_CALLBACK and SYNCHRONIZE need a post callback. COMPLETE means
  the filter set ``cbd.io_status``: nothing below sees the request.
* post-operation ``post(cbd, objects, completion_context, flags)`` returns a
  :class:`PostopCallbackStatus`. ``flags`` has ``PostopFlags.DRAINING`` when
  the instance is detaching and the post may only free its context.
* ``instance_setup(objects, flags, volume_device_type, volume_filesystem_type)``
  returns None or ``NtStatus.SUCCESS`` to attach, anything else (typically
  ``NtStatus.FLT_DO_NOT_ATTACH``) to decline. To decline with a reason the
  user must see (a wrong key, a volume the filter cannot serve safely), it
  raises :class:`InstanceSetupRefused`: the attach fails with that message,
  and at mount time the mount fails with it (a plain declining status at
  mount time is only logged). ``instance_teardown_start`` and
  ``instance_teardown_complete`` get ``(objects, InstanceTeardownFlags)``;
  ``filter_unload(FilterUnloadFlags)`` runs after the filter's last instance is
  gone. ``filter_load(filter)`` runs once when the filter is loaded, before
  its first instance attaches (the rest of a DriverEntry: create communication
  ports there); it returns None or ``NtStatus.SUCCESS``, anything else fails
  the load. After a successful unload the filter's ports close and their
  clients are disconnected. These are plain functions, except the two teardown callbacks, which may
  be coroutine functions: they are awaited, so they can close the files the
  instance opened with filter-initiated I/O (``close_file``), as
  FltClose in InstanceTeardownComplete does on Windows.
* name provider callbacks (see ``fltfuse._stack.names``):
  ``generate_file_name(objects, file_object, cbd, name_format)`` returns the
  full name (a ``str``, volume included) that the filters above this one see
  for ``file_object``, or None to pass the name from below unchanged;
  ``normalize_name_component(objects, parent_name, component)`` returns the
  final component (a ``str``) the filters above see for ``component`` in the
  directory they know as ``parent_name``. Plain functions; they may query
  names themselves (``get_file_name_information_unsafe``), which asks the
  instances below.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ._callback_data import CallbackData, MajorFunction


class PreopCallbackStatus(enum.Enum):
    """FLT_PREOP_CALLBACK_STATUS: what a pre-operation callback decided.

    DISALLOW_FASTIO has no use here: fast I/O on Linux is the kernel answering
    from its page, attribute and entry caches, and that never reaches a filter
    (every request a filter sees is, in Windows terms, an IRP). To see those
    operations a filter registers them with ``OperationFlags.BYPASS_KERNEL_CACHE``.
    Returning it is, as FltMgr treats it for IRP operations, a filter bug.
    DISALLOW_FSFILTER_IO likewise: there are no FsFilter callbacks.
    """

    SUCCESS_WITH_CALLBACK = 0
    SUCCESS_NO_CALLBACK = 1
    PENDING = 2
    DISALLOW_FASTIO = 3
    COMPLETE = 4
    SYNCHRONIZE = 5
    DISALLOW_FSFILTER_IO = 6


class PostopCallbackStatus(enum.Enum):
    """FLT_POSTOP_CALLBACK_STATUS: what a post-operation callback decided."""

    FINISHED_PROCESSING = 0
    MORE_PROCESSING_REQUIRED = 1
    DISALLOW_FSFILTER_IO = 2


class PostopFlags(enum.IntFlag):
    """FLTFL_POST_OPERATION_*."""

    NONE = 0
    DRAINING = 0x1


class OperationFlags(enum.IntFlag):
    """FLTFL_OPERATION_REGISTRATION_*: READ and WRITE a filter does not want to see.

    Filters sit below the kernel's page cache (on Windows they sit above the
    cache manager), so the I/O kinds map like this:

    * cached I/O (a read(2) the page cache answers) never reaches a filter:
      SKIP_CACHED_IO has nothing to skip;
    * paging I/O is what the page cache sends down: READ and WRITE on a handle
      opened for cached I/O (page fills, readahead, write-through and mmap
      writeback). SKIP_PAGING_IO skips them;
    * non-cached non-paging I/O is READ and WRITE on a handle opened with
      O_DIRECT, or for direct I/O because an instance asked for
      BYPASS_KERNEL_CACHE: each is one read(2)/write(2) of the caller.
      SKIP_NON_CACHED_NON_PAGING_IO skips them;
    * there are no volume (DASD) opens: SKIP_NON_DASD_IO skips every READ and WRITE.

    The flags apply to READ and WRITE only, as on Windows.
    """

    NONE = 0
    SKIP_PAGING_IO = 0x1
    SKIP_CACHED_IO = 0x2
    SKIP_NON_DASD_IO = 0x4
    SKIP_NON_CACHED_NON_PAGING_IO = 0x8
    # fltfuse's own: a filter sits below the kernel's caches, so by default it
    # does not see what they answer (a stat the attribute cache answers sends no
    # request). With this flag on LOOKUP or QUERY_INFORMATION the kernel may not
    # cache names or attributes while the instance is attached: it sees every one.
    # On READ or WRITE, files opened while it is attached use direct I/O: every
    # read(2)/write(2) is a request as the caller made it (and can be interrupted).
    BYPASS_KERNEL_CACHE = 0x100


class RegistrationFlags(enum.IntFlag):
    """FLTFL_REGISTRATION_*."""

    NONE = 0
    DO_NOT_SUPPORT_SERVICE_STOP = 0x1
    SUPPORT_NPFS_MSFS = 0x2  # accepted and ignored: no named pipes or mailslots on Linux
    SUPPORT_DAX_VOLUME = 0x4  # accepted and ignored


class InstanceSetupFlags(enum.IntFlag):
    """FLTFL_INSTANCE_SETUP_*: why an instance is being attached."""

    AUTOMATIC_ATTACHMENT = 0x1  # the filter was loaded, or the volume mounted
    MANUAL_ATTACHMENT = 0x2  # fltmc attach
    NEWLY_MOUNTED_VOLUME = 0x4


class InstanceTeardownFlags(enum.IntFlag):
    """FLTFL_INSTANCE_TEARDOWN_*: why an instance is going away."""

    MANUAL = 0x1
    FILTER_UNLOAD = 0x2
    MANDATORY_FILTER_UNLOAD = 0x4
    VOLUME_DISMOUNT = 0x8
    INTERNAL_ERROR = 0x10


class FilterUnloadFlags(enum.IntFlag):
    """FLTFL_FILTER_UNLOAD_*."""

    NONE = 0
    MANDATORY = 0x1


PreopResult = PreopCallbackStatus | tuple[PreopCallbackStatus, Any]
PreCallback = Callable[[CallbackData, Any], PreopResult | Awaitable[PreopResult]]
PostCallback = Callable[[CallbackData, Any, Any, PostopFlags], PostopCallbackStatus | Awaitable[PostopCallbackStatus]]

# Majors no filter may register for, and those that cannot have a post (fltKernel.h).
_NOT_REGISTRABLE = frozenset({MajorFunction.POWER, MajorFunction.DEVICE_CHANGE, MajorFunction.FORGET})
_NO_POST = frozenset({MajorFunction.SHUTDOWN})
_ALL_OPERATION_FLAGS = 0x10F


@dataclass(frozen=True)
class OperationRegistration:
    """One entry of the operations table: a major function and its callbacks."""

    major: MajorFunction
    pre: PreCallback | None = None
    post: PostCallback | None = None
    flags: OperationFlags = OperationFlags.NONE


@dataclass(frozen=True)
class FilterRegistration:
    """FLT_REGISTRATION: everything a filter declares, as data."""

    operations: tuple[OperationRegistration, ...] = ()
    contexts: tuple[Any, ...] = ()
    flags: RegistrationFlags = RegistrationFlags.NONE
    filter_load: Callable[..., Any] | None = None
    filter_unload: Callable[..., Any] | None = None
    instance_setup: Callable[..., Any] | None = None
    instance_query_teardown: Callable[..., Any] | None = None
    instance_teardown_start: Callable[..., Any] | None = None
    instance_teardown_complete: Callable[..., Any] | None = None
    generate_file_name: Callable[..., Any] | None = None
    normalize_name_component: Callable[..., Any] | None = None


class InstanceSetupRefused(Exception):
    """Raised by ``instance_setup`` to decline with a reason (STATUS_FLT_DO_NOT_ATTACH and a message).

    Not a filter bug: the message reaches whoever attached (``fltmc attach``)
    and fails the mount when it happens at mount time.
    """


class RegistrationError(Exception):
    """A registration that cannot be loaded; the message names filter, entry and problem."""

    def __init__(self, filter_name: str, entry: str, problem: str):
        super().__init__(f"filter {filter_name!r}: {entry}: {problem}")
        self.filter_name = filter_name
        self.entry = entry
        self.problem = problem


@dataclass(frozen=True)
class Operation:
    """A validated operations-table entry, with whether each callback must be awaited."""

    major: MajorFunction
    pre: PreCallback | None
    post: PostCallback | None
    flags: OperationFlags
    pre_is_async: bool
    post_is_async: bool


# The instance callbacks and how many positional arguments each takes.
_INSTANCE_CALLBACKS = {
    "filter_load": 1,  # (filter)
    "filter_unload": 1,  # (flags)
    "instance_setup": 4,  # (objects, flags, volume_device_type, volume_filesystem_type)
    "instance_query_teardown": 2,  # (objects, flags)
    "instance_teardown_start": 2,  # (objects, reason)
    "instance_teardown_complete": 2,  # (objects, reason)
    "generate_file_name": 4,  # (objects, file_object, cbd, name_format)
    "normalize_name_component": 3,  # (objects, parent_name, component)
}
# The instance callbacks that may be coroutine functions (awaited: they may do filter-initiated I/O).
_MAY_BE_COROUTINES = frozenset({"instance_teardown_start", "instance_teardown_complete"})


def validate(filter_name: str, registration: object) -> dict[MajorFunction, Operation]:
    """Check a registration and return its operations by major function."""
    if not isinstance(registration, FilterRegistration):
        raise RegistrationError(
            filter_name, "REGISTRATION", f"is a {type(registration).__name__}, not a FilterRegistration"
        )
    if not isinstance(registration.flags, int):
        raise RegistrationError(filter_name, "flags", f"{registration.flags!r} is not a RegistrationFlags value")
    for name, arity in _INSTANCE_CALLBACKS.items():
        callback = getattr(registration, name)
        if callback is not None:
            _check_signature(filter_name, name, callback, arity)
            if inspect.iscoroutinefunction(callback) and name not in _MAY_BE_COROUTINES:
                raise RegistrationError(filter_name, name, "must be a plain function: it is called, not awaited")
    _check_contexts(filter_name, registration.contexts)
    operations: dict[MajorFunction, Operation] = {}
    for index, op in enumerate(registration.operations):
        entry = f"operations[{index}]"
        if not isinstance(op, OperationRegistration):
            raise RegistrationError(filter_name, entry, f"is a {type(op).__name__}, not an OperationRegistration")
        if not isinstance(op.major, MajorFunction):
            raise RegistrationError(filter_name, entry, f"unknown major function {op.major!r}")
        entry = f"operations[{index}] ({op.major.name})"
        if op.major in _NOT_REGISTRABLE:
            raise RegistrationError(filter_name, entry, "this major function cannot be registered")
        if op.major in operations:
            raise RegistrationError(filter_name, entry, "registered twice")
        if op.pre is None and op.post is None:
            raise RegistrationError(filter_name, entry, "neither a pre nor a post callback")
        if op.post is not None and op.major in _NO_POST:
            raise RegistrationError(filter_name, entry, "a post callback is not allowed for this major function")
        if op.pre is not None:
            _check_signature(filter_name, f"{entry} pre", op.pre, 2)
        if op.post is not None:
            _check_signature(filter_name, f"{entry} post", op.post, 4)
        if not isinstance(op.flags, int) or op.flags & ~_ALL_OPERATION_FLAGS:
            raise RegistrationError(filter_name, entry, f"unknown flags {op.flags!r}")
        flags = OperationFlags(op.flags)
        operations[op.major] = Operation(
            op.major,
            op.pre,
            op.post,
            flags,
            inspect.iscoroutinefunction(op.pre),
            inspect.iscoroutinefunction(op.post),
        )
    return operations


def _check_signature(filter_name: str, entry: str, callback: object, arity: int) -> None:
    if not callable(callback):
        raise RegistrationError(filter_name, entry, f"{callback!r} is not callable")
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return  # a builtin without introspectable signature: trust it
    try:
        signature.bind(*range(arity))
    except TypeError:
        name = getattr(callback, "__qualname__", repr(callback))
        parameters = ", ".join(signature.parameters)
        raise RegistrationError(filter_name, entry, f"{name}({parameters}) does not take {arity} arguments") from None


def _check_contexts(filter_name: str, contexts: Any) -> None:
    from ._stack.contexts import ContextRegistration, ContextType  # here: the stack imports this module

    seen: set[ContextType] = set()
    for index, registration in enumerate(contexts):
        entry = f"contexts[{index}]"
        if not isinstance(registration, ContextRegistration):
            kind = type(registration).__name__
            raise RegistrationError(filter_name, entry, f"is a {kind}, not a ContextRegistration")
        if not isinstance(registration.type, ContextType) or registration.type not in ContextType.__members__.values():
            raise RegistrationError(filter_name, entry, f"unknown context type {registration.type!r}")
        if registration.type in seen:
            raise RegistrationError(filter_name, entry, f"{registration.type.name} registered twice")
        if registration.size < 0:
            raise RegistrationError(filter_name, entry, "a negative size")
        if registration.cleanup is not None:
            _check_signature(filter_name, f"{entry}.cleanup", registration.cleanup, 2)
        seen.add(registration.type)
