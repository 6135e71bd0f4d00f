"""fltmctest_reload: answers ``getxattr user.fltmctest.version`` itself, from its code and its INF.

The value is ``VERSION:Greeting`` (``VERSION`` below, ``Greeting`` the INF
parameter). The reload test copies this module and its INF, edits both while
the filter is unloaded, and loads it again: the answer must change.
"""

from __future__ import annotations

from typing import Any

from fltfuse import (
    CallbackData,
    EaMinor,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    NtStatus,
    OperationRegistration,
    PreopCallbackStatus,
    RelatedObjects,
)

VERSION = "one"
NAME = b"user.fltmctest.version"


def pre_query_ea(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    params = cbd.iopb.parameters
    if params.minor is not EaMinor.GET or params.name != NAME:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    params.value = f"{VERSION}:{objects.filter.parameters['Greeting']}".encode()
    cbd.io_status.status = NtStatus.SUCCESS
    return PreopCallbackStatus.COMPLETE


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(
    filter_unload=unload,
    instance_query_teardown=query_teardown,
    operations=(OperationRegistration(MajorFunction.QUERY_EA, pre_query_ea),),
)
