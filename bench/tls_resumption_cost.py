"""Server CPU of one module-port TLS handshake: full, with tickets, and resumed.

    python bench/tls_resumption_cost.py [--handshakes 1500]

The module port's own context (``server.tls.module_context``, with and without
``resumption``) against a pyOpenSSL client, both in this process over memory BIOs (no sockets,
no reactor): only the server's ``do_handshake``/``send``/``recv`` calls are timed
(``time.thread_time``).  Three kinds, interleaved handshake by handshake so the machine's load
hits them alike, once without a client certificate (an ad-hoc customer) and once with a
supporter's:

* full handshake, no resumable tickets (the module port before 2026-12-06; hosts still);
* full handshake issuing stateless tickets (supporters' and customers' control connections);
* resumed handshake (a relay leg offering its control connection's session).

Prints medians and the resumed/full ratio.  Never fails on timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_line  # noqa: E402

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from OpenSSL import SSL, crypto  # noqa: E402

from protocol.identity import Identity  # noqa: E402
from server import pki, tls  # noqa: E402


def certificates():
    ca_key, ca = pki.create_ca()
    server_key, server_cert = pki.issue_server_cert(ca_key, ca, ("localhost",), ("127.0.0.1",))
    key = pki.new_key()
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    cert = pki.sign_module_csr(ca_key, ca, csr, Identity("supporter", "bench"), days=30)
    return ca, server_key, server_cert, key, cert


def client_context(ca, key=None, cert=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(ca))
    ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)
    if cert is not None:
        ctx.use_certificate(crypto.X509.from_cryptography(cert))
        ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    return ctx


def handshake(server_ctx, client_ctx, session=None) -> tuple[float, SSL.Connection, bool]:
    """(server CPU seconds, the client connection, resumed?) — handshake plus one byte each way
    (the byte carries the tickets)."""
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    cpu = 0.0
    done = False
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            server.bio_write(client.bio_read(65536))
        except SSL.WantReadError:
            pass
        t = time.thread_time()
        try:
            server.do_handshake()
            done = True
        except SSL.WantReadError:
            pass
        cpu += time.thread_time() - t
        try:
            client.bio_write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
        if done:
            break
    t = time.thread_time()
    server.send(b"s")
    out = server.bio_read(65536)
    cpu += time.thread_time() - t
    client.bio_write(out)
    client.recv(1)
    client.send(b"c")
    server.bio_write(client.bio_read(65536))
    t = time.thread_time()
    server.recv(1)
    cpu += time.thread_time() - t
    return cpu, client, tls.resumed(server)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--handshakes", type=int, default=1500, help="of each kind (default 1500)")
    args = p.parse_args(argv)
    print(machine_line())
    print(f"server and client TLS: {SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} "
          "(pyOpenSSL, as the server)")
    ca, server_key, server_cert, key, cert = certificates()
    plain = tls.module_context([server_cert], server_key, ca, "1.2", lambda serial: False)
    resuming = tls.module_context([server_cert], server_key, ca, "1.2", lambda serial: False,
                                  resumption=True)
    n = args.handshakes
    for label, client_ctx in (("customer (no client certificate)", client_context(ca)),
                              ("supporter (client certificate)", client_context(ca, key, cert))):
        _, first, _ = handshake(resuming, client_ctx)  # stays open: its session stays resumable
        session = first.get_session()
        full, ticketed, resumed, kept = [], [], [], []
        reused = 0
        for _ in range(n):
            full.append(handshake(plain, client_ctx)[0])
            cpu, conn, _ = handshake(resuming, client_ctx)
            ticketed.append(cpu)
            cpu, conn2, was = handshake(resuming, client_ctx, session)
            resumed.append(cpu)
            reused += was
            kept += [conn, conn2]  # freed later, together (a free without close_notify is fine)
            if len(kept) > 200:
                kept.clear()
        median = {name: sorted(values)[n // 2] * 1e6 for name, values in
                  (("full", full), ("ticketed", ticketed), ("resumed", resumed))}
        print(f"{label}: server CPU per handshake, median of {n}: full {median['full']:.0f} µs, "
              f"full issuing tickets {median['ticketed']:.0f} µs, resumed "
              f"{median['resumed']:.0f} µs ({reused} of {n} resumed) -> resumed/full "
              f"{median['resumed'] / median['full']:.2f}x, saves "
              f"{median['full'] - median['resumed']:.0f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
