"""Modules over a WebSocket on the HTTPS port, for networks where only web traffic passes.

``GET /api/v1/module-tunnel`` upgrades to a WebSocket (RFC 6455, Twisted's implementation);
its binary messages carry the module's own TLS connection, which is terminated here with the
module port's context (mutual TLS: chain, revocation and identity checked exactly as there) and
handed to the module port's factory: control connections and relay legs of the in-process relay.
So a TLS-inspecting web proxy in between sees only the outer TLS and an opaque byte stream, and
the module still proves who it is to this server, not to the proxy.

Not here: the WebSocket framing (``twisted.web.websocket`` with wsproto), the module port's own
rules (``module_port``), relay legs to separate relay processes (``server.relay_tunnel``).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.websocket import WebSocketResource

from protocol.message_pipe import MessagePipe, close_websocket
from protocol.runtime import Logger

log = Logger(namespace="hausmeister.ws_tunnel")

PATH = b"module-tunnel"


class _TunnelTLS(TLSMemoryBIOProtocol):
    """The module's TLS inside a tunnel.  Like a connection on the module port it must finish
    its handshake and first command (Hello, OpenRelayLeg) within a deadline, or it is closed:
    an upgraded WebSocket that never speaks must not hold a connection for ever."""

    tunnel_deadline = None

    def settle(self) -> None:  # called by the module port (connection_guard.settle)
        if self.tunnel_deadline and self.tunnel_deadline.active():  # False: settled already
            self.tunnel_deadline.cancel()
        self.tunnel_deadline = False

    def connectionLost(self, reason) -> None:
        self.settle()
        super().connectionLost(reason)


class _TunnelEnd:
    """One WebSocket: its messages are the inner TLS connection's bytes."""

    def __init__(self, tls_factory: TLSMemoryBIOFactory, request, deadline: float, clock) -> None:
        self.tls_factory = tls_factory
        self.request = request
        self.deadline = deadline
        self.clock = clock
        self.inner = None

    def negotiationStarted(self, transport) -> None:
        self.ws = transport

    def negotiationFinished(self) -> None:
        outer = self.request.channel.transport
        # the HTTP channel throttled the connection as its producer; after the upgrade the
        # tunnel's inner TLS (and a relay splice behind it) takes that role
        outer.unregisterProducer()
        # the channel's idle timeout is no longer reset by the bytes (they go to the tunnel); a
        # host's tunnel lives as long as its presence
        self.request.channel.setTimeout(None)
        log.info("module tunnel (WebSocket) opened from {address}", address=outer.getPeer().host)
        self.inner = self.tls_factory.buildProtocol(outer.getPeer())
        self.inner.tunnel_deadline = self.clock.callLater(self.deadline, self._too_slow, outer)
        self.inner.makeConnection(MessagePipe(self.ws, outer))

    def _too_slow(self, outer) -> None:
        log.info("module tunnel from {address} closed: no handshake and first command within "
                 "{seconds:g} s", address=outer.getPeer().host, seconds=self.deadline)
        if self.inner is not None:
            self.inner.tunnel_deadline = False
        outer.abortConnection()

    def bytesMessageReceived(self, data) -> None:
        if self.inner is not None:
            self.inner.dataReceived(bytes(data))

    def textMessageReceived(self, message: str) -> None:
        close_websocket(self.ws, 1003)  # text has no place in a byte tunnel

    def pongReceived(self, payload: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if self.inner is not None:
            inner, self.inner = self.inner, None
            inner.connectionLost(reason)


class _TunnelFactory:
    def __init__(self, module_context_factory: Any, module_factory: Any, deadline: float,
                 clock) -> None:
        self.tls_factory = TLSMemoryBIOFactory(module_context_factory, False, module_factory)
        self.tls_factory.protocol = _TunnelTLS
        self.deadline = deadline
        self.clock = clock

    def buildProtocol(self, request) -> _TunnelEnd:
        return _TunnelEnd(self.tls_factory, request, self.deadline, self.clock)


def tunnel_resource(module_context_factory: Any, module_factory: Any, deadline: float,
                    clock) -> WebSocketResource:
    """``deadline``: seconds for the inner TLS handshake and first command together."""
    return WebSocketResource(_TunnelFactory(module_context_factory, module_factory, deadline,
                                            clock))
