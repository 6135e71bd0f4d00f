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
  ``complete_pended_preoperation`` gives the final decision (``pending.py``);
* the backend performs the request;
* post-operation callbacks run from the lowest altitude up, only for instances
  that asked; MORE_PROCESSING_REQUIRED parks completion until
  ``complete_pended_postoperation``.

The dirty rule: each instance's pre gets a copy of the parameters it may
change; the changes go down only if it calls ``cbd.set_dirty()``, and its post
(and every instance above) sees the parameters as they were before. Output
fields (``Parameters.OUTPUTS``) are carried back up to each instance's copy.
``io_status`` is shared and needs no dirty flag.

Changing the stack while requests flow: ``attach`` and ``detach`` take effect
for requests that start afterwards; a request keeps the chain it started with.
``detach`` drains: the instance's owed posts run at once with DRAINING, and
requests it still holds after ``drain_timeout`` are reported and cancelled
(see ``InstanceStack.detach``). READ and WRITE have one chain per I/O kind of
the handle, after the instances' SKIP_* flags.

Containment: a callback that raises, returns something that is not a status,
or breaks a rule is a filter bug. It is logged with the filter, the instance
and the request; the request fails with FLT_INTERNAL_ERROR (EIO), except
CLEANUP and CLOSE, which cannot fail and go on down. With ``verifier=True``
(tests) a bug raises :class:`VerifierError` instead, so the test fails.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import trio

from .._callback_data import (
    CANNOT_FAIL,
    CallbackData,
    CallbackDataFlags,
    DispositionParameters,
    FileObject,
    MajorFunction,
    RenameParameters,
)
from .._port.server import filter_unloaded
from .._registration import (
    FilterRegistration,
    FilterUnloadFlags,
    InstanceSetupFlags,
    InstanceSetupRefused,
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
from . import names, pending
from .contexts import ContextTable

log = logging.getLogger("fltfuse.stack")

_PENDING = PreopCallbackStatus.PENDING
_WITH_CALLBACK = PreopCallbackStatus.SUCCESS_WITH_CALLBACK
_SYNCHRONIZE = PreopCallbackStatus.SYNCHRONIZE
_FINISHED = PostopCallbackStatus.FINISHED_PROCESSING
_NO_FLAGS = PostopFlags.NONE
_COMPLETE = PreopCallbackStatus.COMPLETE
_NO_CALLBACK = PreopCallbackStatus.SUCCESS_NO_CALLBACK
_MORE_PROCESSING = PostopCallbackStatus.MORE_PROCESSING_REQUIRED
_DRAINING = PostopFlags.DRAINING
_DIRTY = int(CallbackDataFlags.DIRTY)
_GENERATED = int(CallbackDataFlags.GENERATED_IO)
_TOP_OF_STACK = int(CallbackDataFlags.TOP_OF_STACK_IO)
_NAME_CHANGES = frozenset({RenameParameters, DispositionParameters})
_POST_OPERATION = int(CallbackDataFlags.POST_OPERATION)
_IO = frozenset({MajorFunction.READ, MajorFunction.WRITE})
_SKIP_CACHED = OperationFlags.SKIP_PAGING_IO | OperationFlags.SKIP_NON_DASD_IO  # page-cache traffic is paging I/O
_SKIP_UNCACHED = OperationFlags.SKIP_NON_CACHED_NON_PAGING_IO | OperationFlags.SKIP_NON_DASD_IO
_new_tuple = tuple.__new__  # RelatedObjects without NamedTuple's Python-level __new__: one per callback


class Backend(Protocol):
    """The bottom of a stack: performs a request and sets its io_status and outputs."""

    async def dispatch(self, cbd: CallbackData) -> None: ...


class VerifierError(Exception):
    """A filter broke a Filter Manager rule (raised only in verifier mode)."""


class StackError(Exception):
    """An attach or detach that cannot be done; ``status`` is the FltMgr status.

    ``refused``: the instance's setup declined with :class:`InstanceSetupRefused` (the message is its reason).
    """

    def __init__(self, status: NtStatus, message: str, *, refused: bool = False):
        super().__init__(message)
        self.status = status
        self.refused = refused


class Filter:
    """FLT_FILTER: a loaded filter, its validated registration and its parameters.

    ``parameters`` is the filter's private settings (the Windows ``Parameters``
    registry key): from its INF, with ``--param NAME.KEY=VALUE`` overrides.
    ``data`` is the filter's own: what a Windows filter keeps in its globals
    (its ports, its service's client port), kept per loaded filter so that two
    volumes in one test process do not share it. ``port_directory`` is where
    its communication ports listen (set by whoever loads it: the daemon, an
    InProcessVolume); ``ports`` are the ports it created.
    """

    def __init__(self, name: str, registration: FilterRegistration, parameters: Mapping[str, Any] | None = None):
        self.name = name
        self.registration = registration
        self.operations = validate(name, registration)
        self.parameters: Mapping[str, Any] = parameters if parameters is not None else MappingProxyType({})
        self.data: Any = None
        self.port_directory: str | None = None
        self.ports: list[Any] = []
        self.started = False
        self.unloaded = False

    def __repr__(self) -> str:
        return f"Filter({self.name!r})"

    def start(self) -> None:
        """Run the filter's ``filter_load`` callback, once, before its first instance attaches.

        It is the rest of a Windows DriverEntry after FltRegisterFilter: where
        a filter creates its communication ports. A failure status or an
        exception fails the load with :class:`StackError` naming the filter.
        """
        if self.started:
            return
        callback = self.registration.filter_load
        if callback is not None:
            try:
                answer = callback(self)
            except Exception as exc:
                filter_unloaded(self)
                why = f"filter {self.name}: filter_load raised {exc!r}"
                raise StackError(NtStatus.FLT_INTERNAL_ERROR, why) from exc
            if answer is not None and answer != NtStatus.SUCCESS:
                filter_unloaded(self)
                status = answer if isinstance(answer, NtStatus) else NtStatus.UNSUCCESSFUL
                raise StackError(status, f"filter {self.name}: filter_load refused to start ({status.name})")
        self.started = True

    def unload(self, flags: FilterUnloadFlags = FilterUnloadFlags.NONE) -> NtStatus:
        """Call the filter's unload callback (once). Returns its answer.

        A status other than SUCCESS (or None) refuses the unload, unless
        ``flags`` has MANDATORY: then the answer is ignored. No unload callback:
        the filter cannot be unloaded (FLT_DO_NOT_DETACH), again unless mandatory.
        A callback that raises is logged and counts as a refusal.
        """
        mandatory = bool(flags & FilterUnloadFlags.MANDATORY)
        callback = self.registration.filter_unload
        answer: Any = NtStatus.SUCCESS
        if callback is None:
            answer = NtStatus.SUCCESS if mandatory else NtStatus.FLT_DO_NOT_DETACH
        else:
            try:
                answer = callback(flags)
            except Exception as exc:
                log.error("filter bug: filter %s: filter_unload raised %r", self.name, exc, exc_info=exc)
                answer = NtStatus.FLT_INTERNAL_ERROR
        if answer is None or answer == NtStatus.SUCCESS or mandatory:
            self.unloaded = True
            filter_unloaded(self)  # its ports close and its clients disconnect, as FltUnregisterFilter forces
            return NtStatus.SUCCESS
        return answer if isinstance(answer, NtStatus) else NtStatus.FLT_DO_NOT_DETACH

    def unload_mandatory(self) -> None:
        """Unload at shutdown: the unload callback runs (if it has not) and cannot refuse."""
        if not self.unloaded:
            self.unload(FilterUnloadFlags.MANDATORY)


@dataclass(eq=False)
class Instance:
    """FLT_INSTANCE: one filter attached to one volume at one altitude."""

    filter: Filter
    name: str
    altitude: Decimal
    volume: Any = None
    setup_flags: InstanceSetupFlags = InstanceSetupFlags.AUTOMATIC_ATTACHMENT  # how it was attached
    tearing_down: bool = False
    contexts: ContextTable | None = None  # its volume's, while attached
    stack: InstanceStack | None = None  # its volume's, from attach to teardown complete
    recursions: int = 0  # its own top-of-stack I/O that came back to it (and passed it by)

    def __repr__(self) -> str:
        return f"Instance({self.filter.name!r}, {self.name!r}, {self.altitude})"


class RelatedObjects(NamedTuple):
    """FLT_RELATED_OBJECTS: what every callback is handed."""

    filter: Filter
    instance: Instance
    volume: VolumeProperties | None
    file_object: FileObject | None  # None in the instance and filter callbacks


class _Walk:
    """One request on its way through the stack: what draining looks at.

    ``frames`` are the posts still to run (None once run or drained); ``at`` is
    the instance whose callback is running or has the request pended.
    """

    __slots__ = ("at", "cbd", "frames")

    def __init__(self, cbd: CallbackData, frames: list[Any]):
        self.cbd = cbd
        self.frames = frames
        self.at: Instance | None = None


@dataclass
class InstanceStack:
    """The instances attached to one volume, above the backend that ends every request.

    ``dispatch`` never raises for a failed request: the outcome is in
    ``cbd.io_status``. ``drain_timeout`` bounds how long a detach waits for a
    request an instance holds before it reports the filter and cancels it.
    """

    backend: Backend
    verifier: bool = False
    volume: VolumeProperties | None = None
    drain_timeout: float = 5.0
    instances: list[Instance] = field(default_factory=list)  # highest altitude first
    _chains: dict[MajorFunction, tuple[tuple[Instance, Operation, Filter, Any], ...]] = field(default_factory=dict)
    # READ and WRITE by whether the handle is uncached: the chains after the SKIP_* flags
    _io_chains: dict[tuple[MajorFunction, bool], tuple[tuple[Instance, Operation, Filter, Any], ...]] = field(
        default_factory=dict
    )
    _inflight: set[_Walk] = field(default_factory=set)
    _draining: int = 0
    _drained: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    contexts: ContextTable = field(init=False)
    names: names.NameCache = field(default_factory=names.NameCache)
    # set by the kernel adapter: a coroutine function that tells the kernel a file's data and
    # attributes (inode) or a name (directory, name) changed behind its back, after filter-initiated I/O
    invalidate_kernel_cache: Any = None

    def __post_init__(self) -> None:
        self.contexts = ContextTable(lambda instance, what: self._bug(instance, None, what))

    # -- attaching and detaching ----------------------------------------------------

    def attach(self, instance: Instance, flags: InstanceSetupFlags = InstanceSetupFlags.MANUAL_ATTACHMENT) -> None:
        """Add ``instance`` at its altitude, if its filter's setup callback agrees.

        Altitudes and instance names (compared without case) are unique per volume. Raises StackError
        with FLT_DO_NOT_ATTACH if the setup callback declines (or raises); ``refused`` is True when it
        declined with :class:`InstanceSetupRefused`, whose message the error carries.
        Requests already on their way keep the stack they started with.
        """
        for other in self.instances:
            if other.altitude == instance.altitude:
                raise StackError(
                    NtStatus.FLT_INSTANCE_ALTITUDE_COLLISION,
                    f"altitude {instance.altitude} is taken by {other.filter.name}/{other.name}",
                )
            if other.name.casefold() == instance.name.casefold():
                raise StackError(
                    NtStatus.FLT_INSTANCE_NAME_COLLISION, f"an instance named {instance.name!r} is attached"
                )
        instance.filter.start()
        instance.volume = self.volume
        instance.setup_flags = flags
        instance.contexts = self.contexts
        instance.stack = self
        setup = instance.filter.registration.instance_setup
        if setup is not None:
            fs_type = self.volume.filesystem_type if self.volume else ""
            try:
                answer = setup(self._objects(instance), flags, "disk", fs_type)
            except InstanceSetupRefused as exc:
                reason = f"{instance.filter.name} (instance {instance.name}): {exc}"
                raise StackError(NtStatus.FLT_DO_NOT_ATTACH, reason, refused=True) from exc
            except Exception as exc:
                self._bug(instance, None, f"instance setup raised {exc!r}; not attached", exc)
                answer = NtStatus.FLT_DO_NOT_ATTACH
            if answer is not None and answer != NtStatus.SUCCESS:
                raise StackError(NtStatus.FLT_DO_NOT_ATTACH, f"{instance!r} declined to attach ({answer!r})")
        self.instances.append(instance)
        self.instances.sort(key=lambda i: i.altitude, reverse=True)
        self._rebuild()

    def query_teardown(self, instance: Instance) -> None:
        """Ask ``instance`` whether it may be detached by hand (fltmc detach).

        Raises StackError(FLT_DO_NOT_DETACH) if the filter has no query
        teardown callback, or the callback refuses (or raises).
        """
        callback = instance.filter.registration.instance_query_teardown
        if callback is None:
            raise StackError(
                NtStatus.FLT_DO_NOT_DETACH,
                f"filter {instance.filter.name} has no instance query teardown callback: it cannot be detached by hand",
            )
        try:
            answer = callback(self._objects(instance), 0)
        except Exception as exc:
            self._bug(instance, None, f"instance query teardown raised {exc!r}; not detached", exc, contain=True)
            answer = NtStatus.FLT_DO_NOT_DETACH
        if answer is not None and answer != NtStatus.SUCCESS:
            raise StackError(NtStatus.FLT_DO_NOT_DETACH, f"{instance!r} refused to detach ({answer!r})")

    async def detach(self, instance: Instance, reason: InstanceTeardownFlags) -> None:
        """Take ``instance`` off the volume while requests flow.

        New requests stop reaching it at once. Then: teardown start (the filter
        completes what it has pended), the drain (each post it still owes runs
        now with ``PostopFlags.DRAINING``; requests it holds are waited for, and
        after ``drain_timeout`` reported with the filter's name and cancelled),
        and teardown complete, which runs only when nothing is left. Teardown
        callbacks that are coroutine functions are awaited.
        """
        if instance not in self.instances:
            raise StackError(NtStatus.FLT_INSTANCE_NOT_FOUND, f"{instance!r} is not attached")
        self.instances.remove(instance)
        self._rebuild()
        instance.tearing_down = True
        await self._teardown(instance, "instance_teardown_start", reason)
        await self._drain(instance)
        await self._teardown(instance, "instance_teardown_complete", reason)
        self.contexts.instance_gone(instance, self._last_of_filter(instance))
        instance.stack = None

    async def detach_all(self, reason: InstanceTeardownFlags) -> list[Filter]:
        """Detach every instance, from the top, draining each; return their filters."""
        filters = list(dict.fromkeys(instance.filter for instance in self.instances))
        for instance in list(self.instances):
            await self.detach(instance, reason)
        return filters

    def dismount(self) -> None:
        """The volume is gone (no request is in flight): tear every instance down, unload the filters.

        For each instance, from the top: teardown start, then teardown complete,
        with VOLUME_DISMOUNT; then each filter's unload callback, mandatory. A
        callback that raises is logged and the teardown goes on. A teardown
        callback that is a coroutine function runs to completion in a trio loop
        of its own: dismount runs outside the daemon's loop, after it ended
        (inside a running loop it cannot, and is reported: detach first).
        """
        filters = []
        for instance in list(self.instances):
            for name in ("instance_teardown_start", "instance_teardown_complete"):
                coroutine = self._teardown_callback(instance, name, InstanceTeardownFlags.VOLUME_DISMOUNT)
                if coroutine is not None:
                    self._run_teardown_outside_loop(instance, name, coroutine)
            self.instances.remove(instance)
            self.contexts.instance_gone(instance, self._last_of_filter(instance))
            instance.stack = None
            if instance.filter not in filters:
                filters.append(instance.filter)
        self._rebuild()
        self.contexts.dismount()
        for filter_ in filters:
            filter_.unload_mandatory()

    def _teardown_callback(
        self, instance: Instance, name: str, reason: InstanceTeardownFlags
    ) -> Coroutine[Any, Any, Any] | None:
        """Call a teardown callback; a coroutine function's coroutine is returned, for the caller to run."""
        callback = getattr(instance.filter.registration, name)
        if callback is None:
            return None
        try:
            outcome = callback(self._objects(instance), reason)
        except Exception as exc:
            self._bug(instance, None, f"{name} raised {exc!r}", exc, contain=True)
            return None
        return outcome if inspect.iscoroutine(outcome) else None

    async def _teardown(self, instance: Instance, name: str, reason: InstanceTeardownFlags) -> None:
        await self._finish_teardown(instance, name, self._teardown_callback(instance, name, reason))

    async def _finish_teardown(self, instance: Instance, name: str, coroutine: Coroutine[Any, Any, Any] | None) -> None:
        if coroutine is not None:
            try:
                await coroutine
            except Exception as exc:
                self._bug(instance, None, f"{name} raised {exc!r}", exc, contain=True)

    def _run_teardown_outside_loop(self, instance: Instance, name: str, coroutine: Coroutine[Any, Any, Any]) -> None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            trio.run(self._finish_teardown, instance, name, coroutine)
            return
        coroutine.close()
        self._bug(
            instance,
            None,
            f"{name} did not run: the volume was dismounted inside a trio loop (detach first)",
            contain=True,
        )

    async def _drain(self, instance: Instance) -> None:
        deadline = trio.current_time() + self.drain_timeout
        self._draining += 1
        try:
            while True:
                holding = []
                for walk in list(self._inflight):
                    frames = walk.frames
                    for i, frame in enumerate(frames):
                        if frame is not None and frame[0] is instance:
                            frames[i] = None  # the walk will not call it again
                            _, op, context, _, objects = frame
                            await self._call_post(instance, op, walk.cbd, objects, context, _DRAINING)
                    if walk.at is instance:
                        holding.append(walk)
                if not holding:
                    return
                if trio.current_time() >= deadline:
                    self._cancel_held(instance, holding)
                    deadline = trio.current_time() + self.drain_timeout
                with trio.move_on_at(deadline):
                    await self._drained.park()
        finally:
            self._draining -= 1

    def _cancel_held(self, instance: Instance, holding: list[_Walk]) -> None:
        """The drain timed out: name the filter and the requests it holds; cancel those it pended."""
        for walk in holding:
            cbd = walk.cbd
            if pending.is_pended(cbd, "pre-operation"):
                action = "it never completed its pended pre-operation; the request is cancelled"
                pending.complete_cancelled(cbd)
            elif pending.is_pended(cbd, "post-operation"):
                action = "it never completed its post-operation (MORE_PROCESSING_REQUIRED); it is finished for it"
                pending.resume(cbd, "post-operation", _FINISHED, None)
            else:
                action = "its callback has not returned"
            log.error(
                "filter %s (instance %s) still holds %r after %.1f s of detach: %s",
                instance.filter.name,
                instance.name,
                cbd,
                self.drain_timeout,
                action,
            )

    def _last_of_filter(self, instance: Instance) -> bool:
        """Whether no other instance of ``instance``'s filter is attached (after it was taken off)."""
        return not any(other.filter is instance.filter for other in self.instances)

    def _objects(self, instance: Instance) -> RelatedObjects:
        return RelatedObjects(instance.filter, instance, self.volume, None)

    def objects_of(self, instance: Instance, file_object: FileObject | None) -> RelatedObjects:
        """The related objects ``instance`` is handed for ``file_object`` (for calls made on its behalf)."""
        return RelatedObjects(instance.filter, instance, self.volume, file_object)

    def _rebuild(self) -> None:
        chains: dict[MajorFunction, list[tuple[Instance, Operation, Filter, Any]]] = {}
        for instance in self.instances:
            for major, op in instance.filter.operations.items():
                chains.setdefault(major, []).append((instance, op, instance.filter, instance.volume))
        self._chains = {major: tuple(chain) for major, chain in chains.items()}
        self._io_chains = {}
        for major in _IO:
            for uncached in (False, True):
                skip = _SKIP_UNCACHED if uncached else _SKIP_CACHED
                chain = tuple(entry for entry in chains.get(major, ()) if not entry[1].flags & skip)
                if chain:
                    self._io_chains[major, uncached] = chain

    def bypasses_kernel_cache(self, major: MajorFunction) -> bool:
        """Whether an attached instance registered ``major`` with ``BYPASS_KERNEL_CACHE``.

        The kernel adapter lets the kernel cache names, attributes and file
        data unless an instance asked to see every LOOKUP, QUERY_INFORMATION,
        READ or WRITE.
        """
        return any(op.flags & OperationFlags.BYPASS_KERNEL_CACHE for _, op, _, _ in self._chains.get(major, ()))

    # -- the walk -------------------------------------------------------------------

    def _chain(self, cbd: CallbackData) -> tuple[tuple[Instance, Operation, Filter, Any], ...] | None:
        major = cbd.iopb.parameters.MAJOR
        if major in _IO:  # which instances see it depends on the handle's I/O kind (the SKIP_* flags)
            return self._io_chains.get((major, cbd.iopb.target_file_object.uncached))
        return self._chains.get(major)

    async def dispatch(self, cbd: CallbackData) -> None:
        chain = self._chain(cbd)
        if chain is None:
            await self.backend.dispatch(cbd)
            self._performed(cbd)
        else:
            await self._walk(cbd, chain)

    async def dispatch_generated(self, cbd: CallbackData, initiator: Instance, *, top_of_stack: bool = False) -> None:
        """Filter-initiated I/O: ``cbd`` from ``initiator`` goes to the instances below it, then the file system.

        The request is flagged GENERATED_IO with ``cbd.initiator`` set. With
        ``top_of_stack`` it starts at the top of the stack instead (flagged
        TOP_OF_STACK_IO too); when it comes back down to its initiator, that
        is recursion: it is logged, counted in ``initiator.recursions``, and
        passes the initiator by instead of re-entering it.
        """
        cbd.initiator = initiator
        cbd.flags |= _GENERATED | (_TOP_OF_STACK if top_of_stack else 0)
        chain = self._chain(cbd) or ()
        if top_of_stack:
            if any(entry[0] is initiator for entry in chain):
                initiator.recursions += 1
                log.warning(
                    "filter %s (instance %s): its own top-of-stack I/O %r came back to it; passed it by",
                    initiator.filter.name,
                    initiator.name,
                    cbd,
                )
                chain = tuple(entry for entry in chain if entry[0] is not initiator)
        else:
            chain = tuple(entry for entry in chain if entry[0].altitude < initiator.altitude)
        if chain:
            await self._walk(cbd, chain)
        else:
            await self.backend.dispatch(cbd)
            self._performed(cbd)
        if not cbd.io_status.status and self.invalidate_kernel_cache is not None:
            await self.invalidate_kernel_cache(cbd)

    def answering_io_of(self, inode: int) -> bool:
        """Whether a kernel READ or WRITE of ``inode`` is on its way through the instances.

        The kernel holds that request's pages locked until it is answered, so
        filter-initiated I/O it causes must not wait for those pages. A
        request no instance sees cannot cause any, so the walks in flight are
        all there is to look at (nothing is counted on the request path).
        """
        for walk in self._inflight:
            cbd = walk.cbd
            if (
                cbd.iopb.parameters.MAJOR in _IO
                and not cbd.flags & _GENERATED
                and cbd.iopb.target_file_object.inode == inode
            ):
                return True
        return False

    def _performed(self, cbd: CallbackData) -> None:
        """The file system performed ``cbd`` (a plain call after each backend dispatch, not another coroutine
        on every request's path): a rename, unlink or rmdir that succeeded drops the names it changed."""
        if cbd.iopb.parameters.__class__ in _NAME_CHANGES and not cbd.io_status.status:
            names.renamed_or_removed(self, cbd)

    async def _walk(self, cbd: CallbackData, chain: Iterable[tuple[Instance, Operation, Filter, Any]]) -> None:
        original = cbd.iopb.parameters
        major = original.MAJOR
        file_object = cbd.iopb.target_file_object
        frames: list[Any] = []  # (instance, op, context, params, objects) of the posts to run, top first
        walk = _Walk(cbd, frames)
        self._inflight.add(walk)
        try:
            completed = False
            iopb = cbd.iopb
            for instance, op, filter_, volume in chain:
                params = iopb.parameters
                objects = _new_tuple(RelatedObjects, (filter_, instance, volume, file_object))
                pre = op.pre
                if pre is None:
                    frames.append((instance, op, None, params, objects))
                    continue
                walk.at = instance
                iopb.parameters = params.copy()  # what this instance may change
                cbd.flags &= ~_DIRTY
                try:
                    result = await pre(cbd, objects) if op.pre_is_async else pre(cbd, objects)  # type: ignore[misc]
                except Exception as exc:
                    result = self._failed(instance, cbd, f"pre-operation callback raised {exc!r}", exc)
                if result.__class__ is tuple:
                    status, context = result
                else:
                    status, context = result, None
                if status is _PENDING:
                    status, context = await pending.park(
                        cbd, "pre-operation", pending.watches_caller(cbd), _holder(instance)
                    )
                elif cbd.pended is not None:
                    self._not_pended(instance, cbd)
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
                    if major in CANNOT_FAIL and cbd.io_status.status >= 0x80000000:  # not NT_SUCCESS
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
            walk.at = None
            cbd.flags &= ~_DIRTY
            if not completed:
                await self.backend.dispatch(cbd)
                self._performed(cbd)
            lower = cbd.iopb.parameters
            for i in range(len(frames) - 1, -1, -1):
                frame = frames[i]
                if frame is None:
                    continue  # its instance detached and drained it
                frames[i] = None
                instance, op, context, params, objects = frame
                if lower is not params:
                    for name in lower.OUTPUTS:
                        setattr(params, name, getattr(lower, name))
                cbd.iopb.parameters = lower = params
                walk.at = instance
                if op.post_is_async:
                    await self._call_post(instance, op, cbd, objects, context, _NO_FLAGS)
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
        finally:
            self._inflight.discard(walk)
            if self._draining:
                self._drained.unpark_all()

    def _not_pended(self, instance: Instance, cbd: CallbackData) -> None:
        """A pre returned without PENDING but left pending state: drop it; a completion there is a bug."""
        if pending.discard(cbd):
            self._bug(instance, cbd, "completed a pended operation it did not pend (or completed one twice)")

    def _failed(
        self, instance: Instance, cbd: CallbackData, what: str, exc: BaseException | None
    ) -> tuple[PreopCallbackStatus, Any]:
        self._bug(instance, cbd, what, exc)
        if cbd.iopb.parameters.MAJOR in CANNOT_FAIL:
            return PreopCallbackStatus.SUCCESS_NO_CALLBACK, None
        cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR
        return PreopCallbackStatus.COMPLETE, None

    async def _call_post(
        self,
        instance: Instance,
        op: Operation,
        cbd: CallbackData,
        objects: RelatedObjects,
        context: Any,
        flags: PostopFlags,
    ) -> None:
        """Run one post-operation callback outside the walk's inline fast path (async, or draining)."""
        assert op.post is not None
        cbd.flags |= _POST_OPERATION
        try:
            status: Any = op.post(cbd, objects, context, flags)
            if op.post_is_async:
                status = await status
        except Exception as exc:
            self._post_failed(instance, cbd, exc)
        else:
            if status is not _FINISHED:
                if flags & _DRAINING and status is _MORE_PROCESSING:
                    self._bug(instance, cbd, "asked for more processing while draining", contain=True)
                else:
                    await self._post_status(instance, cbd, status)
        finally:
            cbd.flags &= ~_POST_OPERATION

    async def _post_status(self, instance: Instance, cbd: CallbackData, status: Any) -> None:
        """A post returned something other than FINISHED_PROCESSING."""
        if status is _MORE_PROCESSING:
            status, _ = await pending.park(cbd, "post-operation", False, _holder(instance))
        if status is not _FINISHED:
            self._bug(instance, cbd, f"post-operation callback returned {status!r}")

    def _post_failed(self, instance: Instance, cbd: CallbackData, exc: Exception) -> None:
        self._bug(instance, cbd, f"post-operation callback raised {exc!r}", exc)
        if cbd.iopb.parameters.MAJOR not in CANNOT_FAIL:
            cbd.io_status.status = NtStatus.FLT_INTERNAL_ERROR

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


def _holder(instance: Instance) -> str:
    return f"filter {instance.filter.name} (instance {instance.name})"
