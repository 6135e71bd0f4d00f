"""Backends: stage (4), where every request ends.

``passthrough`` serves a real directory (the ext4 mounted from the volume's
loop device, or a plain directory as the fallback).
"""

from .inode_table import ROOT_INODE
from .passthrough import PassthroughBackend

__all__ = ["ROOT_INODE", "PassthroughBackend"]
