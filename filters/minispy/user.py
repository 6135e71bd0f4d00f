"""The ``minispy`` command: what minispy.exe is on Windows, the reader of the minispy filter's log.

    minispy [--volume MNT] [--json] [--path PATTERN] [--pid PID] [--process NAME] [--op MAJOR]... [--count N]
    minispy --stats [--volume MNT]
    minispy --attach MNT [--instance NAME]
    minispy --detach MNT [--instance NAME]
    minispy --list [MNT]

Without an action it connects to the filter's port ``MiniSpyPort`` (on the
one volume that has it, or on ``--volume``) and streams the records as they
are logged: an aligned table, or ``--json`` (one JSON object per line, as in
:mod:`filters.minispy.protocol`). ``--path`` (a substring of the name, or a
glob when it has ``*``, ``?`` or ``[``), ``--pid``, ``--process`` (a command
name, or a glob) and ``--op`` (major function names, repeatable) choose the
records shown; ``--count N`` stops after N of them. Drop notices (records the
filter's full buffer could not keep) are always shown. Ctrl-C stops it.

``--attach`` and ``--detach`` attach or detach an instance of the filter
(``top``, ``middle``, ``bottom`` or a full instance name; default: the Top
instance) through the volume's control socket, as ``fltmc attach`` does;
``--list`` shows the filter's instances on one volume or all.

Exit status: 0 when done (``--count`` reached, Ctrl-C, the output closed);
1 when it could not connect (no fltfuse volume there, no port, the port on
several volumes and no ``--volume``, another minispy connected, not root) or
a control request failed; 2 for a usage error; 3 when the filter
disconnected it (unloaded, or its volume unmounted).
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

from fltfuse import MajorFunction, NtStatus
from fltfuse._control import ControlError
from fltfuse._volume import VolumeError
from fltfuse.fltmc import _call, _live, _state, _table
from fltfuse.port import (
    FilterPort,
    PortDisconnectedError,
    PortError,
    PortNotFoundError,
    PortRefusedError,
    connect_communication_port,
    find_port,
)

from . import protocol

FILTER = "minispy"
WAIT_MS = 1000  # each GET_LOG waits this long for a record when there is none
_GLOB = frozenset("*?[")

DONE, FAILED, USAGE, DISCONNECTED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minispy", description="Stream what the minispy filter logs, and attach or detach its instances."
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--attach", metavar="MNT", help="attach an instance of minispy to the volume at MNT")
    action.add_argument("--detach", metavar="MNT", help="detach an instance of minispy from the volume at MNT")
    action.add_argument(
        "--list", nargs="?", const="", metavar="MNT", help="list minispy's instances (on MNT, or every volume)"
    )
    action.add_argument("--stats", action="store_true", help="show the filter's counters and exit")
    p.add_argument("--instance", help="top, middle, bottom or a full instance name (default: the Top instance)")
    p.add_argument("--volume", metavar="MNT", help="the volume whose port to connect to (default: the only one)")
    p.add_argument("--port", default=protocol.PORT_NAME, help="the port's name, or its socket's path")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    p.add_argument("--path", help="only names containing this text (or matching this glob)")
    p.add_argument("--pid", type=int, help="only requests of this process")
    p.add_argument("--process", help="only requests of processes with this command name (or matching this glob)")
    p.add_argument("--op", action="append", default=[], metavar="MAJOR", help="only this major function (repeatable)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N records")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ops = {op.upper() for text in args.op for op in text.split(",") if op}
    unknown = ops - MajorFunction.__members__.keys()
    if unknown:
        parser.error(f"unknown major function(s) {', '.join(sorted(unknown))}")
    if args.count is not None and args.count <= 0:
        parser.error("--count takes a positive number")
    if args.instance is not None and args.attach is None and args.detach is None:
        parser.error("--instance goes with --attach or --detach")
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")  # a name that is not UTF-8 is written as its bytes
    try:
        if args.attach is not None:
            return _attach(args.attach, args.instance)
        if args.detach is not None:
            return _detach(args.detach, args.instance)
        if args.list is not None:
            return _list(args.list or None)
        with _connect(args.port, args.volume) as port:
            if args.stats:
                return _stats(port, args.json)
            return _stream(port, _matcher(args, ops), args.json, args.count, sys.stdout)
    except ControlError as exc:
        volume = args.attach or args.detach or "MNT"
        hint = f"; load it first: fltmc load minispy {volume}" if exc.status == "FLT_FILTER_NOT_FOUND" else ""
        return _fail(f"{exc} ({exc.status}){hint}")
    except (VolumeError, _ConnectError) as exc:
        return _fail(str(exc))
    except PortDisconnectedError as exc:
        return _fail(f"disconnected: the minispy filter was unloaded or its volume unmounted ({exc})", DISCONNECTED)
    except (PortError, protocol.ProtocolError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return DONE
    except BrokenPipeError:
        # the reader of our output went away (minispy | head): done; keep the exit's flush from failing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return DONE


def _fail(message: str, code: int = FAILED) -> int:
    print(f"minispy: {message}", file=sys.stderr)
    return code


# -- the control socket ---------------------------------------------------------------------------


def _attach(volume: str, instance: str | None) -> int:
    name = protocol.instance_name(instance) if instance else None
    result = _call(_state(volume), "attach", name=FILTER, instance=name)
    print(f"attached {result['instance']} at altitude {result['altitude']} to {volume}")
    return DONE


def _detach(volume: str, instance: str | None) -> int:
    name = protocol.instance_name(instance) if instance else protocol.INSTANCES["top"]
    _call(_state(volume), "detach", name=FILTER, instance=name)
    print(f"detached {name} from {volume}")
    return DONE


def _list(volume: str | None) -> int:
    """The filter's instances per volume: its INF's three (attached or not) and any other attached by hand."""
    states = [_state(volume)] if volume else _live()
    if not states:
        raise VolumeError("no fltfuse volume is mounted")
    rows = []
    for state in states:
        loaded = any(row["name"].casefold() == FILTER for row in _call(state, "filters"))
        attached = {
            row["instance"].casefold(): row for row in _call(state, "instances") if row["filter"].casefold() == FILTER
        }
        names = list(protocol.INSTANCES.values())
        names += [row["instance"] for key, row in attached.items() if key not in {n.casefold() for n in names}]
        for name in names:
            row = attached.get(name.casefold())
            how = row["attached"] if row else "no" if loaded else "no (filter not loaded)"
            rows.append((state.mountpoint, name, row["altitude"] if row else "-", how))
    _table(("Volume", "Instance", "Altitude", "Attached"), rows)
    return DONE


# -- the port ---------------------------------------------------------------------------------------


class _ConnectError(Exception):
    """Connecting to the port failed; the message says why, for a person."""


def _connect(name: str, volume: str | None) -> FilterPort:
    where = f" on {volume}" if volume else ""
    try:
        return connect_communication_port(name, volume=volume)
    except PortNotFoundError as exc:
        if volume is not None:
            _state(volume)  # VolumeError when it is no fltfuse volume at all
        raise _ConnectError(
            f"{exc}: is the minispy filter loaded? (fltfuse mount --filter minispy, or fltmc load minispy MNT)"
        ) from None
    except PortRefusedError as exc:
        if exc.status == NtStatus.CONNECTION_COUNT_LIMIT:
            why = f"another minispy is already connected to {name}{where} (the port takes one reader at a time)"
        elif exc.status == NtStatus.ACCESS_DENIED:
            why = f"only root may connect to {name}{where}"
        else:
            why = str(exc)
        raise _ConnectError(f"connection refused: {why}") from None
    except PortError as exc:
        if volume is None and exc.status == NtStatus.OBJECT_NAME_COLLISION:
            on = ", ".join(_volumes_with(name))
            raise _ConnectError(f"{name} is on several volumes ({on}): name one with --volume MNT") from None
        raise _ConnectError(str(exc)) from None


def _volumes_with(name: str) -> list[str]:
    """The mount points of the live volumes that have port ``name``."""
    found = []
    for state in _live():
        try:
            find_port(name, state.mountpoint)
        except PortNotFoundError:
            continue
        found.append(state.mountpoint)
    return found


def _request(port: FilterPort, message: bytes) -> dict[str, Any]:
    return protocol.decode(port.send_message(message, reply_capacity=protocol.REPLY_CAPACITY))


def _stats(port: FilterPort, as_json: bool) -> int:
    stats = _request(port, protocol.get_stats())["stats"]
    if as_json:
        print(json.dumps(stats))
    else:
        print(
            f"logged {stats['logged']}, dropped {stats['dropped']}, "
            f"buffered {stats['buffered']} of {stats['capacity']}, last sequence number {stats['sequence']}"
        )
    return DONE


def _stream(
    port: FilterPort, matches: Callable[[dict[str, Any]], bool], as_json: bool, count: int | None, out: TextIO
) -> int:
    """Print the records as they come until ``count`` were shown (None: until stopped or disconnected)."""
    shown = 0
    if not as_json:
        print(HEADER, file=out, flush=True)
    while True:
        for entry in _request(port, protocol.get_log(WAIT_MS))["entries"]:
            if entry["type"] == "record":
                if not matches(entry):
                    continue
                shown += 1
            print(json.dumps(entry) if as_json else _line(entry), file=out)
            if count is not None and shown >= count:
                out.flush()
                return DONE
        out.flush()


def _like(text: str | None, pattern: str, *, substring: bool) -> bool:
    if text is None:
        return False
    if _GLOB & set(pattern):
        return fnmatch.fnmatchcase(text, pattern)
    return pattern in text if substring else pattern == text


def _matcher(args: argparse.Namespace, ops: set[str]) -> Callable[[dict[str, Any]], bool]:
    """Whether a record passes --path, --pid, --process and --op."""

    def matches(record: dict[str, Any]) -> bool:
        if ops and record["major"] not in ops:
            return False
        if args.pid is not None and record["pid"] != args.pid:
            return False
        if args.process is not None and not _like(record["process"], args.process, substring=False):
            return False
        if args.path is not None:
            names = (record["name"], record["arguments"].get("destination"))
            return any(_like(name, args.path, substring=True) for name in names)
        return True

    return matches


# -- the table ------------------------------------------------------------------------------------

_COLUMNS = "{:>8} {:<6} {:<15} {:>7} {:>7} {:<15} {:<37} {:<22} {}"
HEADER = _COLUMNS.format("SEQ", "INST", "TIME", "USEC", "PID", "PROCESS", "OPERATION", "STATUS", "NAME  ARGUMENTS")


def _line(entry: dict[str, Any]) -> str:
    """One entry as a table row (a drop notice as a line of its own)."""
    if entry["type"] == "dropped":
        return f"*** {entry['count']} record(s) dropped here: the filter's buffer was full (MaxRecords) ***"
    operation = entry["major"] + (f"/{entry['minor']}" if entry["minor"] else "")
    status = entry["errno"] or entry["status"] or "(draining)"  # a failure by the errno its caller got
    name = entry["name"] if entry["name"] is not None else f"<inode {entry['inode']}>"
    arguments = [f"{key}={value}" for key, value in entry["arguments"].items()]
    if entry["information"]:
        arguments.append(f"information={entry['information']}")
    return _COLUMNS.format(
        entry["seq"],
        protocol.short_instance(entry["instance"])[:6],
        datetime.fromtimestamp(entry["pre_time"] / 1e9).strftime("%H:%M:%S.%f"),
        (entry["post_time"] - entry["pre_time"]) // 1000,
        entry["pid"],
        entry["process"][:15],
        operation,
        status,
        "  ".join([name, " ".join(arguments)]) if arguments else name,
    )


if __name__ == "__main__":
    sys.exit(main())
