"""fltmctest_drain: shows which post-operation callbacks run while an instance drains.

Two instances of one filter, told apart by name:

* ``Drain Upper`` (the default instance) asks for the post of each READ at
  offset ``PendOffset``; its post logs the flags it got (DRAINING or NONE).
* ``Drain Lower`` (attached by hand, below it) pends each READ at
  ``PendOffset`` until a ``setxattr(user.fltmctest.release)`` on any file
  completes them all (the setxattr itself succeeds without reaching ext4).

So with a READ pended below it, a detach of ``Drain Upper`` must call its
post at once with PostopFlags.DRAINING (and never again): the log says so.
READ is registered with BYPASS_KERNEL_CACHE so that every read(2) reaches it.
"""

from __future__ import annotations

import logging
from typing import Any

from fltfuse import (
    CallbackData,
    EaMinor,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationFlags,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
    RelatedObjects,
    complete_pended_preoperation,
)

log = logging.getLogger("fltmctest.drain")

RELEASE = b"user.fltmctest.release"
PENDED: list[CallbackData] = []  # READs the lower instance holds until released


def pre_read(cbd: CallbackData, objects: RelatedObjects) -> Any:
    if cbd.iopb.parameters.offset != objects.filter.parameters["PendOffset"]:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    if objects.instance.name == "Drain Lower":
        PENDED.append(cbd)
        log.info("fltmctest: %s pended %r", objects.instance.name, cbd)
        return PreopCallbackStatus.PENDING
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK, f"context of pid {cbd.requestor.pid}"


def post_read(cbd: CallbackData, objects: RelatedObjects, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    how = "DRAINING" if flags & PostopFlags.DRAINING else "NONE"
    log.info("fltmctest: post READ instance=%s flags=%s context=%s", objects.instance.name, how, context)
    return PostopCallbackStatus.FINISHED_PROCESSING


def pre_set_ea(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    params = cbd.iopb.parameters
    if params.minor is not EaMinor.SET or params.name != RELEASE:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    while PENDED:
        held = PENDED.pop(0)
        log.info("fltmctest: %s releases %r", objects.instance.name, held)
        complete_pended_preoperation(held, PreopCallbackStatus.SUCCESS_NO_CALLBACK)
    cbd.io_status.status = NtStatus.SUCCESS
    return PreopCallbackStatus.COMPLETE


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(
        OperationRegistration(MajorFunction.READ, pre_read, post_read, flags=OperationFlags.BYPASS_KERNEL_CACHE),
        OperationRegistration(MajorFunction.SET_EA, pre_set_ea),
    ),
)
