"""The module's control connection to the server: mutual TLS on the module port, then ``Hello``.

The server's certificate must chain to the pinned CA and match the server's name; the module
presents its own certificate (an ad-hoc customer presents none).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, endpoints, ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols import amp
from zope.interface import implementer

from protocol import PROTOCOL_VERSION
from protocol import control
from protocol.amp_adapter import FramedAMP
from protocol.session_end import BadEndReason, EndCause, EndReason
from protocol.tls_suites import CIPHERS_TLS12

from modules.common.link.folder import ModuleFolder
from modules.common.link import ws_tunnel
from modules.common.link.proxy import tcp_endpoint
from modules.common.link.servers import FailoverEndpoint, server_list

MODULE_VERSION = "0.1.0"
ALPN_MODULE = b"hausmeister/1"


@dataclass
class ServerAddress:
    host: str
    port: int


#: client TLS settings by (server name, CA, certificate, key): the most recent few
_CLIENT_TLS: dict[tuple, ssl.IOpenSSLClientConnectionCreator] = {}
_CLIENT_TLS_KEPT = 8


def client_tls(host: str, ca_pem: bytes, folder: ModuleFolder | None) -> ssl.IOpenSSLClientConnectionCreator:
    """The module's TLS settings for ``host``.  The same settings (one OpenSSL context) for the
    same server, CA and certificate: a relay leg can only offer its control connection's TLS
    session (``ResumingTLS``) on the context that connection used.  A renewed certificate or
    another server gets settings of its own."""
    wanted = (host, ca_pem, folder.cert_path.read_bytes() if folder else None,
              folder.key_path.read_bytes() if folder else None)
    tls = _CLIENT_TLS.pop(wanted, None) or _new_client_tls(host, ca_pem, folder)
    _CLIENT_TLS[wanted] = tls  # now the most recent
    while len(_CLIENT_TLS) > _CLIENT_TLS_KEPT:
        _CLIENT_TLS.pop(next(iter(_CLIENT_TLS)))
    return tls


def _new_client_tls(host: str, ca_pem: bytes,
                    folder: ModuleFolder | None) -> ssl.IOpenSSLClientConnectionCreator:
    trust = ssl.Certificate.loadPEM(ca_pem)
    client_cert = None
    if folder is not None:
        key_pem = folder.private_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        client_cert = ssl.PrivateCertificate.loadPEM(key_pem + folder.cert_path.read_bytes())
    # ALPN names the module plane, so a server's single port (listen.single_port) can tell us
    # from browsers; the module port itself ignores it
    options = ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert,
                                      acceptableProtocols=[ALPN_MODULE],
                                      extraCertificateOptions={
                                          "raiseMinimumTo": ssl.TLSVersion.TLSv1_2,
                                          # only what the server accepts (protocol.tls_suites)
                                          "acceptableCiphers": _MODULE_PORT_CIPHERS})
    if client_cert is not None:
        send_certificate_alone(options)
    return options


_MODULE_PORT_CIPHERS = ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS_TLS12)

#: OpenSSL's ``SSL_MODE_NO_AUTO_CHAIN`` (ssl.h); pyOpenSSL names no constant for it
MODE_NO_AUTO_CHAIN = 0x00000008


def send_certificate_alone(options: ssl.IOpenSSLClientConnectionCreator) -> bool:
    """Present the module certificate without the CA certificate behind it.

    With no chain configured, OpenSSL builds one from the trust store and sends the pinned CA's
    certificate after the module's own: the server has that certificate already (it is what
    it verifies against), yet its OpenSSL parses it and keeps it in the session for as long
    as the connection lives — ~4.6 KB per idle host connection (bench/README.md, issue 14),
    plus ~0.5 KB on the wire per handshake.  The mode is set on the OpenSSL context behind
    Twisted's options (``CertificateOptions.getContext()``, reached through the options'
    connection maker; Twisted before 24 kept it as ``_ctx``).  False (nothing changed: the
    chain is sent as before, which the server accepts too) if Twisted keeps it elsewhere."""
    context = getattr(options, "_ctx", None)
    if context is None:
        certificate_options = getattr(getattr(options, "_createConnection", None), "__self__",
                                      None)
        get_context = getattr(certificate_options, "getContext", None)
        context = get_context() if callable(get_context) else None
    if not isinstance(context, SSL.Context):
        return False
    context.set_mode(MODE_NO_AUTO_CHAIN)
    return True


@implementer(IOpenSSLClientConnectionCreator)
class ResumingTLS:
    """Client TLS settings that offer an earlier TLS session of the same server.

    A relay leg offers its control connection's session (a TLS 1.3 ticket the module port
    issued to a supporter or an ad-hoc customer): the server then skips its certificate and
    signature, and a supporter's certificate check — a third of the server's handshake work.
    The server judges the session's certificate again (revoked? expired?) before the leg may
    speak; a session it cannot or will not resume (a host's, another process's, an expired
    ticket) simply gives a full handshake.  The server's certificate is still checked against
    the name here (the session carries the certificate the first handshake verified)."""

    def __init__(self, creator: ssl.IOpenSSLClientConnectionCreator, session) -> None:
        self._creator = creator
        self._session = session

    def clientConnectionForTLS(self, tls_protocol):
        connection = self._creator.clientConnectionForTLS(tls_protocol)
        if self._session is not None:
            try:
                connection.set_session(self._session)
            except ValueError:  # another context (another server name): a full handshake
                pass
        return connection


def tls_session(conn):
    """The TLS session of an open connection (``OpenSSL.SSL.Session``), or None.  Taken while
    the connection is open: OpenSSL marks a session unresumable once its connection is gone
    without a close_notify."""
    transport = getattr(conn, "transport", None)
    get_handle = getattr(transport, "getHandle", None)
    lost = getattr(conn, "lost", None)
    if get_handle is None or (lost is not None and lost.called):
        return None
    try:
        return get_handle().get_session()
    except Exception:  # not a pyOpenSSL connection (a test double), or no session yet
        return None


class ControlClient(FramedAMP):
    """The module's control connection; the server's calls go to the handlers set here."""

    def __init__(self, on_offer=None, on_going_away=None) -> None:
        super().__init__()
        self.on_going_away = on_going_away  # (back_in, spread) -> None: a clean shutdown
        self.on_session_ready = None   # supporter: (fields) -> None
        self.on_offer = on_offer       # host: (fields) -> Deferred[bool] | bool
        self.lost: defer.Deferred = defer.Deferred()
        # session id → called with the server's EndReason when it ends that session (SessionEnded)
        self.session_end_handlers: dict[str, object] = {}
        self.on_host_presence = None   # supporter: (fields) -> None, pushed by the server
        self.greeting: dict = {}       # the server's answer to Hello (heartbeat_seconds, ...)
        # True from the first moment of the connection's end: AMP fails the calls still waiting
        # for an answer before ``lost`` fires; their errbacks read this to tell a dead
        # connection from a refusal without knowing every error a dying connection may give
        self.gone = False

    def connectionLost(self, reason) -> None:
        self.gone = True
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(reason.getErrorMessage())

    @control.SessionReady.responder
    def session_ready(self, **fields):
        if self.on_session_ready is None:
            raise control.WrongState("this module is not waiting for a customer")
        self.on_session_ready(fields)
        return {}

    @control.SessionEnded.responder
    def session_ended(self, session_id, cause, by, detail, text):
        try:
            reason = EndReason.from_fields({"cause": cause, "by": by, "detail": detail})
        except BadEndReason as exc:
            reason = EndReason(EndCause.ERROR, "server", f"unreadable end notice: {exc}")
        handler = self.session_end_handlers.get(session_id)
        if handler is not None:
            handler(reason)
        return {}

    @control.HostPresenceChanged.responder
    def host_presence_changed(self, **fields):
        if self.on_host_presence is not None:
            self.on_host_presence(fields)
        return {}

    @control.ServerGoingAway.responder
    def server_going_away(self, back_in, spread):
        if self.on_going_away is not None:
            self.on_going_away(back_in, spread)
        return {}

    @control.OfferSession.responder
    def offer_session(self, **fields):
        if self.on_offer is None:
            return {"accepted": False}
        return defer.maybeDeferred(self.on_offer, fields).addCallback(
            lambda accepted: {"accepted": bool(accepted)})


def endpoint_for(reactor, address: "ServerAddress | list[ServerAddress]", ca_pem: bytes,
                 folder: ModuleFolder | None, timeout: float = 15):
    """The module's TLS endpoint to the server; given several addresses (the nodes of a server
    with several nodes), one that tries them in turn (``servers.FailoverEndpoint``)."""
    if isinstance(address, list):
        if len(address) == 1:
            return endpoint_for(reactor, address[0], ca_pem, folder, timeout)
        return FailoverEndpoint([endpoint_for(reactor, a, ca_pem, folder, timeout)
                                 for a in address], [f"{a.host}:{a.port}" for a in address])
    tls = client_tls(address.host, ca_pem, folder)
    return endpoints.wrapClientTLS(tls, path_to(reactor, address.host, address.port, ca_pem, timeout))


def path_to(reactor, host: str, port: int, ca_pem: bytes, timeout: float = 15):
    """What the module's TLS runs on: TCP (direct or through the proxy), or with
    ``--websocket`` a WebSocket tunnel on the server's single port."""
    if ws_tunnel.enabled():
        return ws_tunnel.WebSocketTunnelEndpoint(reactor, host, port, ca_pem, timeout)
    return tcp_endpoint(reactor, host, port, timeout)


async def connect(reactor, address: "ServerAddress | list[ServerAddress]", ca_pem: bytes,
                  folder: ModuleFolder | None, timeout: float = 15) -> ControlClient:
    endpoint = endpoint_for(reactor, address, ca_pem, folder, timeout)
    return await endpoints.connectProtocol(endpoint, ControlClient())


async def hello(conn: amp.AMP, module_kind: str) -> dict:
    answer = await conn.callRemote(control.Hello, protocol_version=PROTOCOL_VERSION,
                                   module_version=MODULE_VERSION, module_kind=module_kind)
    conn.greeting = answer
    return answer


async def greeted(reactor, folder: ModuleFolder, kind: str) -> ControlClient:
    """A new control connection to the folder's server, past ``Hello``; one that fails or is
    cancelled on the way is closed (what reconnects by itself gives up a hanging attempt)."""
    conn = await connect(reactor, addresses_of(folder), folder.ca_path.read_bytes(), folder)
    try:
        await hello(conn, kind)
    except BaseException:
        conn.transport.abortConnection()
        raise
    return conn


def address_of(folder: ModuleFolder) -> ServerAddress:
    """The first server address (what a status line shows)."""
    return addresses_of(folder)[0]


def addresses_of(folder: ModuleFolder) -> list[ServerAddress]:
    """Every server address of the folder, in the order they are tried."""
    return [ServerAddress(host, port) for host, port in server_list(folder)]

