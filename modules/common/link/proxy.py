"""Reaching the server through an HTTP proxy with ``CONNECT`` (``--proxy URL`` or ``https_proxy``).

The proxy only opens a TCP tunnel; TLS (mutual TLS with the pinned CA) runs inside it unchanged,
so the proxy sees neither certificates' private halves nor any content.  ``ConnectReply`` is the
sans-I/O reading of the proxy's answer; ``HTTPConnectEndpoint`` is the thin Twisted side that
any client TLS endpoint wraps (control connection and relay legs alike).  Basic auth comes from
the URL's ``user:password@``.  ``no_proxy`` is honoured for names and addresses listed there.

Not here: which server to reach (``connection``), enrollment's HTTPS requests (``enrollment``
hands ``urllib`` the same proxy).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from twisted.internet import defer, endpoints, protocol

MAX_REPLY = 16 * 1024   # a CONNECT reply's status line and headers; more is not a proxy


class ProxyError(Exception):
    """The proxy refused or garbled the tunnel, or the proxy setting is wrong: one line."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    user: str = ""
    password: str = ""

    @property
    def shown(self) -> str:
        """The proxy as written in messages (never with its password)."""
        return f"http://{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def connect_request(self, host: str, port: int) -> bytes:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def url(self) -> str:
        """For urllib's ProxyHandler (with the credentials)."""
        auth = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}@" if self.user else ""
        return f"http://{auth}{self.host}:{self.port}"


def parse_proxy(url: str) -> Proxy:
    """``http://HOST:PORT`` or ``http://USER:PASSWORD@HOST:PORT`` → Proxy, or ValueError saying what is wrong."""
    parts = urlsplit(url.strip() if "://" in url else f"http://{url.strip()}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"proxy {url!r} has a port that is not 1-65535")
    if port == 0:
        raise ValueError(f"proxy {url!r} has a port that is not 1-65535")
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"proxy {url!r} must look like http://HOST:PORT or http://USER:PASSWORD@HOST:PORT")
    return Proxy(parts.hostname, port or 3128, unquote(parts.username or ""),
                 unquote(parts.password or ""))


def _bypassed(host: str, no_proxy: str) -> bool:
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.lstrip(".")
        name = host.lower()
        if name == entry or name.endswith("." + entry):
            return True
    return False


# The proxy of this process: set once from --proxy by the CLI, else from the environment.
_chosen: Proxy | None = None
_chosen_set = False


def configure(url: str | None) -> Proxy | None:
    """Use ``url`` for every connection of this process (None: the environment decides)."""
    global _chosen, _chosen_set
    _chosen = parse_proxy(url) if url else None
    _chosen_set = url is not None
    return _chosen


def proxy_for(host: str) -> Proxy | None:
    """The proxy to reach ``host`` through, or None for a direct connection."""
    if _chosen_set:
        return _chosen
    url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not url or _bypassed(host, os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""):
        return None
    try:
        return parse_proxy(url)
    except ValueError as exc:
        raise ProxyError(f"the https_proxy variable: {exc}") from None


# --- the proxy's answer, sans I/O ----------------------------------------------------------------

class ConnectReply:
    """Fed the proxy's bytes; ``done`` once the reply's header block is complete, then ``status``,
    ``reason`` and ``rest`` (bytes already from the tunnel).  ValueError for a garbled reply."""

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        self.status = 0
        self.reason = ""
        self.rest = b""

    def feed(self, data: bytes) -> bool:
        if self.done:
            self.rest += data
            return True
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_REPLY:
                raise ValueError(f"the proxy's answer is longer than {MAX_REPLY} bytes")
            return False
        head, self.rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not (len(code) == 3 and code.isdigit()):
            raise ValueError(f"the proxy answered something that is not HTTP: {status_line[:80]!r}")
        self.status, self.reason, self.done = int(code), reason.strip()[:100], True
        return True


# --- Twisted side --------------------------------------------------------------------------------

class _Tunnel(protocol.Protocol):
    """Speaks CONNECT, then passes everything to the protocol of the wrapped factory."""

    def __init__(self, proxy: Proxy, host: str, port: int, factory, ready: defer.Deferred) -> None:
        self.proxy, self.host, self.port = proxy, host, port
        self.factory_inside = factory
        self.ready = ready
        self.reply = ConnectReply()
        self.inside: protocol.Protocol | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.proxy.connect_request(self.host, self.port))

    def _fail(self, message: str) -> None:
        if not self.ready.called:
            self.ready.errback(ProxyError(message))
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.inside is not None:
            self.inside.dataReceived(data)
            return
        try:
            if not self.reply.feed(data):
                return
        except ValueError as exc:
            self._fail(f"proxy {self.proxy.shown}: {exc}")
            return
        if self.reply.status != 200:
            hint = {407: "; the proxy wants a user and password: --proxy http://USER:PASSWORD@host:port",
                    401: "; the proxy refused the user or password in --proxy",
                    403: "; the proxy does not allow this port: ask for CONNECT to it"}.get(
                self.reply.status, "")
            self._fail(f"the proxy {self.proxy.shown} refused CONNECT to {self.host}:{self.port}: "
                       f"{self.reply.status} {self.reply.reason}{hint}")
            return
        inside = self.factory_inside.buildProtocol(self.transport.getPeer())
        if inside is None:
            self._fail("the connection was not wanted any more")
            return
        self.inside = inside
        inside.makeConnection(self.transport)
        self.ready.callback(inside)
        if self.reply.rest:
            inside.dataReceived(self.reply.rest)

    def connectionLost(self, reason) -> None:
        if self.inside is not None:
            self.inside.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(ProxyError(
                f"the proxy {self.proxy.shown} closed the connection before the tunnel to "
                f"{self.host}:{self.port} was open ({reason.getErrorMessage()})"))


class _TunnelFactory(protocol.Factory):
    def __init__(self, tunnel: _Tunnel) -> None:
        self.tunnel = tunnel

    def buildProtocol(self, addr) -> _Tunnel:
        return self.tunnel


class HTTPConnectEndpoint:
    """An ``IStreamClientEndpoint`` that reaches ``host:port`` through ``proxy``."""

    def __init__(self, reactor, proxy: Proxy, host: str, port: int, timeout: float = 15) -> None:
        self.reactor, self.proxy, self.host, self.port = reactor, proxy, host, port
        self.timeout = timeout

    def connect(self, factory) -> defer.Deferred:
        ready: defer.Deferred = defer.Deferred()
        tunnel = _Tunnel(self.proxy, self.host, self.port, factory, ready)
        to_proxy = endpoints.TCP4ClientEndpoint(self.reactor, self.proxy.host, self.proxy.port,
                                                timeout=self.timeout)
        if ":" in self.proxy.host:
            to_proxy = endpoints.TCP6ClientEndpoint(self.reactor, self.proxy.host,
                                                    self.proxy.port, timeout=self.timeout)

        def unreachable(failure):
            if not ready.called:
                ready.errback(ProxyError(f"cannot reach the proxy {self.proxy.shown}: "
                                         f"{failure.getErrorMessage()}"))
        to_proxy.connect(_TunnelFactory(tunnel)).addErrback(unreachable)
        timer = self.reactor.callLater(self.timeout, lambda: ready.called or tunnel._fail(
            f"the proxy {self.proxy.shown} did not open the tunnel within {self.timeout:g} s"))
        ready.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return ready


def tcp_endpoint(reactor, host: str, port: int, timeout: float = 15):
    """Where a module's TLS connection to ``host:port`` starts: direct, or through the proxy."""
    chosen = proxy_for(host)
    if chosen is None:  # every address of a name is tried (one DNS name for several nodes)
        return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    return HTTPConnectEndpoint(reactor, chosen, host, port, timeout)
