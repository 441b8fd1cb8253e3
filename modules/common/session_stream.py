"""A module's relay leg: a TLS connection that says ``OpenRelayLeg`` and then carries raw bytes.

``open_leg`` returns a ``RelayLeg`` whose bytes go to whatever sink is attached (``--pipe``
attaches stdin/stdout); bytes that arrive before a sink is attached are kept, in order.
Back-pressure runs both ways through Twisted producers and consumers.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer, endpoints, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from protocol.amp_adapter import FramedAMP
from protocol.control import OpenRelayLeg

from .connection import client_tls
from .folder import ModuleFolder

log = Logger()


class RelayLeg(FramedAMP):
    """The module's end of one relayed session stream."""

    def __init__(self) -> None:
        super().__init__()
        self.session_id = ""
        self.ended: defer.Deferred = defer.Deferred()
        self._sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.bytes_in = 0
        self.bytes_out = 0

    def start(self, token: str) -> defer.Deferred:
        d = self.callRemote(OpenRelayLeg, relay_token=token)

        def switched(answer):
            self.session_id = answer["session_id"]
            self.switch_to_raw(self._received, self._leg_lost)
            return self
        return d.addCallback(switched)

    def _received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._sink is None:
            self._early.append(data)
        else:
            self._sink(data)

    def _leg_lost(self, reason: Failure) -> None:
        if not self.ended.called:
            self.ended.callback(reason.getErrorMessage())

    def attach(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink(chunk)

    def send(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.transport.write(data)

    def close(self) -> None:
        # TLS only sends its close alert once no producer is registered on the transport.
        if self.transport is None:
            return
        if getattr(self.transport, "producer", None) is not None or getattr(
                self.transport, "_producer", None) is not None:
            self.transport.unregisterProducer()
        self.transport.loseConnection()


async def open_leg(reactor, relay_host: str, relay_port: int, token: str, ca_pem: bytes,
                   folder: ModuleFolder | None, timeout: float = 15) -> RelayLeg:
    tls = client_tls(relay_host, ca_pem, folder)
    endpoint = endpoints.wrapClientTLS(
        tls, endpoints.TCP4ClientEndpoint(reactor, relay_host, relay_port, timeout=timeout))
    leg = await endpoints.connectProtocol(endpoint, RelayLeg())
    return await leg.start(token)


@implementer(IHalfCloseableProtocol)
class _StdioSide(Protocol):
    def __init__(self, leg: RelayLeg) -> None:
        self.leg = leg

    def dataReceived(self, data: bytes) -> None:
        self.leg.send(data)

    def readConnectionLost(self) -> None:
        # stdin ended: everything read so far is already on its way; end the session.
        self.leg.close()

    def writeConnectionLost(self) -> None:
        self.leg.close()  # nobody reads our stdout any more

    def connectionLost(self, reason) -> None:
        self.leg.close()


def pipe_stdio(leg: RelayLeg, reactor=None) -> defer.Deferred:
    """Join stdin/stdout to the session stream; fires when the session ends."""
    side = _StdioSide(leg)
    io = stdio.StandardIO(side, reactor=reactor)
    leg.transport.registerProducer(io, True)   # the relay is slow: stop reading stdin
    io.registerProducer(leg.transport, True)   # stdout is slow: stop reading the relay
    leg.attach(io.write)

    def done(reason):
        io.unregisterProducer()
        io.loseConnection()
        return reason
    return leg.ended.addCallback(done)


def discard(leg: RelayLeg) -> defer.Deferred:
    """Hold the session and count what arrives (no screen yet to show it on)."""
    leg.attach(lambda data: None)
    return leg.ended
