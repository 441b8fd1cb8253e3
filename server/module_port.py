"""The module port: one mutual-TLS control connection per module, speaking ``protocol.control``.

TLS (``server.tls.module_context``) has already refused foreign, expired and revoked
certificates; here the connection learns who it is talking to and the registry of live
connections lets revocation drop them at once.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred

from twisted.internet import protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from protocol import PROTOCOL_VERSION
from protocol.control import Hello, ProtocolVersionMismatch
from protocol.identity import Identity, identity_of

from . import __version__

log = Logger()


@implementer(IHandshakeListener)
class ModuleConnection(amp.AMP):
    """One module's control connection; ``identity`` is None for an ad-hoc customer."""

    def __init__(self, registry: "ConnectionRegistry", tenant_of: Callable[[Identity], Deferred]) -> None:
        super().__init__()
        self.registry = registry
        self.tenant_of = tenant_of
        self.identity: Identity | None = None
        self.serial: str | None = None
        self.not_after: str = ""
        self.address = "?"

    def connectionMade(self) -> None:
        super().connectionMade()
        self.address = self.transport.getPeer().host

    def handshakeCompleted(self) -> None:
        peer = self.transport.getPeerCertificate()
        if peer is not None:
            cert = peer.to_cryptography()
            self.identity = identity_of(cert)
            self.serial = format(cert.serial_number, "x")
            self.not_after = cert.not_valid_after_utc.isoformat()
        self.registry.add(self)
        log.info("module connected: {identity} from {address} (serial {serial})",
                 identity=self.identity.uri if self.identity else "anonymous",
                 address=self.address, serial=self.serial)

    def connectionLost(self, reason) -> None:
        if self in self.registry:
            self.registry.discard(self)
            log.info("module disconnected: {identity} from {address}",
                     identity=self.identity.uri if self.identity else "anonymous",
                     address=self.address)
        else:
            log.info("connection from {address} closed before the TLS handshake completed: {why}",
                     address=self.address, why=reason.getErrorMessage())
        super().connectionLost(reason)

    @Hello.responder
    def hello(self, protocol_version: int, module_version: str, module_kind: str) -> dict:
        if protocol_version != PROTOCOL_VERSION:
            log.warn("module {address} speaks protocol {theirs}, server {ours}: closing",
                     address=self.address, theirs=protocol_version, ours=PROTOCOL_VERSION)
            raise ProtocolVersionMismatch(
                f"server speaks protocol {PROTOCOL_VERSION}, module {protocol_version}: "
                "update the module from the server's download page")
        identity = self.identity

        def answer(tenant: str) -> dict:
            return {
                "server_version": __version__,
                "identity": identity.uri if identity else "anonymous",
                "role": identity.role if identity else "customer",
                "tenant": tenant,
                "certificate_not_after": self.not_after,
            }
        if identity is None:
            return answer("")
        return self.tenant_of(identity).addCallback(answer)


class ConnectionRegistry:
    """Live module connections, so revocation and (later) presence can find them."""

    def __init__(self) -> None:
        self._connections: set[ModuleConnection] = set()

    def add(self, conn: ModuleConnection) -> None:
        self._connections.add(conn)

    def discard(self, conn: ModuleConnection) -> None:
        self._connections.discard(conn)

    def __contains__(self, conn: object) -> bool:
        return conn in self._connections

    def __len__(self) -> int:
        return len(self._connections)

    def identities(self) -> list[str]:
        return sorted(c.identity.uri if c.identity else "anonymous" for c in self._connections)

    def drop_revoked(self, revoked: set[str]) -> int:
        dropped = 0
        for conn in list(self._connections):
            if conn.serial is not None and conn.serial in revoked:
                log.warn("dropping {identity}: certificate {serial} was revoked",
                         identity=conn.identity.uri, serial=conn.serial)
                conn.transport.abortConnection()
                self._connections.discard(conn)
                dropped += 1
        return dropped


class ModulePortFactory(protocol.Factory):
    def __init__(self, registry: ConnectionRegistry, tenant_of: Callable[[Identity], Deferred]) -> None:
        self.registry = registry
        self.tenant_of = tenant_of

    def buildProtocol(self, addr) -> ModuleConnection:
        conn = ModuleConnection(self.registry, self.tenant_of)
        conn.factory = self
        return conn
