"""``server.tls.Resumption``: what a resumed TLS session skips is judged again.

Real TLS 1.3 handshakes between pyOpenSSL connections in memory (no sockets): a supporter's full
handshake, then a resumption of its session.  The module port's own test
(``test_module_port.py``) covers revocation and hosts end to end.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto

from protocol.identity import Identity
from server import pki, tls


@pytest.fixture(scope="module")
def certs():
    ca_key, ca = pki.create_ca()
    server_key, server_cert = pki.issue_server_cert(ca_key, ca, ("localhost",), ("127.0.0.1",))
    key = pki.new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    cert = pki.sign_module_csr(ca_key, ca, csr, Identity("supporter", "bob"), days=30)
    return ca, server_key, server_cert, key, cert


def client_context(ca, key, cert) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    ctx.use_certificate(crypto.X509.from_cryptography(cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    return ctx


def handshake(server_ctx, client_ctx, session=None):
    """(server connection, client connection) after a handshake and one byte each way (the
    byte carries the tickets to the client)."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    for _ in range(10):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    server.send(b"s")
    client.bio_write(server.bio_read(65536))
    assert client.recv(1) == b"s"
    return server, client


def test_a_resumed_session_is_judged_again_revoked_or_expired(certs):
    ca, server_key, server_cert, key, cert = certs
    revoked: set[str] = set()
    ctx = tls.module_context([server_cert], server_key, ca, "1.2", revoked.__contains__,
                             resumption=True)
    resumption = ctx.get_app_data()
    client_ctx = client_context(ca, key, cert)
    full, first = handshake(ctx, client_ctx)  # ``first`` stays open: its session stays resumable
    assert not tls.resumed(full)
    server, _ = handshake(ctx, client_ctx, first.get_session())
    assert tls.resumed(server)
    facts = resumption.check(server)
    assert facts.identity == Identity("supporter", "bob")
    assert facts.serial == format(cert.serial_number, "x")
    # a certificate not remembered (another process's cache, evicted) is parsed: same facts
    assert tls.Resumption(revoked.__contains__).check(server) == facts

    resumption.clock = lambda: cert.not_valid_after_utc.timestamp() + 1
    with pytest.raises(tls.ResumptionRefused, match="expired"):
        resumption.check(server)
    resumption.clock = lambda: cert.not_valid_after_utc.timestamp() - 1
    assert resumption.check(server) == facts
    revoked.add(facts.serial)
    with pytest.raises(tls.ResumptionRefused, match="revoked"):
        resumption.check(server)


def test_without_resumption_no_session_is_resumed(certs):
    ca, server_key, server_cert, key, cert = certs
    ctx = tls.module_context([server_cert], server_key, ca, "1.2", lambda serial: False)
    assert ctx.get_app_data() is None
    client_ctx = client_context(ca, key, cert)
    _, first = handshake(ctx, client_ctx)
    server, _ = handshake(ctx, client_ctx, first.get_session())
    assert not tls.resumed(server)
