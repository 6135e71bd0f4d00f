"""The ``fltmc`` command: what fltmc.exe is on Windows.

    fltmc volumes      the mounted fltfuse volumes: mount point, source, backing, daemon

(The filter commands ``load``, ``unload``, ``filters``, ``instances``,
``attach`` and ``detach`` talk to each daemon's control socket; they come with
the filter manager.)
"""

from __future__ import annotations

import argparse
import sys

from ._volume import VolumeState


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fltmc", description="Manage fltfuse minifilters and volumes.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("volumes", help="list mounted volumes")
    p.parse_args(argv)
    rows = [("Dos Name", "Volume Name", "FileSystem", "Daemon")]
    for state in VolumeState.all():
        alive = state.daemon_alive()
        fs = "ext4" if state.kind != "directory" else "directory (fallback)"
        rows.append(
            (state.mountpoint, state.loop_device or state.source, fs, f"{state.pid}" + ("" if alive else " (dead)"))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
