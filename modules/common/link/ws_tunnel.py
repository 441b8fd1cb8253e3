"""Reaching the server through a WebSocket over TLS, where only web traffic passes
(``--websocket`` on any module command).

The module opens ``wss://HOST:PORT/api/v1/module-tunnel`` to its usual server address (which
must be the server's single port, ``listen.single_port``, where browsers and modules share one
port), through the HTTP proxy if one is set, and runs its own mutual TLS inside the WebSocket's
binary messages: the server checks the module's certificate exactly as on the module port, and
the end-to-end session channel inside is unchanged.  The outer TLS is pinned to the server's CA
as well.  A relay leg to a relay process of its own (``relay.external``) goes to the server too,
as ``/api/v1/relay-tunnel?to=HOST:PORT`` (``leg_endpoint``): the server passes the bytes to that
relay, and the module's TLS runs with the relay itself.  Not here: the WebSocket framing itself
(``twisted.web.websocket``).
"""

from __future__ import annotations

from urllib.parse import quote

from twisted.internet import defer, endpoints, ssl
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.websocket import WebSocketClientEndpoint
from zope.interface import implementer

from protocol.message_pipe import MessagePipe, close_websocket

from modules.common.link.proxy import tcp_endpoint

PATH = "/api/v1/module-tunnel"
RELAY_PATH = "/api/v1/relay-tunnel"

_enabled = False
#: the server address the last module tunnel reached (a relay leg goes through that server)
_server: tuple[str, int] | None = None


def configure(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


@implementer(IAgentEndpointFactory)
class _OuterTLS:
    """The WebSocket's own TLS: pinned to the server's CA, ALPN http/1.1, via the proxy if set."""

    def __init__(self, reactor, ca_pem: bytes, timeout: float) -> None:
        self.reactor, self.ca_pem, self.timeout = reactor, ca_pem, timeout

    def endpointForURI(self, uri):
        host = uri.host.decode()
        tls = ssl.optionsForClientTLS(host, trustRoot=ssl.Certificate.loadPEM(self.ca_pem),
                                      acceptableProtocols=[b"http/1.1"],
                                      extraCertificateOptions={
                                          "raiseMinimumTo": ssl.TLSVersion.TLSv1_2})
        return endpoints.wrapClientTLS(tls, tcp_endpoint(self.reactor, host, uri.port,
                                                         self.timeout))


class _TunnelEnd:
    def __init__(self) -> None:
        self.ws = None
        self.inner = None

    def negotiationStarted(self, transport) -> None:
        self.ws = transport

    def negotiationFinished(self) -> None:
        pass

    def bytesMessageReceived(self, data) -> None:
        if self.inner is not None:
            self.inner.dataReceived(bytes(data))

    def textMessageReceived(self, message: str) -> None:
        close_websocket(self.ws, 1003)

    def pongReceived(self, payload: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        if self.inner is not None:
            inner, self.inner = self.inner, None
            inner.connectionLost(reason)


class _OneEnd:
    def __init__(self, end: _TunnelEnd) -> None:
        self.end = end

    def buildProtocol(self, url: str) -> _TunnelEnd:
        return self.end


class WebSocketTunnelEndpoint:
    """An ``IStreamClientEndpoint`` whose connections are WebSocket tunnels to the server."""

    def __init__(self, reactor, host: str, port: int, ca_pem: bytes, timeout: float = 15,
                 relay: tuple[str, int] | None = None) -> None:
        """``relay``: a relay process the server at ``host``:``port`` passes the bytes to."""
        self.reactor, self.ca_pem, self.timeout = reactor, ca_pem, timeout
        self.server = (host, port) if relay is None else None
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.url = f"https://{netloc}{PATH}"
        if relay is not None:
            target = f"[{relay[0]}]:{relay[1]}" if ":" in relay[0] else f"{relay[0]}:{relay[1]}"
            self.url = f"https://{netloc}{RELAY_PATH}?to={quote(target, safe='[]:')}"

    def connect(self, factory) -> defer.Deferred:
        return defer.ensureDeferred(self._connect(factory))

    async def _connect(self, factory):
        end = _TunnelEnd()
        outer = WebSocketClientEndpoint(_OuterTLS(self.reactor, self.ca_pem, self.timeout),
                                        self.url)
        await defer.ensureDeferred(outer.connect(_OneEnd(end)))
        if self.server is not None:
            global _server
            _server = self.server
        inner = factory.buildProtocol(end.ws.transport.getPeer())
        end.inner = inner
        inner.makeConnection(MessagePipe(end.ws, end.ws.transport))
        return inner


def leg_endpoint(reactor, relay_host: str, relay_port: int, ca_pem: bytes, timeout: float = 15):
    """Where a relay leg's TLS runs with ``--websocket``: the server's own relay through the
    module tunnel, a relay process of its own through the server's relay tunnel."""
    if _server is None or _server == (relay_host, relay_port):
        return WebSocketTunnelEndpoint(reactor, relay_host, relay_port, ca_pem, timeout)
    return WebSocketTunnelEndpoint(reactor, *_server, ca_pem, timeout,
                                   relay=(relay_host, relay_port))
