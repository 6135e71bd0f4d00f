"""Communication ports in-process: a test filter's port on a real Unix socket, with clients in threads,
trio tasks and processes of their own (fltmgr-features.md section 1.10, one test or more per check).

The filter (:class:`PortFilter`) creates its port in ``filter_load`` on an
:class:`~fltfuse.testing.InProcessVolume`, whose trio loop serves it as the
daemon's does. Thread clients (:func:`fltfuse.port.connect_communication_port`)
run in worker threads (their calls block), trio clients
(:func:`fltfuse.port.open_filter_port`) in the test's own loop, and process
clients (``tests/integration/port_filters/porttest_client.py``) as children,
as another user where security is the point or killed where death is.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import resource
import socket
import stat
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from fltfuse import (
    ClientPort,
    CommunicationPort,
    Filter,
    FilterRegistration,
    FilterUnloadFlags,
    NtStatus,
    PortBufferOverflowError,
    PortDeadlockError,
    PortDisconnectedError,
    PortError,
    PortRefusedError,
    PortSecurity,
    PortTimeoutError,
    Requestor,
    close_client_port,
    close_communication_port,
    create_communication_port,
    send_message,
)
from fltfuse._port import deadlocks, server
from fltfuse._port.deadlocks import requesting_thread
from fltfuse._port.wire import (
    FROM_DAEMON,
    HEADER,
    MAGIC,
    MAX_CONTEXT,
    MAX_FDS,
    MAX_PAYLOAD,
    NO_REPLY,
    VERSION,
    Decoder,
    Frame,
    FrameKind,
    PortProtocolError,
    encode,
)
from fltfuse.port import (
    MAX_WAITING_MESSAGES,
    FilterPort,
    PortMessage,
    PortNotFoundError,
    connect_communication_port,
    open_filter_port,
)
from fltfuse.testing import InProcessVolume
from tests.integration.port_filters.porttest_client import ClientProcess

PORT = "TestPort"
ALTITUDE = "370010"
REFUSAL = "this filter speaks no context b'bad'"
NOBODY = 65534
STRANGER = 65533  # a uid with no name and no rights
GROUP = 4242  # a group with no name: the port's group in the group tests

MessageNotify = Callable[[Any, bytes, int], Any]


@dataclass(eq=False)
class Connection:
    """The connection cookie the filter's connect_notify returns: the client port and its context."""

    client: ClientPort
    context: bytes
    disconnected_at: float | None = None  # trio.current_time() of its disconnect_notify


def echo(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
    return b"echo:" + data


class PortFilter:
    """A filter whose ``filter_load`` creates the port PORT; it records what its port callbacks saw.

    It accepts any connection context but ``b"bad"`` (refused with REFUSAL),
    answers messages with ``message_notify`` (None: it has none) and closes
    its port in its unload callback unless ``leave_port_open``; with
    ``refuse_unload`` that callback refuses a unload that is not mandatory.
    """

    def __init__(
        self,
        *,
        max_connections: int = 8,
        security: PortSecurity | None = None,
        message_notify: MessageNotify | None = echo,
        leave_port_open: bool = False,
        refuse_unload: bool = False,
    ):
        self.max_connections = max_connections
        self.security = security
        self.message_notify = message_notify
        self.leave_port_open = leave_port_open
        self.refuse_unload = refuse_unload
        self.filter = Filter("porttest", FilterRegistration(filter_load=self._load, filter_unload=self._unload))
        self.port: CommunicationPort | None = None
        self.connections: list[Connection] = []  # accepted, in order
        self.disconnected: list[Connection] = []  # disconnect_notify's cookies, in order

    def _load(self, filter_: Filter) -> None:
        self.port = create_communication_port(
            filter_,
            "\\" + PORT,  # as Windows names it; the leading backslash is dropped
            connect_notify=self._connect,
            disconnect_notify=self._disconnect,
            message_notify=self.message_notify,
            max_connections=self.max_connections,
            security=self.security,
            server_cookie=self,
        )

    def _unload(self, flags: FilterUnloadFlags) -> NtStatus:
        if self.refuse_unload and not flags & FilterUnloadFlags.MANDATORY:
            return NtStatus.FLT_DO_NOT_DETACH
        if not self.leave_port_open and self.port is not None:
            close_communication_port(self.port)
        return NtStatus.SUCCESS

    def _connect(self, client: ClientPort, server_cookie: Any, context: bytes) -> Connection:
        assert server_cookie is self
        if context == b"bad":
            raise PortRefusedError(REFUSAL)
        connection = Connection(client, context)
        self.connections.append(connection)
        return connection

    def _disconnect(self, connection: Connection) -> None:
        connection.disconnected_at = trio.current_time()
        self.disconnected.append(connection)

    def volume(self, directory: Path) -> InProcessVolume:
        """A volume of ``directory`` with this filter attached (make it in the test's trio loop)."""
        return InProcessVolume(directory, filters=[(self.filter, ALTITUDE)])


# -- helpers ------------------------------------------------------------------------------------------


async def in_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` in a worker thread: a blocking client call must not block the daemon's loop."""
    return await trio.to_thread.run_sync(partial(function, *args, **kwargs))


async def connect(vol: InProcessVolume, context: bytes = b"v1") -> FilterPort:
    port: FilterPort = await in_thread(connect_communication_port, vol.port_path(PORT), context)
    return port


async def until(condition: Callable[[], Any], what: str, timeout: float = 5) -> None:
    """Poll ``condition`` (the daemon's tasks run meanwhile); fail the test after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.002)
        return
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def answer_one(port: FilterPort, status: int = 0, reply: Callable[[PortMessage], bytes] | None = None) -> PortMessage:
    """A client's turn (in a thread): get one message and reply ``b"re:"`` + its data (or ``reply(message)``)."""
    message = port.get_message(timeout=10)
    port.reply_message(message.message_id, b"re:" + message.data if reply is None else reply(message), status)
    return message


async def outcome_of(coroutine_function: Callable[[], Any], into: list[Any]) -> None:
    """Run it; append its result or the exception it raised to ``into`` (for a task started in a nursery)."""
    try:
        into.append(await coroutine_function())
    except Exception as exc:
        into.append(exc)


# -- FltCreateCommunicationPort, ConnectNotify, MaxConnections ------------------------------------------


async def test_connect_context_is_accepted_or_refused_by_the_filter(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol, b"v1") as port:
            assert port.connected
            [connection] = pf.connections
            assert connection.context == b"v1"
            assert connection.client.connected and connection.client.pid == os.getpid()
            assert connection.client.uid == os.geteuid()
            with pytest.raises(PortRefusedError) as refused:
                await connect(vol, b"bad")
            assert refused.value.status == NtStatus.CONNECTION_REFUSED
            assert REFUSAL in str(refused.value)
            assert pf.connections == [connection]
            assert pf.port is not None and pf.port.clients == [connection.client] and pf.port.connections == 1


async def test_a_connect_callback_that_raises_refuses_with_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pf = PortFilter()

    def broken(client: ClientPort, server_cookie: Any, context: bytes) -> None:
        raise RuntimeError("connect_notify is broken")

    async with pf.volume(tmp_path) as vol:
        assert pf.port is not None
        pf.port.connect_notify = broken
        with pytest.raises(PortRefusedError) as refused:
            await connect(vol)
        assert refused.value.status == NtStatus.FLT_INTERNAL_ERROR
        assert "filter bug: port TestPort: connect_notify raised RuntimeError" in caplog.text
        assert pf.port.clients == [] and pf.disconnected == []


async def test_async_callbacks_are_awaited(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        await trio.sleep(0)
        return b"async:" + data

    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol:
        assert pf.port is not None
        accept = pf.port.connect_notify

        async def connect_later(client: ClientPort, server_cookie: Any, context: bytes) -> Any:
            await trio.sleep(0)
            return accept(client, server_cookie, context)

        pf.port.connect_notify = connect_later
        with await connect(vol) as port:
            assert await in_thread(port.send_message, b"x", timeout=10) == b"async:x"
            assert [c.context for c in pf.connections] == [b"v1"]


async def test_connections_beyond_the_maximum_are_refused_until_one_ends(tmp_path: Path) -> None:
    pf = PortFilter(max_connections=1)
    async with pf.volume(tmp_path) as vol:
        first = await connect(vol)
        with pytest.raises(PortRefusedError) as refused:
            await connect(vol)
        assert refused.value.status == NtStatus.CONNECTION_COUNT_LIMIT
        assert "allows 1 connection" in str(refused.value)
        await in_thread(first.close)
        await until(lambda: pf.disconnected, "the first client's disconnect_notify")
        with await connect(vol, b"second") as second:
            assert await in_thread(second.send_message, b"hi", timeout=10) == b"echo:hi"
        assert [c.context for c in pf.connections] == [b"v1", b"second"]


async def test_a_killed_clients_connection_is_free_again_at_once(tmp_path: Path) -> None:
    """MaxConnections 1 (the scanner's): a second client process is refused while the first lives and
    gets in right after the first was killed with SIGKILL (it never closed its port)."""
    pf = PortFilter(max_connections=1)
    async with pf.volume(tmp_path) as vol:
        with await in_thread(ClientProcess, vol.port_path(PORT), "first") as first:
            assert "connected" in first.first, first.first
            with await in_thread(ClientProcess, vol.port_path(PORT), "second") as second:
                assert second.first["error"] == "PortRefusedError", second.first
                assert second.first["status"] == NtStatus.CONNECTION_COUNT_LIMIT
            await in_thread(first.kill)
            with await in_thread(ClientProcess, vol.port_path(PORT), "third") as third:  # no wait for the daemon
                assert "connected" in third.first, third.first
                assert await in_thread(third.command, "send hi") == {"answer": "echo:hi"}
        assert [c.context for c in pf.connections] == [b"first", b"third"]
        assert pf.disconnected[0] is pf.connections[0]


async def test_a_duplicate_port_name_is_a_name_collision(tmp_path: Path) -> None:
    pf = PortFilter()
    other = Filter("other", FilterRegistration())
    async with pf.volume(tmp_path) as vol:
        other.port_directory = vol.port_directory
        for filter_, name in ((pf.filter, PORT), (other, "\\" + PORT), (other, "/" + PORT)):
            with pytest.raises(PortError) as collision:
                create_communication_port(
                    filter_, name, connect_notify=pf._connect, disconnect_notify=pf._disconnect, max_connections=1
                )
            assert collision.value.status == NtStatus.OBJECT_NAME_COLLISION
            assert "created by filter porttest" in str(collision.value)
        assert pf.port is not None
        close_communication_port(pf.port)
        again = create_communication_port(
            other,
            PORT,
            connect_notify=pf._connect,
            disconnect_notify=pf._disconnect,
            max_connections=1,
            server_cookie=pf,
        )
        try:
            assert stat.S_ISSOCK(os.stat(vol.port_path(PORT)).st_mode)
            with await connect(vol) as port:
                assert port.connected and pf.connections[0].client.port is again
        finally:
            close_communication_port(again)


@pytest.mark.parametrize("name", ["", "\\", "a/b", "-leading-dash", "x" * 65, "with space", "é", "a\0b", ".."])
async def test_bad_port_names_are_refused(tmp_path: Path, name: str) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path):
        with pytest.raises(PortError) as invalid:
            create_communication_port(
                pf.filter, name, connect_notify=pf._connect, disconnect_notify=pf._disconnect, max_connections=1
            )
        assert invalid.value.status == NtStatus.OBJECT_NAME_INVALID
        if "/" not in name:  # a name with a slash is a socket path to the user-mode library
            with pytest.raises(PortError) as client_side:
                await in_thread(connect_communication_port, name)
            assert client_side.value.status == NtStatus.OBJECT_NAME_INVALID


async def test_other_create_mistakes(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        create = partial(create_communication_port, connect_notify=pf._connect, disconnect_notify=pf._disconnect)
        for bad in (0, -1, 1.5):
            with pytest.raises(PortError) as invalid:
                create(pf.filter, "Other", max_connections=bad)  # type: ignore[arg-type]
            assert invalid.value.status == NtStatus.INVALID_PARAMETER
        with pytest.raises(PortError) as no_directory:
            create(Filter("homeless", FilterRegistration()), "Other", max_connections=1)
        assert no_directory.value.status == NtStatus.FLT_NOT_INITIALIZED
        with pytest.raises(PortError) as not_in_loop:
            await in_thread(create, pf.filter, "Other", max_connections=1)
        assert not_in_loop.value.status == NtStatus.FLT_NOT_INITIALIZED
        assert not os.path.exists(vol.port_path("Other"))
        with pytest.raises(PortNotFoundError):
            await in_thread(connect_communication_port, vol.port_path("Other"))


# -- security ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("security", "who", "accepted"),
    [
        pytest.param(PortSecurity(), {"user": NOBODY, "group": NOBODY}, False, id="default-root-only"),
        pytest.param(PortSecurity(mode=0o666), {"user": NOBODY, "group": NOBODY}, True, id="mode-0666"),
        pytest.param(PortSecurity(allowed_uids=frozenset({NOBODY})), {"user": NOBODY}, True, id="allowed-uid"),
        pytest.param(PortSecurity(allowed_uids=frozenset({NOBODY})), {"user": STRANGER}, False, id="not-allowed-uid"),
        pytest.param(PortSecurity(owner=NOBODY), {"user": NOBODY}, True, id="owner"),
        pytest.param(PortSecurity(group=GROUP, mode=0o660), {"user": NOBODY, "group": GROUP}, True, id="group"),
        pytest.param(
            PortSecurity(group=GROUP, mode=0o660),
            {"user": NOBODY, "group": NOBODY, "extra_groups": [GROUP]},
            True,
            id="supplementary-group",
        ),
        pytest.param(
            PortSecurity(group=GROUP, mode=0o660),
            {"user": NOBODY, "group": NOBODY, "extra_groups": []},
            False,
            id="not-in-group",
        ),
    ],
)
@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root (setuid)")
async def test_security_decides_who_may_connect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, security: PortSecurity, who: dict[str, Any], accepted: bool
) -> None:
    """A client process running as another user (setgid, setgroups, setuid before it starts) connects.

    Without ``group`` the child keeps the test's group (root's, the socket
    file's): an allowed uid must get in all the same.
    """
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    pf = PortFilter(security=security)
    async with pf.volume(tmp_path) as vol:
        socket_file = os.stat(vol.port_path(PORT))
        assert stat.S_ISSOCK(socket_file.st_mode)
        assert stat.S_IMODE(socket_file.st_mode) == security.file_mode
        assert socket_file.st_uid == security.owner_uid
        assert socket_file.st_gid == (os.getegid() if security.group is None else security.group)
        os.chmod(vol.port_directory, 0o755)  # as the daemon's ports directory: other users may reach the socket
        client = await in_thread(ClientProcess, vol.port_path(PORT), "v1", **who)
        try:
            if accepted:
                assert "connected" in client.first, client.first
                assert await in_thread(client.command, "send hi") == {"answer": "echo:hi"}
                [connection] = pf.connections
                assert connection.client.uid == who["user"] and connection.client.pid == client.pid
            else:
                assert client.first["error"] == "PortRefusedError", client.first
                assert client.first["status"] == NtStatus.ACCESS_DENIED
                assert client.first["errno"] == errno.EACCES  # the kernel's refusal or the daemon's: the same
                assert pf.connections == []
        finally:
            assert await in_thread(client.close) == 0
    if security.allowed_uids and not accepted:
        # the socket file lets every user reach it: the daemon's check of the peer's credentials refused it
        assert f"uid {who['user']} may not connect to port {PORT}" in caplog.text


def test_permits_follows_the_socket_files_permissions() -> None:
    """The credential check agrees with the kernel's check of the socket file (owner, then group, then others)."""
    me = os.getegid()
    assert PortSecurity().permits(0, {0})
    assert PortSecurity().permits(os.geteuid(), set())  # the default: the daemon's user (and root)
    assert not PortSecurity(owner=0).permits(NOBODY, {NOBODY})
    assert not PortSecurity(owner=NOBODY, mode=0o066).permits(NOBODY, {GROUP})  # the owner's bits decide for it
    assert PortSecurity(owner=0, mode=0o660).permits(NOBODY, {NOBODY, me})  # a member of the daemon's group
    assert not PortSecurity(owner=0, group=GROUP, mode=0o606).permits(NOBODY, {GROUP})
    assert PortSecurity(owner=0, group=GROUP, mode=0o606).permits(NOBODY, {NOBODY})
    assert PortSecurity(allowed_uids=frozenset({NOBODY})).file_mode == 0o622  # in the socket's group or not


# -- MessageNotify (FilterSendMessage) --------------------------------------------------------------------


async def test_message_notify_answers_with_the_connection_cookie_and_capacity(tmp_path: Path) -> None:
    seen: list[tuple[Connection, bytes, int]] = []

    def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        seen.append((connection, data, reply_capacity))
        return data.upper()

    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            assert await in_thread(port.send_message, b"hello", reply_capacity=100, timeout=10) == b"HELLO"
            assert await in_thread(port.send_message, b"", reply_capacity=0, timeout=10) == b""
            assert seen == [(pf.connections[0], b"hello", 100), (pf.connections[0], b"", 0)]


async def test_without_message_notify_sends_fail(tmp_path: Path) -> None:
    pf = PortFilter(message_notify=None)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            with pytest.raises(PortError) as failed:
                await in_thread(port.send_message, b"anyone?", timeout=10)
            assert type(failed.value) is PortError and failed.value.status == NtStatus.INVALID_DEVICE_REQUEST
            assert port.connected


async def test_a_message_notify_that_raises_is_internal_error_and_the_port_serves_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        if data == b"boom":
            raise ValueError("boom")
        return b"fine"

    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            with pytest.raises(PortError) as failed:
                await in_thread(port.send_message, b"boom", timeout=10)
            assert failed.value.status == NtStatus.FLT_INTERNAL_ERROR
            assert "filter bug: port TestPort: message_notify raised ValueError('boom')" in caplog.text
            assert await in_thread(port.send_message, b"again", timeout=10) == b"fine"
            with await connect(vol, b"another") as another:
                assert await in_thread(another.send_message, b"x", timeout=10) == b"fine"


async def test_an_answer_longer_than_the_capacity_is_a_buffer_overflow(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            with pytest.raises(PortBufferOverflowError) as overflow:
                await in_thread(port.send_message, b"hello", reply_capacity=len(b"echo:hello") - 1, timeout=10)
            assert overflow.value.status == NtStatus.BUFFER_OVERFLOW
            exact = await in_thread(port.send_message, b"hello", reply_capacity=len(b"echo:hello"), timeout=10)
            assert exact == b"echo:hello"


async def test_many_threads_send_at_once_and_each_gets_its_own_answer(tmp_path: Path) -> None:
    async def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        for _ in range(zlib.crc32(data) % 5):  # answers leave in another order than the messages came
            await trio.sleep(0)
        return b"echo:" + data

    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:

            def sender(thread: int) -> None:
                for n in range(50):
                    data = b"thread %d message %d" % (thread, n)
                    assert port.send_message(data, timeout=10) == b"echo:" + data

            async with trio.open_nursery() as nursery:
                for thread in range(8):
                    nursery.start_soon(in_thread, sender, thread)


async def test_requests_beyond_the_in_flight_limit_get_insufficient_resources(tmp_path: Path) -> None:
    """One client's messages are handled concurrently, up to MAX_REQUESTS_IN_FLIGHT; beyond, refused at once."""
    release = trio.Event()
    handling: list[bytes] = []

    async def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        handling.append(data)
        await release.wait()
        return b"done"

    limit, extra = server.MAX_REQUESTS_IN_FLIGHT, 6
    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol, open_filter_port(vol.port_path(PORT)) as port:
        results: list[Any] = []
        async with trio.open_nursery() as nursery:
            for n in range(limit + extra):
                nursery.start_soon(outcome_of, partial(port.send_message, b"%d" % n), results)
            await until(lambda: len(results) == extra and len(handling) == limit, "the requests beyond the limit")
            assert all(isinstance(r, PortError) and r.status == NtStatus.INSUFFICIENT_RESOURCES for r in results)
            release.set()
        assert results[extra:] == [b"done"] * limit
        assert await port.send_message(b"after") == b"done"  # the limit counts requests in flight only


# -- FltSendMessage ---------------------------------------------------------------------------------------


def test_every_filter_send_has_a_finite_timeout_by_default() -> None:
    """The hung-service pitfall: FltSendMessage with a NULL timeout waits forever; here a send the filter
    gives no timeout waits DEFAULT_SEND_TIMEOUT (30 s) and no more."""
    default = inspect.signature(send_message).parameters["timeout"].default
    assert default == server.DEFAULT_SEND_TIMEOUT == 30.0


async def test_send_message_gets_the_clients_reply(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            got: list[PortMessage] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, partial(in_thread, answer_one, port), got)
                reply = await send_message(pf.connections[0].client, b"ping", reply_capacity=100, timeout=10)
            assert reply == b"re:ping"
            assert got[0].data == b"ping" and got[0].reply_capacity == 100 and got[0].fds == []


async def test_send_message_without_a_reply_buffer_returns_once_written(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            assert await send_message(pf.connections[0].client, b"notice", reply_capacity=None, timeout=10) is None
            message = await in_thread(port.get_message, timeout=10)
            assert message.data == b"notice" and message.reply_capacity is None


async def test_a_client_that_never_gets_makes_send_time_out_and_its_late_reply_is_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fltfuse.port")
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            client = pf.connections[0].client
            start = trio.current_time()
            replies: list[Any] = []
            with pytest.raises(PortTimeoutError) as timed_out:
                replies.append(await send_message(client, b"late", timeout=1))
            elapsed = trio.current_time() - start
            assert replies == []  # raised, never returned: a timeout cannot be taken for a reply
            assert 1.0 <= elapsed < 1.5, elapsed
            assert isinstance(timed_out.value, TimeoutError) and timed_out.value.status == 0x102
            assert "no reply from" in str(timed_out.value)
            # the client gets the message only now and answers it: the daemon drops the answer
            message = await in_thread(answer_one, port)
            assert message.data == b"late"
            dropped = f"replied to message {message.message_id}, which waits no more"
            await until(lambda: dropped in caplog.text, "the late reply to be dropped")
            # the connection still works both ways
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, answer_one, port)
                assert await send_message(client, b"again", timeout=10) == b"re:again"
            assert await in_thread(port.send_message, b"and back", timeout=10) == b"echo:and back"


async def test_a_reply_with_an_error_status_raises_it(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(in_thread, answer_one, port, NtStatus.ACCESS_DENIED))
                with pytest.raises(PortError) as failed:
                    await send_message(pf.connections[0].client, b"verdict?", timeout=10)
            assert type(failed.value) is PortError and failed.value.status == NtStatus.ACCESS_DENIED
            assert "ACCESS_DENIED" in str(failed.value)


async def test_a_reply_longer_than_the_capacity_is_a_buffer_overflow(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            client = pf.connections[0].client
            for reply, capacity, overflows in ((b"12345", 4, True), (b"1234", 4, False)):
                result: list[Any] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(in_thread, answer_one, port, reply=lambda m, r=reply: r))
                    await outcome_of(partial(send_message, client, b"x", reply_capacity=capacity, timeout=10), result)
                if overflows:
                    assert isinstance(result[0], PortBufferOverflowError), result
                else:
                    assert result == [reply]


async def test_descriptors_sent_with_a_message_arrive_readable(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            read_end, write_end = os.pipe()
            os.write(write_end, b"scan me")
            os.close(write_end)

            def scan(message: PortMessage) -> bytes:
                [fd] = message.fds
                assert stat.S_ISFIFO(os.fstat(fd).st_mode) and fd != read_end
                content = os.read(fd, 100)
                message.close()
                assert message.fds == []
                return b"clean" if content == b"scan me" else b"got " + content

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(in_thread, answer_one, port, reply=scan))
                    verdict = await send_message(pf.connections[0].client, b"scan", fds=(read_end,), timeout=10)
                assert verdict == b"clean"
                os.fstat(read_end)  # the filter's descriptor is its own still
                with pytest.raises(PortError) as too_many:
                    await send_message(pf.connections[0].client, b"scan", fds=(read_end,) * 5, timeout=10)
                assert too_many.value.status == NtStatus.INVALID_PARAMETER
            finally:
                os.close(read_end)
            assert await in_thread(port.send_message, b"still here", timeout=10) == b"echo:still here"


async def test_eight_threads_get_distinct_messages_and_replies_match_their_ids(tmp_path: Path) -> None:
    """The features doc's check: 8 threads with gets outstanding at once receive distinct message ids, and
    each reply (matched by id) reaches the send that waits for it."""
    rounds, threads = 5, 8
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            client = pf.connections[0].client
            barrier = threading.Barrier(threads, timeout=10)
            ids: list[list[int]] = [[] for _ in range(threads)]

            def getter(thread: int) -> None:
                for _ in range(rounds):
                    message = port.get_message(timeout=10)
                    ids[thread].append(message.message_id)
                    barrier.wait()  # all eight hold a message at once: each get had one of its own
                    port.reply_message(message.message_id, b"re:" + message.data)

            async def send(n: int) -> None:
                assert await send_message(client, b"m%d" % n, timeout=10) == b"re:m%d" % n

            async with trio.open_nursery() as nursery:
                for thread in range(threads):
                    nursery.start_soon(in_thread, getter, thread)
                for round_ in range(rounds):
                    async with trio.open_nursery() as senders:
                        for k in range(threads):
                            senders.start_soon(send, round_ * threads + k)
            every = [i for got in ids for i in got]
            assert len(every) == len(set(every)) == rounds * threads
            assert all(len(got) == rounds for got in ids)


async def test_a_trio_client_sends_gets_and_replies_from_many_tasks(tmp_path: Path) -> None:
    async def answer(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        for _ in range(zlib.crc32(data) % 5):
            await trio.sleep(0)
        return b"echo:" + data

    pf = PortFilter(message_notify=answer)
    async with pf.volume(tmp_path) as vol, open_filter_port(vol.port_path(PORT), b"trio") as port:
        assert port.connected and [c.context for c in pf.connections] == [b"trio"]
        client = pf.connections[0].client
        ids: list[int] = []
        count = 64

        async def getter() -> None:
            while len(ids) < count:
                message = await port.get_message()
                ids.append(message.message_id)
                await port.reply_message(message.message_id, b"re:" + message.data)

        async def filter_send(n: int) -> None:
            assert await send_message(client, b"m%d" % n, timeout=10) == b"re:m%d" % n

        async def client_send(task: int) -> None:
            for n in range(20):
                data = b"task %d message %d" % (task, n)
                assert await port.send_message(data) == b"echo:" + data

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(getter)
                async with trio.open_nursery() as senders:
                    for n in range(count):
                        senders.start_soon(filter_send, n)
                    for task in range(8):
                        senders.start_soon(client_send, task)
                nursery.cancel_scope.cancel()  # the getters still waiting
        assert sorted(ids) == sorted(set(ids)) and len(ids) == count
        with pytest.raises(PortBufferOverflowError):
            await port.send_message(b"too long", reply_capacity=3)
    await until(lambda: pf.disconnected, "disconnect_notify of the trio client")


# -- closing: the server port, a client port, the client's death, the filter's unload ------------------


async def test_closing_the_server_port_keeps_its_connections(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as old:
            assert pf.port is not None
            close_communication_port(pf.port)
            close_communication_port(pf.port)  # again: nothing happens
            assert not os.path.exists(vol.port_path(PORT))
            with pytest.raises(PortNotFoundError):
                await connect(vol)
            assert await in_thread(old.send_message, b"still", timeout=10) == b"echo:still"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, answer_one, old)
                assert await send_message(pf.connections[0].client, b"both ways", timeout=10) == b"re:both ways"
            assert pf.port.clients == [pf.connections[0].client]
        await until(lambda: pf.disconnected, "the old client's disconnect_notify")
    assert [c.context for c in pf.disconnected] == [b"v1"]


async def test_the_filter_closing_a_client_port_wakes_its_gets_without_disconnect_notify(tmp_path: Path) -> None:
    pf = PortFilter(max_connections=2)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol, b"getter") as getter, await connect(vol, b"silent"):
            waiting, silent = (c.client for c in pf.connections)
            got: list[Any] = []
            sent: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, partial(in_thread, getter.get_message, timeout=10), got)
                nursery.start_soon(outcome_of, partial(send_message, silent, b"pending", timeout=10), sent)
                await until(lambda: silent._waiting, "the send to wait for its reply")
                close_client_port(waiting)
                close_client_port(silent)
            assert isinstance(got[0], PortDisconnectedError), got
            assert isinstance(sent[0], PortDisconnectedError), sent
            assert not getter.connected and not waiting.connected and not silent.connected
            with pytest.raises(PortDisconnectedError):
                await send_message(waiting, b"after", timeout=10)
            close_client_port(waiting)  # again, and a nulled handle: nothing happens
            close_client_port(None)
            assert pf.port is not None and pf.port.clients == []
            with await connect(vol, b"next") as following:  # the slots are free again
                assert await in_thread(following.send_message, b"x", timeout=10) == b"echo:x"
    assert [c.context for c in pf.disconnected] == [b"next"]  # none for the two the filter closed


async def test_a_port_its_client_closed_says_so(tmp_path: Path) -> None:
    """After close() (threads) or the end of ``async with`` (trio), calls raise PortDisconnectedError
    saying the port was closed, not that the daemon closed it; the filter sees both disconnects."""
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        port = await connect(vol)
        await in_thread(port.close)
        async with open_filter_port(vol.port_path(PORT)) as trio_port:
            pass
        for closed in (partial(in_thread, port.send_message, b"x", timeout=10), partial(trio_port.send_message, b"x")):
            with pytest.raises(PortDisconnectedError) as disconnected:
                await closed()
            assert str(disconnected.value) == f"port {PORT}: closed"
        await until(lambda: len(pf.disconnected) == 2, "both disconnect callbacks")


async def test_a_killed_client_is_disconnected_within_a_second_and_its_pending_send_fails(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        client = await in_thread(ClientProcess, vol.port_path(PORT), "doomed")
        try:
            assert "connected" in client.first, client.first
            [connection] = pf.connections
            assert connection.client.pid == client.pid
            sent: list[Any] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, partial(send_message, connection.client, b"scan", timeout=30), sent)
                got = await in_thread(client.command, "get")  # it has the message, and will never reply
                assert got["message"]["data"] == "scan", got
                killed = trio.current_time()
                await in_thread(client.kill)
        finally:
            await in_thread(client.close)
        assert isinstance(sent[0], PortDisconnectedError), sent
        assert pf.disconnected == [connection]
        assert connection.disconnected_at is not None and connection.disconnected_at - killed < 1.0
        with pytest.raises(PortDisconnectedError):
            await send_message(connection.client, b"later", timeout=10)


# -- the service's own I/O and the deadlock detector (section 3: a service deadlocking on its own opens) ------


def request_of(tid: int) -> Requestor:
    return Requestor(tid, 0, 0, 0o022)


@contextlib.contextmanager
def handling_request_of(tid: int) -> Iterator[None]:
    """Run the block as the kernel adapter runs a request of thread ``tid`` (whose caller waits for it)."""
    token = requesting_thread.set(tid)
    try:
        yield
    finally:
        requesting_thread.reset(token)


async def test_client_of_recognises_any_thread_of_a_clients_process_even_a_new_one(tmp_path: Path) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        assert pf.port is not None
        assert pf.port.client_of(request_of(os.getpid())) is None  # no client yet
        with await connect(vol):  # this process is the client
            [connection] = pf.connections
            started, done = threading.Event(), threading.Event()
            tids: list[int] = []

            def worker() -> None:
                tids.append(threading.get_native_id())
                started.set()
                done.wait(10)

            thread = threading.Thread(target=worker)
            thread.start()
            try:
                started.wait(10)
                # asked at once: a thread the client started a moment ago is the client's too
                assert tids[0] != os.getpid()
                assert pf.port.client_of(request_of(tids[0])) is connection.client
                assert pf.port.client_of(request_of(os.getpid())) is connection.client
            finally:
                done.set()
                thread.join()
            other = subprocess.Popen(["sleep", "30"])
            try:
                assert pf.port.client_of(request_of(other.pid)) is None
            finally:
                other.kill()
                other.wait()
            assert pf.port.client_of(request_of(0)) is None  # the kernel's own requests (forget) have no process
        await until(lambda: pf.disconnected, "the disconnect")
        assert pf.port.client_of(request_of(os.getpid())) is None  # a client that left is nobody's service


async def test_a_send_for_a_request_of_the_clients_own_process_is_refused_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:  # this process is the client
            client = pf.connections[0].client
            waiting_thread = threading.get_native_id()  # a thread of the client, blocked in the request
            start = trio.current_time()
            with handling_request_of(waiting_thread), pytest.raises(PortDeadlockError) as refused:
                await send_message(client, b"scan it", timeout=30)
            assert trio.current_time() - start < 1  # at once, not after the send's 30 s
            error = refused.value
            assert error.status == NtStatus.POSSIBLE_DEADLOCK and error.errno == errno.EDEADLK
            assert f"port {PORT}: possible deadlock" in str(error)
            assert f"thread {waiting_thread} of pid {os.getpid()}" in str(error)
            assert f"port client pid {os.getpid()}" in str(error)
            assert str(error) in caplog.text  # logged for whoever reads the daemon's log
            with pytest.raises(PortTimeoutError):  # nothing was sent
                await in_thread(port.get_message, timeout=0.2)
            # a filter whose service answers from other threads than its I/O's says so, and the send goes out
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, answer_one, port)
                with handling_request_of(waiting_thread):
                    reply = await send_message(client, b"scan it", timeout=10, deadlock_check=False)
            assert reply == b"re:scan it"
            # a send made for no request (a work item, filter_load...) or that waits for no reply is not checked
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, answer_one, port)
                assert await send_message(client, b"unasked", timeout=10) == b"re:unasked"
            with handling_request_of(waiting_thread):
                assert await send_message(client, b"notice", reply_capacity=None, timeout=10) is None
            assert (await in_thread(port.get_message, timeout=10)).data == b"notice"


async def test_a_send_that_would_close_a_cycle_through_other_clients_is_refused(tmp_path: Path) -> None:
    # clients A and B in processes of their own; a request of A's (single) thread waits on B. B's request that
    # waits on A closes the cycle: refused. A third process's request that waits on A is an ordinary wait.
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        a = await in_thread(ClientProcess, vol.port_path(PORT), "a")
        b = await in_thread(ClientProcess, vol.port_path(PORT), "b")
        bystander = subprocess.Popen(["sleep", "60"])
        try:
            to_a, to_b = (next(c.client for c in pf.connections if c.context == x) for x in (b"a", b"b"))
            sent: list[Any] = []

            async def a_waits_on_b() -> bytes | None:
                with handling_request_of(a.pid):
                    return await send_message(to_b, b"for a", timeout=30)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, a_waits_on_b, sent)
                message = (await in_thread(b.command, "get"))["message"]  # B has A's message, not yet answered
                assert message["data"] == "for a"
                with handling_request_of(b.pid), pytest.raises(PortDeadlockError) as refused:
                    await send_message(to_a, b"for b", timeout=30)
                assert f"thread {b.pid} of pid {b.pid}" in str(refused.value)
                assert f"thread {a.pid} of pid {a.pid}" in str(refused.value)
                assert f"port client pid {b.pid}" in str(refused.value)

                async def bystander_waits_on_a() -> bytes | None:
                    with handling_request_of(bystander.pid):
                        return await send_message(to_a, b"for the bystander", timeout=30)

                nursery.start_soon(outcome_of, bystander_waits_on_a, sent)
                got = (await in_thread(a.command, "get"))["message"]
                assert got["data"] == "for the bystander"
                assert await in_thread(a.command, f"reply {got['id']} fine") == {"replied": got["id"]}
                assert await in_thread(b.command, f"reply {message['id']} done") == {"replied": message["id"]}
            assert sorted(sent) == [b"done", b"fine"]

            # the wait ended with its reply: B's request may now wait on A
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, a_waits_on_b, sent)  # and A's on B again, meanwhile

                async def b_waits_on_a() -> bytes | None:
                    with handling_request_of(b.pid):
                        return await send_message(to_a, b"for b", timeout=30)

                await until(lambda: deadlocks._waits, "A's wait on B")
                with pytest.raises(PortDeadlockError):
                    await b_waits_on_a()
                got = (await in_thread(b.command, "get"))["message"]
                await in_thread(b.command, f"reply {got['id']} again")
            assert sent[-1] == b"again" and deadlocks._waits == []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, b_waits_on_a, sent)
                got = (await in_thread(a.command, "get"))["message"]
                await in_thread(a.command, f"reply {got['id']} unblocked")
            assert sent[-1] == b"unblocked"
        finally:
            bystander.kill()
            bystander.wait()
            await in_thread(a.close)
            await in_thread(b.close)


async def test_unloading_the_filter_disconnects_every_client(tmp_path: Path) -> None:
    pf = PortFilter()
    vol = pf.volume(tmp_path)
    closed = False
    with contextlib.ExitStack() as clients:
        try:
            first = clients.enter_context(await connect(vol, b"first"))
            second = clients.enter_context(await connect(vol, b"second"))
            got: list[Any] = []
            async with open_filter_port(vol.port_path(PORT), b"third") as third, trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, partial(in_thread, first.get_message, timeout=10), got)
                nursery.start_soon(outcome_of, partial(in_thread, second.get_message, timeout=10), got)
                nursery.start_soon(outcome_of, third.get_message, got)
                await until(lambda: len(pf.connections) == 3, "three connections")
                closed = True
                await vol.aclose()
        finally:
            if not closed:
                await vol.aclose()
        assert len(got) == 3 and all(isinstance(outcome, PortDisconnectedError) for outcome in got), got
        assert sorted(c.context for c in pf.disconnected) == [b"first", b"second", b"third"]
        assert not first.connected and not second.connected
        assert not os.path.exists(vol.port_path(PORT)) and not os.path.exists(vol.port_directory)


async def test_an_unload_the_filter_refuses_keeps_its_ports(tmp_path: Path) -> None:
    """Filter.unload is what ``fltmc unload`` asks first: a refusal leaves the port and its clients alone."""
    pf = PortFilter(refuse_unload=True)
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            assert pf.filter.unload(FilterUnloadFlags.NONE) == NtStatus.FLT_DO_NOT_DETACH
            assert await in_thread(port.send_message, b"still", timeout=10) == b"echo:still"
            assert os.path.exists(vol.port_path(PORT)) and pf.disconnected == []
            assert pf.filter.unload(FilterUnloadFlags.MANDATORY) == NtStatus.SUCCESS
            assert pf.disconnected == pf.connections and not os.path.exists(vol.port_path(PORT))
            with pytest.raises(PortDisconnectedError):
                await in_thread(port.get_message, timeout=10)


async def test_a_port_left_open_at_unload_is_closed_for_the_filter(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    pf = PortFilter(leave_port_open=True)
    async with pf.volume(tmp_path) as vol:
        port = await connect(vol)
    try:
        assert pf.port is not None and pf.port.closed and pf.port.clients == []
        assert "port TestPort closed (1 client(s) stay connected)" in caplog.text
        assert "disconnected: the filter unloaded" in caplog.text
        assert "filter bug" not in caplog.text  # filter_unload gets no Filter: it may leave its ports to the manager
        assert pf.disconnected == pf.connections
        with pytest.raises(PortDisconnectedError):
            await in_thread(port.get_message, timeout=10)
    finally:
        port.close()


async def test_a_disconnect_notify_that_raises_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pf = PortFilter()

    def broken(connection: Connection) -> None:
        raise RuntimeError("disconnect_notify is broken")

    async with pf.volume(tmp_path) as vol:
        assert pf.port is not None
        pf.port.disconnect_notify = broken
        await in_thread((await connect(vol)).close)
        await until(lambda: "disconnect_notify raised RuntimeError" in caplog.text, "the filter bug's log line")
        with await connect(vol) as port:  # the port serves on
            assert await in_thread(port.send_message, b"x", timeout=10) == b"echo:x"


# -- robustness: clients that misbehave, the daemon's descriptors, stale sockets ---------------------------


def raw_client(vol: InProcessVolume, context: bytes = b"raw") -> socket.socket:
    """A client on a bare socket (blocking: use it in a thread), accepted, then doing only what the test does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(vol.port_path(PORT))
    sock.sendall(encode(Frame(FrameKind.CONNECT, payload=context)))
    [connected] = Decoder(FROM_DAEMON).feed(sock.recv(4096))
    assert connected.kind is FrameKind.CONNECTED and connected.aux == NtStatus.SUCCESS, connected
    return sock


async def test_a_client_that_does_not_read_its_answers_is_not_read_either(tmp_path: Path) -> None:
    """Backpressure: a client that floods requests and never reads the answers soon finds its own writes
    blocked (the daemon stopped reading it) instead of making the daemon hold a task and an answer for
    each request; the daemon serves the other clients meanwhile."""
    pf = PortFilter(max_connections=2)
    async with pf.volume(tmp_path) as vol:
        flooder = await in_thread(raw_client, vol)
        request = encode(Frame(FrameKind.REQUEST, 1, 100, b"x"))

        def flood(frames: int) -> int:
            flooder.settimeout(1)
            for sent in range(frames):
                try:
                    flooder.sendall(request)
                except TimeoutError:
                    return sent
            return frames

        with flooder:
            sent = await in_thread(flood, 100_000)
            assert sent < 10_000, f"the daemon read {sent} requests from a client that reads nothing"
            with await connect(vol, b"other") as other:
                assert await in_thread(other.send_message, b"meanwhile", timeout=10) == b"echo:meanwhile"
        await until(lambda: len(pf.disconnected) == 2, "both disconnect callbacks")
        assert pf.port is not None and pf.port.clients == []


async def test_a_send_to_a_client_that_stops_reading_times_out_and_blocks_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The filter's 4 MiB message to a client that reads nothing fills its socket: the send times out at
    its timeout (the daemon's loop waits on nothing), the message cut short disconnects that client
    (its stream is mid-frame), a send queued behind it fails with PORT_DISCONNECTED, and another client
    exchanges messages both ways meanwhile."""
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    pf = PortFilter(max_connections=2)
    async with pf.volume(tmp_path) as vol:
        with await in_thread(raw_client, vol), await connect(vol, b"other") as other:
            stuck, fine = (c.client for c in pf.connections)
            big: list[Any] = []
            queued: list[Any] = []
            start = trio.current_time()
            with trio.fail_after(20):  # a send that waited for the socket without its timeout would hang here
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(outcome_of, partial(send_message, stuck, b"x" * MAX_PAYLOAD, timeout=1), big)
                    nursery.start_soon(outcome_of, partial(send_message, stuck, b"queued", timeout=10), queued)
                    assert await in_thread(other.send_message, b"meanwhile", timeout=10) == b"echo:meanwhile"
                    nursery.start_soon(in_thread, answer_one, other)
                    assert await send_message(fine, b"fine", timeout=10) == b"re:fine"
            elapsed = trio.current_time() - start
            assert isinstance(big[0], PortTimeoutError), big
            assert isinstance(queued[0], PortDisconnectedError), queued
            assert 1.0 <= elapsed < 2.5, elapsed
            assert not stuck.connected and fine.connected
            assert "disconnected: a message to it was cut short" in caplog.text
            assert pf.disconnected == [pf.connections[0]]


@pytest.mark.parametrize("flavour", ["thread", "trio"])
async def test_a_client_that_stops_getting_holds_a_bounded_number_of_messages(tmp_path: Path, flavour: str) -> None:
    """A service that stopped calling get_message: its port holds MAX_WAITING_MESSAGES of the filter's
    messages, disconnects itself at one more (its memory stays bounded) and tells why on its next call."""
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol, contextlib.AsyncExitStack() as stack:
        if flavour == "thread":
            port: Any = stack.enter_context(await connect(vol))
        else:
            port = await stack.enter_async_context(open_filter_port(vol.port_path(PORT), b"v1"))
        client = pf.connections[0].client
        for number in range(MAX_WAITING_MESSAGES):
            await send_message(client, b"notice %d" % number, reply_capacity=None, timeout=10)
        await trio.sleep(0.2)  # the client's reader has them all
        assert port.connected and pf.disconnected == []
        with contextlib.suppress(PortDisconnectedError):  # it may be written before the client hangs up
            await send_message(client, b"one too many", reply_capacity=None, timeout=10)
        await until(lambda: pf.disconnected, "the client to disconnect itself")
        with pytest.raises(PortDisconnectedError):
            await send_message(client, b"later", reply_capacity=None, timeout=10)
        assert not port.connected
        too_many = f"more than {MAX_WAITING_MESSAGES} messages waiting for get_message"
        with pytest.raises(PortProtocolError, match=too_many):
            if flavour == "thread":
                await in_thread(port.get_message, timeout=10)
            else:
                await port.get_message()


async def test_a_trio_clients_cancelled_send_disconnects_it_instead_of_garbling_the_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A trio task's large send_message cancelled after part of the frame was written: the port is
    disconnected (the daemon sees a truncated frame), so that no later message is read as the rest of it."""
    seen: list[bytes] = []

    def record(connection: Connection, data: bytes, reply_capacity: int) -> bytes:
        seen.append(data)
        return b"ok"

    pf = PortFilter(message_notify=record)
    async with pf.volume(tmp_path) as vol, open_filter_port(vol.port_path(PORT)) as port:
        writes: list[int] = []
        with trio.CancelScope() as scope:
            send = port._sock.send

            async def send_then_cancel(data: Any) -> int:  # the first piece is written, then the task is cancelled
                writes.append(await send(data))
                scope.cancel()
                return writes[-1]

            port._sock.send = send_then_cancel  # type: ignore[method-assign]
            await port.send_message(b"x" * MAX_PAYLOAD)
        assert len(writes) == 1 and 0 < writes[0] < MAX_PAYLOAD, writes
        assert not port.connected
        with pytest.raises(PortDisconnectedError, match="cut short"):
            await port.send_message(b"next")
        await until(lambda: pf.disconnected, "the disconnect callback")
        assert seen == []
        assert "broke the protocol: the stream ended inside a frame" in caplog.text


async def test_replies_no_send_waits_for_are_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reply to an id the filter never sent, or a second reply to one already answered, is dropped (with
    a debug line); the connection and the next exchange are unaffected."""
    caplog.set_level(logging.DEBUG, logger="fltfuse.port")
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        with await connect(vol) as port:
            client = pf.connections[0].client
            await in_thread(port.reply_message, 987654321, b"nobody asked")
            got: list[PortMessage] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outcome_of, partial(in_thread, answer_one, port), got)
                assert await send_message(client, b"once", timeout=10) == b"re:once"
            await in_thread(port.reply_message, got[0].message_id, b"twice")
            for message_id in (987654321, got[0].message_id):
                dropped = f"replied to message {message_id}, which waits no more"
                await until(lambda d=dropped: d in caplog.text, dropped)  # type: ignore[misc]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_thread, answer_one, port)
                assert await send_message(client, b"next", timeout=10) == b"re:next"
            assert client.connected and pf.disconnected == []


async def test_a_stale_socket_file_is_replaced_and_a_deleted_one_stops_only_new_connections(tmp_path: Path) -> None:
    """A socket file a crashed daemon left where the port goes is replaced; one deleted while the port
    listens makes new clients get PortNotFoundError, the connected client serves on, closing the port
    is fine, and the filter can create it again. A file that is not a socket is never removed."""
    pf = PortFilter()
    ports = tmp_path / "ports"  # the filter's port directory, made before the volume starts it
    ports.mkdir()
    pf.filter.port_directory = str(ports)
    path = str(ports / PORT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as crashed:
        crashed.bind(path)  # bound and never listening: what a dead daemon leaves
    async with pf.volume(tmp_path):
        with await in_thread(connect_communication_port, path, b"v1") as port:
            assert await in_thread(port.send_message, b"on a stale path", timeout=10) == b"echo:on a stale path"
            os.unlink(path)
            with pytest.raises(PortNotFoundError):
                await in_thread(connect_communication_port, path, b"late")
            assert await in_thread(port.send_message, b"still", timeout=10) == b"echo:still"
            assert pf.port is not None
            close_communication_port(pf.port)
            pf._load(pf.filter)  # created again, as a filter reload would
            with await in_thread(connect_communication_port, path, b"again") as again:
                assert await in_thread(again.send_message, b"x", timeout=10) == b"echo:x"
            not_a_socket = ports / "Other"
            not_a_socket.write_text("keep me")
            with pytest.raises(PortError, match="cannot listen"):
                create_communication_port(
                    pf.filter, "Other", connect_notify=pf._connect, disconnect_notify=pf._disconnect, max_connections=1
                )
            assert not_a_socket.read_text() == "keep me"


async def test_a_port_keeps_listening_when_the_daemon_runs_out_of_descriptors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE leaves the connection in the backlog: the port logs it, retries, and
    the client is served once descriptors are free again (it does not stop listening for good)."""
    caplog.set_level(logging.INFO, logger="fltfuse.port")
    pf = PortFilter()
    async with pf.volume(tmp_path) as vol:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            held: list[int] = []
            try:
                highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
                resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
                with contextlib.suppress(OSError):
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                client.connect(vol.port_path(PORT))  # needs no descriptor of this process: it waits in the backlog
                client.sendall(encode(Frame(FrameKind.CONNECT, payload=b"starved")))
                await until(lambda: "accept" in caplog.text, "the daemon's failed accept")
            finally:
                for fd in held:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert "cannot accept a connection ([Errno 24] Too many open files); retrying" in caplog.text
            client.settimeout(10)
            [connected] = Decoder(FROM_DAEMON).feed(await in_thread(client.recv, 4096))
            assert connected.kind is FrameKind.CONNECTED and connected.aux == NtStatus.SUCCESS, connected
            assert [c.context for c in pf.connections] == [b"starved"]
            assert "accepting connections again" in caplog.text


# -- the wire format ----------------------------------------------------------------------------------------


def test_the_wire_format_is_the_documented_one() -> None:
    """The header of wire.py's docstring, byte for byte: a change to the format must change VERSION."""
    frame = Frame(FrameKind.MESSAGE, message_id=0x0102030405060708, aux=0x0A0B0C0D, payload=b"hi", fds=(7, 8))
    expected = (
        b"FP"  # magic
        + bytes([1, 5, 2, 0, 0, 0])  # version 1, kind MESSAGE, 2 descriptors, 3 reserved bytes
        + bytes.fromhex("00000002")  # length, big-endian
        + bytes.fromhex("0A0B0C0D")  # aux
        + bytes.fromhex("0102030405060708")  # message id
        + b"hi"
    )
    assert encode(frame) == expected and HEADER.size == 24 and VERSION == 1
    assert {kind.name: kind.value for kind in FrameKind} == {
        "CONNECT": 1,
        "CONNECTED": 2,
        "REQUEST": 3,
        "RESPONSE": 4,
        "MESSAGE": 5,
        "REPLY": 6,
    }
    assert (MAX_PAYLOAD, MAX_CONTEXT, MAX_FDS, NO_REPLY) == (4 * 1024 * 1024, 0xFFFF, 4, 0xFFFFFFFF)
    [decoded] = Decoder(FROM_DAEMON).feed(expected, [7, 8])
    assert decoded == frame


@pytest.mark.parametrize("flavour", ["threads", "trio"])
async def test_a_client_refuses_a_daemon_speaking_another_version(tmp_path: Path, flavour: str) -> None:
    """A daemon answering CONNECT in wire format version 2: the client library raises PortProtocolError
    naming the version, rather than misreading the frame."""
    path = str(tmp_path / "FakePort")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)

    def fake_daemon() -> bytes:
        conn, _ = listener.accept()
        with conn:
            request = conn.recv(4096)
            conn.sendall(HEADER.pack(MAGIC, 2, FrameKind.CONNECTED, 0, 0, 0, 0))
            conn.recv(4096)  # until the client hangs up
        return request

    with listener:
        async with trio.open_nursery() as nursery:
            requests: list[bytes] = []
            nursery.start_soon(outcome_of, partial(in_thread, fake_daemon), requests)
            with pytest.raises(PortProtocolError, match="wire format version 2"):
                if flavour == "threads":
                    await in_thread(connect_communication_port, path, b"v1")
                else:
                    async with open_filter_port(path, b"v1"):
                        pass
    assert requests == [encode(Frame(FrameKind.CONNECT, payload=b"v1"))]
