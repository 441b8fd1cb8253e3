"""Relay legs over a WebSocket on the node's HTTPS port, to relay processes of their own
(``--websocket`` modules with ``relay.external``).

A module that reaches the server only through a WebSocket (``server.ws_tunnel``) cannot open a
TLS connection to a separate relay process.  It opens ``GET /api/v1/relay-tunnel?to=HOST:PORT``
on its node instead; the node connects to that relay process (only to an address of
``relay.external``: no open proxy) and passes the bytes both ways unread.  The module's TLS runs
end to end with the relay process inside the WebSocket's binary messages, so the relay checks the
module's certificate and relay token exactly as on its own port; the node sees ciphertext.
Back-pressure goes both ways (each side pauses the other's reading).

Not here: the module tunnel to this node's own module plane (``server.ws_tunnel``).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web import resource
from twisted.web.websocket import WebSocketResource
from zope.interface import implementer

from protocol.message_pipe import MessagePipe, close_websocket
from protocol.runtime import Logger

log = Logger(namespace="hausmeister.relay_tunnel")

PATH = b"relay-tunnel"
#: seconds for the connection to the relay process
CONNECT_TIMEOUT = 10.0


def parse_target(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class _ToRelay(protocol.Protocol):
    """The node's TCP connection to the relay process: its bytes go into the WebSocket."""

    def __init__(self, end: "_RelayTunnelEnd") -> None:
        self.end = end

    def dataReceived(self, data: bytes) -> None:
        self.end.pipe.write(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.end.relay_gone()


@implementer(IPushProducer)
class _ModuleReading:
    """Pauses reading from the module while the relay process's connection cannot take more;
    its loss is ``relay_gone``'s business, not a reason to abort here."""

    def __init__(self, outer) -> None:
        self.outer = outer

    def pauseProducing(self) -> None:
        self.outer.pauseProducing()

    def resumeProducing(self) -> None:
        self.outer.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _RelayTunnelEnd:
    """One WebSocket: its binary messages go to the relay process and back."""

    def __init__(self, request, target: tuple[str, int], reactor) -> None:
        self.request = request
        self.target = target
        self.reactor = reactor
        self.ws = None
        self.pipe: MessagePipe | None = None
        self.relay: _ToRelay | None = None
        self.early: list[bytes] = []   # the module's bytes before the relay connection is up
        self.closed = False

    def negotiationStarted(self, transport) -> None:
        self.ws = transport

    def negotiationFinished(self) -> None:
        outer = self.request.channel.transport
        outer.unregisterProducer()  # the tunnel, not the HTTP channel, throttles it from now
        self.request.channel.setTimeout(None)  # the relay's own timeouts apply
        self.pipe = MessagePipe(self.ws, outer)
        host, port = self.target
        log.info("relay tunnel (WebSocket) from {address} to relay {host}:{port}",
                 address=outer.getPeer().host, host=host, port=port)
        endpoint = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=CONNECT_TIMEOUT)
        endpoints.connectProtocol(endpoint, _ToRelay(self)).addCallbacks(
            self._connected, self._not_connected)

    def _connected(self, relay: _ToRelay) -> None:
        if self.closed:
            relay.transport.loseConnection()
            return
        self.relay = relay
        # a slow module pauses reading from the relay, a slow relay pauses reading the module
        self.pipe.registerProducer(relay.transport, True)
        relay.transport.registerProducer(_ModuleReading(self.pipe.outer), True)
        early, self.early = self.early, []
        for data in early:
            relay.transport.write(data)

    def _not_connected(self, failure: Failure) -> None:
        log.warn("relay tunnel: could not reach relay {host}:{port}: {why}", host=self.target[0],
                 port=self.target[1], why=failure.getErrorMessage())
        if not self.closed:
            close_websocket(self.ws, 1011)

    def bytesMessageReceived(self, data) -> None:
        if self.relay is not None:
            self.relay.transport.write(bytes(data))
        elif not self.closed:
            self.early.append(bytes(data))

    def textMessageReceived(self, message: str) -> None:
        close_websocket(self.ws, 1003)  # text has no place in a byte tunnel

    def pongReceived(self, payload: bytes) -> None:
        pass

    def relay_gone(self) -> None:
        if not self.closed and self.pipe is not None:
            self.pipe.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.closed = True
        self.early = []
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.loseConnection()


class _RelayTunnelFactory:
    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def buildProtocol(self, request) -> _RelayTunnelEnd:
        return _RelayTunnelEnd(request, request.relay_target, self.reactor)


class RelayTunnelResource(resource.Resource):
    """``GET /api/v1/relay-tunnel?to=HOST:PORT``: a WebSocket to one of ``relays`` (the
    ``relay.external`` addresses); this node's own relay address (``own()``, the in-process
    relay, named differently from how the module reached the node) is the module tunnel
    (``local``); any other target is refused with the reason."""

    isLeaf = True

    def __init__(self, relays: list[tuple[str, int]], reactor: Any,
                 own: Callable[[], tuple[str, int]], local: resource.Resource) -> None:
        super().__init__()
        self.relays = {(host, int(port)) for host, port in relays}
        self.own, self.local = own, local
        self.websocket = WebSocketResource(_RelayTunnelFactory(reactor))

    def render_GET(self, request):
        wanted = (request.args.get(b"to") or [b""])[0].decode("utf-8", "replace")[:300]
        target = parse_target(wanted)
        if target not in self.relays and target == self.own():
            return self.local.render(request)
        if target not in self.relays:
            log.warn("relay tunnel refused from {address}: {wanted!r} is not a relay of this "
                     "server", address=request.getClientAddress().host, wanted=wanted)
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not a relay of this server (relay.external)\n"
        request.relay_target = target
        return self.websocket.render_GET(request)


