"""The communication-port wire format, version 1, and the errors both ends share.

A port is a Unix stream socket. Each side writes frames; a frame is a
24-byte header and a payload::

    offset size  field
    0      2     magic      b"FP"
    2      1     version    1
    3      1     kind       a FrameKind
    4      1     nfds       descriptors sent with this frame (SCM_RIGHTS, MESSAGE only)
    5      3     reserved   zero
    8      4     length     payload bytes, at most MAX_PAYLOAD
    12     4     aux        REQUEST, MESSAGE: the reply capacity (NO_REPLY: none wanted);
                            CONNECTED, RESPONSE, REPLY: an NTSTATUS value
    16     8     message_id REQUEST/RESPONSE: chosen by the client; MESSAGE/REPLY: by the filter

All integers are big-endian. The exchange:

* the client's first frame is CONNECT (payload: its connection context, at
  most MAX_CONTEXT bytes); the daemon answers CONNECTED with aux = SUCCESS,
  or with a failure status and a UTF-8 reason, and then closes the socket;
* REQUEST -> RESPONSE is FilterSendMessage: the filter's message callback
  answers at most ``aux`` bytes; RESPONSE's aux is its status;
* MESSAGE -> REPLY is FltSendMessage: the client answers with FilterReplyMessage,
  echoing the message id; a MESSAGE with aux = NO_REPLY wants no answer.
  A MESSAGE may carry up to MAX_FDS descriptors (a file for a scanner to read);
  the descriptors travel with the frame's first byte.

A frame with a bad magic, an unknown version or kind, a kind that side may not
send, an oversized length, descriptors where none belong, or one cut short by
the end of the stream is a protocol violation: the daemon disconnects that
client and logs why, the client library raises :class:`PortProtocolError`.

Windows counterpart: FILTER_MESSAGE_HEADER (ReplyLength, MessageId) and
FILTER_REPLY_HEADER (Status, MessageId) in fltUserStructures.h.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import re
import socket
import struct
from dataclasses import dataclass

from .._status import errno_from_status

MAGIC = b"FP"
VERSION = 1
HEADER = struct.Struct("!2sBBB3xIIQ")
MAX_PAYLOAD = 4 * 1024 * 1024
MAX_CONTEXT = 0xFFFF  # wSizeOfContext is a WORD
MAX_FDS = 4
NO_REPLY = 0xFFFFFFFF
RECEIVE_SIZE = 256 * 1024  # bytes asked of each recvmsg, and the room for descriptors beside them
ANCILLARY_SIZE = socket.CMSG_SPACE(16 * array.array("i").itemsize)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class FrameKind(enum.IntEnum):
    CONNECT = 1  # client -> daemon
    CONNECTED = 2  # daemon -> client
    REQUEST = 3  # client -> daemon (FilterSendMessage)
    RESPONSE = 4  # daemon -> client
    MESSAGE = 5  # daemon -> client (FltSendMessage)
    REPLY = 6  # client -> daemon (FilterReplyMessage)


FROM_CLIENT = frozenset({FrameKind.CONNECT, FrameKind.REQUEST, FrameKind.REPLY})
FROM_DAEMON = frozenset({FrameKind.CONNECTED, FrameKind.RESPONSE, FrameKind.MESSAGE})


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    message_id: int = 0
    aux: int = 0
    payload: bytes = b""
    fds: tuple[int, ...] = ()


# -- errors (both ends) ----------------------------------------------------------------------


class PortError(OSError):
    """A port operation failed; ``status`` is the NTSTATUS value that says why, ``errno`` its errno
    (EACCES for ACCESS_DENIED, ECONNREFUSED, ECONNRESET for PORT_DISCONNECTED, ETIMEDOUT, ...)."""

    status: int = 0xC0000001  # UNSUCCESSFUL
    own_errno: int | None = None  # the errno when the status's own would mislead

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.errno = self.own_errno or errno_from_status(self.status) or None


class PortDisconnectedError(PortError, ConnectionResetError):
    """The other end went away (STATUS_PORT_DISCONNECTED): pending sends and gets fail with it."""

    status = 0xC0000037


class PortTimeoutError(PortError, TimeoutError):
    """No reply (or no delivery) within the timeout. Never a reply: there is nothing to read."""

    status = 0x00000102  # STATUS_TIMEOUT, a *success* code on Windows; here it cannot be mistaken for one
    own_errno = errno.ETIMEDOUT


class PortDeadlockError(PortError):
    """A send refused because its reply could wait on the request it is made for (STATUS_POSSIBLE_DEADLOCK,
    EDEADLK): the client's process is the one the request came from, or is itself waiting on that process."""

    status = 0xC0000194


class PortRefusedError(PortError, ConnectionRefusedError):
    """The connection was refused: the filter's connect callback said no, or too many clients, or access."""

    status = 0xC0000236


class PortNotFoundError(PortError, FileNotFoundError):
    """No port of that name (OBJECT_NAME_NOT_FOUND)."""

    status = 0xC0000034


class PortBufferOverflowError(PortError):
    """A reply longer than the capacity the sender gave (STATUS_BUFFER_OVERFLOW)."""

    status = 0x80000005
    own_errno = errno.EMSGSIZE


class PortProtocolError(PortError):
    """The peer broke the wire format; the connection is closed."""

    status = 0xC000000D  # INVALID_PARAMETER


# -- frames ---------------------------------------------------------------------------------------


def encode(frame: Frame) -> bytes:
    """The bytes of ``frame`` (its descriptors go beside them, with ``sendmsg``)."""
    if len(frame.payload) > MAX_PAYLOAD:
        raise PortError(f"a port message is at most {MAX_PAYLOAD} bytes, not {len(frame.payload)}", 0xC000000D)
    if len(frame.fds) > MAX_FDS:
        raise PortError(f"a port message carries at most {MAX_FDS} descriptors", 0xC000000D)
    header = HEADER.pack(MAGIC, VERSION, frame.kind, len(frame.fds), len(frame.payload), frame.aux, frame.message_id)
    return header + frame.payload


class Decoder:
    """Frames from a byte stream (sans I/O): ``feed`` bytes and descriptors as they arrive, then ``frames``.

    ``accepted`` is the set of kinds this side may receive. Descriptors are
    matched to frames in arrival order (each is sent with its frame's first
    byte). A violation raises :class:`PortProtocolError`; descriptors this
    decoder holds are closed by :meth:`close`.
    """

    def __init__(self, accepted: frozenset[FrameKind]):
        self.accepted = accepted
        self._buffer = bytearray()
        self._fds: list[int] = []

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Frame]:
        self._fds.extend(fds)
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            magic, version, kind, nfds, length, aux, message_id = HEADER.unpack_from(self._buffer)
            if magic != MAGIC:
                raise PortProtocolError(f"bad magic {bytes(magic)!r}")
            if version != VERSION:
                raise PortProtocolError(f"wire format version {version} (this side speaks {VERSION})")
            try:
                frame_kind = FrameKind(kind)
            except ValueError:
                raise PortProtocolError(f"unknown frame kind {kind}") from None
            if frame_kind not in self.accepted:
                raise PortProtocolError(f"a {frame_kind.name} frame may not be sent to this side")
            if length > MAX_PAYLOAD:
                raise PortProtocolError(f"a frame of {length} bytes (at most {MAX_PAYLOAD})")
            if nfds and (frame_kind is not FrameKind.MESSAGE or nfds > MAX_FDS):
                raise PortProtocolError(f"{nfds} descriptors with a {frame_kind.name} frame")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            if len(self._fds) < nfds:
                got = len(self._fds)
                raise PortProtocolError(f"a {frame_kind.name} frame announced {nfds} descriptors, {got} came")
            taken, self._fds = tuple(self._fds[:nfds]), self._fds[nfds:]
            frames.append(Frame(frame_kind, message_id, aux, bytes(self._buffer[HEADER.size : end]), taken))
            del self._buffer[:end]
        if self._fds and not self._buffer:
            raise PortProtocolError(f"{len(self._fds)} descriptors without a frame")
        return frames

    def received(self, data: bytes, ancillary: list[tuple[int, int, bytes]], msg_flags: int) -> list[Frame] | None:
        """Frames from one ``recvmsg`` result (its SCM_RIGHTS descriptors included); None at the end of the stream."""
        fds: list[int] = []
        for level, kind, fd_bytes in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", fd_bytes[: len(fd_bytes) - len(fd_bytes) % 4]))
        if msg_flags & socket.MSG_CTRUNC or not data:
            for fd in fds:
                os.close(fd)
            if msg_flags & socket.MSG_CTRUNC:
                raise PortProtocolError("more descriptors than a frame may carry")
            self.finish()
            return None
        return self.feed(data, fds)

    def finish(self) -> None:
        """The stream ended: a partial frame left in the buffer is a truncated frame."""
        if self._buffer:
            raise PortProtocolError(f"the stream ended inside a frame ({len(self._buffer)} bytes of it came)")

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


# -- names --------------------------------------------------------------------------------------


def check_reply_capacity(reply_capacity: int) -> None:
    """A reply capacity a frame can carry (NO_REPLY is the aux value for none)."""
    if not 0 <= reply_capacity < NO_REPLY:
        raise PortError(f"reply_capacity {reply_capacity} out of range", 0xC000000D)  # INVALID_PARAMETER


def port_name(name: str) -> str:
    """A port's name without Windows' leading backslash (``"\\\\ScannerPort"`` -> ``"ScannerPort"``), checked."""
    bare = name.lstrip("\\/")
    if not _NAME.fullmatch(bare):
        raise PortError(
            f"bad port name {name!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
            0xC0000033,  # OBJECT_NAME_INVALID
        )
    return bare
