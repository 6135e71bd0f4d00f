"""FilterManager: the filters loaded in one daemon and what fltmc may do with them.

Where it sits: between the control socket (and the mount-time command line)
and the instance stack. It owns the loaded filters, attaches and detaches their
instances on the volume's stack, and unloads them. Every method runs in the
daemon's trio loop, so requests keep flowing while it works: an attach or
detach changes the stack for requests that start afterwards; requests already
on their way finish with the stack they started with (a detach drains them).

Windows counterpart: the filter manager's filter list and ``FltLoadFilter``,
``FltUnloadFilter``, ``FltAttachVolumeAtAltitude``, ``FltDetachVolume``: what
fltmc.exe and the service control manager call.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from . import _loader
from ._loader import LoadedFilter
from ._registration import FilterUnloadFlags, InstanceSetupFlags, InstanceTeardownFlags
from ._stack import Instance, InstanceStack, StackError
from ._status import NtStatus

log = logging.getLogger("fltfuse.manager")


class ManagerError(Exception):
    """A request to the filter manager that cannot be done; ``status`` is the FltMgr status."""

    def __init__(self, status: NtStatus, message: str):
        super().__init__(message)
        self.status = status


class FilterManager:
    """The loaded filters of one daemon and their instances on its volume.

    ``filter_path`` and ``parameters`` (filter name, lower case -> KEY ->
    VALUE overrides) are the mount's ``--filter-path`` and ``--param``; they
    apply to filters loaded later too. ``on_change`` runs after every change
    of the stack (the kernel adapter recomputes what the kernel may cache).
    ``port_directory`` is where the filters' communication ports listen.
    """

    def __init__(
        self,
        stack: InstanceStack,
        *,
        filter_path: Sequence[str | os.PathLike[str]] = (),
        parameters: Mapping[str, Mapping[str, str]] | None = None,
        on_change: Callable[[], None] = lambda: None,
        port_directory: str | None = None,
    ):
        self.stack = stack
        self.port_directory = port_directory
        self.filter_path = tuple(filter_path)
        self.parameters = dict(parameters or {})
        self.on_change = on_change
        self.loaded: dict[str, LoadedFilter] = {}  # by lower-case name

    # -- loading -------------------------------------------------------------------

    def start(self, loaded: LoadedFilter, flags: InstanceSetupFlags = InstanceSetupFlags.AUTOMATIC_ATTACHMENT) -> None:
        """Start a filter loaded elsewhere (its ``filter_load`` runs) and attach its default instance automatically.

        Call it in the daemon's trio loop: the filter may create ports.
        """
        key = loaded.filter.name.lower()
        if key in self.loaded:
            raise ManagerError(NtStatus.OBJECT_NAME_COLLISION, f"filter {loaded.filter.name} is already loaded")
        loaded.filter.port_directory = self.port_directory
        try:
            loaded.filter.start()
        except StackError as exc:
            raise ManagerError(exc.status, str(exc)) from exc
        self.loaded[key] = loaded
        log.info("loaded filter %s from %s", loaded.inf.name, loaded.inf.path)
        instance = _loader.default_instance(loaded.filter, loaded.inf)
        if instance is None:
            return
        try:
            self.stack.attach(instance, flags)
        except StackError as exc:
            if exc.refused and flags & InstanceSetupFlags.NEWLY_MOUNTED_VOLUME:
                raise ManagerError(exc.status, str(exc)) from exc  # the mount fails with the filter's reason
            log.warning("%s/%s not attached: %s", instance.filter.name, instance.name, exc)
            return
        log.info("attached %s/%s at altitude %s", instance.filter.name, instance.name, instance.altitude)
        self.on_change()

    def prepare(self, name: str) -> LoadedFilter:
        """fltmc load, first half: find the INF, import the module, validate the registration.

        It touches no state of the manager, so it may run in a worker thread (a
        slow import then does not stall requests); ``start`` is the second half.
        """
        if name.lower() in self.loaded:
            raise ManagerError(NtStatus.OBJECT_NAME_COLLISION, f"filter {name} is already loaded")
        try:
            return _loader.load_named(name, self.filter_path, self.parameters)
        except (_loader.FilterNotFound, _loader.FilterDisabled) as exc:
            raise ManagerError(NtStatus.FLT_FILTER_NOT_FOUND, str(exc)) from exc

    async def unload(self, name: str, *, mandatory: bool = False) -> None:
        """fltmc unload: ask the filter (its unload callback may refuse unless ``mandatory``), then
        detach every instance (draining), then forget its code so a later load imports it afresh."""
        loaded = self._loaded(name)
        flags = FilterUnloadFlags.MANDATORY if mandatory else FilterUnloadFlags.NONE
        answer = loaded.filter.unload(flags)
        if answer != NtStatus.SUCCESS:
            how = "has no unload callback" if loaded.filter.registration.filter_unload is None else "refused"
            raise ManagerError(answer, f"filter {loaded.filter.name} {how}: not unloaded (use --force)")
        reason = InstanceTeardownFlags.MANDATORY_FILTER_UNLOAD if mandatory else InstanceTeardownFlags.FILTER_UNLOAD
        for instance in [i for i in self.stack.instances if i.filter is loaded.filter]:
            await self.stack.detach(instance, reason)
            self.on_change()
        del self.loaded[loaded.filter.name.lower()]
        _forget_module(loaded.inf.module)
        log.info("unloaded filter %s%s", loaded.filter.name, " (mandatory)" if mandatory else "")

    # -- instances -----------------------------------------------------------------

    def attach(self, name: str, instance_name: str | None = None, altitude: str | None = None) -> Instance:
        """fltmc attach: attach an instance of a loaded filter by hand.

        ``instance_name`` picks one of the INF's instances (default: its default
        instance) and ``altitude`` overrides its altitude. A name the INF does
        not define makes a new instance, and then ``altitude`` is required.
        """
        loaded = self._loaded(name)
        spec = None
        try:
            spec = loaded.inf.instance(instance_name)
        except KeyError as exc:
            if altitude is None:
                raise ManagerError(NtStatus.FLT_INSTANCE_NOT_FOUND, f"{exc.args[0]}; give an altitude") from exc
        if spec is not None and spec.flags & spec.NO_MANUAL_ATTACH:
            raise ManagerError(
                NtStatus.FLT_DO_NOT_ATTACH, f"instance {spec.name} of {loaded.filter.name} forbids manual attachment"
            )
        where = _altitude(altitude) if altitude is not None else spec.altitude  # type: ignore[union-attr]
        new = Instance(loaded.filter, instance_name if spec is None else spec.name, where)  # type: ignore[arg-type]
        try:
            self.stack.attach(new, InstanceSetupFlags.MANUAL_ATTACHMENT)
        except StackError as exc:
            raise ManagerError(exc.status, str(exc)) from exc
        log.info("attached %s/%s at altitude %s by hand", new.filter.name, new.name, new.altitude)
        self.on_change()
        return new

    async def detach(self, name: str, instance_name: str | None = None) -> None:
        """fltmc detach: the instance's query teardown callback must agree; then it drains and goes."""
        loaded = self._loaded(name)
        mine = [i for i in self.stack.instances if i.filter is loaded.filter]
        if instance_name is None:
            default = loaded.inf.default_instance
            chosen = [i for i in mine if i.name.casefold() == default.casefold()] or mine[:1]
            if len(mine) > 1 and not any(i.name.casefold() == default.casefold() for i in mine):
                names = ", ".join(i.name for i in mine)
                raise ManagerError(NtStatus.FLT_INSTANCE_NOT_FOUND, f"{name} has instances {names}: name one with -i")
        else:
            chosen = [i for i in mine if i.name.casefold() == instance_name.casefold()]
        if not chosen:
            what = f"instance {instance_name!r}" if instance_name else "an instance"
            raise ManagerError(NtStatus.FLT_INSTANCE_NOT_FOUND, f"filter {loaded.filter.name} has no {what} attached")
        instance = chosen[0]
        try:
            self.stack.query_teardown(instance)
            await self.stack.detach(instance, InstanceTeardownFlags.MANUAL)
        except StackError as exc:
            raise ManagerError(exc.status, str(exc)) from exc
        log.info("detached %s/%s by hand", instance.filter.name, instance.name)
        self.on_change()

    async def dismount(self) -> None:
        """The daemon is stopping with the mount still up: detach every instance, draining, from the top."""
        await self.stack.detach_all(InstanceTeardownFlags.VOLUME_DISMOUNT)
        self.on_change()

    def shutdown(self) -> None:
        """After the last request: tear down what is still attached, then unload every filter (mandatory)."""
        self.stack.dismount()
        for loaded in self.loaded.values():
            loaded.filter.unload_mandatory()
        self.loaded.clear()

    # -- what fltmc shows --------------------------------------------------------------

    def filters(self) -> list[dict[str, Any]]:
        """One row per loaded filter: name, instance count, its INF's default altitude, frame."""
        rows = []
        for loaded in self.loaded.values():
            count = sum(1 for i in self.stack.instances if i.filter is loaded.filter)
            default = loaded.inf.instance(None)
            rows.append({"name": loaded.filter.name, "instances": count, "altitude": default.altitude_text, "frame": 0})
        return rows

    def instances(self) -> list[dict[str, Any]]:
        """One row per attached instance, highest altitude first."""
        rows = []
        for instance in self.stack.instances:
            loaded = self.loaded.get(instance.filter.name.lower())
            spec_flags = 0
            if loaded is not None:
                try:
                    spec_flags = loaded.inf.instance(instance.name).flags
                except KeyError:
                    pass
            rows.append(
                {
                    "filter": instance.filter.name,
                    "instance": instance.name,
                    "altitude": str(instance.altitude),
                    "frame": 0,
                    "attached": _attach_reason(instance.setup_flags),
                    "flags": spec_flags,
                }
            )
        return rows

    def _loaded(self, name: str) -> LoadedFilter:
        try:
            return self.loaded[name.lower()]
        except KeyError:
            raise ManagerError(NtStatus.FLT_FILTER_NOT_FOUND, f"filter {name} is not loaded") from None


def _altitude(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ManagerError(NtStatus.INVALID_PARAMETER, f"altitude {text!r} is not a decimal number") from None
    if not value.is_finite() or value < 0:
        raise ManagerError(NtStatus.INVALID_PARAMETER, f"altitude {text!r} is not a decimal number")
    return value


def _attach_reason(flags: InstanceSetupFlags) -> str:
    if flags & InstanceSetupFlags.MANUAL_ATTACHMENT:
        return "manual"
    if flags & InstanceSetupFlags.NEWLY_MOUNTED_VOLUME:
        return "mount"
    return "automatic"


def _forget_module(module: str) -> None:
    """Drop a filter's module (and its submodules) so that loading it again runs its current code."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        del sys.modules[name]
