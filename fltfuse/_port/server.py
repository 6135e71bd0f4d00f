"""Communication ports, the filter's side: server ports, client ports, FltSendMessage.

A filter creates a named server port (usually in its ``filter_load``
callback); user-mode processes connect to it with :mod:`fltfuse.port`. Each
connection is a :class:`ClientPort`. The filter talks to a client with
:func:`send_message` (an answer or a distinct error, within a timeout); the
client talks to the filter through the port's message callback.

Callback contracts (``connect_notify`` and ``message_notify`` may be coroutine functions):

* ``connect_notify(client_port, server_cookie, context: bytes)`` returns the
  connection cookie (any value; it is handed to the other two callbacks). To
  refuse the client it raises :class:`PortRefusedError` (the client sees its
  message); any other exception is a filter bug: logged, and the client is
  refused with FLT_INTERNAL_ERROR.
* ``disconnect_notify(connection_cookie)`` (a plain function: it may run
  where nothing can be awaited, at unload) runs once per accepted client: when
  the client closes or dies (within a second: the socket's end is seen at
  once), or when the filter unloads. It is not called for a client the
  filter closes itself with :func:`close_client_port`.
* ``message_notify(connection_cookie, data: bytes, reply_capacity: int)``
  answers a client's message with at most ``reply_capacity`` bytes (None: an
  empty answer). Longer answers reach the client as BUFFER_OVERFLOW. An
  exception is a filter bug: logged, the client gets FLT_INTERNAL_ERROR.
  Messages of one client are handled concurrently (up to
  :data:`MAX_REQUESTS_IN_FLIGHT`; beyond that the client gets
  INSUFFICIENT_RESOURCES), so a callback may wait for the same client's reply
  to a :func:`send_message`. A client that sends without reading the answers
  is no longer read once they fill its socket: its own writes block
  (backpressure), and the daemon holds no more for it than those answers.

Security: a :class:`PortSecurity` stands in for the security descriptor. The
socket file gets its owner, group and mode, and every connecting peer's
credentials (SO_PEERCRED, with its supplementary groups) are checked against
it; root may always connect, as administrators may on Windows.

Windows counterpart: ``FltCreateCommunicationPort``,
``FltCloseCommunicationPort``, ``FltSendMessage``, ``FltCloseClientPort``,
``FltBuildDefaultSecurityDescriptor``.
"""

from __future__ import annotations

import array
import errno
import inspect
import itertools
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._process import groups_of, is_thread_of
from .._status import NtStatus
from .deadlocks import waiting_on
from .wire import (
    ANCILLARY_SIZE,
    FROM_CLIENT,
    MAX_CONTEXT,
    NO_REPLY,
    RECEIVE_SIZE,
    Decoder,
    Frame,
    FrameKind,
    PortBufferOverflowError,
    PortDisconnectedError,
    PortError,
    PortProtocolError,
    PortRefusedError,
    PortTimeoutError,
    check_reply_capacity,
    encode,
    port_name,
)

if TYPE_CHECKING:
    from .._callback_data import Requestor

log = logging.getLogger("fltfuse.port")

DEFAULT_SEND_TIMEOUT = 30.0  # seconds; every send has one unless the caller says math.inf
DEFAULT_REPLY_CAPACITY = 64 * 1024
MAX_REQUESTS_IN_FLIGHT = 64
HANDSHAKE_TIMEOUT = 5.0
ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True)
class PortSecurity:
    """Who may connect to a server port: the socket file's owner, group and mode, plus named uids.

    The default is FltBuildDefaultSecurityDescriptor's: the daemon's user only
    (root, for a root daemon), and root. ``owner`` None is the daemon's user,
    ``group`` None its group. A peer may
    connect if it is root, listed in ``allowed_uids``, or allowed write access
    by ``mode`` as ``owner`` or as a member of ``group`` (primary or
    supplementary) or as anyone else. With ``allowed_uids`` the socket file is
    made writable by its group and others so that those users can reach it at
    all (whatever their groups); the credential check stays exact.
    """

    owner: int | None = None  # None: the daemon's user
    group: int | None = None  # None: the daemon's group
    mode: int = 0o600
    allowed_uids: frozenset[int] = frozenset()

    def permits(self, uid: int, groups: set[int]) -> bool:
        if uid == 0 or uid in self.allowed_uids:
            return True
        if uid == self.owner_uid:
            return bool(self.mode & 0o200)
        if (os.getegid() if self.group is None else self.group) in groups:  # the socket file's group
            return bool(self.mode & 0o020)
        return bool(self.mode & 0o002)

    @property
    def owner_uid(self) -> int:
        return os.geteuid() if self.owner is None else self.owner

    @property
    def file_mode(self) -> int:
        return (self.mode | (0o022 if self.allowed_uids else 0)) & 0o777


ConnectNotify = Callable[["ClientPort", Any, bytes], Any]
DisconnectNotify = Callable[[Any], Any]
MessageNotify = Callable[[Any, bytes, int], Any]


class CommunicationPort:
    """A filter's server port (the handle FltCreateCommunicationPort returns). Made by create_communication_port."""

    def __init__(
        self,
        filter_: Any,
        name: str,
        path: Path,
        security: PortSecurity,
        server_cookie: Any,
        connect_notify: ConnectNotify,
        disconnect_notify: DisconnectNotify,
        message_notify: MessageNotify | None,
        max_connections: int,
    ):
        self.filter = filter_
        self.name = name
        self.path = path
        self.security = security
        self.server_cookie = server_cookie
        self.connect_notify = connect_notify
        self.disconnect_notify = disconnect_notify
        self.message_notify = message_notify
        self.max_connections = max_connections
        self.clients: list[ClientPort] = []
        self.closed = False
        self.connections = 0  # accepted since creation
        self._listener: socket.socket | None = None

    def __repr__(self) -> str:
        return f"<CommunicationPort {self.name} of {self.filter.name}: {len(self.clients)} client(s)>"

    def client_of(self, requestor: Requestor) -> ClientPort | None:
        """The connected client whose process made a request (``cbd.requestor``), or None.

        How a filter recognises its own service's I/O, which it must not send
        back to that service (a scanner's service reading the file it was
        asked about). Exact for any thread of the client's process, even one
        started a moment ago: one stat of /proc per connected client.
        """
        for client in self.clients:
            if client.connected and (requestor.pid == client.pid or is_thread_of(requestor.pid, client.pid)):
                return client
        return None


class ClientPort:
    """One client's connection to a server port (the ClientPort handle a connect callback gets)."""

    def __init__(self, port: CommunicationPort, raw: socket.socket, pid: int, uid: int, gid: int):
        self.port = port
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.cookie: Any = None
        self.connected = False
        self._raw = raw
        self._sock = trio.socket.from_stdlib_socket(raw)
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._closed_by_filter = False
        self._notified = False

    @property
    def peer(self) -> str:
        return f"pid {self.pid} (uid {self.uid})"

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<ClientPort {self.port.name} {self.peer} {state}>"

    async def _send(self, frame: Frame) -> None:
        """Write one frame; a write cut short by cancellation leaves the stream unusable: disconnect."""
        data = memoryview(encode(frame))
        async with self._send_lock:
            sent = 0
            try:
                if frame.fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", frame.fds).tobytes())]
                    sent = await self._sock.sendmsg([data], ancillary)
                while sent < len(data):
                    sent += await self._sock.send(data[sent:])
            except BaseException as exc:
                if 0 < sent < len(data):
                    self._disconnect(f"a message to it was cut short ({type(exc).__name__})")
                if isinstance(exc, (OSError, trio.ClosedResourceError)):
                    raise PortDisconnectedError(f"{self.peer} on port {self.port.name} is gone: {exc}") from exc
                raise

    def _disconnect(self, why: str, *, notify: bool = True) -> None:
        """End the connection (once): fail the filter's waiting sends, close the socket, tell the filter."""
        if self.connected:
            self.connected = False
            log.info("port %s: %s disconnected: %s", self.port.name, self.peer, why)
            if self in self.port.clients:
                self.port.clients.remove(self)
        for waiter in self._waiting.values():
            waiter.fail(PortDisconnectedError(f"{self.peer} disconnected from port {self.port.name}: {why}"))
        self._waiting.clear()
        _close_socket(self._raw)
        if notify and self.cookie is not _REFUSED and not self._closed_by_filter and not self._notified:
            self._notified = True
            try:
                self.port.disconnect_notify(self.cookie)
            except Exception as exc:
                log.error("filter bug: port %s: disconnect_notify raised %r", self.port.name, exc, exc_info=exc)


_REFUSED = object()


class _Waiter:
    """A send_message waiting for its reply."""

    __slots__ = ("error", "event", "frame")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.frame: Frame | None = None
        self.error: PortError | None = None

    def fail(self, error: PortError) -> None:
        self.error = error
        self.event.set()


# -- the filter's calls -------------------------------------------------------------------------


def create_communication_port(
    filter_: Any,
    name: str,
    *,
    connect_notify: ConnectNotify,
    disconnect_notify: DisconnectNotify,
    message_notify: MessageNotify | None = None,
    max_connections: int,
    security: PortSecurity | None = None,
    server_cookie: Any = None,
) -> CommunicationPort:
    """FltCreateCommunicationPort: listen on the port ``name`` of ``filter_``'s volume.

    Call it from the daemon's trio thread (``filter_load`` or any callback).
    Raises :class:`PortError`: OBJECT_NAME_COLLISION if the name is taken on
    this volume, INVALID_PARAMETER if ``max_connections`` is not positive.
    """
    bare = port_name(name)
    if not isinstance(max_connections, int) or max_connections <= 0:
        raise PortError(f"port {bare}: max_connections must be a positive integer", NtStatus.INVALID_PARAMETER)
    directory = getattr(filter_, "port_directory", None)
    if directory is None:
        raise PortError(
            f"filter {filter_.name}: no port directory (ports belong to a daemon's or an InProcessVolume's filters)",
            NtStatus.FLT_NOT_INITIALIZED,
        )
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        raise PortError("ports are created in the daemon's trio thread", NtStatus.FLT_NOT_INITIALIZED) from None
    path = Path(directory) / bare
    if path in _LISTENING:
        owner = _LISTENING[path].filter.name
        raise PortError(f"port {bare} already exists (created by filter {owner})", NtStatus.OBJECT_NAME_COLLISION)
    security = security or PortSecurity()
    port = CommunicationPort(
        filter_, bare, path, security, server_cookie, connect_notify, disconnect_notify, message_notify, max_connections
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if path.is_socket():
            path.unlink()  # a crashed daemon's: this process owns the directory
        old = os.umask(0o177)
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        os.chown(path, security.owner_uid, -1 if security.group is None else security.group)
        os.chmod(path, security.file_mode)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise PortError(f"port {bare}: cannot listen on {path}: {exc}", NtStatus.UNSUCCESSFUL) from exc
    listener.setblocking(False)
    port._listener = listener
    _LISTENING[path] = port
    filter_.ports.append(port)
    trio.lowlevel.spawn_system_task(_accept, port, name=f"port {bare}")
    log.info("filter %s: port %s listening on %s (mode %o)", filter_.name, bare, path, security.file_mode)
    return port


def close_communication_port(port: CommunicationPort) -> None:
    """FltCloseCommunicationPort: stop accepting; connected clients stay until they or the filter close."""
    if port.closed:
        return
    port.closed = True
    _LISTENING.pop(port.path, None)
    if port._listener is not None:
        _close_socket(port._listener)
    try:
        if stat.S_ISSOCK(port.path.lstat().st_mode):
            port.path.unlink()
    except OSError:
        pass
    log.info("port %s closed (%d client(s) stay connected)", port.name, len(port.clients))


def close_client_port(client: ClientPort | None) -> None:
    """FltCloseClientPort: disconnect one client (idempotent; None is allowed, as a nulled handle).

    Its pending :func:`send_message` calls fail with PortDisconnectedError;
    ``disconnect_notify`` is not called for it (the filter closed it).
    """
    if client is None:
        return
    client._closed_by_filter = True
    client._disconnect("closed by the filter", notify=False)


async def send_message(
    client: ClientPort | None,
    data: bytes,
    *,
    reply_capacity: int | None = DEFAULT_REPLY_CAPACITY,
    timeout: float = DEFAULT_SEND_TIMEOUT,
    fds: tuple[int, ...] = (),
    deadlock_check: bool = True,
) -> bytes | None:
    """FltSendMessage: send ``data`` (and descriptors ``fds``, duplicated for the client) and wait for the reply.

    Returns the reply's bytes (at most ``reply_capacity``), or None when
    ``reply_capacity`` is None (then it returns once the message is written).
    ``timeout`` (seconds; ``math.inf`` to wait forever) covers delivery and
    reply together. Raises :class:`PortTimeoutError` when it runs out,
    :class:`PortDisconnectedError` if the client is (or goes) away,
    :class:`PortBufferOverflowError` for a longer reply, and
    :class:`PortError` with the client's status when it replied with an error.
    A timed-out message's late reply is dropped.

    Sent while a kernel request is handled, a message that waits for a reply
    raises :class:`PortDeadlockError` at once when the client's process made
    that request or waits on its process (see :mod:`.deadlocks`), unless
    ``deadlock_check`` is False (for a client that answers from another
    thread than the ones doing its I/O).
    """
    if client is None or not client.connected:
        raise PortDisconnectedError("the client port is not connected")
    if reply_capacity is not None:
        check_reply_capacity(reply_capacity)
    waits = waiting_on(client.pid, client.port.name) if deadlock_check and reply_capacity is not None else nullcontext()
    with waits:
        return await _send_message(client, data, reply_capacity, timeout, fds)


async def _send_message(
    client: ClientPort, data: bytes, reply_capacity: int | None, timeout: float, fds: tuple[int, ...]
) -> bytes | None:
    message_id = next(client._ids)
    waiter = None
    if reply_capacity is not None:
        waiter = client._waiting[message_id] = _Waiter()
    frame = Frame(FrameKind.MESSAGE, message_id, NO_REPLY if reply_capacity is None else reply_capacity, data, fds)
    try:
        with trio.move_on_after(timeout) as scope:
            await client._send(frame)
            if waiter is None:
                return None
            await waiter.event.wait()
    finally:
        client._waiting.pop(message_id, None)
    if scope.cancelled_caught:
        what = "reply" if waiter is not None else "delivery"
        raise PortTimeoutError(f"port {client.port.name}: no {what} from {client.peer} within {timeout} s")
    assert waiter is not None
    if waiter.error is not None:
        raise waiter.error
    assert waiter.frame is not None
    reply = waiter.frame
    if reply.aux:
        status = _status_name(reply.aux)
        raise PortError(f"port {client.port.name}: {client.peer} replied with status {status}", reply.aux)
    if len(reply.payload) > (reply_capacity or 0):
        raise PortBufferOverflowError(
            f"port {client.port.name}: {client.peer} replied {len(reply.payload)} bytes, capacity {reply_capacity}"
        )
    return reply.payload


def filter_unloaded(filter_: Any) -> None:
    """A filter unloads: its server ports still open close, and every client is disconnected, each with
    its disconnect callback (as FltUnregisterFilter forces it).

    On Windows a filter must close its server ports in its unload routine or
    the unload hangs; here the unload callback (which gets only the flags)
    may leave them, and they close after it agrees to unload.
    """
    for port in filter_.ports:
        if not port.closed:
            close_communication_port(port)
        for client in list(port.clients):
            client._disconnect("the filter unloaded")
    filter_.ports.clear()


# -- serving ------------------------------------------------------------------------------------

_LISTENING: dict[Path, CommunicationPort] = {}


async def _accept(port: CommunicationPort) -> None:
    """The port's listener: each connection gets a task of its own, which outlives the listener.

    Running out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
    passing: the connection waits in the backlog, and accept is retried every
    ACCEPT_RETRY_DELAY seconds until it succeeds (logged once each time).
    """
    listener = port._listener
    assert listener is not None
    short_of_resources = False
    while not port.closed:
        try:
            await trio.lowlevel.wait_readable(listener)
            raw, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        except (OSError, trio.ClosedResourceError) as exc:
            if not isinstance(exc, OSError) or exc.errno not in _ACCEPT_SHORTAGES:
                if not port.closed:
                    log.exception("port %s: accept failed; the port stops listening", port.name)
                return
            if not short_of_resources:
                log.warning("port %s: cannot accept a connection (%s); retrying", port.name, exc)
                short_of_resources = True
            await trio.sleep(ACCEPT_RETRY_DELAY)
            continue
        if short_of_resources:
            log.info("port %s: accepting connections again", port.name)
            short_of_resources = False
        trio.lowlevel.spawn_system_task(_serve_client, port, raw, name=f"port {port.name} client")


async def _serve_client(port: CommunicationPort, raw: socket.socket) -> None:
    """One connection, start to end. Nothing a client sends may end the daemon: every failure ends only this."""
    try:
        pid, uid, gid = struct.unpack("3i", raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except OSError:
        raw.close()
        return
    client = ClientPort(port, raw, pid, uid, gid)
    client.cookie = _REFUSED
    decoder = Decoder(FROM_CLIENT)
    try:
        if await _handshake(client, decoder):
            await _serve_messages(client, decoder)
    except PortProtocolError as exc:
        log.warning("port %s: %s broke the protocol: %s; disconnected", port.name, client.peer, exc)
        client._disconnect(f"protocol error: {exc}")
    except Exception:
        log.exception("port %s: serving %s failed; disconnected", port.name, client.peer)
        client._disconnect("an internal error")
    finally:
        decoder.close()
        client._disconnect("it closed the connection")


async def _receive(client: ClientPort, decoder: Decoder) -> list[Frame] | None:
    """The next frames from the client, or None at the end of the stream (a partial frame raises)."""
    while True:
        try:
            data, ancillary, msg_flags, _ = await client._sock.recvmsg(RECEIVE_SIZE, ANCILLARY_SIZE)
        except (OSError, trio.ClosedResourceError):
            return None
        frames = decoder.received(data, ancillary, msg_flags)
        if frames is None or frames:
            return frames


async def _handshake(client: ClientPort, decoder: Decoder) -> bool:
    """CONNECT -> CONNECTED: the port's checks, then the filter's connect callback. True: accepted."""
    port = client.port
    frames: list[Frame] | None = None
    with trio.move_on_after(HANDSHAKE_TIMEOUT) as waiting:
        frames = await _receive(client, decoder)
    if waiting.cancelled_caught:
        log.warning("port %s: %s sent no CONNECT within %s s; disconnected", port.name, client.peer, HANDSHAKE_TIMEOUT)
        return False
    if frames is None:
        return False
    first = frames[0]
    if first.kind is not FrameKind.CONNECT or len(frames) > 1:
        raise PortProtocolError("the first frame must be CONNECT, alone")
    if len(first.payload) > MAX_CONTEXT:
        raise PortProtocolError(f"a connection context of {len(first.payload)} bytes (at most {MAX_CONTEXT})")
    refusal = _admission(client)
    if refusal is None:
        port.clients.append(client)  # holds its place while the filter decides
        client.connected = True
        try:
            client.cookie = await _maybe_await(port.connect_notify(client, port.server_cookie, first.payload))
        except PortRefusedError as exc:
            refusal = exc.status, str(exc)
        except Exception as exc:
            log.error("filter bug: port %s: connect_notify raised %r", port.name, exc, exc_info=exc)
            refusal = NtStatus.FLT_INTERNAL_ERROR, "the filter failed"
        if refusal is not None or not client.connected:  # refused, or closed by the filter meanwhile
            client.connected = False
            if client in port.clients:
                port.clients.remove(client)
    if refusal is not None:
        status, why = refusal
        log.info("port %s: refused %s: %s", port.name, client.peer, why)
        await client._send(Frame(FrameKind.CONNECTED, 0, status, why.encode()))
        return False
    if not client.connected:
        return False
    port.connections += 1
    log.info("port %s: %s connected", port.name, client.peer)
    await client._send(Frame(FrameKind.CONNECTED, 0, NtStatus.SUCCESS))
    return True


def _admission(client: ClientPort) -> tuple[int, str] | None:
    """Why the port refuses this peer before asking the filter (None: it does not)."""
    port = client.port
    if port.closed:
        return NtStatus.CONNECTION_REFUSED, "the port is closed"
    if not port.security.permits(client.uid, groups_of(client.pid, client.gid)):
        return NtStatus.ACCESS_DENIED, f"uid {client.uid} may not connect to port {port.name}"
    if len(port.clients) >= port.max_connections:
        return NtStatus.CONNECTION_COUNT_LIMIT, f"port {port.name} allows {port.max_connections} connection(s)"
    return None


async def _serve_messages(client: ClientPort, decoder: Decoder) -> None:
    """The client's frames until it goes: replies wake the filter's sends, requests go to its message callback.

    A protocol violation ends the nursery and is raised as it is (not in an
    exception group), for the caller to log and disconnect.
    """
    in_flight = [0]
    violation: PortProtocolError | None = None
    async with trio.open_nursery() as nursery:
        try:
            while client.connected:
                frames = await _receive(client, decoder)
                if frames is None:
                    break
                for frame in frames:
                    if frame.kind is FrameKind.REPLY:
                        waiter = client._waiting.get(frame.message_id)
                        if waiter is None:
                            log.debug(
                                "port %s: %s replied to message %d, which waits no more",
                                client.port.name,
                                client.peer,
                                frame.message_id,
                            )
                        else:
                            waiter.frame = frame
                            waiter.event.set()
                    elif frame.kind is FrameKind.REQUEST:
                        if in_flight[0] >= MAX_REQUESTS_IN_FLIGHT:
                            # Refused here, not in a task: a client that sends without reading its answers
                            # stops being read once its socket is full (backpressure), instead of making
                            # the daemon hold a task and an answer for each request it sends.
                            await _respond(client, frame.message_id, NtStatus.INSUFFICIENT_RESOURCES, b"")
                        else:
                            in_flight[0] += 1
                            nursery.start_soon(_handle_request, client, frame, in_flight)
                    else:
                        raise PortProtocolError("a second CONNECT")
        except PortProtocolError as exc:
            violation = exc
        nursery.cancel_scope.cancel()
    if violation is not None:
        raise violation


async def _handle_request(client: ClientPort, frame: Frame, in_flight: list[int]) -> None:
    """FilterSendMessage's far end: the filter's message callback, then its answer to the client."""
    port = client.port
    try:
        if port.message_notify is None:
            await _respond(client, frame.message_id, NtStatus.INVALID_DEVICE_REQUEST, b"")
            return
        try:
            answer = await _maybe_await(port.message_notify(client.cookie, frame.payload, frame.aux))
        except Exception as exc:
            log.error("filter bug: port %s: message_notify raised %r", port.name, exc, exc_info=exc)
            await _respond(client, frame.message_id, NtStatus.FLT_INTERNAL_ERROR, b"")
            return
        answer = bytes(answer or b"")
        if len(answer) > frame.aux:
            await _respond(client, frame.message_id, NtStatus.BUFFER_OVERFLOW, b"")
        else:
            await _respond(client, frame.message_id, NtStatus.SUCCESS, answer)
    finally:
        in_flight[0] -= 1


async def _respond(client: ClientPort, message_id: int, status: int, data: bytes) -> None:
    try:
        await client._send(Frame(FrameKind.RESPONSE, message_id, status, data))
    except PortDisconnectedError:
        pass


# -- helpers ------------------------------------------------------------------------------------


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _close_socket(raw: socket.socket) -> None:
    """Close a socket trio may be waiting on (waiters get ClosedResourceError); fine once the loop has ended."""
    try:
        trio.lowlevel.notify_closing(raw)
    except RuntimeError:
        pass  # no trio loop any more: nothing waits on it
    raw.close()


def _status_name(value: int) -> str:
    try:
        return NtStatus(value).name
    except ValueError:
        return f"0x{value:08X}"
