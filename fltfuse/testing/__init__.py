"""Test harness for filter authors (and fltfuse's own tests).

* :class:`InProcessVolume`: a filter stack over a real directory, driven
  in-process through the same kernel adapter the daemon uses; no kernel, no
  mount, no root: runs in any container.
* :func:`mounted_volume`: a real ext4 image mounted through a real fltfuse
  daemon, with guaranteed cleanup (needs root, /dev/fuse and loop devices;
  :func:`why_no_mount` says what is missing).
* ``fltfuse.testing.plugin``: pytest fixtures for both, registered as a
  pytest plugin when fltfuse is installed.
"""

from .in_process import InProcessVolume
from .mounted import MountedVolume, mount, mounted_volume, release, why_no_mount

__all__ = ["InProcessVolume", "MountedVolume", "mount", "mounted_volume", "release", "why_no_mount"]
