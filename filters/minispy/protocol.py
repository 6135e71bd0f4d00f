"""MiniSpyPort's messages: what the ``minispy`` command and the minispy filter say to each other.

Version 1. The command sends FilterSendMessage requests on the port
``MiniSpyPort``; the filter's message callback answers each. Every request
and every answer is one UTF-8 JSON object with ``"v": 1``:

* ``{"v": 1, "op": "GET_LOG", "wait_ms": N}`` (GetMiniSpyLog): the oldest
  log entries, as many as fit in the request's reply capacity, taken out of
  the filter's buffer. When the buffer is empty the filter waits up to ``N``
  milliseconds (at most :data:`MAX_WAIT_MS`; 0: answer at once) for the next
  entry, so a reader streams without polling. Answer: ``{"v": 1, "more":
  BOOL, "entries": [ENTRY, ...]}``; ``more`` says entries are left for the
  next request.
* ``{"v": 1, "op": "GET_STATS"}``: answer ``{"v": 1, "stats": {"logged",
  "dropped", "buffered", "capacity", "sequence"}}``: records put in the
  buffer since the filter loaded, records dropped because it was full,
  records in it now, its capacity (MaxRecords), and the last sequence number
  given.
* A request the filter cannot serve (bad JSON, another version, an unknown
  op, a reply capacity too small for one entry) is answered
  ``{"v": 1, "error": MESSAGE}``.

An ENTRY is a record or a drop notice (Windows' minispy marks a record
"out of memory" instead):

* ``{"type": "record", "seq", "instance", "altitude", "major", "minor",
  "name", "inode", "pid", "tid", "process", "status", "errno",
  "information", "pre_time", "post_time", "flags", "record_flags",
  "arguments"}``. ``seq`` is given in the pre-operation, once per instance
  that saw the request, so with several minispy instances the pre order is
  the ``seq`` order; entries are logged at the post-operation, so the post
  order is the log order (and ``post_time`` order). ``name`` is the
  normalized name, or null when none could be had (then ``inode`` is the
  only clue). ``status`` is the NTSTATUS name and ``errno`` the errno name
  (null for success) the caller got; both are null for a record logged
  without its post (``record_flags`` has ``"DRAINING"``: the instance was
  detached while the request was below it). ``pre_time`` and ``post_time``
  are nanoseconds since the epoch (monotonic within one filter load).
  ``flags`` are the callback data's flags in the pre-operation
  (``IRP_OPERATION``, ``GENERATED_IO`` ...); ``arguments`` the request's
  parameters worth showing (offset and length of a READ, disposition and
  open flags of a CREATE, the destination of a rename ...).
* ``{"type": "dropped", "count": N, "time": NS}``: N records were dropped
  because the buffer was full; it comes where they would have been.
"""

from __future__ import annotations

import json
from typing import Any

VERSION = 1
PORT_NAME = "MiniSpyPort"
MAX_WAIT_MS = 60_000
REPLY_CAPACITY = 1024 * 1024  # what the minispy command offers for each GET_LOG answer

GET_LOG = "GET_LOG"
GET_STATS = "GET_STATS"
OPS = frozenset({GET_LOG, GET_STATS})

# The filter's instances (its INF's), by the short names the command accepts and shows.
INSTANCES = {
    "top": "Minispy - Top Instance",
    "middle": "Minispy - Middle Instance",
    "bottom": "Minispy - Bottom Instance",
}

_ANSWER_HEAD = b'{"v":1,"more":%s,"entries":['
_ANSWER_TAIL = b"]}"
ANSWER_OVERHEAD = len(_ANSWER_HEAD % b"false") + len(_ANSWER_TAIL)  # an answer's bytes besides its entries


class ProtocolError(ValueError):
    """A message that is not a minispy message of this version, or an answer that reports an error."""


def encode(message: dict[str, Any]) -> bytes:
    """A request or an answer: ``message`` with the version, as compact JSON."""
    return json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A request or an answer as a dict; ProtocolError if it is not one of this version, or reports an error."""
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message is a JSON object")
    if message.get("v") != VERSION:
        raise ProtocolError(f"protocol version {message.get('v')!r} (this side speaks {VERSION})")
    if "error" in message:
        raise ProtocolError(str(message["error"]))
    return message


def get_log(wait_ms: int) -> bytes:
    return encode({"op": GET_LOG, "wait_ms": wait_ms})


def get_stats() -> bytes:
    return encode({"op": GET_STATS})


def entry(fields: dict[str, Any]) -> bytes:
    """One log entry as it travels (the filter encodes each once, when it logs it)."""
    return json.dumps(fields, separators=(",", ":")).encode()


def log_answer(entries: list[bytes], more: bool) -> bytes:
    """A GET_LOG answer from encoded entries: ``ANSWER_OVERHEAD`` bytes plus the entries and a comma between each."""
    return _ANSWER_HEAD % (b"true" if more else b"false") + b",".join(entries) + _ANSWER_TAIL


def short_instance(name: str) -> str:
    """ "Minispy - Top Instance" -> "Top"; any other instance name as it is."""
    for short, full in INSTANCES.items():
        if name.casefold() == full.casefold():
            return short.capitalize()
    return name


def instance_name(text: str) -> str:
    """The full instance name for "top", "Middle" ... ; any other text as it is (an instance by its full name)."""
    return INSTANCES.get(text.casefold(), text)
