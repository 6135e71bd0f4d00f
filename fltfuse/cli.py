"""The ``fltfuse`` command: create volumes, mount them, unmount them.

    fltfuse volume create IMAGE --size SIZE
    fltfuse mount SOURCE MOUNTPOINT [-o OPTIONS] [-f] [--filter NAME ...] [--param NAME.KEY=VALUE ...]
    fltfuse unmount MOUNTPOINT [-l]
    fltfuse SOURCE MOUNTPOINT -o OPTIONS        (the form mount.fuse3 uses for -t fuse.fltfuse)

Without ``-f``, ``mount`` starts the daemon in the background and returns once
the mount is live (or prints why it failed); the daemon logs to
``--log-file``, by default ``<state root>/<volume id>.log``. With ``-f`` it
serves in the foreground and logs to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from . import _volume
from ._kernel import FuseOptions

log = logging.getLogger("fltfuse")


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fltfuse", description="Filter Manager volumes on FUSE.")
    sub = p.add_subparsers(dest="command", required=True)

    vol = sub.add_parser("volume", help="manage volume images")
    vsub = vol.add_subparsers(dest="volume_command", required=True)
    create = vsub.add_parser("create", help="make an ext4 image file")
    create.add_argument("image")
    create.add_argument("--size", required=True, help="e.g. 1G, 512M")
    create.add_argument("--inodes", type=int, help="number of inodes (mkfs.ext4 -N)")
    create.add_argument("--force", action="store_true", help="overwrite an existing file")

    mount = sub.add_parser("mount", help="mount a volume")
    mount.add_argument("source", help="ext4 image file, block device, or directory (fallback)")
    mount.add_argument("mountpoint")
    mount.add_argument("-o", dest="options", action="append", default=[], help="mount options, comma-separated")
    mount.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground, log to stderr")
    mount.add_argument("-d", "--debug", action="store_true", help="log every request")
    mount.add_argument(
        "--filter", dest="filters", action="append", default=[], metavar="NAME", help="attach this filter (repeatable)"
    )
    mount.add_argument(
        "--filter-path", action="append", default=[], metavar="DIR", help="also look for filter INFs here (repeatable)"
    )
    mount.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="override a filter parameter",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument(
        "--log-file", metavar="PATH", help="where the background daemon logs (default <state root>/<volume id>.log)"
    )

    unmount = sub.add_parser("unmount", aliases=["umount"], help="unmount a volume and release its devices")
    unmount.add_argument("mountpoint")
    unmount.add_argument("-l", "--lazy", action="store_true", help="detach now even if files are open")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] not in {"volume", "mount", "unmount", "umount", "-h", "--help"}:
        argv = ["mount", *argv]  # mount.fuse3 calls: fltfuse SOURCE MOUNTPOINT -o OPTS
    args = _parser().parse_args(argv)
    try:
        if args.command == "volume":
            _volume.create_image(args.image, _volume.parse_size(args.size), force=args.force, inodes=args.inodes)
            print(f"created ext4 volume {args.image} ({args.size})")
            return 0
        if args.command == "mount":
            return _mount(args)
        _volume.unmount(args.mountpoint, lazy=args.lazy)
        return 0
    except (_volume.VolumeError, ValueError) as exc:
        print(f"fltfuse: {exc}", file=sys.stderr)
        return 1


def _mount(args: argparse.Namespace) -> int:
    args.source = os.path.abspath(args.source)
    args.mountpoint = _volume.resolve_mountpoint(args.mountpoint)
    options = FuseOptions.parse(args.options, fsname=args.source)
    if args.foreground:
        return _serve(args, options)
    return _spawn(args)


def _serve(args: argparse.Namespace, options: FuseOptions) -> int:
    from . import _daemon, _loader  # imports pyfuse3 and the filters: only the daemon needs them

    _configure_logging(args.debug)
    ready_fd = args.ready_fd

    def on_ready() -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, b"ok\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        parameters = _parse_params(args.params)
        filters = _loader.load_all(args.filters, args.filter_path, parameters)
        _daemon.run(
            args.source,
            args.mountpoint,
            options,
            log_path=args.log_file,
            on_ready=on_ready,
            filters=filters,
            filter_path=[os.path.abspath(d) for d in args.filter_path],
            parameters=parameters,
        )
    except Exception as exc:
        log.error("%s", exc, exc_info=not isinstance(exc, _volume.VolumeError))
        if ready_fd is not None:
            os.write(ready_fd, f"error: {exc}\n".encode())
        return 1
    return 0


def _parse_params(specs: list[str]) -> dict[str, dict[str, str]]:
    """``NAME.KEY=VALUE`` items -> {filter name (lower case): {KEY: VALUE}}."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs:
        target, eq, value = spec.partition("=")
        name, dot, key = target.partition(".")
        if not (eq and dot and name and key):
            raise ValueError(f"--param {spec!r}: expected NAME.KEY=VALUE")
        out.setdefault(name.lower(), {})[key] = value
    return out


def _spawn(args: argparse.Namespace) -> int:
    """Start the daemon in the background and wait until its mount is live."""
    mountpoint = _volume.resolve_mountpoint(args.mountpoint)
    state = _volume.VolumeState.load(mountpoint)
    if state is not None and state.daemon_alive():  # say so here: the log is the live daemon's
        raise _volume.VolumeError(f"{mountpoint} is already served by fltfuse daemon {state.pid}")
    if args.log_file:
        log_path = Path(args.log_file).absolute()
    else:
        log_path = _volume.state_root() / f"{_volume.volume_id(mountpoint)}.log"
        _volume.make_private_dir(log_path.parent)
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "fltfuse", "mount", "-f", "--ready-fd", str(write_end), "--log-file", str(log_path)]
    argv += [*(f"-o{o}" for o in args.options), *(["-d"] if args.debug else [])]
    argv += [
        *(f"--filter={f}" for f in args.filters),
        *(f"--filter-path={os.path.abspath(d)}" for d in args.filter_path),
    ]
    argv += [*(f"--param={p}" for p in args.params), args.source, mountpoint]
    with os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    os.close(write_end)
    message = b""
    deadline = time.monotonic() + 120
    with os.fdopen(read_end, "rb", buffering=0) as ready:
        while not message.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([ready], [], [], 0.5)[0]:
                chunk = ready.read(4096)
                if not chunk:
                    break
                message += chunk
            elif proc.poll() is not None:
                break
    text = message.decode(errors="replace").strip()
    if text == "ok":
        print(f"fltfuse: {args.source} mounted at {mountpoint} (daemon pid {proc.pid}, log {log_path})")
        return 0
    if proc.poll() is None and not text:
        proc.terminate()
        text = "the daemon did not report a live mount within 120 s"
    reason = text.removeprefix("error: ") or "the daemon exited"
    print(f"fltfuse: mounting {args.source} at {mountpoint} failed: {reason}", file=sys.stderr)
    print(f"fltfuse: daemon log: {log_path}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
