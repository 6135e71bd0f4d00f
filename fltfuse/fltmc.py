"""The ``fltmc`` command: what fltmc.exe is on Windows.

    fltmc filters                          loaded filters: name, instance count, altitude, frame
    fltmc instances [VOLUME]               attached instances (of every volume, or of one)
    fltmc volumes                          mounted fltfuse volumes
    fltmc load NAME [VOLUME]               load a filter (on every volume, or on one)
    fltmc unload NAME [VOLUME] [--force]   unload it (--force: mandatory, its unload callback cannot refuse)
    fltmc attach NAME VOLUME [-i INSTANCE] [-a ALTITUDE]
    fltmc detach NAME VOLUME [-i INSTANCE]

Each fltfuse daemon is the filter manager of its own volume; fltmc talks to
the daemons' control sockets (root-only on root mounts). VOLUME is a mount
point. A filter "loaded" system-wide on Windows is here loaded in each
daemon, so ``filters`` sums over the volumes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ._control import ControlError, request
from ._volume import VolumeError, VolumeState, resolve_mountpoint

_INSTANCE_FLAGS = {0x1: "no automatic attach", 0x2: "no manual attach"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fltmc", description="Manage fltfuse minifilters and volumes.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("filters", help="list loaded filters")
    instances = sub.add_parser("instances", help="list attached instances")
    instances.add_argument("volume", nargs="?", help="only this volume (mount point)")
    instances.add_argument("-v", "--volume", dest="volume_option", help=argparse.SUPPRESS)
    sub.add_parser("volumes", help="list mounted volumes")
    load = sub.add_parser("load", help="load a filter and attach its default instance")
    load.add_argument("name")
    load.add_argument("volume", nargs="?", help="only on this volume (default: every volume)")
    unload = sub.add_parser("unload", help="detach every instance of a filter and unload it")
    unload.add_argument("name")
    unload.add_argument("volume", nargs="?", help="only on this volume (default: every volume)")
    unload.add_argument("-f", "--force", action="store_true", help="mandatory unload: the filter cannot refuse")
    attach = sub.add_parser("attach", help="attach an instance of a loaded filter to a volume")
    attach.add_argument("name")
    attach.add_argument("volume")
    attach.add_argument("-i", "--instance", help="instance name (default: the INF's default instance)")
    attach.add_argument("-a", "--altitude", help="altitude (default: the instance's altitude in the INF)")
    detach = sub.add_parser("detach", help="detach an instance of a filter from a volume")
    detach.add_argument("name")
    detach.add_argument("volume")
    detach.add_argument("-i", "--instance", help="instance name (default: the filter's default instance)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "volumes":
            return _volumes()
        if args.command == "filters":
            return _filters()
        if args.command == "instances":
            return _instances(args.volume or args.volume_option)
        if args.command in ("load", "unload"):
            return _each(
                args.command,
                args.volume,
                name=args.name,
                **({"force": True} if args.command == "unload" and args.force else {}),
            )
        if args.command == "attach":
            result = _call(
                _state(args.volume), "attach", name=args.name, instance=args.instance, altitude=args.altitude
            )
            print(f"attached {args.name} {result['instance']!r} at altitude {result['altitude']} to {args.volume}")
            return 0
        _call(_state(args.volume), "detach", name=args.name, instance=args.instance)
        print(f"detached {args.name} from {args.volume}")
        return 0
    except (ControlError, VolumeError) as exc:
        status = f" ({exc.status})" if isinstance(exc, ControlError) else ""
        print(f"fltmc: {exc}{status}", file=sys.stderr)
        return 1


def _live() -> list[VolumeState]:
    return [state for state in VolumeState.all() if state.daemon_alive()]


def _state(volume: str) -> VolumeState:
    state = VolumeState.load(resolve_mountpoint(volume))
    if state is None or not state.daemon_alive():
        raise VolumeError(f"{volume} is not a mounted fltfuse volume")
    return state


def _call(state: VolumeState, op: str, **args: Any) -> Any:
    try:
        return request(state.control_path, op, **{k: v for k, v in args.items() if v is not None})
    except ControlError as exc:
        raise ControlError(exc.status, f"{state.mountpoint}: {exc}") from None
    except OSError as exc:
        raise ControlError("CONNECTION_REFUSED", f"{state.mountpoint}: control socket: {exc}") from None


def _each(op: str, volume: str | None, **args: Any) -> int:
    """load/unload on one volume, or on every mounted volume."""
    states = [_state(volume)] if volume else _live()
    if not states:
        raise VolumeError("no fltfuse volume is mounted")
    failed = 0
    for state in states:
        try:
            _call(state, op, **args)
        except ControlError as exc:
            print(f"fltmc: {exc} ({exc.status})", file=sys.stderr)
            failed += 1
        else:
            print(f"{op}ed {args['name']} on {state.mountpoint}")
    return 1 if failed else 0


def _filters() -> int:
    totals: dict[str, dict[str, Any]] = {}
    for state in _live():
        for row in _call(state, "filters"):
            entry = totals.setdefault(row["name"].lower(), dict(row, instances=0))
            entry["instances"] += row["instances"]
    rows = [(r["name"], str(r["instances"]), r["altitude"], str(r["frame"])) for r in totals.values()]
    _table(("Filter Name", "Num Instances", "Altitude", "Frame"), sorted(rows, key=lambda r: r[0].lower()))
    return 0


def _instances(volume: str | None) -> int:
    rows = []
    for state in [_state(volume)] if volume else _live():
        for row in _call(state, "instances"):
            rows.append(
                (
                    row["filter"],
                    state.mountpoint,
                    row["altitude"],
                    row["instance"],
                    str(row["frame"]),
                    row["attached"],
                    _flags(row["flags"]),
                )
            )
    _table(("Filter", "Volume Name", "Altitude", "Instance Name", "Frame", "Attached", "Flags"), rows)
    return 0


def _flags(flags: int) -> str:
    names = [text for bit, text in _INSTANCE_FLAGS.items() if flags & bit]
    return f"0x{flags:x}" + (f" ({', '.join(names)})" if names else "")


def _volumes() -> int:
    rows = []
    for state in VolumeState.all():
        alive = state.daemon_alive()
        fs = "ext4" if state.kind != "directory" else "directory (fallback)"
        rows.append(
            (state.mountpoint, state.loop_device or state.source, fs, f"{state.pid}" + ("" if alive else " (dead)"))
        )
    _table(("Dos Name", "Volume Name", "FileSystem", "Daemon"), rows)
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns like fltmc.exe's: a header, a rule of dashes, left-aligned cells."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
