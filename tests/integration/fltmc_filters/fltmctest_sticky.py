"""fltmctest_sticky: a filter that registers nothing, not even an unload or query teardown callback.

So its instances cannot be detached by hand (``fltmc detach`` is refused with
FLT_DO_NOT_DETACH) and it unloads only by a mandatory unload (``fltmc unload
--force``). Its INF has an instance that attaches at mount but not by hand
(Flags 0x2), one that attaches only by hand (0x1) and one that never attaches
(0x3).
"""

from fltfuse import FilterRegistration

REGISTRATION = FilterRegistration()
