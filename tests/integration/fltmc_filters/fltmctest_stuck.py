"""fltmctest_stuck: pends each READ at offset ``PendOffset`` and never completes it.

It sets no cancel routine, so nothing but the filter manager can end such a
request: when the instance is detached (``fltmc detach``, ``fltmc unload``, or
the daemon stopping), the drain times out, reports the filter and the request,
and cancels it (the reader gets EINTR). READ is registered with
BYPASS_KERNEL_CACHE, so every read(2) reaches the filter as the caller made it.
Instances may be detached and the filter unloaded.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("fltmctest.stuck")

HELD: list[CallbackData] = []  # the requests it pended, never completed


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    if cbd.iopb.parameters.offset != objects.filter.parameters["PendOffset"]:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    HELD.append(cbd)
    log.info("fltmctest: %s pended %r forever", objects.instance.name, cbd)
    return PreopCallbackStatus.PENDING


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(OperationRegistration(MajorFunction.READ, pre_read, flags=OperationFlags.BYPASS_KERNEL_CACHE),),
)
