"""The scanner's port messages, shared by the filter and the fltfuse-scanner service.

Every message is one JSON object (UTF-8), then, for a buffer scan, the bytes
to scan: ``<u32 big-endian length of the JSON><JSON><body>``. Typed fields,
no struct padding, a version in each message.

The filter sends (FltSendMessage), on port ``ScannerPort``:

* ``{"v": 1, "op": "scan", "kind": "file", "name", "size", "pid", "reason"}``
  with one descriptor: a pipe the filter fills with the file's data as the
  file system below the scanner has it, closing it at the end. The service
  reads it to its end. ``reason`` is ``"open"``, ``"close"`` (a rescan
  after writes, at a CLEANUP) or ``"release"`` (a rescan at the handle's
  CLOSE, of writes that came after its last CLEANUP).
* ``{"v": 1, "op": "scan", "kind": "buffer", "name", "offset", "pid",
  "reason": "write"}`` with the write's data as the body.

The service replies ``{"v": 1, "verdict": "clean" | "infected" | "error",
"signature", "engine", "fingerprint", "error"}``; ``fingerprint`` names the
signature database the verdict was judged with (taken before the scan: never
newer than that database).

The service sends (FilterSendMessage) ``{"v": 1, "op": "database",
"fingerprint"}`` when its database changes; the filter answers ``{"v": 1,
"ok": true}``. Its connection context is ``{"v": 1, "service": NAME,
"fingerprint"}``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

VERSION = 1
PORT_NAME = "ScannerPort"
REPLY_CAPACITY = 4096
_LENGTH = struct.Struct("!I")


class ProtocolError(ValueError):
    """A message that is not a scanner message of this version."""


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    text = json.dumps({"v": VERSION, **header}, separators=(",", ":")).encode()
    return _LENGTH.pack(len(text)) + text + body


def decode(message: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, body) of a message; raises ProtocolError for anything else."""
    if len(message) < _LENGTH.size:
        raise ProtocolError("a message shorter than its length field")
    (length,) = _LENGTH.unpack_from(message)
    if _LENGTH.size + length > len(message):
        raise ProtocolError(f"a header of {length} bytes in a message of {len(message)}")
    try:
        header = json.loads(message[_LENGTH.size : _LENGTH.size + length])
    except ValueError as exc:
        raise ProtocolError(f"the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the header is not a JSON object")
    if header.get("v") != VERSION:
        raise ProtocolError(f"version {header.get('v')!r} (this side speaks {VERSION})")
    return header, message[_LENGTH.size + length :]


@dataclass(frozen=True)
class ScanResult:
    """A service's verdict as the filter sees it."""

    verdict: str  # "clean", "infected" or "error"
    signature: str | None = None
    engine: str = ""
    fingerprint: str = ""
    error: str = ""

    @classmethod
    def from_reply(cls, reply: bytes) -> ScanResult:
        header, _ = decode(reply)
        verdict = header.get("verdict")
        if verdict not in ("clean", "infected", "error"):
            raise ProtocolError(f"verdict {verdict!r}")
        return cls(
            verdict,
            header.get("signature"),
            str(header.get("engine", "")),
            str(header.get("fingerprint", "")),
            str(header.get("error", "")),
        )

    def encode(self) -> bytes:
        return encode(
            {
                "verdict": self.verdict,
                "signature": self.signature,
                "engine": self.engine,
                "fingerprint": self.fingerprint,
                "error": self.error,
            }
        )
