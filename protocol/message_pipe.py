"""A byte stream carried in WebSocket binary messages, as a Twisted transport.

The module's TLS connection runs over it when it reaches the server through a WebSocket (server:
``server.ws_tunnel``, module: ``modules.common.link.ws_tunnel``): each write is one message, and
pausing or aborting acts on the connection the WebSocket itself runs on.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer
from wsproto.utilities import LocalProtocolError
from zope.interface import implementer


@implementer(IConsumer, IPushProducer)
class MessagePipe:
    """The transport the inner TLS writes to: each write becomes one binary message; pausing
    pauses the connection the WebSocket runs on."""

    def __init__(self, ws, outer) -> None:
        self.ws = ws          # the WebSocketTransport
        self.outer = outer    # the outer connection (for addresses, pausing, aborting)
        self.disconnecting = False
        self.producer = None

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            try:
                self.ws.sendBytesMessage(bytes(data))
            except LocalProtocolError:  # the peer's close came first: the WebSocket is ending
                self.disconnecting = True

    def writeSequence(self, parts) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            close_websocket(self.ws)

    def abortConnection(self) -> None:
        self.disconnecting = True
        self.outer.abortConnection()

    def getPeer(self):
        return self.outer.getPeer()

    def getHost(self):
        return self.outer.getHost()

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer
        self.outer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.producer = None
        self.outer.unregisterProducer()

    def pauseProducing(self) -> None:
        self.outer.pauseProducing()

    def resumeProducing(self) -> None:
        self.outer.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


def close_websocket(ws, code: int = 1000) -> None:
    """Close ``ws``; if the peer's close frame was already answered (wsproto is CLOSED, the
    connection's end not yet delivered — e.g. the relay's side of a tunnel ends in that moment)
    only the connection underneath is closed, instead of an "Unhandled Error"."""
    try:
        ws.loseConnection(code)
    except LocalProtocolError:
        ws.transport.loseConnection()
