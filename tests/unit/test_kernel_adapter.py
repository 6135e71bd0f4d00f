"""The kernel adapter in-process: request -> callback data -> reply, and the one exception boundary."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest

from fltfuse import (
    CallbackData,
    CleanupParameters,
    CreateDisposition,
    CreateParameters,
    LookupParameters,
    MajorFunction,
)
from fltfuse._backend import ROOT_INODE, PassthroughBackend
from fltfuse._kernel import FuseOptions, KernelAdapter
from fltfuse._stack.contexts import ContextTable


@dataclass
class Ctx:
    """What pyfuse3's RequestContext carries."""

    pid: int = os.getpid()
    uid: int = os.geteuid()
    gid: int = os.getegid()
    umask: int = 0o022


class Recording:
    """A stack that records each callback data and then lets the real backend do it."""

    def __init__(self, backend: PassthroughBackend, fail_on: MajorFunction | None = None):
        self.backend = backend
        self.seen: list[CallbackData] = []
        self.fail_on = fail_on
        self.contexts = ContextTable(lambda instance, what: None)  # no instances, so never any context

    async def dispatch(self, cbd: CallbackData) -> None:
        self.seen.append(cbd)
        if cbd.iopb.major_function is self.fail_on:
            raise RuntimeError("a bug below the adapter")
        await self.backend.dispatch(cbd)

    def bypasses_kernel_cache(self, major: MajorFunction) -> bool:
        return False


def adapter_over(root: Path, fail_on: MajorFunction | None = None) -> tuple[KernelAdapter, Recording]:
    backend = PassthroughBackend(str(root))
    stack = Recording(backend, fail_on)
    return KernelAdapter(stack, backend), stack  # type: ignore[arg-type]


async def test_each_request_becomes_one_callback_data(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("data")
    adapter, stack = adapter_over(tmp_path)
    entry = await adapter.lookup(ROOT_INODE, b"f", Ctx(pid=4242))
    assert entry.st_ino == os.stat(tmp_path / "f").st_ino
    assert entry.st_size == 4
    (cbd,) = stack.seen
    assert cbd.iopb.major_function is MajorFunction.LOOKUP
    assert isinstance(cbd.iopb.parameters, LookupParameters)
    assert cbd.iopb.parameters.name == b"f"
    assert cbd.requestor.pid == 4242


async def test_backend_errno_passes_through_unchanged(tmp_path: Path) -> None:
    adapter, _ = adapter_over(tmp_path)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.lookup(ROOT_INODE, b"missing", Ctx())
    assert info.value.errno == errno.ENOENT
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").touch()
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.rmdir(ROOT_INODE, b"d", Ctx())
    assert info.value.errno == errno.ENOTEMPTY


async def test_an_exception_below_is_answered_eio_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter, _ = adapter_over(tmp_path, fail_on=MajorFunction.LOOKUP)
    with caplog.at_level(logging.ERROR, logger="fltfuse.kernel"), pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.lookup(ROOT_INODE, b"some-name", Ctx())
    assert info.value.errno == errno.EIO
    (record,) = [r for r in caplog.records if r.name == "fltfuse.kernel"]
    assert "lookup" in record.getMessage() and "some-name" in record.getMessage()
    assert "a bug below the adapter" in (record.exc_text or "")
    # and the adapter keeps serving
    adapter2_entry = await adapter.getattr(ROOT_INODE, Ctx())
    assert adapter2_entry.st_ino == ROOT_INODE


async def test_cleanup_never_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter, stack = adapter_over(tmp_path, fail_on=MajorFunction.CLEANUP)
    info, _ = await adapter.create(ROOT_INODE, b"f", 0o644, os.O_RDWR | os.O_CREAT, Ctx())
    with caplog.at_level(logging.ERROR, logger="fltfuse.kernel"):
        await adapter.flush(info.fh)  # no exception reaches the caller
    assert any(isinstance(c.iopb.parameters, CleanupParameters) for c in stack.seen)
    assert caplog.records
    await adapter.release(info.fh)


async def test_a_bad_handle_is_ebadf(tmp_path: Path) -> None:
    adapter, _ = adapter_over(tmp_path)
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.read(123456, 0, 10)
    assert info.value.errno == errno.EBADF


async def test_forget_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    adapter, _ = adapter_over(tmp_path)
    with caplog.at_level(logging.ERROR):
        await adapter.forget([(999_999, 1)])
    assert "unknown inode" in caplog.text


async def test_open_with_o_trunc_is_an_overwrite_and_truncates(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("old contents")
    adapter, stack = adapter_over(tmp_path)
    entry = await adapter.lookup(ROOT_INODE, b"f", Ctx())
    info = await adapter.open(entry.st_ino, os.O_WRONLY | os.O_TRUNC, Ctx())
    assert (tmp_path / "f").read_text() == ""
    params = stack.seen[-1].iopb.parameters
    assert isinstance(params, CreateParameters) and params.disposition is CreateDisposition.OVERWRITE
    await adapter.release(info.fh)


def test_kernel_caches_stay_on_unless_a_filter_asks_to_bypass_them(tmp_path: Path) -> None:
    from decimal import Decimal

    from fltfuse import FilterRegistration, OperationFlags, OperationRegistration, PreopCallbackStatus
    from fltfuse._stack import Filter, Instance, InstanceStack

    def pre(cbd: CallbackData, objects: object) -> PreopCallbackStatus:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK

    def adapter_with(flags: OperationFlags) -> KernelAdapter:
        backend = PassthroughBackend(str(tmp_path))
        stack = InstanceStack(backend)
        registration = FilterRegistration(operations=(OperationRegistration(MajorFunction.LOOKUP, pre, flags=flags),))
        stack.attach(Instance(Filter("auditor", registration), "main", Decimal("370000")))
        return KernelAdapter(stack, backend, attr_timeout=60, entry_timeout=60)

    plain = adapter_with(OperationFlags.NONE)
    assert (plain._entry_timeout, plain._attr_timeout) == (60, 60)
    auditing = adapter_with(OperationFlags.BYPASS_KERNEL_CACHE)
    assert (auditing._entry_timeout, auditing._attr_timeout) == (0, 60)


def test_mount_options_split_into_fltfuses_own_and_the_kernels() -> None:
    options = FuseOptions.parse(
        ["ro,attr_timeout=1.5", "entry_timeout=0,stall_report=2,nofail,x-systemd.foo"], fsname="v"
    )
    assert (options.attr_timeout, options.entry_timeout, options.stall_report) == (1.5, 0.0, 2.0)
    assert options.read_only
    assert "nofail" not in options.kernel and not any(o.startswith(("x-", "stall_report")) for o in options.kernel)
    assert {"fsname=v", "subtype=fltfuse", "default_permissions"} <= set(options.kernel)
    defaults = FuseOptions.parse([], fsname="v")
    assert (defaults.attr_timeout, defaults.entry_timeout, defaults.stall_report) == (60.0, 60.0, 5.0)
    with pytest.raises(ValueError, match="mount option stall_report needs a number of seconds"):
        FuseOptions.parse(["stall_report=soon"], fsname="v")
