"""Communication ports between filters and user-mode processes (chapter 10 of the guide).

``wire`` is the frame format both ends speak; ``server`` is the filter's
side, in the daemon. The user-mode side is :mod:`fltfuse.port`.
"""

from .server import (
    DEFAULT_REPLY_CAPACITY,
    DEFAULT_SEND_TIMEOUT,
    ClientPort,
    CommunicationPort,
    PortSecurity,
    close_client_port,
    close_communication_port,
    create_communication_port,
    send_message,
)
from .wire import (
    PortBufferOverflowError,
    PortDeadlockError,
    PortDisconnectedError,
    PortError,
    PortNotFoundError,
    PortProtocolError,
    PortRefusedError,
    PortTimeoutError,
)

__all__ = [
    "DEFAULT_REPLY_CAPACITY",
    "DEFAULT_SEND_TIMEOUT",
    "ClientPort",
    "CommunicationPort",
    "PortBufferOverflowError",
    "PortDeadlockError",
    "PortDisconnectedError",
    "PortError",
    "PortNotFoundError",
    "PortProtocolError",
    "PortRefusedError",
    "PortSecurity",
    "PortTimeoutError",
    "close_client_port",
    "close_communication_port",
    "create_communication_port",
    "send_message",
]
