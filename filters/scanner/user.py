"""fltfuse-scanner: the scanner filter's user-mode service (Windows' scanuser.exe / avscan.exe).

It connects to the ``ScannerPort`` of every mounted volume (or of the volumes
named with ``--volume``), and keeps looking for new ones each second, so a
volume mounted later, or a filter loaded again, is served too. Each
connection has ``--threads`` worker threads taking the filter's scan
messages (FilterGetMessage), judging them with the engine and replying
(FilterReplyMessage). Every verdict is logged, one line per scan.

Engines (``filters/scanner/engines.py``): ``pattern`` (byte patterns from a
rules file; the default rules detect the EICAR test file, so the service
started with no arguments protects a volume mounted with
``--filter scanner``) and ``clamav`` (a running clamd, over its socket).
The service watches its engine's signature database; when it changes it
tells every filter, which drops its cached verdicts.

Exit status: 0 after SIGTERM or SIGINT, 2 for bad arguments or an engine
that cannot start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from fltfuse.port import (
    FilterPort,
    PortDisconnectedError,
    PortError,
    PortMessage,
    connect_communication_port,
    find_port,
    find_ports,
)

from . import protocol
from .engines import ClamdEngine, Engine, EngineError, PatternEngine, Verdict

log = logging.getLogger("fltfuse-scanner")


def _engine(args: argparse.Namespace) -> Engine:
    if args.engine == "clamav":
        return ClamdEngine(args.clamd_socket, timeout=args.clamd_timeout, database=args.clamd_database)
    return PatternEngine.from_rules_file(args.rules or PatternEngine.DEFAULT_RULES)


class Service:
    """Connections to scanner ports, their worker threads, and the database watch."""

    def __init__(self, engine: Engine, threads: int, volumes: list[str], ports: list[str]):
        self.engine = engine
        self.threads = threads
        self.volumes = volumes
        self.ports = [Path(p) for p in ports]
        self.connections: dict[Path, FilterPort] = {}
        self.stopping = threading.Event()
        self._fingerprint = engine.fingerprint()
        self._refusals: dict[Path, str] = {}  # the last reason each port refused us: said once, not every second

    def run(self) -> None:
        """Serve until stopped: connect to new ports, notice database changes, every second."""
        while not self.stopping.is_set():
            self._connect_new()
            self._watch_database()
            self.stopping.wait(1.0)
        for port in list(self.connections.values()):
            port.close()

    def _wanted(self) -> list[Path]:
        if not self.volumes and not self.ports:
            return find_ports(protocol.PORT_NAME)
        found = [p for p in self.ports if p.is_socket()]
        for volume in self.volumes:
            try:
                found.append(find_port(protocol.PORT_NAME, volume))
            except PortError:
                pass  # not mounted yet, or no scanner there: looked for again in a second
        return found

    def _connect_new(self) -> None:
        for path, port in list(self.connections.items()):
            if not port.connected:
                del self.connections[path]
        for path in self._wanted():
            if path in self.connections:
                continue
            hello = protocol.encode({"service": "fltfuse-scanner", "fingerprint": self._fingerprint})
            try:
                port = connect_communication_port(str(path), hello)
            except PortError as exc:
                if self._refusals.get(path) != str(exc):
                    self._refusals[path] = str(exc)
                    log.warning("cannot connect to %s: %s (trying again every second)", path, exc)
                continue
            self._refusals.pop(path, None)
            self.connections[path] = port
            log.info("serving %s with %d thread(s), engine %s", path, self.threads, self.engine.name)
            for number in range(self.threads):
                threading.Thread(
                    target=self._work, args=(port,), name=f"scan {path.parent.name} {number}", daemon=True
                ).start()

    def _watch_database(self) -> None:
        try:
            fingerprint = self.engine.fingerprint()
        except EngineError as exc:
            log.warning("engine: %s", exc)
            return
        if fingerprint == self._fingerprint:
            return
        self._fingerprint = fingerprint
        log.info("signature database changed: telling %d filter(s)", len(self.connections))
        for port in list(self.connections.values()):
            try:
                port.send_message(protocol.encode({"op": "database", "fingerprint": fingerprint}), timeout=10)
            except PortError as exc:
                log.warning("telling %s of the new database failed: %s", port.path, exc)

    def _work(self, port: FilterPort) -> None:
        while not self.stopping.is_set():
            try:
                message = port.get_message()
            except PortDisconnectedError:
                return
            try:
                reply = self._judge(message)
            finally:
                message.close()
            if message.reply_capacity is None:
                continue
            try:
                port.reply_message(message.message_id, reply)
            except PortDisconnectedError:
                return

    def _judge(self, message: PortMessage) -> bytes:
        """The reply to one scan message: the verdict, or an error the filter's policy handles.

        The verdict is tagged with the fingerprint the service knew before the scan (the database watch changes
        it only once the engine scans with the new database), so it never names a newer database than the one it
        was judged with; the filter caches only verdicts of the database it knows as current.
        """
        fingerprint = self._fingerprint
        try:
            header, body = protocol.decode(message.data)
            kind = header.get("kind")
            if header.get("op") != "scan" or kind not in ("file", "buffer"):
                raise protocol.ProtocolError(f"not a scan: {header!r}")
            if kind == "file":
                if len(message.fds) != 1:
                    raise protocol.ProtocolError("a file scan comes with one descriptor")
                with os.fdopen(message.fds.pop(), "rb", buffering=0) as stream:
                    verdict = self.engine.scan(stream)
            else:
                verdict = self.engine.scan_bytes(body)
        except (protocol.ProtocolError, EngineError, OSError) as exc:
            log.error("scan failed: %s", exc)
            return protocol.ScanResult(
                "error", engine=self.engine.name, fingerprint=fingerprint, error=str(exc)
            ).encode()
        _log_verdict(header, verdict)
        result = "infected" if verdict.infected else "clean"
        return protocol.ScanResult(result, verdict.signature, verdict.engine, fingerprint).encode()


def _log_verdict(header: dict[str, object], verdict: Verdict) -> None:
    what = f"{header.get('reason')} {header.get('name')} (pid {header.get('pid')})"
    if verdict.infected:
        log.warning("INFECTED %s: %s [%s]", what, verdict.signature, verdict.engine)
    else:
        log.debug("clean %s [%s]", what, verdict.engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fltfuse-scanner", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--volume",
        action="append",
        default=[],
        metavar="MOUNTPOINT",
        help="serve this volume only (repeatable; default: every volume with a scanner)",
    )
    parser.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="SOCKET",
        help="serve the port at this socket path (repeatable; an InProcessVolume's port_path)",
    )
    parser.add_argument("--engine", choices=("pattern", "clamav"), default="pattern")
    parser.add_argument("--rules", metavar="FILE", help="pattern engine rules (default: the EICAR rule)")
    parser.add_argument(
        "--clamd-socket",
        default="/run/clamav/clamd.ctl",
        metavar="PATH",
        help="clamd's LocalSocket (default: Debian's clamav-daemon)",
    )
    parser.add_argument("--clamd-database", metavar="DIR", help="clamd's DatabaseDirectory, watched for changes")
    parser.add_argument("--clamd-timeout", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--threads", type=int, default=4, help="worker threads per volume (default 4)")
    parser.add_argument("--log", metavar="FILE", help="also log to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="log clean verdicts too")
    args = parser.parse_args(argv)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if args.log:
        handlers.append(logging.FileHandler(args.log, errors="backslashreplace"))  # names need not be UTF-8
    logging.basicConfig(level=logging.INFO, handlers=handlers, format="%(asctime)s fltfuse-scanner: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not 1 <= args.threads <= 64:
        parser.error("--threads must be between 1 and 64")
    try:
        engine = _engine(args)
        engine.fingerprint()
    except EngineError as exc:
        print(f"fltfuse-scanner: {exc}", file=sys.stderr)
        return 2
    service = Service(engine, args.threads, args.volume, args.port)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: service.stopping.set())
    log.info("started: engine %s, serving %s", engine.name, ", ".join(args.volume + args.port) or "every volume")
    service.run()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
