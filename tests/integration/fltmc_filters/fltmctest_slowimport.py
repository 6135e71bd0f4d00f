"""fltmctest_slowimport: its import takes IMPORT_SECONDS; `fltmc load` must not stall the mount meanwhile."""

import time

from fltfuse import FilterRegistration, FilterUnloadFlags, NtStatus

IMPORT_SECONDS = 3.0
time.sleep(IMPORT_SECONDS)


def unload(flags: FilterUnloadFlags) -> NtStatus:
    return NtStatus.SUCCESS


REGISTRATION = FilterRegistration(filter_unload=unload)
