"""An idle module connection gives back its handshake-sized memory BIOs (bench/README.md, issue 14:
~5.3 KB per idle host) and goes on working: real TLS 1.3 with a client certificate, the module
port's context and the guarded listener on 127.0.0.1, and pyOpenSSL memory BIOs for the edge
cases (bytes still in a BIO: nothing is swapped)."""

from __future__ import annotations

import gc
import socket
import ssl
import uuid

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import deferLater
from zope.interface import implementer

from protocol.identity import Identity, make_csr
from protocol.tls_suites import CIPHERS_TLS12
from server import pki, tls
from server.config import LimitsSection
from server.connection_guard import ConnectionGuard, listen_guarded, settle


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    ca_key, ca_cert = pki.create_ca("test CA")
    server_key, server_cert = pki.issue_server_cert(ca_key, ca_cert, ("localhost",),
                                                    ("127.0.0.1",))
    key = pki.new_key()
    csr = pki.parse_csr(make_csr(key, None).public_bytes(serialization.Encoding.PEM))
    cert = pki.sign_module_csr(ca_key, ca_cert, csr, Identity("host", str(uuid.uuid4())), 30)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    (folder / "key.pem").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {"folder": folder, "ca_key": ca_key, "ca_cert": ca_cert, "key": key, "cert": cert,
            "server_cert": server_cert, "server": tls.module_context([server_cert], server_key, ca_cert, "1.2",
                                         lambda serial: False)}


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        settle(self.transport)
        self.transport.write(data)


def _round_trips(port: int, folder, payloads: list[bytes]) -> list[bytes]:
    """A blocking module: TLS 1.3 with its certificate; sends each payload, reads its echo."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(folder / "ca.pem")
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    echoed = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.version() == "TLSv1.3"
        for payload in payloads:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(65536)
                assert chunk, "closed by the server"
                got += chunk
            echoed.append(got)
    return echoed


@pytest_twisted.inlineCallbacks
def test_an_idle_connection_gives_back_its_handshake_buffers_and_keeps_working(certs):
    from twisted.internet import reactor
    limits = LimitsSection(tls_handshake_seconds=30, first_command_seconds=30,
                           http_header_seconds=30, pending_per_address=10, pending_total=10,
                           raise_open_file_limit=False, refusal_log_seconds=60)
    guard = ConnectionGuard(limits, reactor)
    factory = protocol.Factory.forProtocol(Echo)
    built = []
    original = factory.buildProtocol
    factory.buildProtocol = lambda addr: built.append(original(addr)) or built[-1]
    port = listen_guarded(reactor, 0, guard, "test port", ("Hello", 30),
                          tls.ServerContextFactory(certs["server"]), factory, "127.0.0.1", 50,
                          write_aggregation=False)
    try:
        # a heartbeat, a large record stream in both directions (the fresh BIOs grow and
        # shrink as before), another heartbeat
        payloads = [b"h" * 40, bytes(range(256)) * 800, b"h" * 40]
        echoed = yield threads.deferToThread(_round_trips, port.getHost().port,
                                             certs["folder"], payloads)
        assert echoed == payloads
        tls_protocol = built[0].transport
        assert tls_protocol.handshake_buffers_kept is False  # swapped after the handshake
        assert len(guard.pending) == 0 and guard.closed_count == 0
    finally:
        yield defer.maybeDeferred(port.stopListening)


def _odd_reads(port: int, folder, payloads: list[bytes]) -> tuple[bytes, bool]:
    """A module whose TLS records do not come one per read: three records in one TCP write,
    then records cut at odd places over several writes; then its close_notify.  Returns the
    echo and whether the server closed after answering the close_notify."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(folder / "ca.pem")
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def exchange(call):
            while True:
                try:
                    return call()
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("closed by the server")
                    incoming.write(data)
        exchange(client.do_handshake)
        assert client.version() == "TLSv1.3"
        records = []
        for payload in payloads:
            client.write(payload)
            records.append(outgoing.read())
        sock.sendall(b"".join(records[:3]))  # three records in one write
        rest = b"".join(records[3:])
        for cut in range(0, len(rest), 7919):  # cut across record boundaries
            sock.sendall(rest[cut:cut + 7919])
        echoed = b""
        while len(echoed) < sum(map(len, payloads)):
            echoed += exchange(lambda: client.read(65536))
        try:
            client.unwrap()  # close_notify out; the server answers with its own and closes
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
        closed = False
        while not closed:
            data = sock.recv(65536)
            closed = not data
        return echoed, closed


@pytest_twisted.inlineCallbacks
def test_records_several_to_a_read_or_cut_across_reads_all_arrive(certs):
    """The guarded TLS layer reads a connection's application bytes until nothing is left to
    read instead of until OpenSSL asks for more (issue 14, heartbeats): every byte of records
    that come several to a read, or cut over several reads, still reaches the protocol, in
    order, and a close_notify still ends the connection."""
    from twisted.internet import reactor
    guard = ConnectionGuard(_limits(10), reactor)
    port = listen_guarded(reactor, 0, guard, "test port", ("Hello", 30),
                          tls.ServerContextFactory(certs["server"]),
                          protocol.Factory.forProtocol(Echo), "127.0.0.1", 50,
                          write_aggregation=False)
    try:
        payloads = [b"a" * 40, b"b" * 41, b"c" * 42, bytes(range(256)) * 300, b"d" * 43,
                    b"e" * 20000]
        echoed, closed = yield threads.deferToThread(_odd_reads, port.getHost().port,
                                                     certs["folder"], payloads)
        assert echoed == b"".join(payloads)
        assert closed
    finally:
        yield defer.maybeDeferred(port.stopListening)


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    moved = True
    while moved:
        moved = False
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
            moved = True


def test_nothing_is_swapped_while_bytes_wait_in_a_bio(certs):
    client_ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    client_ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    client_ctx.use_certificate(crypto.X509.from_cryptography(certs["cert"]))
    client_ctx.use_privatekey(crypto.PKey.from_cryptography_key(certs["key"]))
    server = SSL.Connection(certs["server"], None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    _pump(client, server)
    client.send(b"ping")
    server.bio_write(client.bio_read(65536))
    assert not tls.release_handshake_buffers(server)  # the record is still in the read BIO
    assert server.recv(100) == b"ping"
    server.send(b"pong")
    assert not tls.release_handshake_buffers(server)  # the answer still waits to be sent
    client.bio_write(server.bio_read(65536))
    assert client.recv(100) == b"pong"
    assert tls.release_handshake_buffers(server)
    for _ in range(3):  # and the connection goes on in both directions
        client.send(b"x" * 5000)
        server.bio_write(client.bio_read(65536))
        assert server.recv(10000) == b"x" * 5000
        sent = 0
        while sent < 20000:  # one record per send
            sent += server.send(b"y" * (20000 - sent))
        client.bio_write(server.bio_read(65536))
        got = b""
        while len(got) < 20000:
            got += client.recv(20000)
        assert got == b"y" * 20000


# --- what an idle host connection keeps besides OpenSSL's state (bench/README.md, issue 14) ----

def _limits(pending: int) -> LimitsSection:
    return LimitsSection(tls_handshake_seconds=30, first_command_seconds=30,
                         http_header_seconds=30, pending_per_address=pending,
                         pending_total=pending, raise_open_file_limit=False,
                         refusal_log_seconds=60)


@implementer(IHandshakeListener)
class ChainRecorder(Echo):
    """Echoes, and notes what the server's OpenSSL kept of the client's certificates."""

    seen: list

    def handshakeCompleted(self) -> None:
        tls_protocol = self.transport
        chain = tls_protocol.getHandle().get_peer_cert_chain() or []
        self.seen.append((len(chain), tls_protocol.peer_facts))


@pytest_twisted.inlineCallbacks
def test_a_module_presents_its_certificate_without_the_ca_and_is_still_verified(certs):
    """The module's TLS sends its own certificate only (and so does the server's): the server's OpenSSL then keeps no
    parsed copy of the CA's certificate for the life of the connection (~4.6 KB per idle
    host), and the certificate is still verified and its facts taken.  It offers only the
    cipher suites the server accepts (~0.7 KB per idle host).  A client that sends
    the chain (OpenSSL's default, here Python's ssl) is accepted as before."""
    from twisted.internet import endpoints, reactor

    from modules.common.link.connection import client_tls
    from modules.common.link.folder import ModuleFolder
    guard = ConnectionGuard(_limits(10), reactor)
    factory = protocol.Factory.forProtocol(ChainRecorder)
    seen: list = []
    ChainRecorder.seen = seen
    port = listen_guarded(reactor, 0, guard, "test port", ("Hello", 30),
                          tls.ServerContextFactory(certs["server"]), factory, "127.0.0.1", 50,
                          write_aggregation=False)
    try:
        module_tls = client_tls("127.0.0.1", certs["ca_cert"].public_bytes(
            serialization.Encoding.PEM), ModuleFolder(certs["folder"]))
        endpoint = endpoints.wrapClientTLS(module_tls, endpoints.TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port))
        answered: defer.Deferred = defer.Deferred()
        offered: list[str] = []
        server_chain: list = []

        class Module(protocol.Protocol):
            def connectionMade(self) -> None:
                offered.extend(self.transport.getHandle().get_cipher_list())
                self.transport.write(b"h" * 40)

            def dataReceived(self, data: bytes) -> None:
                server_chain.extend(self.transport.getHandle().get_peer_cert_chain() or [])
                answered.callback(data)
                self.transport.loseConnection()

        yield endpoint.connect(protocol.Factory.forProtocol(Module))
        assert (yield answered) == b"h" * 40
        # the server sends its own certificate only, not a chain OpenSSL built per handshake
        # from its trust store (bench/registration_instructions.py: ~0.87 M instructions per
        # handshake); the module verified it against its pinned CA (client_tls: VERIFY_PEER)
        assert [c.to_cryptography() for c in server_chain] == [certs["server_cert"]]
        # it offers the server's TLS 1.2 suites only (the server keeps the offered list for the
        # life of the connection), and TLS 1.3's
        assert [c for c in offered if not c.startswith("TLS_")] == CIPHERS_TLS12.split(":")
        echoed = yield threads.deferToThread(_round_trips, port.getHost().port, certs["folder"],
                                             [b"h" * 40])
        assert echoed == [b"h" * 40]
        expected = Identity("host", certs["cert"].extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)[0].split(":", 2)[2])
        assert [(n, facts.identity) for n, facts in seen] == [(0, expected), (1, expected)]
    finally:
        yield defer.maybeDeferred(port.stopListening)


def _instance_dict(obj) -> dict | None:
    """The instance's own dict if CPython had to give it one (its attributes no longer fit the
    key table its class's instances share); None while they live in the shared layout."""
    for referent in gc.get_referents(obj):
        if type(referent) is dict and "factory" in referent:
            return referent
    return None


@pytest_twisted.inlineCallbacks
def test_connections_accepted_in_a_burst_keep_the_shared_attribute_layout(certs):
    """40 connections are accepted before the first completes its handshake (a reconnect
    storm): the attributes the handshake sets later must not give each connection a dict of
    its own (464 bytes per idle host before), and every connection still works."""
    from twisted.internet import reactor
    guard = ConnectionGuard(_limits(64), reactor)
    factory = protocol.Factory.forProtocol(Echo)
    built = []
    original = factory.buildProtocol
    factory.buildProtocol = lambda addr: built.append(original(addr)) or built[-1]
    port = listen_guarded(reactor, 0, guard, "test port", ("Hello", 30),
                          tls.ServerContextFactory(certs["server"]), factory, "127.0.0.1", 50,
                          write_aggregation=False, eager_writes=True)

    class FirstOfItsKind(port.factory.protocol):
        """A class of its own: its shared key table starts empty, as in a fresh server."""

    port.factory.protocol = FirstOfItsKind
    raw = []
    try:
        raw = [socket.create_connection(("127.0.0.1", port.getHost().port), timeout=20)
               for _ in range(40)]
        while len(built) < 40:  # all accepted, none has sent a ClientHello yet
            yield deferLater(reactor, 0.01)

        def handshakes() -> list[bytes]:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(certs["folder"] / "ca.pem")
            ctx.load_cert_chain(certs["folder"] / "cert.pem", certs["folder"] / "key.pem")
            answers = []
            for i, sock in enumerate(raw):
                raw[i] = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
                raw[i].sendall(b"h" * 40)
                answers.append(raw[i].recv(100))
            return answers

        assert (yield threads.deferToThread(handshakes)) == [b"h" * 40] * 40
        tls_protocols = [p.transport for p in built]
        assert all(type(p) is FirstOfItsKind for p in tls_protocols)
        assert all(p._handshakeDone and p.peer_facts is not None for p in tls_protocols)
        assert [p for p in tls_protocols if _instance_dict(p) is not None] == []
        assert port.factory.protocols == {}  # nor a dict entry per connection in the factory
    finally:
        for sock in raw:
            sock.close()
        yield defer.maybeDeferred(port.stopListening)

