"""A byte stream carried in WebSocket binary messages, as a Twisted transport.

The module's TLS connection runs over it when it reaches the server through a WebSocket (server:
``server.ws_tunnel``, module: ``modules.common.link.ws_tunnel``): each write is one message, and
pausing or aborting acts on the connection the WebSocket itself runs on.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer
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
            self.ws.sendBytesMessage(bytes(data))

    def writeSequence(self, parts) -> None:
        self.write(b"".join(parts))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.ws.loseConnection()

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
