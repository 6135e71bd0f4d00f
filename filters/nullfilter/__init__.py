"""nullfilter: the smallest minifilter. It registers no operations: it attaches,
detaches and unloads, and every request passes it by without a frame.

Design and operation: as Windows' nullFilter sample, it proves the plumbing
(INF, loading, attachment at an altitude, ``fltmc detach`` and ``fltmc
unload``) with nothing in the request path. It agrees to every detach
(instance query teardown) and every unload.
"""

from typing import Any

from fltfuse import FilterRegistration, FilterUnloadFlags, NtStatus


def query_teardown(objects: Any, flags: int) -> NtStatus:
    return NtStatus.SUCCESS


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(filter_unload=unload, instance_query_teardown=query_teardown)
