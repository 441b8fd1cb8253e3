"""Control-plane commands spoken on the module port (Twisted AMP), defined once for both sides.

Every connection starts with ``Hello``: the module says which protocol version it speaks, the
server answers with the identity it read from the module's certificate (or ``anonymous``).
Errors carry a code (the AMP error key) and a human message.
"""

from __future__ import annotations

from twisted.protocols import amp

from . import PROTOCOL_VERSION


class ProtocolVersionMismatch(Exception):
    """The module speaks a protocol version the server does not."""


class NotEnrolled(Exception):
    """The command needs a module certificate and the connection has none."""


class Hello(amp.Command):
    arguments = [
        (b"protocol_version", amp.Integer()),
        (b"module_version", amp.Unicode()),
        (b"module_kind", amp.Unicode()),
    ]
    response = [
        (b"server_version", amp.Unicode()),
        (b"identity", amp.Unicode()),
        (b"role", amp.Unicode()),
        (b"tenant", amp.Unicode()),
        (b"certificate_not_after", amp.Unicode()),
    ]
    errors = {ProtocolVersionMismatch: b"PROTOCOL_VERSION", NotEnrolled: b"NOT_ENROLLED"}


__all__ = ["Hello", "PROTOCOL_VERSION", "ProtocolVersionMismatch", "NotEnrolled"]
