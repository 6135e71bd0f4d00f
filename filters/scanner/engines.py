"""Scanning engines of the anti-virus service ``fltfuse-scanner``: byte patterns, or a real clamd.

An engine judges a byte stream (:meth:`Engine.scan`) and tells which signature
database it judges with (:meth:`Engine.fingerprint`), so that verdicts cached
under one fingerprint can be dropped when it changes. Engines are used from
several threads at once. When an engine cannot give a verdict it raises
:class:`EngineError` (never a "clean" verdict): the service then applies its
failure policy.

Pattern engine
--------------

:class:`PatternEngine` looks for byte patterns, like the Windows scanner
sample's "foul" string. Its rules file has one rule per line::

    Name = hex:<hex bytes>       # e.g.  Foul-Word = hex:66 6f 75 6c  (spaces between bytes allowed)
    Name = text:<literal text>   # e.g.  Foul-Word = text:foul        (UTF-8, verbatim to the line end)

``Name`` is a letter or digit followed by letters, digits, ``.``, ``_`` or
``-``; it is the signature reported. Blank lines and lines whose first
non-blank character is ``#`` are ignored; there are no comments after a rule.
A stream is infected when any pattern occurs anywhere in it; the verdict names
the pattern that starts earliest (on a tie, the rule listed first).
:attr:`PatternEngine.DEFAULT_RULES` (``default.rules`` next to this module)
detects the EICAR test file and nothing else.

The stream is read in :data:`READ_SIZE` pieces and never held whole: each
piece is searched on its own, and so is the junction of the previous piece's
last ``longest - 1`` bytes with the new piece's first ``longest - 1`` bytes,
so a pattern straddling two reads is found. Each pattern is searched with
``bytes.find`` (CPython's two-way search; for a handful of patterns this beats
one compiled regular expression of alternatives by far).

The fingerprint is the SHA-256 of the rules file's bytes. Every
:meth:`~PatternEngine.fingerprint` and :meth:`~PatternEngine.scan` compares
the file's inode, size and modification time with those of the loaded
version and reloads the rules when they differ; a file that has become
malformed or unreadable makes them raise :class:`EngineError` (naming the file
and line) until it is fixed.

ClamAV engine
-------------

:class:`ClamdEngine` sends the stream to a running clamd over its Unix socket
with the INSTREAM command, one connection per scan. clamd's ``StreamMaxLength``
limits the size of a stream: a longer one gets clamd's "INSTREAM size limit
exceeded" reply, which raises :class:`EngineError`, as do a connection failure,
a socket operation that takes longer than ``timeout`` and any ``ERROR`` reply.

The fingerprint is clamd's ``VERSION`` reply (clamd's version and, for the
official databases, their version and date) and, when the engine is given
clamd's ``DatabaseDirectory``, a digest of the names, sizes and modification
times of the files in it. When that digest changes, the engine has clamd
reload its database and waits until clamd scans with the new one. clamd gives
no sign of that itself: with ``ConcurrentDatabaseReload yes`` (its default) it
keeps scanning with the old database and answers PING while the new one loads,
and swaps them later. So the engine keeps a probe signature of its own in the
directory, the file :data:`ClamdEngine.PROBE_FILE`: before each reload it
rewrites it with a fresh random byte string and, after ``RELOAD``, scans that
string until clamd detects it. Only then does the fingerprint change. The
first :meth:`~ClamdEngine.fingerprint` call reloads too (the engine cannot know
what clamd loaded before it started), and every call waits while nothing has
been confirmed yet; later, while one call reloads, the others return the
fingerprint of the database clamd still scans with. A database clamd fails to
load (it then keeps its previous one) makes the reload time out with
:class:`EngineError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import secrets
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar, Protocol

READ_SIZE = 1 << 20
"""How many bytes the pattern engine asks its stream for at a time."""

INSTREAM_CHUNK = 256 << 10
"""How many bytes the clamd engine reads from its stream and sends in one INSTREAM chunk."""

_MAX_REPLY = 64 << 10


@dataclass(frozen=True)
class Verdict:
    """An engine's judgement of one stream."""

    infected: bool
    signature: str | None = None
    """The matched signature's name when infected (clamd's name as clamd reports it)."""
    engine: str = ""
    """The engine's :attr:`Engine.name`: ``"pattern"`` or ``"clamav"``."""


class EngineError(Exception):
    """The engine could not give a verdict; the message says which engine and why."""


class Engine(Protocol):
    """What the scanning service needs of an engine. Methods may be called from several threads at once."""

    name: str

    def fingerprint(self) -> str:
        """An identifier of the signature database the engine scans with now; cheap (called before every scan)."""
        ...

    def scan(self, stream: BinaryIO) -> Verdict:
        """Judge the bytes ``stream.read(n)`` gives until it returns ``b""`` (no seek needed: a pipe will do).

        Reading may stop before the end once the verdict is known (the pattern engine stops at its first match)
        or on an error; the caller closes the stream in any case, so that whoever feeds it gets EPIPE.
        Errors of the stream itself propagate as they are; the engine's own failures raise :class:`EngineError`.
        """
        ...

    def scan_bytes(self, data: bytes) -> Verdict:
        """Judge ``data``."""
        ...


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, assembled here so that no source file contains it."""
    return b"".join((b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$", b"EICAR-STANDARD-", b"ANTIVIRUS-TEST-", b"FILE!$H+H*"))


def _pieces(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """``stream``'s bytes, read at most ``size`` at a time, to its end. A non-blocking stream that has nothing to
    read yet (``read`` returns None) raises :class:`EngineError` rather than passing for the end of the data."""
    while True:
        piece: bytes | None = stream.read(size)
        if piece is None:
            raise EngineError("the stream is non-blocking and had no data: its end cannot be told")
        if not piece:
            return
        yield piece


# -- pattern engine ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One pattern of a rules file."""

    name: str
    pattern: bytes


_RULE = re.compile(r"\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*=\s*(?P<kind>hex|text):(?P<value>.*)")


@dataclass(frozen=True)
class _RuleSet:
    """The rules of one version of a rules file, with what identifies that version."""

    rules: tuple[Rule, ...]
    fingerprint: str
    identity: tuple[int, int, int, int]
    """(st_dev, st_ino, st_size, st_mtime_ns) of the file the rules were read from."""

    @property
    def overlap(self) -> int:
        """How many bytes a pattern can have on each side of a read boundary: the longest pattern's length - 1."""
        return max((len(rule.pattern) for rule in self.rules), default=1) - 1

    def search(self, data: bytes) -> tuple[int, str] | None:
        """(offset, name) of the pattern that starts earliest in ``data``, or None."""
        found: tuple[int, str] | None = None
        for rule in self.rules:
            offset = data.find(rule.pattern)
            if offset >= 0 and (found is None or offset < found[0]):
                found = (offset, rule.name)
        return found


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _parse_rule(path: Path, number: int, raw: bytes) -> Rule | None:
    """The rule on line ``number`` (``raw``, without its line ending), or None for a blank or comment line."""

    def malformed(why: str) -> EngineError:
        return EngineError(f"pattern engine: {path}:{number}: {why}")

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise malformed(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    match = _RULE.fullmatch(line)
    if match is None:
        raise malformed(f"expected 'Name = hex:<hex bytes>' or 'Name = text:<text>', got {line!r}")
    if match["kind"] == "hex":
        try:
            pattern = bytes.fromhex(match["value"])
        except ValueError as e:
            raise malformed(f"bad hex bytes {match['value'].strip()!r}: {e}") from None
    else:
        pattern = match["value"].encode("utf-8")
    if not pattern:
        raise malformed(f"rule {match['name']} has an empty pattern")
    return Rule(match["name"], pattern)


def _load_rules(path: Path) -> _RuleSet:
    try:
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))
            content = f.read()
    except OSError as e:
        raise EngineError(f"pattern engine: cannot read rules file {path}: {e.strerror}") from None
    rules = []
    for number, raw in enumerate(content.splitlines(), start=1):
        rule = _parse_rule(path, number, raw)
        if rule is not None:
            rules.append(rule)
    return _RuleSet(tuple(rules), hashlib.sha256(content).hexdigest(), identity)


class PatternEngine:
    """Byte patterns from a rules file (format in the module docstring); build it with :meth:`from_rules_file`."""

    name = "pattern"
    DEFAULT_RULES: ClassVar[Path] = Path(__file__).with_name("default.rules")

    def __init__(self, path: Path, rule_set: _RuleSet) -> None:
        self._path = path
        self._rule_set = rule_set
        self._reload_lock = threading.Lock()

    @classmethod
    def from_rules_file(cls, path: str | os.PathLike[str]) -> PatternEngine:
        """An engine with the rules of ``path``; :class:`EngineError` naming the file and line if one is malformed."""
        path = Path(path)
        return cls(path, _load_rules(path))

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules loaded now (without checking the file for changes)."""
        return self._rule_set.rules

    def _current(self) -> _RuleSet:
        """The rules of the file as it is now, reloaded if it changed since they were loaded."""
        try:
            identity = _identity(os.stat(self._path))
        except OSError as e:
            raise EngineError(f"pattern engine: cannot read rules file {self._path}: {e.strerror}") from None
        if identity != self._rule_set.identity:
            with self._reload_lock:
                if identity != self._rule_set.identity:
                    self._rule_set = _load_rules(self._path)
        return self._rule_set

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the rules file's bytes."""
        return self._current().fingerprint

    def scan(self, stream: BinaryIO) -> Verdict:
        rule_set = self._current()
        overlap = rule_set.overlap
        tail = b""
        for chunk in _pieces(stream, READ_SIZE):
            # tail: the stream's last `overlap` bytes before this chunk (fewer at its start). An occurrence starting
            # there lies in the junction; one starting in this chunk, in the chunk (which finds it if it is the first).
            found = rule_set.search(tail + chunk[:overlap]) if tail else None
            if found is None or found[0] >= len(tail):
                found = rule_set.search(chunk)
            if found is not None:
                return Verdict(True, found[1], self.name)
            if overlap:
                tail = chunk[-overlap:] if len(chunk) >= overlap else (tail + chunk)[-overlap:]
        return Verdict(False, engine=self.name)

    def scan_bytes(self, data: bytes) -> Verdict:
        found = self._current().search(data)
        return Verdict(found is not None, found[1] if found else None, self.name)


# -- ClamAV engine ----------------------------------------------------------------------------------------------

_CHUNK_LENGTH = struct.Struct(">I")
_PROBE_SIGNATURE = "Fltfuse-Reload-Probe"


class ClamdEngine:
    """A running clamd, reached over its Unix socket ``socket_path`` (``LocalSocket`` in clamd.conf).

    ``timeout`` bounds each socket operation (connecting, sending a chunk, waiting for the reply), not a whole
    scan. ``database``: clamd's ``DatabaseDirectory``, to reload clamd when it changes (the engine needs write
    access to it, for :data:`PROBE_FILE`); ``reload_timeout``: how long clamd may take to load a changed database.
    """

    name = "clamav"
    PROBE_FILE: ClassVar[str] = "fltfuse-reload-probe.ndb"

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        database: str | os.PathLike[str] | None = None,
        reload_timeout: float = 120.0,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self.database = None if database is None else Path(database)
        self.reload_timeout = reload_timeout
        self._loaded_digest: str | None = None
        self._reload_lock = threading.Lock()

    def _error(self, why: str) -> EngineError:
        return EngineError(f"clamd at {self.socket_path}: {why}")

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except TimeoutError:
            sock.close()
            raise self._error(f"no connection within {self.timeout:g} s") from None
        except OSError as e:
            sock.close()
            raise self._error(f"cannot connect: {e.strerror or e}") from None
        return sock

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data, socket.MSG_NOSIGNAL)
        except TimeoutError:
            raise self._error(f"clamd took no data for {self.timeout:g} s") from None
        except OSError as e:
            # clamd stops reading when it refuses a stream (size limit); its reason is then waiting to be read.
            try:
                sock.settimeout(min(self.timeout, 1.0))
                reply = self._reply(sock)
            except EngineError:
                raise self._error(f"connection lost while sending: {e.strerror or e}") from None
            raise self._error(self._explain(reply)) from None

    def _reply(self, sock: socket.socket) -> str:
        """clamd's NUL-terminated reply, without the NUL."""
        reply = b""
        while not reply.endswith(b"\0"):
            try:
                data = sock.recv(4096)
            except TimeoutError:
                raise self._error(f"no reply within {self.timeout:g} s") from None
            except OSError as e:
                raise self._error(f"connection lost waiting for the reply: {e.strerror or e}") from None
            if not data:
                raise self._error("connection closed without a reply (clamd stopped?)")
            reply += data
            if len(reply) > _MAX_REPLY:
                raise self._error(f"reply longer than {_MAX_REPLY} bytes")
        return reply[:-1].decode("utf-8", "replace")

    @staticmethod
    def _explain(reply: str) -> str:
        if "size limit" in reply:
            return f"refused the stream: {reply!r} (longer than clamd's StreamMaxLength)"
        return f"replied {reply!r}"

    def command(self, command: str) -> str:
        """Send one ``z``-command (``PING``, ``VERSION``, ``RELOAD``...) and return clamd's reply."""
        with self._connect() as sock:
            self._send(sock, b"z" + command.encode("ascii") + b"\0")
            return self._reply(sock)

    def scan(self, stream: BinaryIO) -> Verdict:
        with self._connect() as sock:
            self._send(sock, b"zINSTREAM\0")
            for chunk in _pieces(stream, INSTREAM_CHUNK):
                self._send(sock, _CHUNK_LENGTH.pack(len(chunk)) + chunk)
            self._send(sock, _CHUNK_LENGTH.pack(0))
            reply = self._reply(sock)
        if reply == "stream: OK":
            return Verdict(False, engine=self.name)
        if reply.startswith("stream: ") and reply.endswith(" FOUND"):
            return Verdict(True, reply[len("stream: ") : -len(" FOUND")], self.name)
        raise self._error(self._explain(reply))

    def scan_bytes(self, data: bytes) -> Verdict:
        return self.scan(io.BytesIO(data))

    def fingerprint(self) -> str:
        """``VERSION`` reply, and ``" db:"`` + the digest of ``database`` as clamd has loaded it."""
        version = self.command("VERSION")
        if self.database is None:
            return version
        return f"{version} db:{self._confirmed_digest()}"

    def _database_digest(self) -> str:
        """SHA-256 of the names, sizes and modification times of the database files (without the probe)."""
        digest = hashlib.sha256()
        try:
            entries = sorted(os.scandir(self.database), key=lambda entry: entry.name)
            for entry in entries:
                if entry.name != self.PROBE_FILE and entry.is_file():
                    st = entry.stat()
                    digest.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError as e:
            raise self._error(f"cannot read database directory {self.database}: {e.strerror or e}") from None
        return digest.hexdigest()

    def _confirmed_digest(self) -> str:
        """The digest of the database clamd scans with, after having clamd reload it if it changed."""
        digest = self._database_digest()
        loaded = self._loaded_digest
        if digest == loaded:
            return digest
        # Until a first reload is confirmed every caller waits; afterwards, while one caller reloads, the
        # others go on with the database clamd still scans with.
        if not self._reload_lock.acquire(blocking=loaded is None):
            assert loaded is not None
            return loaded
        try:
            digest = self._database_digest()
            if digest != self._loaded_digest:
                self._reload()
                self._loaded_digest = digest
            return digest
        finally:
            self._reload_lock.release()

    def _reload(self) -> None:
        """Have clamd reload its database and return once it scans with it (detects a fresh probe)."""
        assert self.database is not None
        probe = f"fltfuse-reload-probe-{secrets.token_hex(16)}".encode()
        try:
            with tempfile.NamedTemporaryFile(
                "w", dir=self.database, prefix=".fltfuse-probe-", suffix=".tmp", delete=False
            ) as f:
                f.write(f"{_PROBE_SIGNATURE}:0:*:{probe.hex()}\n")
            os.chmod(f.name, 0o644)
            os.replace(f.name, self.database / self.PROBE_FILE)
        except OSError as e:
            raise self._error(f"cannot write the reload probe into {self.database}: {e.strerror or e}") from None
        reply = self.command("RELOAD")
        if reply != "RELOADING":
            raise self._error(f"RELOAD {self._explain(reply)}")
        deadline = time.monotonic() + self.reload_timeout
        while not self.scan_bytes(probe).infected:
            if time.monotonic() > deadline:
                raise self._error(
                    f"still scanning with its previous database {self.reload_timeout:g} s after RELOAD "
                    "(a malformed database file? clamd's log says)"
                )
            time.sleep(0.01)
