"""TLS settings for the server's listeners (pyOpenSSL contexts handed to Twisted).

The module port verifies client certificates against the CA and the in-memory revocation set
*during* the handshake, so a revoked, expired or foreign certificate never gets a connection.
A client without a certificate is let through (ad-hoc customers); what it may do is decided
above TLS.  The HTTPS port asks for a client certificate but accepts any or none: only the
renewal endpoint uses it, and checks it itself.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi, lib as _lib  # also SSL_session_reused, SSL_set_options
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from protocol.identity import Identity, IdentityError, fingerprint, identity_of
from protocol.tls_suites import CIPHERS_TLS12

log = Logger()


MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# Thousands of hosts reconnect at once after a restart: Twisted's default backlog of 50 drops
# their SYNs (measured: bench/idle_hosts.py).
LISTEN_BACKLOG = 4096


@implementer(IOpenSSLServerConnectionCreator)
class ServerContextFactory:
    """Hands Twisted one shared, fully configured context for every accepted connection."""

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)  # the verify callback logs through its guard
        return connection


def _base_context(chain: list[x509.Certificate], key, min_tls: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(MIN_VERSIONS[min_tls])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
                    | SSL.OP_SINGLE_ECDH_USE | SSL.OP_NO_RENEGOTIATION)
    ctx.set_cipher_list(CIPHERS_TLS12.encode())
    ctx.use_certificate(crypto.X509.from_cryptography(chain[0]))
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    ctx.check_privatekey()
    ctx.set_session_id(b"hausmeister")
    # An idle connection gives its read/write buffers back (~30 KB each, bench/idle_hosts.py).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return ctx


#: ``SSL_MODE_NO_AUTO_CHAIN`` (OpenSSL's ssl.h; pyOpenSSL has no name for it)
_MODE_NO_AUTO_CHAIN = 0x00000008


def _send_chain_as_given(ctx: SSL.Context) -> None:
    """Send the server's chain exactly as configured (its leaf and any intermediate given with
    it), never one OpenSSL builds from the trust store.

    With a leaf-only chain (the server's own CA issued it) OpenSSL otherwise builds the chain
    in *every* handshake: ``X509_verify_cert`` against the store that holds the CA for client
    certificates, an ECDSA verification of the server's own certificate, ~0.87 M instructions
    (~8 % of a host registration, ``bench/registration_instructions.py``) — and then sends the
    CA certificate, which every module has pinned in its ca.pem and finds there anyway."""
    ctx.set_mode(_MODE_NO_AUTO_CHAIN)


def release_handshake_buffers(connection: SSL.Connection) -> bool:
    """Give an idle connection's memory BIOs back once the handshake flight has passed.

    pyOpenSSL's memory BIOs (what Twisted's TLS layer feeds and drains) keep the capacity of
    the largest flight they ever held: the server's certificate chain and key share out, the
    client's ClientHello, certificate and Finished in — ~5.3 KB per connection of TLS 1.3 with
    a client certificate (heaptrack, ``bench/tls_conn_memory.py``), held for as long as an idle
    host stays connected.  ``MODE_RELEASE_BUFFERS`` frees OpenSSL's own record buffers, not
    these.  When both BIOs are empty they are swapped for fresh ones (``SSL_set_bio`` frees the
    old pair); a heartbeat grows the new ones to ~100 bytes.  False (nothing done) if bytes are
    still in either BIO or this pyOpenSSL keeps its BIOs elsewhere: then try again later."""
    into, out = getattr(connection, "_into_ssl", None), getattr(connection, "_from_ssl", None)
    ssl = getattr(connection, "_ssl", None)
    if into is None or out is None or ssl is None:
        return False
    data = _ffi.new("char **")
    if _lib.BIO_get_mem_data(into, data) or _lib.BIO_get_mem_data(out, data):
        return False
    fresh_in = _lib.BIO_new(_lib.BIO_s_mem())
    fresh_out = _lib.BIO_new(_lib.BIO_s_mem())
    if fresh_in == _ffi.NULL or fresh_out == _ffi.NULL:
        for bio in (fresh_in, fresh_out):
            if bio != _ffi.NULL:
                _lib.BIO_free(bio)
        return False
    _lib.SSL_set_bio(ssl, fresh_in, fresh_out)  # takes both, frees the old pair
    connection._into_ssl, connection._from_ssl = fresh_in, fresh_out
    return True


def bio_pending(bio) -> int:
    """Bytes waiting in a memory BIO (``BIO_get_mem_data``'s length; OpenSSL's mem BIO accepts
    no pointer for the data).  Cheaper than a read that raises ``WantReadError`` when empty."""
    return _lib.BIO_get_mem_data(bio, _ffi.NULL)


def nothing_to_read(connection: SSL.Connection) -> bool:
    """True if an ``SSL_read`` now could only ask for more bytes: nothing in the receive BIO
    and no decrypted byte held by OpenSSL.  Without read-ahead (OpenSSL's and Twisted's
    default) every record not yet processed is still in the BIO, and a record partly read
    needs more bytes anyway.  False if this pyOpenSSL keeps its BIOs elsewhere."""
    into = getattr(connection, "_into_ssl", None)
    return (into is not None and not _lib.BIO_get_mem_data(into, _ffi.NULL)
            and not _lib.SSL_pending(connection._ssl))


def web_context(chain: list[x509.Certificate], key, ca_cert: x509.Certificate,
                min_tls: str) -> SSL.Context:
    ctx = _base_context(chain, key, min_tls)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca_cert))
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca_cert).get_subject()])
    # Ask, but admit anyone: browsers have no certificate and the renewal endpoint checks its own.
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
    return ctx


def module_context(chain: list[x509.Certificate], key, ca_cert: x509.Certificate, min_tls: str,
                   is_revoked: Callable[[str], bool], resumption: bool = False) -> SSL.Context:
    """The module port's context.  ``resumption``: supporters and ad-hoc customers get TLS 1.3
    tickets their relay legs (and reconnects) may resume — see ``Resumption``; without it (a
    separate relay process) no session can be resumed."""
    ctx = _base_context(chain, key, min_tls)
    _send_chain_as_given(ctx)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca_cert))
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca_cert).get_subject()])
    # A resumed session skips the verify callback, i.e. the chain and revocation checks, so a
    # revoked module holding a ticket could come back (it could before 2026-12-05:
    # tests/test_module_port.py).  Without ``resumption``: no session can be resumed (OpenSSL
    # still sends TLS 1.3 tickets, stateful ones that no cache holds).  With it: stateless
    # tickets, encrypted with keys this context draws at random and never writes anywhere (a
    # restart invalidates every ticket), and ``Resumption.check`` judges a resumed certificate
    # again — revocation and expiry — before the connection may say anything.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    resumed = Resumption(is_revoked) if resumption else None
    if resumed is None:
        ctx.set_options(SSL.OP_NO_TICKET)
    else:
        ctx.set_timeout(Resumption.LIFETIME_SECONDS)
    ctx.set_app_data(resumed)
    ctx.set_verify(SSL.VERIFY_PEER, _module_verifier(is_revoked, resumed))
    return ctx


class ResumptionRefused(Exception):
    """A resumed session whose certificate is no longer good (revoked, expired)."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Resumption:
    """TLS session resumption on the module port, and what keeps it as safe as a full handshake.

    Why: an ad-hoc set-up costs three TLS handshakes on the server (the customer's control
    connection and both relay legs); a leg that resumes its own control connection's session
    skips the certificate, its signature and — for a supporter — the client certificate's chain
    check and parse (bench/README.md: ~0.14 ms of server CPU saved per customer leg, ~0.39 ms
    per supporter leg).

    What a resumed handshake skips is put back in ``check``: OpenSSL does not call the verify
    callback, so the certificate the ticket carries is judged again here — revoked, or expired
    since, and the connection is refused before its first command.  The chain needs no second
    look: only this context's full handshakes, which checked it, issue tickets, and its keys
    live only in this process.  Hosts get no resumable ticket (``OP_NO_TICKET`` on their
    connection, as before): 20,000 of them reconnect only after a restart, when no ticket is
    valid, and a stateless ticket would add ~0.09 ms to every registration.
    """

    #: a supporter's control connection lives for a working day; its legs resume that long
    LIFETIME_SECONDS = 8 * 3600
    #: certificates whose facts are kept for resumed connections (supporters: a handful)
    MAX_FACTS = 4096

    def __init__(self, is_revoked: Callable[[str], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.is_revoked = is_revoked
        self.clock = clock
        self._facts: dict[str, tuple[PeerFacts, float]] = {}

    def remember(self, facts: PeerFacts, not_after: float) -> None:
        """Keep a certificate's facts (parsed once, in a full handshake) for its resumptions."""
        if facts.serial not in self._facts and len(self._facts) >= self.MAX_FACTS:
            self._facts.pop(next(iter(self._facts)))  # the oldest: parsed again if it comes back
        self._facts[facts.serial] = (facts, not_after)

    def check(self, conn: SSL.Connection) -> PeerFacts | None:
        """The facts of a resumed connection's client certificate (None: it has none, an ad-hoc
        customer); ``ResumptionRefused`` if that certificate is revoked or expired by now."""
        cert = conn.get_peer_certificate()
        if cert is None:
            return None
        serial = format(cert.get_serial_number(), "x")
        if self.is_revoked(serial):
            raise ResumptionRefused("revoked certificate",
                                    f"module port refused a resumed session of revoked "
                                    f"certificate {serial}")
        known = self._facts.get(serial)
        if known is None:
            parsed = cert.to_cryptography()
            known = (PeerFacts(identity_of(parsed), serial, fingerprint(parsed),
                               parsed.not_valid_after_utc.isoformat()),
                     parsed.not_valid_after_utc.timestamp())
            self.remember(*known)
        if self.clock() >= known[1]:
            raise ResumptionRefused("expired certificate",
                                    f"module port refused a resumed session of certificate "
                                    f"{serial}: it expired at {known[0].not_after}")
        return known[0]


def resumed(conn: SSL.Connection) -> bool:
    """Whether this connection's handshake resumed an earlier session."""
    return bool(_lib.SSL_session_reused(conn._ssl))


#: ALPN names on the single port: modules (control connections and relay legs) and browsers
ALPN_MODULE = b"hausmeister/1"
ALPN_WEB = b"http/1.1"


def _select_plane(conn: SSL.Connection, offered: list[bytes]):
    if ALPN_MODULE in offered:
        return ALPN_MODULE
    if ALPN_WEB in offered:
        return ALPN_WEB
    return SSL.NO_OVERLAPPING_PROTOCOLS  # e.g. only h2 offered: no ALPN, served as web


def single_port_context(chain: list[x509.Certificate], key, ca_cert: x509.Certificate,
                        min_tls: str, is_revoked: Callable[[str], bool]) -> SSL.Context:
    """Browsers and modules on one port.  ALPN picks the plane while the ClientHello is read,
    before the client's certificate arrives; the certificate is then judged exactly as that
    plane's own port judges it (module: chain, revocation and identity; web: anything).
    No session resumption here: a resumed session skips certificate verification, so a session
    begun as web could otherwise come back as a module with an unchecked certificate."""
    ctx = _base_context(chain, key, min_tls)
    _send_chain_as_given(ctx)  # a browser that trusts this server has its CA installed
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca_cert))
    ctx.set_client_ca_list([crypto.X509.from_cryptography(ca_cert).get_subject()])
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    module_verify = _module_verifier(is_revoked)

    def verify(conn, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if conn.get_alpn_proto_negotiated() == ALPN_MODULE:
            return module_verify(conn, cert, errno, depth, ok)
        return True  # a browser, or the renewal endpoint, which checks the certificate itself

    ctx.set_verify(SSL.VERIFY_PEER, verify)
    ctx.set_alpn_select_callback(_select_plane)
    return ctx


def _module_verifier(is_revoked: Callable[[str], bool], resumption: Resumption | None = None):
    """The module port's judgement of a client certificate, for OpenSSL's verify callback."""

    def verify(conn, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            _refused(conn, "client certificate refused",
                     f"module port refused a client certificate at depth {depth}: OpenSSL verify "
                     f"error {errno} ({_verify_error_text(errno)})")
            return False
        if depth > 0:
            return True
        serial = format(cert.get_serial_number(), "x")
        if is_revoked(serial):
            _refused(conn, "revoked certificate", f"module port refused revoked certificate {serial}")
            return False
        parsed = cert.to_cryptography()
        try:
            identity = identity_of(parsed)
        except IdentityError as exc:
            _refused(conn, "certificate without identity",
                     f"module port refused certificate {serial}: {exc}")
            return False
        facts = PeerFacts(identity, serial, fingerprint(parsed),
                          parsed.not_valid_after_utc.isoformat())
        tls_protocol = conn.get_app_data()
        if tls_protocol is not None:  # the connection takes these, not the certificate objects
            tls_protocol.peer_facts = facts
        if resumption is not None:
            if identity.role == "host":  # a stateful ticket, which no cache holds: not resumable
                _lib.SSL_set_options(conn._ssl, SSL.OP_NO_TICKET)
            else:
                resumption.remember(facts, parsed.not_valid_after_utc.timestamp())
        return True

    return verify


class PeerFacts(NamedTuple):
    """What a module connection keeps of the client certificate the verify callback accepted
    (parsed once, in the handshake; no certificate object stays with the connection)."""

    identity: Identity
    serial: str
    fingerprint: str
    not_after: str


def _refused(conn: SSL.Connection, kind: str, reason: str) -> None:
    """One line per refusal, or, behind a connection guard, one line per kind and interval (a
    flood of handshakes with a bad certificate must not fill the log)."""
    from .connection_guard import note_refusal  # imports config; here to keep tls.py light
    tls_protocol = conn.get_app_data()
    if tls_protocol is None or not hasattr(tls_protocol, "getPeer"):
        log.warn("{reason}", reason=reason)
        return
    note_refusal(tls_protocol, kind, reason)


def _verify_error_text(errno: int) -> str:
    # The few an operator will actually meet; the number is logged as well.
    return {10: "certificate has expired", 9: "certificate is not yet valid",
            20: "unable to get local issuer certificate (another CA)",
            18: "self-signed certificate", 19: "self-signed certificate in chain",
            2: "unable to get issuer certificate"}.get(errno, "see OpenSSL verify codes")
