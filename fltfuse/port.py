"""Communication ports, the user-mode side: what FltUser.h (fltlib) is on Windows.

A service connects to a port a filter created and then, from as many threads
(or trio tasks) as it likes:

* ``send_message(data)`` sends to the filter's message callback and returns
  its answer (FilterSendMessage);
* ``get_message()`` waits for a message the filter sent with
  ``send_message`` (FilterGetMessage); a message that wants an answer has a
  ``reply_capacity``, and ``reply_message(message.message_id, data)``
  answers it (FilterReplyMessage). Several getters each get a different
  message.

Two flavours with the same methods: :func:`connect_communication_port`
returns a :class:`FilterPort` for threads (a reader thread demultiplexes the
connection), and :func:`open_filter_port` is an async context manager giving
an :class:`AsyncFilterPort` for trio. Failures raise the
:class:`~fltfuse._port.wire.PortError` family: :class:`PortNotFoundError`,
:class:`PortRefusedError` (the filter, the connection limit or the port's
security said no; ``status`` says which), :class:`PortDisconnectedError` (the
daemon closed the connection, unloaded the filter or died: every waiting call
gets it), :class:`PortTimeoutError`, :class:`PortBufferOverflowError`.

Naming a port: ``"ScannerPort"`` finds the one port of that name among the
volumes mounted on this machine (an error names them if there are several);
``volume=MOUNTPOINT`` picks a volume; a name containing ``/`` is the socket's
path (``InProcessVolume.port_path(name)``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ._port.wire import (
    ANCILLARY_SIZE,
    FROM_DAEMON,
    MAX_PAYLOAD,
    NO_REPLY,
    RECEIVE_SIZE,
    Decoder,
    Frame,
    FrameKind,
    PortBufferOverflowError,
    PortDisconnectedError,
    PortError,
    PortNotFoundError,
    PortProtocolError,
    PortRefusedError,
    PortTimeoutError,
    check_reply_capacity,
    encode,
    port_name,
)
from ._volume import state_root, volume_id

__all__ = [
    "AsyncFilterPort",
    "FilterPort",
    "PortBufferOverflowError",
    "PortDisconnectedError",
    "PortError",
    "PortMessage",
    "PortNotFoundError",
    "PortProtocolError",
    "PortRefusedError",
    "PortTimeoutError",
    "connect_communication_port",
    "find_port",
    "find_ports",
    "open_filter_port",
]

DEFAULT_REPLY_CAPACITY = 64 * 1024
MAX_WAITING_MESSAGES = 1024
"""Messages from the filter no get_message has taken yet that a port holds; one more disconnects it with
PortProtocolError (a service that stopped getting), so that a client's memory is bounded."""
_SUCCESS = 0


@dataclass
class PortMessage:
    """A message from the filter (FILTER_MESSAGE_HEADER plus its body).

    ``reply_capacity`` is None when the filter wants no reply. ``fds`` are
    descriptors the filter sent with it (a file to scan): they are the
    receiver's, to close (``close()`` closes them all).
    """

    message_id: int
    data: bytes
    reply_capacity: int | None
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def _roots() -> list[Path]:
    roots = [state_root()]
    if Path("/run/fltfuse") not in roots:
        roots.append(Path("/run/fltfuse"))  # a root daemon's ports, for unprivileged services
    return roots


def find_port(name: str, volume: str | os.PathLike[str] | None = None) -> Path:
    """The socket path of port ``name`` (see the module docstring for how names resolve)."""
    if "/" in name:
        return Path(name)
    bare = port_name(name)
    if volume is not None:
        candidates = [root / f"{volume_id(os.fspath(volume))}.ports" / bare for root in _roots()]
        found = [c for c in candidates if c.is_socket()]
        if not found:
            raise PortNotFoundError(f"no port {bare} on the volume mounted at {volume}")
        return found[0]
    found = find_ports(bare)
    if not found:
        raise PortNotFoundError(f"no port {bare}: no mounted volume has a filter listening on it")
    if len(found) > 1:
        volumes = ", ".join(p.parent.name.removesuffix(".ports") for p in found)
        raise PortError(f"port {bare} exists on several volumes ({volumes}): name one with volume=", 0xC0000035)
    return found[0]


def find_ports(name: str) -> list[Path]:
    """The sockets of every port called ``name`` on the volumes mounted here (a service serving them all)."""
    bare = port_name(name)
    return sorted({p for root in _roots() if root.is_dir() for p in root.glob(f"*.ports/{bare}") if p.is_socket()})


def _connect_failed(path: Path, exc: OSError) -> PortError:
    if isinstance(exc, PermissionError):
        return PortRefusedError(f"{path}: access denied", 0xC0000022)
    if isinstance(exc, FileNotFoundError):
        return PortNotFoundError(f"no port at {path}")
    return PortNotFoundError(f"no daemon listens on {path}: {exc}")


def _refusal(frame: Frame, path: Path) -> PortError | None:
    if frame.kind is not FrameKind.CONNECTED:
        return PortProtocolError(f"{path}: the daemon answered CONNECT with {frame.kind.name}")
    if frame.aux != _SUCCESS:
        why = frame.payload.decode(errors="replace") or "refused"
        return PortRefusedError(f"{path}: connection refused: {why}", frame.aux)
    return None


@contextmanager
def _reading(path: Path, sock: Any, fail: Callable[[PortError], None]) -> Iterator[None]:
    """Around a reader loop: however it ends, ``fail`` gets the error every waiting call will raise, and
    ``sock`` is shut down, so that the daemon disconnects this client at once (its disconnect callback runs)."""
    error: PortError = PortDisconnectedError(f"port {path.name}: the daemon closed the connection")
    try:
        yield
    except PortError as exc:
        error = exc
    except OSError as exc:
        error = PortDisconnectedError(f"port {path.name}: {exc}")
    finally:
        fail(error)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _too_many(path: Path, message: PortMessage) -> PortProtocolError:
    message.close()
    return PortProtocolError(
        f"port {path.name}: more than {MAX_WAITING_MESSAGES} messages waiting for get_message: disconnected"
    )


def _check_capacity(frame: Frame, capacity: int) -> bytes:
    if frame.aux == PortBufferOverflowError.status:  # the daemon's verdict on an answer longer than the capacity
        raise PortBufferOverflowError(f"the filter's answer is longer than the capacity of {capacity} bytes")
    if frame.aux != _SUCCESS:
        raise PortError(f"the filter answered with status 0x{frame.aux:08X}", frame.aux)
    if len(frame.payload) > capacity:
        raise PortBufferOverflowError(f"an answer of {len(frame.payload)} bytes for a capacity of {capacity}")
    return frame.payload


def _reply_frame(message_id: int, data: bytes, status: int) -> Frame:
    if len(data) > MAX_PAYLOAD:
        raise PortError(f"a reply is at most {MAX_PAYLOAD} bytes", 0xC000000D)
    return Frame(FrameKind.REPLY, message_id, status, bytes(data))


# -- threads ------------------------------------------------------------------------------------


def connect_communication_port(
    name: str, context: bytes = b"", *, volume: str | os.PathLike[str] | None = None, timeout: float = 10.0
) -> FilterPort:
    """FilterConnectCommunicationPort: connect, handing the filter ``context``; a port for threads."""
    path = find_port(name, volume)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise _connect_failed(path, exc) from exc
        sock.sendall(encode(Frame(FrameKind.CONNECT, payload=bytes(context))))
        decoder = Decoder(FROM_DAEMON)
        frames: list[Frame] = []
        while not frames:  # recvmsg: a message the filter sends at once may come along, with its descriptors
            try:
                received = decoder.received(*sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)[:3])
            except TimeoutError as exc:
                raise PortTimeoutError(f"{path}: no answer to CONNECT within {timeout} s") from exc
            if received is None:
                raise PortRefusedError(f"{path}: the daemon closed the connection")
            frames = received
        error = _refusal(frames[0], path)
        if error is not None:
            raise error
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return FilterPort(sock, path, decoder, frames[1:])


class _Connection:
    """What both flavours of client port keep: the socket's path and, once it ended, why."""

    path: Path
    _error: PortError | None = None

    @property
    def connected(self) -> bool:
        return self._error is None

    def _raise_if_closed(self) -> None:
        if self._error is not None:
            raise type(self._error)(str(self._error), self._error.status)


class FilterPort(_Connection):
    """A connection to a filter's port, safe to use from many threads at once. Made by connect_communication_port."""

    def __init__(self, sock: socket.socket, path: Path, decoder: Decoder, early: list[Frame]):
        self.path = path
        self._sock = sock
        self._decoder = decoder
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._ids = itertools.count(1)
        self._answers: dict[int, Frame | None] = {}  # request id -> answer (None: still waiting)
        self._messages: deque[PortMessage] = deque()
        self._reader = threading.Thread(target=self._read, name=f"port {path.name} reader", daemon=True)
        for frame in early:
            self._dispatch(frame)
        self._reader.start()

    def __enter__(self) -> FilterPort:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send_message(
        self, data: bytes, *, reply_capacity: int = DEFAULT_REPLY_CAPACITY, timeout: float | None = None
    ) -> bytes:
        """FilterSendMessage: the filter's answer (at most ``reply_capacity`` bytes)."""
        check_reply_capacity(reply_capacity)
        request_id = next(self._ids)
        with self._state:
            self._raise_if_closed()
            self._answers[request_id] = None
        try:
            self._write(Frame(FrameKind.REQUEST, request_id, reply_capacity, bytes(data)))
            with self._state:
                if not self._state.wait_for(lambda: self._answers[request_id] is not None or self._error, timeout):
                    raise PortTimeoutError(f"port {self.path.name}: no answer within {timeout} s")
                answer = self._answers[request_id]
                if answer is None:
                    self._raise_if_closed()
        finally:
            with self._state:
                self._answers.pop(request_id, None)
        assert answer is not None
        return _check_capacity(answer, reply_capacity)

    def get_message(self, timeout: float | None = None) -> PortMessage:
        """FilterGetMessage: the next message from the filter (each goes to exactly one getter)."""
        with self._state:
            if not self._state.wait_for(lambda: self._messages or self._error, timeout):
                raise PortTimeoutError(f"port {self.path.name}: no message within {timeout} s")
            if not self._messages:
                self._raise_if_closed()
            return self._messages.popleft()

    def reply_message(self, message_id: int, data: bytes = b"", status: int = _SUCCESS) -> None:
        """FilterReplyMessage: answer message ``message_id``; a reply to a message the filter
        no longer waits for (it timed out) is dropped by the daemon."""
        self._write(_reply_frame(message_id, data, status))

    def close(self) -> None:
        """Disconnect (the filter's disconnect callback runs); waiting calls get PortDisconnectedError."""
        self._fail(PortDisconnectedError(f"port {self.path.name}: closed"))  # before the reader sees the end
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader.is_alive() and self._reader is not threading.current_thread():
            self._reader.join()
        self._sock.close()

    # -- the reader thread --------------------------------------------------------------------------

    def _write(self, frame: Frame) -> None:
        self._raise_if_closed()
        try:
            with self._send_lock:
                self._sock.sendall(encode(frame))
        except OSError as exc:
            raise PortDisconnectedError(f"port {self.path.name}: {exc}") from exc

    def _read(self) -> None:
        try:
            with _reading(self.path, self._sock, self._fail):
                while (
                    frames := self._decoder.received(*self._sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)[:3])
                ) is not None:
                    for frame in frames:
                        self._dispatch(frame)
        finally:
            self._decoder.close()

    def _dispatch(self, frame: Frame) -> None:
        with self._state:
            if frame.kind is FrameKind.RESPONSE:
                if frame.message_id in self._answers:
                    self._answers[frame.message_id] = frame
            elif frame.kind is FrameKind.MESSAGE:
                capacity = None if frame.aux == NO_REPLY else frame.aux
                message = PortMessage(frame.message_id, frame.payload, capacity, list(frame.fds))
                if len(self._messages) >= MAX_WAITING_MESSAGES:
                    raise _too_many(self.path, message)
                self._messages.append(message)
            else:
                raise PortProtocolError(f"a {frame.kind.name} frame after the connection was made")
            self._state.notify_all()

    def _fail(self, error: PortError) -> None:
        with self._state:
            if self._error is None:
                self._error = error
            for message in self._messages:
                message.close()
            self._messages.clear()
            self._state.notify_all()


# -- trio ---------------------------------------------------------------------------------------


@asynccontextmanager
async def open_filter_port(
    name: str, context: bytes = b"", *, volume: str | os.PathLike[str] | None = None, timeout: float = 10.0
) -> AsyncIterator[AsyncFilterPort]:
    """FilterConnectCommunicationPort for trio: ``async with open_filter_port("X") as port: ...``."""
    path = find_port(name, volume)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        decoder = Decoder(FROM_DAEMON)
        with trio.move_on_after(timeout) as scope:
            try:
                await sock.connect(str(path))
            except OSError as exc:
                raise _connect_failed(path, exc) from exc
            await sock.send(encode(Frame(FrameKind.CONNECT, payload=bytes(context))))
            frames: list[Frame] = []
            while not frames:  # recvmsg: a message the filter sends at once may come along, with its descriptors
                received = decoder.received(*(await sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE))[:3])
                if received is None:
                    raise PortRefusedError(f"{path}: the daemon closed the connection")
                frames = received
        if scope.cancelled_caught:
            raise PortTimeoutError(f"{path}: no answer to CONNECT within {timeout} s")
        error = _refusal(frames[0], path)
        if error is not None:
            raise error
        port = AsyncFilterPort(sock, path, decoder)
        for frame in frames[1:]:
            port._dispatch(frame)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(port._read)
                try:
                    yield port
                finally:
                    port._fail(PortDisconnectedError(f"port {path.name}: closed"))  # before the reader ends
                    nursery.cancel_scope.cancel()
        finally:
            decoder.close()


class AsyncFilterPort(_Connection):
    """A connection to a filter's port for trio tasks (any number at once). Made by open_filter_port."""

    def __init__(self, sock: trio.socket.SocketType, path: Path, decoder: Decoder):
        self.path = path
        self._sock = sock
        self._decoder = decoder
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._answers: dict[int, tuple[trio.Event, list[Frame]]] = {}
        self._incoming, self._messages = trio.open_memory_channel[PortMessage](MAX_WAITING_MESSAGES)

    async def send_message(self, data: bytes, *, reply_capacity: int = DEFAULT_REPLY_CAPACITY) -> bytes:
        """FilterSendMessage (bound it with trio's cancel scopes, e.g. ``trio.fail_after``)."""
        check_reply_capacity(reply_capacity)
        self._raise_if_closed()
        request_id = next(self._ids)
        done, slot = self._answers[request_id] = (trio.Event(), [])
        try:
            await self._write(Frame(FrameKind.REQUEST, request_id, reply_capacity, bytes(data)))
            await done.wait()
        finally:
            self._answers.pop(request_id, None)
        if not slot:
            self._raise_if_closed()
        return _check_capacity(slot[0], reply_capacity)

    async def get_message(self) -> PortMessage:
        """FilterGetMessage: the next message from the filter."""
        try:
            return await self._messages.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._raise_if_closed()
            raise

    async def reply_message(self, message_id: int, data: bytes = b"", status: int = _SUCCESS) -> None:
        """FilterReplyMessage."""
        await self._write(_reply_frame(message_id, data, status))

    async def _write(self, frame: Frame) -> None:
        """Write one frame. A write cut short (a cancelled send of a large message) leaves the stream
        mid-frame: the port is disconnected then, so that no later frame is read as the rest of it."""
        self._raise_if_closed()
        data = memoryview(encode(frame))
        async with self._send_lock:
            self._raise_if_closed()
            sent = 0
            try:
                while sent < len(data):
                    sent += await self._sock.send(data[sent:])
            except BaseException as exc:
                if 0 < sent < len(data):
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)
                    self._fail(PortDisconnectedError(f"port {self.path.name}: a message was cut short, disconnected"))
                if isinstance(exc, (OSError, trio.ClosedResourceError)):
                    raise PortDisconnectedError(f"port {self.path.name}: {exc}") from exc
                raise

    async def _read(self) -> None:
        with _reading(self.path, self._sock, self._fail):
            while True:
                frames = self._decoder.received(*(await self._sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE))[:3])
                if frames is None:
                    break
                for frame in frames:
                    self._dispatch(frame)

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind is FrameKind.RESPONSE:
            waiting = self._answers.get(frame.message_id)
            if waiting is not None:
                waiting[1].append(frame)
                waiting[0].set()
        elif frame.kind is FrameKind.MESSAGE:
            capacity = None if frame.aux == NO_REPLY else frame.aux
            message = PortMessage(frame.message_id, frame.payload, capacity, list(frame.fds))
            try:
                self._incoming.send_nowait(message)
            except trio.WouldBlock:
                raise _too_many(self.path, message) from None
        else:
            raise PortProtocolError(f"a {frame.kind.name} frame after the connection was made")

    def _fail(self, error: PortError) -> None:
        if self._error is None:
            self._error = error
        for event, _ in self._answers.values():
            event.set()
        self._incoming.close()
        while True:  # messages no one got are dropped, as the thread flavour does: calls from now on raise
            try:
                self._messages.receive_nowait().close()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
