"""porttest: a filter with one communication port and no operations (for test_ports_mounted.py).

Its ``filter_load`` creates the server port ``PortName`` with a socket of
mode ``PortMode`` (octal; owner root, group the daemon's) and
``MaxConnections``; its ``filter_unload`` closes it, as a Windows filter
must. The port:

* accepts any connection context but ``b"bad"`` (refused with
  :data:`REFUSAL`);
* answers a message with ``b"echo:"`` and the message;
* logs each connect and disconnect in the daemon's log as
  ``porttest: connected pid N context C`` and ``porttest: disconnected pid N``,
  which the tests read.

Its one operation asks a client before a name is looked up: a LOOKUP of a
name ``ask-PID-...`` first sends ``lookup NAME`` to the connected client of
process PID and waits for its reply (any reply lets the lookup go on); a
send refused as a possible deadlock fails the lookup with that status
(EDEADLK), as a filter with a fail-closed policy would. Other names pass.
"""

from __future__ import annotations

import logging
from typing import Any

from fltfuse import (
    CallbackData,
    ClientPort,
    CommunicationPort,
    Filter,
    FilterRegistration,
    FilterUnloadFlags,
    MajorFunction,
    OperationRegistration,
    PortDeadlockError,
    PortRefusedError,
    PortSecurity,
    PreopCallbackStatus,
    RelatedObjects,
    close_communication_port,
    create_communication_port,
    send_message,
)

log = logging.getLogger("porttest")

REFUSAL = "porttest speaks no context b'bad'"
_port: CommunicationPort | None = None  # the loaded filter's server port (the module is imported afresh per load)


def _number(value: Any, base: int) -> int:
    return int(value, base) if isinstance(value, str) else int(value)


def filter_load(filter_: Filter) -> None:
    global _port
    parameters = filter_.parameters
    _port = create_communication_port(
        filter_,
        str(parameters.get("PortName", "PortTest")),
        connect_notify=connect_notify,
        disconnect_notify=disconnect_notify,
        message_notify=message_notify,
        max_connections=_number(parameters.get("MaxConnections", 4), 0),
        security=PortSecurity(mode=_number(parameters.get("PortMode", "0600"), 8)),
    )


def filter_unload(flags: FilterUnloadFlags) -> None:
    if _port is not None:
        close_communication_port(_port)


def connect_notify(client: ClientPort, server_cookie: Any, context: bytes) -> ClientPort:
    if context == b"bad":
        raise PortRefusedError(REFUSAL)
    log.info("porttest: connected pid %d context %s", client.pid, context.decode(errors="replace"))
    return client


def disconnect_notify(client: ClientPort) -> None:
    log.info("porttest: disconnected pid %d", client.pid)


def message_notify(client: ClientPort, data: bytes, reply_capacity: int) -> bytes:
    return b"echo:" + data


async def pre_lookup(cbd: CallbackData, objects: RelatedObjects) -> PreopCallbackStatus:
    name = cbd.iopb.parameters.name
    if not name.startswith(b"ask-") or _port is None:
        return PreopCallbackStatus.SUCCESS_NO_CALLBACK
    pid = int(name.split(b"-")[1])
    client = next((client for client in _port.clients if client.pid == pid), None)
    if client is not None:
        try:
            await send_message(client, b"lookup " + name, timeout=60)
        except PortDeadlockError as refused:
            cbd.io_status.status = refused.status
            return PreopCallbackStatus.COMPLETE
    return PreopCallbackStatus.SUCCESS_NO_CALLBACK


REGISTRATION = FilterRegistration(
    filter_load=filter_load,
    filter_unload=filter_unload,
    operations=(OperationRegistration(MajorFunction.LOOKUP, pre_lookup),),
)
