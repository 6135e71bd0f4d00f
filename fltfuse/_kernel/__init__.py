"""The kernel adapter: stage (1), the only package that imports pyfuse3.

``operations`` turns FUSE requests into callback data; ``session`` mounts,
serves and unmounts one FUSE session.
"""

from .operations import KernelAdapter
from .session import FuseOptions, serve

__all__ = ["FuseOptions", "KernelAdapter", "serve"]
