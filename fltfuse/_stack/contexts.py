"""Contexts: a filter's own state attached to a volume, an instance, a file, a stream or a handle.

Windows counterparts: ``FLT_CONTEXT_REGISTRATION``, ``FltAllocateContext``,
``FltSet*Context``, ``FltGet*Context``, ``FltGetContexts``,
``FltReferenceContext``, ``FltReleaseContext``, ``FltDeleteContext``.

What each kind keys on here:

* VOLUME: the filter on this volume (one daemon is one volume);
* INSTANCE: the instance;
* FILE and STREAM: the instance and the inode. Linux files have one data
  stream, so a file context and a stream context name the same object; both
  kinds exist so Windows filters port unchanged;
* STREAM_HANDLE: the instance and the FUSE file handle.

Counting: ``allocate_context`` returns a context with one reference (the
caller's); setting it on an object gives the object one of its own; ``get``
returns a new reference; every reference is given back with
``release_context``. When the last one goes, the cleanup callback the filter
registered for the type runs, exactly once. The object's reference goes when
the object does: for FILE and STREAM contexts when the kernel forgets the
inode, for STREAM_HANDLE contexts when the handle is released, for INSTANCE
contexts after teardown complete, for VOLUME contexts at dismount or when the
filter's last instance on the volume tears down (the others at the latest when
their instance tears down), or earlier by ``delete_context``.

Rules, as on Windows: no FILE, STREAM or STREAM_HANDLE context in a
pre-CREATE (the object is not open yet), none set in a post-CLOSE; a filter
sees only its own contexts and allocates only the types it registered. A
release too many, or a context used after its cleanup, is a filter bug
(:class:`~fltfuse.VerifierError` in verifier mode); at teardown the contexts
an instance still holds references to are listed with where they were
allocated, and teardown completes anyway.
"""

from __future__ import annotations

import enum
import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._status import NtStatus

log = logging.getLogger("fltfuse.contexts")


class ContextType(enum.IntFlag):
    """FLT_*_CONTEXT."""

    VOLUME = 0x1
    INSTANCE = 0x2
    FILE = 0x4
    STREAM = 0x8
    STREAM_HANDLE = 0x10


class SetContext(enum.Enum):
    """FLT_SET_CONTEXT_OPERATION."""

    KEEP_IF_EXISTS = 0
    REPLACE_IF_EXISTS = 1


@dataclass(frozen=True)
class ContextRegistration:
    """FLT_CONTEXT_REGISTRATION: a context type a filter uses, its cleanup callback and its buffer size.

    ``cleanup(context, context_type)`` runs once, when the last reference goes.
    ``size``: the context gets a zeroed ``bytearray`` of that many bytes as ``context.buffer``.
    """

    type: ContextType
    cleanup: Callable[[Context, ContextType], None] | None = None
    size: int = 0


class ContextError(Exception):
    """A context operation the rules forbid; ``status`` is the FltMgr status."""

    def __init__(self, status: NtStatus, message: str):
        super().__init__(message)
        self.status = status


_OPEN_OBJECT = ContextType.FILE | ContextType.STREAM | ContextType.STREAM_HANDLE


class Context:
    """A filter's context. Set any attributes on it; ``buffer`` is the registered size, zeroed."""

    def __init__(
        self, table: ContextTable, owner: Any, instance: Any, context_type: ContextType, size: int, where: str
    ):
        self._table = table
        self._owner = owner  # the Filter
        self._instance = instance
        self._type = context_type
        self._refs = 1
        self._key: tuple[Any, ...] | None = None  # where it is set
        self._cleaned = False
        self._where = where
        self.buffer = bytearray(size) if size else None

    @property
    def context_type(self) -> ContextType:
        return self._type

    def __repr__(self) -> str:
        state = "cleaned up" if self._cleaned else f"{self._refs} reference(s)"
        return f"<{self._type.name} context of {self._owner.name}, {state}, allocated at {self._where}>"


class ContextTable:
    """The contexts of one volume's instances, and their lifetimes."""

    def __init__(self, report: Callable[[Any, str], None]):
        self._report = report  # report(instance, message): a filter bug (raises in verifier mode)
        self._set: dict[tuple[Any, ...], Context] = {}
        self._live: dict[int, Context] = {}  # every context not yet cleaned up, by id
        # the keys set on each inode (FILE, STREAM) and handle (STREAM_HANDLE), so that a forget or a
        # close finds its contexts without a scan of every context; a key may be gone from _set already
        self._on_object: dict[tuple[bool, int], dict[tuple[Any, ...], None]] = {}
        self._lock = threading.RLock()  # work items may use contexts from threads
        self.leaks: list[str] = []  # the leak reports so far (the test harness fails a test on any)

    # -- the filter's calls ------------------------------------------------------------

    def allocate(self, objects: Any, context_type: ContextType) -> Context:
        registration = _registration(objects.filter, context_type)
        frame = traceback.extract_stack(limit=3)[0]
        where = f"{frame.filename}:{frame.lineno} in {frame.name}"
        context = Context(self, objects.filter, objects.instance, context_type, registration.size, where)
        with self._lock:
            self._live[id(context)] = context
        return context

    def set(self, objects: Any, context: Context, operation: SetContext) -> tuple[NtStatus, Context | None]:
        self._check_alive(context, "set")
        key = self._key(objects, context._type, setting=True)
        if context._owner is not objects.filter:
            raise ContextError(NtStatus.INVALID_PARAMETER, f"{context!r} belongs to another filter")
        with self._lock:
            if context._key is not None:
                raise ContextError(NtStatus.FLT_CONTEXT_ALREADY_LINKED, f"{context!r} is already set on an object")
            existing = self._set.get(key)
            if existing is not None and operation is SetContext.KEEP_IF_EXISTS:
                existing._refs += 1
                return NtStatus.FLT_CONTEXT_ALREADY_DEFINED, existing
            if existing is not None:
                existing._key = None  # the object's reference moves to the caller, who releases it
            self._set[key] = context
            if context._type & _OPEN_OBJECT:
                self._on_object.setdefault((context._type is ContextType.STREAM_HANDLE, key[2]), {})[key] = None
            context._key = key
            context._refs += 1
            return NtStatus.SUCCESS, existing

    def get(self, objects: Any, context_type: ContextType) -> Context | None:
        key = self._key(objects, context_type, setting=False)
        with self._lock:
            context = self._set.get(key)
            if context is not None:
                context._refs += 1
            return context

    def reference(self, context: Context) -> None:
        self._check_alive(context, "reference")
        with self._lock:
            context._refs += 1

    def release(self, context: Context) -> None:
        with self._lock:
            if context._cleaned or context._refs <= 0:
                bug = f"released {context!r} once too often"
            else:
                bug = ""
                context._refs -= 1
                last = context._refs == 0
        if bug:
            self._report(context._instance, bug)
            return
        if last:
            self._cleanup(context)

    def delete(self, context: Context) -> None:
        """Take ``context`` off its object (the object's reference goes)."""
        self._check_alive(context, "delete")
        with self._lock:
            key = context._key
            if key is None:
                return
            del self._set[key]
            context._key = None
        self.release(context)

    # -- lifetimes the filter manager drives ------------------------------------------------

    def inode_forgotten(self, inode: int) -> None:
        self._drop_keys((False, inode))

    def handle_closed(self, handle: int) -> None:
        self._drop_keys((True, handle))

    def instance_gone(self, instance: Any, last_of_filter: bool) -> None:
        """After teardown complete: drop what is set for the instance, then list what it leaked.

        ``last_of_filter``: no other instance of its filter is left on the
        volume, so the filter's volume context goes too.
        """

        def owned(key: tuple[Any, ...]) -> bool:
            if key[0] is ContextType.VOLUME:
                return last_of_filter and key[1] is instance.filter
            return key[1] is instance

        self._drop(owned)
        with self._lock:
            leaked = [
                c
                for c in self._live.values()
                if c._instance is instance and (c._key is None or c._key[0] is not ContextType.VOLUME)
            ]
        for context in leaked:
            report = f"filter {context._owner.name} (instance {getattr(instance, 'name', instance)}) leaked {context!r}"
            self.leaks.append(report)
            log.error("filter bug: %s at teardown", report)

    def dismount(self) -> None:
        """The volume is gone: drop every context still set (volume contexts live until here)."""
        self._drop(lambda key: True)

    def _drop_keys(self, obj: tuple[bool, int]) -> None:
        """Drop the contexts set on one inode or handle (``(is_handle, number)``)."""
        gone = []
        with self._lock:
            for key in self._on_object.pop(obj, ()):
                context = self._set.pop(key, None)
                if context is not None:
                    context._key = None
                    gone.append(context)
        for context in gone:
            self.release(context)

    def _drop(self, matches: Callable[[tuple[Any, ...]], bool]) -> None:
        with self._lock:
            gone = [(key, c) for key, c in self._set.items() if matches(key)]
            for key, context in gone:
                del self._set[key]
                context._key = None
        for _, context in gone:
            self.release(context)

    # -- internals -------------------------------------------------------------------------

    def _key(self, objects: Any, context_type: ContextType, *, setting: bool) -> tuple[Any, ...]:
        _registration(objects.filter, context_type)
        if context_type is ContextType.VOLUME:
            return (context_type, objects.filter)
        if context_type is ContextType.INSTANCE:
            return (context_type, objects.instance)
        file_object = objects.file_object
        if file_object is None:
            raise ContextError(NtStatus.INVALID_PARAMETER, f"a {context_type.name} context needs a request's file")
        if file_object.creating:
            raise ContextError(
                NtStatus.NOT_SUPPORTED, f"no {context_type.name} context in a pre-CREATE: the file is not open yet"
            )
        if setting and file_object.closed:
            raise ContextError(NtStatus.FLT_DELETING_OBJECT, f"no {context_type.name} context is set in a post-CLOSE")
        if context_type is ContextType.STREAM_HANDLE:
            if file_object.handle is None:
                raise ContextError(NtStatus.INVALID_PARAMETER, "a stream handle context needs a request with a handle")
            return (context_type, objects.instance, file_object.handle)
        return (context_type, objects.instance, file_object.inode)

    def _check_alive(self, context: Context, what: str) -> None:
        if context._cleaned:
            self._report(context._instance, f"used {context!r} after its cleanup ({what})")
            raise ContextError(NtStatus.FLT_DELETING_OBJECT, f"{context!r} was cleaned up")

    def _cleanup(self, context: Context) -> None:
        context._cleaned = True
        with self._lock:
            self._live.pop(id(context), None)
        callback = _registration(context._owner, context._type).cleanup
        if callback is not None:
            try:
                callback(context, context._type)
            except Exception as exc:
                log.error("filter bug: %s's context cleanup raised %r", context._owner.name, exc, exc_info=exc)


def _registration(filter_: Any, context_type: ContextType) -> ContextRegistration:
    for registration in filter_.registration.contexts:
        if registration.type is context_type:
            return registration  # type: ignore[no-any-return]
    raise ContextError(
        NtStatus.FLT_INVALID_CONTEXT_REGISTRATION,
        f"filter {filter_.name} did not register {context_type.name} contexts",
    )


# -- the API filters call (FltAllocateContext, FltSet*Context, ...) -----------------------------------


def _table(objects: Any) -> ContextTable:
    table = objects.instance.contexts
    if table is None:
        raise ContextError(NtStatus.FLT_DELETING_OBJECT, f"instance {objects.instance.name} is not attached")
    return table  # type: ignore[no-any-return]


def allocate_context(objects: Any, context_type: ContextType) -> Context:
    """FltAllocateContext: a new context of a type the filter registered, with one reference (yours)."""
    return _table(objects).allocate(objects, context_type)


def set_context(
    objects: Any, context: Context, operation: SetContext = SetContext.KEEP_IF_EXISTS
) -> tuple[NtStatus, Context | None]:
    """FltSet*Context: attach ``context`` to the object its type names (from ``objects``).

    Returns ``(SUCCESS, None)``; with REPLACE_IF_EXISTS ``(SUCCESS, old)`` if one
    was set (``old`` is now yours to release); with KEEP_IF_EXISTS
    ``(FLT_CONTEXT_ALREADY_DEFINED, existing)`` if one was set: ``existing`` is
    referenced for you, and ``context`` was not set (release it).
    """
    return _table(objects).set(objects, context, operation)


def get_context(objects: Any, context_type: ContextType) -> Context | None:
    """FltGet*Context: the context of that type set on the object, referenced for you; None if there is none."""
    return _table(objects).get(objects, context_type)


def get_contexts(objects: Any, context_types: ContextType) -> dict[ContextType, Context]:
    """FltGetContexts: each of ``context_types`` that is set on the objects, referenced for you."""
    table = _table(objects)
    found = {}
    for context_type in ContextType:
        if context_types & context_type:
            try:
                context = table.get(objects, context_type)
            except ContextError:
                continue  # not registered, or not available in this callback
            if context is not None:
                found[context_type] = context
    return found


def reference_context(context: Context) -> None:
    """FltReferenceContext."""
    context._table.reference(context)


def release_context(context: Context) -> None:
    """FltReleaseContext: give back one reference; the last one runs the cleanup callback."""
    context._table.release(context)


def delete_context(context: Context) -> None:
    """FltDeleteContext: take the context off its object (the object's reference goes)."""
    context._table.delete(context)
