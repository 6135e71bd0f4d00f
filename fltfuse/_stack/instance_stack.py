"""InstanceStack: the instances attached to one volume, and the walk of each request through them.

Windows counterpart: the FltMgr frame's instance list and its dispatch of
FLT_CALLBACK_DATA through pre- and post-operation callbacks.

The walk, exactly as Filter Manager does it:

* pre-operation callbacks run from the highest altitude down, only for
  instances that registered for the major function;
* SUCCESS_WITH_CALLBACK and SYNCHRONIZE ask for the post (with the completion
  context the pre returned), SUCCESS_NO_CALLBACK does not, COMPLETE ends the
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
from typing import Any, Protocol

import trio

from .._callback_data import CallbackData, CallbackDataFlags, FileObject, MajorFunction, Parameters
from .._registration import (
    FilterRegistration,
    Operation,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    validate,
)
from .._status import NtStatus

log = logging.getLogger("fltfuse.stack")

_CANNOT_FAIL = frozenset({MajorFunction.CLEANUP, MajorFunction.CLOSE})
_WANTS_POST = frozenset({PreopCallbackStatus.SUCCESS_WITH_CALLBACK, PreopCallbackStatus.SYNCHRONIZE})
_FINAL_PREOP = frozenset(
    {PreopCallbackStatus.SUCCESS_WITH_CALLBACK, PreopCallbackStatus.SUCCESS_NO_CALLBACK, PreopCallbackStatus.COMPLETE}
)


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


@dataclass(frozen=True)
class RelatedObjects:
    """FLT_RELATED_OBJECTS: what every callback is handed."""

    filter: Filter
    instance: Instance
    volume: Any
    file_object: FileObject


@dataclass
class _Pended:
    """A parked pre- or post-operation and how to wake it."""

    event: trio.Event
    token: trio.lowlevel.TrioToken
    status: Any = None
    context: Any = None
    waiting: str = ""


@dataclass
class _Frame:
    """An instance whose post runs for this request, with the parameters it saw."""

    instance: Instance
    operation: Operation
    context: Any
    params: Parameters


@dataclass
class InstanceStack:
    """The instances attached to one volume, above the backend that ends every request.

    ``dispatch`` never raises for a failed request: the outcome is in
    ``cbd.io_status``.
    """

    backend: Backend
    verifier: bool = False
    instances: list[Instance] = field(default_factory=list)  # highest altitude first
    _chains: dict[MajorFunction, tuple[tuple[Instance, Operation], ...]] = field(default_factory=dict)

    # -- attaching ----------------------------------------------------------------

    def attach(self, instance: Instance) -> None:
        """Add ``instance`` at its altitude; altitudes and instance names are unique per volume."""
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
        self.instances.append(instance)
        self.instances.sort(key=lambda i: i.altitude, reverse=True)
        self._rebuild()

    def detach(self, instance: Instance) -> None:
        try:
            self.instances.remove(instance)
        except ValueError:
            raise StackError(NtStatus.FLT_INSTANCE_NOT_FOUND, f"{instance!r} is not attached") from None
        self._rebuild()

    def _rebuild(self) -> None:
        chains: dict[MajorFunction, list[tuple[Instance, Operation]]] = {}
        for instance in self.instances:
            for major, op in instance.filter.operations.items():
                chains.setdefault(major, []).append((instance, op))
        self._chains = {major: tuple(chain) for major, chain in chains.items()}

    def sees(self, major: MajorFunction) -> bool:
        """Whether any attached instance registered for ``major``.

        The kernel adapter lets the kernel cache what no instance needs to see
        (attributes, directory entries).
        """
        return major in self._chains

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
        frames: list[_Frame] = []
        completed = False
        for instance, op in chain:
            params = cbd.iopb.parameters
            if op.pre is None:
                frames.append(_Frame(instance, op, None, params))
                continue
            down = params.copy()
            cbd.iopb.parameters = down
            cbd.flags &= ~CallbackDataFlags.DIRTY
            status, context = await self._pre(instance, op, cbd)
            if type(cbd.iopb.parameters).MAJOR is not major:
                self._bug(instance, cbd, "changed the major function of a request")
                cbd.iopb.parameters = down = params.copy()
                status = PreopCallbackStatus.SUCCESS_NO_CALLBACK
            if status is PreopCallbackStatus.COMPLETE:
                if cbd.io_status.status == NtStatus.PENDING:
                    self._bug(instance, cbd, "completed a request with STATUS_PENDING")
                    cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
                if major in _CANNOT_FAIL and cbd.io_status.status >= 0x80000000:  # not NT_SUCCESS
                    self._bug(instance, cbd, f"failed {major.name}, which cannot fail; it succeeds")
                    cbd.io_status.status = NtStatus.SUCCESS
                completed = True  # its outputs (in the copy it filled) go up as the file system's would
                break
            if not cbd.is_dirty:
                cbd.iopb.parameters = params  # changes without set_dirty() do not go down
            if status in _WANTS_POST:
                if op.post is None:
                    self._bug(instance, cbd, f"returned {status.name} without a post-operation callback")
                else:
                    frames.append(_Frame(instance, op, context, params))
        cbd.flags &= ~CallbackDataFlags.DIRTY
        if not completed:
            await self.backend.dispatch(cbd)
        lower = cbd.iopb.parameters
        for frame in reversed(frames):
            _carry_outputs(lower, frame.params)
            cbd.iopb.parameters = lower = frame.params
            await self._post(frame, cbd)
        _carry_outputs(lower, original)
        cbd.iopb.parameters = original

    async def _pre(self, instance: Instance, op: Operation, cbd: CallbackData) -> tuple[PreopCallbackStatus, Any]:
        assert op.pre is not None
        objects = RelatedObjects(instance.filter, instance, instance.volume, cbd.iopb.target_file_object)
        try:
            result = await op.pre(cbd, objects) if op.pre_is_async else op.pre(cbd, objects)  # type: ignore[misc]
        except Exception as exc:
            return self._failed(instance, cbd, f"pre-operation callback raised {exc!r}", exc)
        status, context = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
        if status is PreopCallbackStatus.PENDING:
            status, context = await self._park(cbd, "pre-operation", instance)
        if status not in _FINAL_PREOP:
            return self._failed(instance, cbd, f"pre-operation callback returned {status!r}", None)
        return status, context

    def _failed(
        self, instance: Instance, cbd: CallbackData, what: str, exc: BaseException | None
    ) -> tuple[PreopCallbackStatus, Any]:
        self._bug(instance, cbd, what, exc)
        if cbd.iopb.parameters.MAJOR in _CANNOT_FAIL:
            return PreopCallbackStatus.SUCCESS_NO_CALLBACK, None
        cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
        return PreopCallbackStatus.COMPLETE, None

    async def _post(self, frame: _Frame, cbd: CallbackData) -> None:
        op, instance = frame.operation, frame.instance
        assert op.post is not None
        objects = RelatedObjects(instance.filter, instance, instance.volume, cbd.iopb.target_file_object)
        cbd.flags |= CallbackDataFlags.POST_OPERATION
        try:
            if op.post_is_async:
                status = await op.post(cbd, objects, frame.context, PostopFlags.NONE)  # type: ignore[misc]
            else:
                status = op.post(cbd, objects, frame.context, PostopFlags.NONE)
            if status is PostopCallbackStatus.MORE_PROCESSING_REQUIRED:
                status, _ = await self._park(cbd, "post-operation", instance)
            if status is not PostopCallbackStatus.FINISHED_PROCESSING:
                self._bug(instance, cbd, f"post-operation callback returned {status!r}")
        except Exception as exc:
            self._bug(instance, cbd, f"post-operation callback raised {exc!r}", exc)
            if cbd.iopb.parameters.MAJOR not in _CANNOT_FAIL:
                cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
        finally:
            cbd.flags &= ~CallbackDataFlags.POST_OPERATION

    async def _park(self, cbd: CallbackData, what: str, instance: Instance) -> tuple[Any, Any]:
        cbd.pended = pended = _Pended(trio.Event(), trio.lowlevel.current_trio_token(), waiting=what)
        try:
            await pended.event.wait()
        finally:
            cbd.pended = None
        return pended.status, pended.context

    def _bug(self, instance: Instance, cbd: CallbackData, what: str, exc: BaseException | None = None) -> None:
        message = f"filter {instance.filter.name} (instance {instance.name}) {what} for {cbd!r}"
        if self.verifier:
            raise VerifierError(message) from exc
        log.error("filter bug: %s", message, exc_info=exc)


def _carry_outputs(source: Parameters, target: Parameters) -> None:
    if source is not target:
        for name in source.OUTPUTS:
            setattr(target, name, getattr(source, name))


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
