"""The module's control connection to the server: mutual TLS on the module port, then ``Hello``.

The server's certificate must chain to the pinned CA and match the server's name; the module
presents its own certificate (an ad-hoc customer presents none).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, endpoints, ssl
from twisted.protocols import amp

from protocol import PROTOCOL_VERSION
from protocol.control import Hello

from .folder import ModuleFolder

MODULE_VERSION = "0.1.0"


@dataclass
class ServerAddress:
    host: str
    port: int


def client_tls(host: str, ca_pem: bytes, folder: ModuleFolder | None) -> ssl.IOpenSSLClientConnectionCreator:
    trust = ssl.Certificate.loadPEM(ca_pem)
    client_cert = None
    if folder is not None:
        key_pem = folder.private_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())
        client_cert = ssl.PrivateCertificate.loadPEM(key_pem + folder.cert_path.read_bytes())
    return ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert,
                                   extraCertificateOptions={
                                       "raiseMinimumTo": ssl.TLSVersion.TLSv1_2})


async def connect(reactor, address: ServerAddress, ca_pem: bytes,
                  folder: ModuleFolder | None, timeout: float = 15) -> amp.AMP:
    tls = client_tls(address.host, ca_pem, folder)
    endpoint = endpoints.wrapClientTLS(
        tls, endpoints.TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout))
    return await endpoints.connectProtocol(endpoint, amp.AMP())


async def hello(conn: amp.AMP, module_kind: str) -> dict:
    return await conn.callRemote(Hello, protocol_version=PROTOCOL_VERSION,
                                 module_version=MODULE_VERSION, module_kind=module_kind)


def address_of(folder: ModuleFolder) -> ServerAddress:
    settings = folder.settings()
    return ServerAddress(settings["module_host"], int(settings["module_port"]))


def as_deferred(coro) -> defer.Deferred:
    return defer.ensureDeferred(coro)
