"""passthrough: a pre and a post for every major function FUSE produces, counting calls.

Design and operation: as Windows' passThrough sample, every callback returns
at once (the pre asks for its post; the post finishes), so the difference
between a volume with and without it is the cost of one filter in the request
path: the benchmark's per-filter overhead reference. ``PRE_CALLS`` and
``POST_CALLS`` count the callbacks per major function (for all instances
together), as plain dictionaries: a ``Counter`` with tuple keys cost more
than the rest of the callback.
Any instance may be detached (``fltmc detach``) and the filter unloaded
(``fltmc unload``) at any time; several instances may be attached at
different altitudes (``fltmc attach passthrough VOL -i NAME -a ALTITUDE``),
which is how the benchmark builds a stack of five.
"""

from __future__ import annotations

from typing import Any

from fltfuse import (
    FUSE_PRODUCES,
    CallbackData,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PostopCallbackStatus,
    PostopFlags,
    PreopCallbackStatus,
)

PRE_CALLS: dict[MajorFunction, int] = dict.fromkeys(MajorFunction, 0)
POST_CALLS: dict[MajorFunction, int] = dict.fromkeys(MajorFunction, 0)


def pre(cbd: CallbackData, objects: Any) -> PreopCallbackStatus:
    PRE_CALLS[cbd.iopb.parameters.MAJOR] += 1
    return PreopCallbackStatus.SUCCESS_WITH_CALLBACK


def post(cbd: CallbackData, objects: Any, context: Any, flags: PostopFlags) -> PostopCallbackStatus:
    POST_CALLS[cbd.iopb.parameters.MAJOR] += 1
    return PostopCallbackStatus.FINISHED_PROCESSING


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS  # any instance may be detached by hand


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=tuple(
        OperationRegistration(major, pre, post)
        for major in sorted(FUSE_PRODUCES)
        if major is not MajorFunction.FORGET  # FORGET is no request a filter can see
    ),
)
