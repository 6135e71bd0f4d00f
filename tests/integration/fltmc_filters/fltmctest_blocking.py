"""fltmctest_blocking: its pre-READ at offset ``BlockOffset`` blocks the event loop for ``BlockSeconds``.

A synchronous ``time.sleep`` in a callback is the bug the loop watchdog
reports: every request on the volume waits until it returns. READ is
registered with BYPASS_KERNEL_CACHE, so every read(2) reaches the filter as
the caller made it. Instances may be detached and the filter unloaded.
"""

from __future__ import annotations

import time
from typing import Any

from fltfuse import (
    CallbackData,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationFlags,
    OperationRegistration,
    PreopCallbackStatus,
    RelatedObjects,
)


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    parameters = objects.filter.parameters
    if cbd.iopb.parameters.offset == parameters["BlockOffset"]:
        time.sleep(parameters["BlockSeconds"])  # blocks the daemon's event loop: the watchdog names this filter
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(OperationRegistration(MajorFunction.READ, pre_read, flags=OperationFlags.BYPASS_KERNEL_CACHE),),
)
