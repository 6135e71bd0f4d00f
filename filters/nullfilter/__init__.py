"""nullfilter: the smallest minifilter. It registers no operations: it attaches,
detaches and unloads, and every request passes it by without a frame.

Design and operation: as Windows' nullFilter sample, it proves the plumbing
(INF, loading, attachment at an altitude) with nothing in the request path.
"""

from fltfuse import FilterRegistration

REGISTRATION = FilterRegistration()
