"""Conformance tier: differential tests of the mount against the raw ext4 under it."""
