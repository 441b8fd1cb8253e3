"""A module's relay leg: a TLS connection that says ``OpenRelayLeg`` and then carries raw bytes.

``open_leg`` returns a ``RelayLeg`` whose bytes go to whatever sink is attached (the session
channel); bytes that arrive before a sink is attached are kept, in order.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocol.amp_adapter import FramedAMP
from protocol.control import OpenRelayLeg

from modules.common.link import ws_tunnel
from modules.common.link.connection import ResumingTLS, client_tls, path_to
from modules.common.link.folder import ModuleFolder

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

    def connectionMade(self) -> None:
        super().connectionMade()
        # the leg carries the screen: an update's last, short TLS record must go out at once,
        # not wait for the relay's delayed ACK (~40 ms; bench/README.md, Nagle) — as the relay's
        # own side of the leg and the RFB server's socket already do
        tcp = getattr(self.transport, "transport", None)
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)

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
                   folder: ModuleFolder | None, timeout: float = 15,
                   resume=None) -> RelayLeg:
    """``resume``: the TLS session to offer (``connection.tls_session`` of the module's control
    connection): a relay in the server process resumes it instead of a full handshake."""
    tls = client_tls(relay_host, ca_pem, folder)
    if resume is not None:
        tls = ResumingTLS(tls, resume)
    if ws_tunnel.enabled():  # a relay process of its own is reached through the server
        path = ws_tunnel.leg_endpoint(reactor, relay_host, relay_port, ca_pem, timeout)
    else:
        path = path_to(reactor, relay_host, relay_port, ca_pem, timeout)
    endpoint = endpoints.wrapClientTLS(tls, path)
    leg = await endpoints.connectProtocol(endpoint, RelayLeg())
    return await leg.start(token)
