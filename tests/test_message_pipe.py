"""The byte stream carried in WebSocket messages (``protocol.message_pipe``) ends quietly when
its other side ends in the moment after the peer's close frame was answered but before the
connection's end was delivered (wsproto is CLOSED then and refuses to send a close or a
message): before, that raised out of the reactor as an "Unhandled Error" (seen once in
``test_cluster_ops`` when a relay process's connection ended as the module closed its tunnel).
Real WebSockets (Twisted's, over TCP on 127.0.0.1)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, endpoints
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.websocket import WebSocketClientEndpoint, WebSocketResource
from zope.interface import implementer

from protocol.message_pipe import MessagePipe


class End:
    """A WebSocket end doing nothing but noticing its end."""

    def __init__(self) -> None:
        self.lost: defer.Deferred = defer.Deferred()
        self.ws = None

    def negotiationStarted(self, ws) -> None:
        self.ws = ws

    def negotiationFinished(self) -> None:
        pass

    def bytesMessageReceived(self, data) -> None:
        pass

    def textMessageReceived(self, text) -> None:
        pass

    def pongReceived(self, payload) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


class TunnelEnd(End):
    """The server's end, a ``MessagePipe`` over its WebSocket.  Twisted answers the peer's
    close frame and then closes the TCP connection; in that very call the pipe is written to
    and closed, as a tunnel's other side (the relay process) may do in that moment."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []
        self.in_the_window: defer.Deferred = defer.Deferred()

    def negotiationStarted(self, ws) -> None:
        super().negotiationStarted(ws)
        self.pipe = MessagePipe(ws, ws.transport)
        tcp = ws.transport
        close = tcp.loseConnection

        def lose_connection(*args) -> None:
            close(*args)
            if not self.in_the_window.called:
                try:
                    self.pipe.write(b"late bytes from the other side")
                    self.pipe.loseConnection()
                except BaseException as exc:  # noqa: BLE001 - what the reactor would log
                    self.errors.append(exc)
                self.in_the_window.callback(None)
        tcp.loseConnection = lose_connection


@implementer(IAgentEndpointFactory)
class PlainTCP:
    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri):
        return endpoints.TCP4ClientEndpoint(self.reactor, uri.host.decode(), uri.port,
                                            timeout=10)


@pytest_twisted.ensureDeferred
async def test_a_pipe_closed_right_after_the_peers_close_frame_raises_nothing():
    from twisted.internet import reactor
    server_end, client_end = TunnelEnd(), End()

    class One:
        def __init__(self, end) -> None:
            self.end = end

        def buildProtocol(self, _request_or_url):
            return self.end

    root = Resource()
    root.putChild(b"ws", WebSocketResource(One(server_end)))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/ws"
        await defer.ensureDeferred(WebSocketClientEndpoint(PlainTCP(reactor), url).connect(
            One(client_end))).addTimeout(10, reactor)
        client_end.ws.loseConnection()               # the module closes its tunnel ...
        await server_end.in_the_window.addTimeout(10, reactor)   # ... as the other side ends
        assert server_end.errors == []
        await server_end.lost.addTimeout(10, reactor)
        await client_end.lost.addTimeout(10, reactor)
    finally:
        await port.stopListening()
