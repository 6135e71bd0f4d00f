"""InstanceStack: the instances attached to one volume, and the walk of each request through them.

Windows counterpart: the FltMgr frame's instance list and its dispatch of
FLT_CALLBACK_DATA through pre- and post-operation callbacks.

The walk, exactly as Filter Manager does it:

* pre-operation callbacks run from the highest altitude down, only for
  instances that registered for the major function;
* SUCCESS_WITH_CALLBACK and SYNCHRONIZE ask for the post (with the completion
  context the pre returned), SUCCESS_NO_CALLBACK does not. SYNCHRONIZE's
  promise, the post runs in the same thread as the pre, always holds here:
  every post runs in the request's own trio task; COMPLETE ends the
  descent (the filter set ``io_status``; nothing below sees the request and
  only the posts above it run), PENDING parks the request until
  :func:`complete_pended_preoperation` gives the final decision;
* the backend performs the request;
* post-operation callbacks run from the lowest altitude up, only for instances
  that asked; MORE_PROCESSING_REQUIRED parks completion until
  :func:`complete_pended_postoperation`.

The dirty rule: each instance's pre gets a copy of the parameters it may
change; the changes go down only if it calls ``cbd.set_dirty()``, and its post
(and every instance above) sees the parameters as they were before. Output
fields (``Parameters.OUTPUTS``) are carried back up to each instance's copy.
``io_status`` is shared and needs no dirty flag.

Containment: a callback that raises, returns something that is not a status,
or breaks a rule is a filter bug. It is logged with the filter, the instance
and the request; the request fails with FLT_INTERNAL_ERROR (EIO), except
CLEANUP and CLOSE, which cannot fail and go on down. With ``verifier=True``
(tests) a bug raises :class:`VerifierError` instead, so the test fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import trio

from .._callback_data import CallbackData, CallbackDataFlags, FileObject, MajorFunction, Parameters
from .._registration import (
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupFlags,
    InstanceTeardownFlags,
    Operation,
    OperationFlags,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    validate,
)
from .._status import NtStatus
from .._volume import VolumeProperties

log = logging.getLogger("fltfuse.stack")

_CANNOT_FAIL = frozenset({MajorFunction.CLEANUP, MajorFunction.CLOSE})
_PENDING = PreopCallbackStatus.PENDING
_WITH_CALLBACK = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
_SYNCHRONIZE = PreopCallbackStatus.SYNCHRONIZE
_FINISHED = PostopCallbackStatus.FINISHED_PROCESSING
_NO_FLAGS = PostopFlags.NONE
_COMPLETE = PreopCallbackStatus.COMPLETE
_NO_CALLBACK = PreopCallbackStatus.SUCCESS_NO_CALLBACK
_DIRTY = int(CallbackDataFlags.DIRTY)
_POST_OPERATION = int(CallbackDataFlags.POST_OPERATION)


class Backend(Protocol):
    """The bottom of a stack: performs a request and sets its io_status and outputs."""

    async def dispatch(self, cbd: CallbackData) -> None: ...


class VerifierError(Exception):
    """A filter broke a Filter Manager rule (raised only in verifier mode)."""


class StackError(Exception):
    """An attach or detach that cannot be done; ``status`` is the FltMgr status."""

    def __init__(self, status: NtStatus, message: str):
        super().__init__(message)
        self.status = status


class Filter:
    """FLT_FILTER: a loaded filter, its validated registration and its parameters.

    ``parameters`` is the filter's private settings (the Windows ``Parameters``
    registry key): from its INF, with ``--param NAME.KEY=VALUE`` overrides.
    """

    def __init__(self, name: str, registration: FilterRegistration, parameters: Mapping[str, Any] | None = None):
        self.name = name
        self.registration = registration
        self.operations = validate(name, registration)
        self.parameters: Mapping[str, Any] = parameters if parameters is not None else MappingProxyType({})

    def __repr__(self) -> str:
        return f"Filter({self.name!r})"


@dataclass(eq=False)
class Instance:
    """FLT_INSTANCE: one filter attached to one volume at one altitude."""

    filter: Filter
    name: str
    altitude: Decimal
    volume: Any = None

    def __repr__(self) -> str:
        return f"Instance({self.filter.name!r}, {self.name!r}, {self.altitude})"


class RelatedObjects(NamedTuple):
    """FLT_RELATED_OBJECTS: what every callback is handed."""

    filter: Filter
    instance: Instance
    volume: VolumeProperties | None
    file_object: FileObject | None  # None in the instance and filter callbacks


@dataclass
class _Pended:
    """A parked pre- or post-operation and how to wake it."""

    event: trio.Event
    token: trio.lowlevel.TrioToken
    status: Any = None
    context: Any = None
    waiting: str = ""


@dataclass
class InstanceStack:
    """The instances attached to one volume, above the backend that ends every request.

    ``dispatch`` never raises for a failed request: the outcome is in
    ``cbd.io_status``.
    """

    backend: Backend
    verifier: bool = False
    volume: VolumeProperties | None = None
    instances: list[Instance] = field(default_factory=list)  # highest altitude first
    _chains: dict[MajorFunction, tuple[tuple[Instance, Operation], ...]] = field(default_factory=dict)

    # -- attaching ----------------------------------------------------------------

    def attach(self, instance: Instance, flags: InstanceSetupFlags = InstanceSetupFlags.MANUAL_ATTACHMENT) -> None:
        """Add ``instance`` at its altitude, if its filter's setup callback agrees.

        Altitudes and instance names are unique per volume. Raises StackError
        with FLT_DO_NOT_ATTACH if the setup callback declines (or raises).
        """
        for other in self.instances:
            if other.altitude == instance.altitude:
                raise StackError(
                    NtStatus.FLT_INSTANCE_ALTITUDE_COLLISION,
                    f"altitude {instance.altitude} is taken by {other.filter.name}/{other.name}",
                )
            if other.name == instance.name:
                raise StackError(
                    NtStatus.FLT_INSTANCE_NAME_COLLISION, f"an instance named {instance.name!r} is attached"
                )
        instance.volume = self.volume
        setup = instance.filter.registration.instance_setup
        if setup is not None:
            fs_type = self.volume.filesystem_type if self.volume else ""
            try:
                answer = setup(self._objects(instance), flags, "disk", fs_type)
            except Exception as exc:
                self._bug(instance, None, f"instance setup raised {exc!r}; not attached", exc)
                answer = NtStatus.FLT_DO_NOT_ATTACH
            if answer is not None and answer != NtStatus.SUCCESS:
                raise StackError(NtStatus.FLT_DO_NOT_ATTACH, f"{instance!r} declined to attach ({answer!r})")
        self.instances.append(instance)
        self.instances.sort(key=lambda i: i.altitude, reverse=True)
        self._rebuild()

    def dismount(self) -> None:
        """The volume is going away (no request is in flight): tear every instance down, unload the filters.

        For each instance, from the top: teardown start, then teardown complete,
        with VOLUME_DISMOUNT; then each filter's unload callback. A callback
        that raises is logged and the teardown goes on.
        """
        filters = []
        for instance in list(self.instances):
            for name in ("instance_teardown_start", "instance_teardown_complete"):
                callback = getattr(instance.filter.registration, name)
                if callback is not None:
                    try:
                        callback(self._objects(instance), InstanceTeardownFlags.VOLUME_DISMOUNT)
                    except Exception as exc:
                        self._bug(instance, None, f"{name} raised {exc!r}", exc, contain=True)
            self.instances.remove(instance)
            if instance.filter not in filters:
                filters.append(instance.filter)
        self._rebuild()
        for filter_ in filters:
            unload = filter_.registration.filter_unload
            if unload is not None:
                try:
                    unload(FilterUnloadFlags.NONE)
                except Exception:
                    log.exception("filter bug: filter %s: filter_unload raised", filter_.name)

    def _objects(self, instance: Instance) -> RelatedObjects:
        return RelatedObjects(instance.filter, instance, self.volume, None)

    def _rebuild(self) -> None:
        chains: dict[MajorFunction, list[tuple[Instance, Operation]]] = {}
        for instance in self.instances:
            for major, op in instance.filter.operations.items():
                chains.setdefault(major, []).append((instance, op))
        self._chains = {major: tuple(chain) for major, chain in chains.items()}

    def bypasses_kernel_cache(self, major: MajorFunction) -> bool:
        """Whether an attached instance registered ``major`` with ``BYPASS_KERNEL_CACHE``.

        The kernel adapter lets the kernel cache names and attributes unless an
        instance asked to see every LOOKUP or QUERY_INFORMATION.
        """
        return any(op.flags & OperationFlags.BYPASS_KERNEL_CACHE for _, op in self._chains.get(major, ()))

    # -- the walk -------------------------------------------------------------------

    async def dispatch(self, cbd: CallbackData) -> None:
        chain = self._chains.get(cbd.iopb.parameters.MAJOR)
        if chain is None:
            await self.backend.dispatch(cbd)
        else:
            await self._walk(cbd, chain)

    async def _walk(self, cbd: CallbackData, chain: Iterable[tuple[Instance, Operation]]) -> None:
        original = cbd.iopb.parameters
        major = original.MAJOR
        file_object = cbd.iopb.target_file_object
        frames: list[tuple[Instance, Operation, Any, Parameters, RelatedObjects]] = []  # posts to run, top first
        completed = False
        for instance, op in chain:
            params = cbd.iopb.parameters
            objects = RelatedObjects(instance.filter, instance, instance.volume, file_object)
            if op.pre is None:
                frames.append((instance, op, None, params, objects))
                continue
            cbd.iopb.parameters = params.copy()  # what this instance may change
            cbd.flags &= ~_DIRTY
            try:
                result = await op.pre(cbd, objects) if op.pre_is_async else op.pre(cbd, objects)  # type: ignore[misc]
            except Exception as exc:
                result = self._failed(instance, cbd, f"pre-operation callback raised {exc!r}", exc)
            if result.__class__ is tuple:
                status, context = result
            else:
                status, context = result, None
            if status is _PENDING:
                status, context = await self._park(cbd, "pre-operation")
            if not (
                status is _WITH_CALLBACK or status is _NO_CALLBACK or status is _COMPLETE or status is _SYNCHRONIZE
            ):
                status, context = self._failed(instance, cbd, f"pre-operation callback returned {status!r}", None)
            if cbd.iopb.parameters.MAJOR is not major:
                self._bug(instance, cbd, "changed the major function of a request")
                cbd.iopb.parameters = params.copy()
                status = _NO_CALLBACK
            if status is _COMPLETE:
                if cbd.io_status.status == NtStatus.PENDING:
                    self._bug(instance, cbd, "completed a request with STATUS_PENDING")
                    cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
                if major in _CANNOT_FAIL and cbd.io_status.status >= 0x80000000:  # not NT_SUCCESS
                    self._bug(instance, cbd, f"failed {major.name}, which cannot fail; it succeeds")
                    cbd.io_status.status = NtStatus.SUCCESS
                completed = True  # its outputs (in the copy it filled) go up as the file system's would
                break
            if not cbd.flags & _DIRTY:
                cbd.iopb.parameters = params  # changes without set_dirty() do not go down
            if status is not _NO_CALLBACK:  # SUCCESS_WITH_CALLBACK or SYNCHRONIZE
                if op.post is None:
                    self._bug(instance, cbd, f"returned {status.name} without a post-operation callback")
                else:
                    frames.append((instance, op, context, params, objects))
        cbd.flags &= ~_DIRTY
        if not completed:
            await self.backend.dispatch(cbd)
        lower = cbd.iopb.parameters
        for instance, op, context, params, objects in reversed(frames):
            if lower is not params:
                for name in lower.OUTPUTS:
                    setattr(params, name, getattr(lower, name))
            cbd.iopb.parameters = lower = params
            if op.post_is_async:
                await self._post(instance, op, cbd, objects, context)
                continue
            cbd.flags |= _POST_OPERATION
            try:
                status = op.post(cbd, objects, context, _NO_FLAGS)
            except Exception as exc:
                self._post_failed(instance, cbd, exc)
            else:
                if status is not _FINISHED:
                    await self._post_status(instance, cbd, status)
            cbd.flags &= ~_POST_OPERATION
        if lower is not original:
            for name in lower.OUTPUTS:
                setattr(original, name, getattr(lower, name))
            cbd.iopb.parameters = original

    def _failed(
        self, instance: Instance, cbd: CallbackData, what: str, exc: BaseException | None
    ) -> tuple[PreopCallbackStatus, Any]:
        self._bug(instance, cbd, what, exc)
        if cbd.iopb.parameters.MAJOR in _CANNOT_FAIL:
            return PreopCallbackStatus.SUCCESS_NO_CALLBACK, None
        cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
        return PreopCallbackStatus.COMPLETE, None

    async def _post(
        self, instance: Instance, op: Operation, cbd: CallbackData, objects: RelatedObjects, context: Any
    ) -> None:
        """An async post-operation callback (sync ones are called inline by the walk)."""
        assert op.post is not None
        cbd.flags |= _POST_OPERATION
        try:
            status = await op.post(cbd, objects, context, _NO_FLAGS)  # type: ignore[misc]
        except Exception as exc:
            self._post_failed(instance, cbd, exc)
        else:
            if status is not _FINISHED:
                await self._post_status(instance, cbd, status)
        finally:
            cbd.flags &= ~_POST_OPERATION

    async def _post_status(self, instance: Instance, cbd: CallbackData, status: Any) -> None:
        """A post returned something other than FINISHED_PROCESSING."""
        if status is PostopCallbackStatus.MORE_PROCESSING_REQUIRED:
            status, _ = await self._park(cbd, "post-operation")
        if status is not _FINISHED:
            self._bug(instance, cbd, f"post-operation callback returned {status!r}")

    def _post_failed(self, instance: Instance, cbd: CallbackData, exc: Exception) -> None:
        self._bug(instance, cbd, f"post-operation callback raised {exc!r}", exc)
        if cbd.iopb.parameters.MAJOR not in _CANNOT_FAIL:
            cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR

    async def _park(self, cbd: CallbackData, what: str) -> tuple[Any, Any]:
        cbd.pended = pended = _Pended(trio.Event(), trio.lowlevel.current_trio_token(), waiting=what)
        try:
            await pended.event.wait()
        finally:
            cbd.pended = None
        return pended.status, pended.context

    def _bug(
        self,
        instance: Instance,
        cbd: CallbackData | None,
        what: str,
        exc: BaseException | None = None,
        *,
        contain: bool = False,
    ) -> None:
        """Report a filter bug: raise in verifier mode (unless ``contain``), else log it."""
        message = f"filter {instance.filter.name} (instance {instance.name}) {what}" + (f" for {cbd!r}" if cbd else "")
        if self.verifier and not contain:
            raise VerifierError(message) from exc
        log.error("filter bug: %s", message, exc_info=exc)


def complete_pended_preoperation(cbd: CallbackData, status: PreopCallbackStatus, context: Any = None) -> None:
    """FltCompletePendedPreOperation: resume a pre-operation that returned PENDING.

    ``status`` is SUCCESS_WITH_CALLBACK, SUCCESS_NO_CALLBACK or COMPLETE. Call it
    from any trio task of the daemon or from any worker thread.
    """
    _resume(cbd, "pre-operation", status, context)


def complete_pended_postoperation(cbd: CallbackData) -> None:
    """FltCompletePendedPostOperation: finish a post that returned MORE_PROCESSING_REQUIRED."""
    _resume(cbd, "post-operation", PostopCallbackStatus.FINISHED_PROCESSING, None)


def _resume(cbd: CallbackData, what: str, status: Any, context: Any) -> None:
    pended = cbd.pended
    if not isinstance(pended, _Pended) or pended.waiting != what or pended.event.is_set():
        raise RuntimeError(f"{cbd!r} has no pended {what} to complete")
    pended.status, pended.context = status, context
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:  # a worker thread: wake the request in the daemon's trio loop
        trio.from_thread.run_sync(pended.event.set, trio_token=pended.token)
    else:
        pended.event.set()
