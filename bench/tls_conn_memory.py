"""What OpenSSL itself keeps per idle server-side TLS connection, with the module port's context.

    python bench/tls_conn_memory.py [--connections 1000]

In one process, no sockets: ``--connections`` handshakes through pyOpenSSL memory BIOs (what
Twisted's TLS layer uses) against ``server.tls.module_context`` (MODE_RELEASE_BUFFERS, no
resumption), then one small record each way, as a heartbeat does; the clients are freed and the
server sides kept.  The figure is malloc'd bytes in use (glibc ``mallinfo2``: ``uordblks`` +
``hblkhd``) after minus before, per connection — OpenSSL's state plus pyOpenSSL's cffi handles,
without Python objects, the reactor or allocator slack.  Three client kinds: a module
certificate over TLS 1.3 (what hosts do), no certificate (an ad-hoc customer), and a module
certificate with the client capped at TLS 1.2 (for comparison only; the module port keeps 1.3).

Then a host module's own client settings (``modules.common.link.connection.client_tls``), now
and as they were before 2026-12-06: the bare clients above send no CA certificate and offer
OpenSSL's cipher list, the module sent the CA's certificate along and Twisted's 42 suites,
both of which the server's OpenSSL keeps for the life of the connection.

Each of the first three kinds is measured twice: as the connection is left after the exchange, and after
``server.tls.release_handshake_buffers`` (what the server's TLS layer does once the handshake's
bytes have passed: fresh memory BIOs instead of ones with the capacity of the handshake flight).
Where the rest goes (heaptrack, bench/README.md): OpenSSL's two record layers, the connection
object, the client's ML-KEM-768 key share kept until the connection is freed, two AES-GCM
contexts, the session with the peer's certificate.

It is the floor under ``idle_hosts.py``'s bytes per host: the issue's target is 40 KB per host.
Prints figures, never fails on them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization  # noqa: E402
from OpenSSL import SSL, crypto  # noqa: E402

from _common import machine_line  # noqa: E402
from protocol.identity import Identity, make_csr  # noqa: E402
from server import pki, tls  # noqa: E402


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def malloced() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def client_context(ca_key, ca_cert, kind: str) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *args: True)
    if kind == "no certificate":
        return ctx
    if kind == "certificate, TLS 1.2":
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    key = pki.new_key()
    csr = pki.parse_csr(make_csr(key, None).public_bytes(serialization.Encoding.PEM))
    cert = pki.sign_module_csr(ca_key, ca_cert, csr, Identity("host", str(uuid.uuid4())), 30)
    ctx.use_certificate(crypto.X509.from_cryptography(cert))
    ctx.use_privatekey(crypto.PKey.from_cryptography_key(key))
    return ctx


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


def idle_server_side(server_ctx: SSL.Context, client_ctx: SSL.Context,
                     release: bool = False) -> SSL.Connection:
    server = SSL.Connection(server_ctx, None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    _pump(client, server)
    client.send(b"h" * 40)  # a heartbeat and its answer
    _pump(client, server)
    server.recv(100)
    server.send(b"a" * 60)
    _pump(client, server)
    client.recv(100)
    if release and not tls.release_handshake_buffers(server):
        raise RuntimeError("the BIOs were not empty after the exchange")
    return server


def measure(server_ctx, client_ctx, n: int, release: bool) -> float:
    keep = [idle_server_side(server_ctx, client_ctx, release) for _ in range(20)]  # warm-up
    gc.collect()
    _libc.malloc_trim(0)
    before = malloced()
    servers = [idle_server_side(server_ctx, client_ctx, release) for _ in range(n)]
    gc.collect()
    _libc.malloc_trim(0)
    per = (malloced() - before) / n
    del servers, keep
    gc.collect()
    return per


def module_client_contexts(ca_key, ca_cert) -> dict[str, SSL.Context]:
    """The client contexts of a host module: as ``modules.common.link.connection.client_tls``
    makes it now, and as it made it before 2026-12-06 (Twisted's ``CertificateOptions`` with the
    pinned CA as trust root: OpenSSL sends the CA certificate after the module's, and Twisted's
    default cipher list is offered)."""
    import tempfile

    from twisted.internet import ssl as twisted_ssl

    from modules.common.link.connection import client_tls
    from modules.common.link.folder import ModuleFolder
    pem = serialization.Encoding.PEM
    key = pki.new_key()
    csr = pki.parse_csr(make_csr(key, None).public_bytes(pem))
    cert = pki.sign_module_csr(ca_key, ca_cert, csr, Identity("host", str(uuid.uuid4())), 30)
    folder = Path(tempfile.mkdtemp(prefix="tls-conn-memory-"))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    (folder / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    now = client_tls("127.0.0.1", ca_cert.public_bytes(pem), ModuleFolder(folder))
    before = twisted_ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
        trustRoot=twisted_ssl.Certificate.loadPEM(ca_cert.public_bytes(pem)),
        raiseMinimumTo=twisted_ssl.TLSVersion.TLSv1_2)
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return {"module's TLS before 2026-12-06": before.getContext(),
            "module's TLS now (client_tls)": now._createConnection.__self__.getContext()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--connections", type=int, default=1000, help="server-side connections kept")
    args = p.parse_args(argv)
    print(machine_line())
    print(f"pyOpenSSL's OpenSSL (cryptography's bundled one, what the server's TLS uses): "
          f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}")
    ca_key, ca_cert = pki.create_ca("bench CA")
    server_key, server_cert = pki.issue_server_cert(ca_key, ca_cert, ("localhost",), ("127.0.0.1",))
    server_ctx = tls.module_context([server_cert], server_key, ca_cert, "1.2", lambda s: False)
    results = {}
    for kind in ("module certificate, TLS 1.3", "no certificate", "certificate, TLS 1.2"):
        client_ctx = client_context(ca_key, ca_cert, kind)
        for release in (False, True):
            results[kind, release] = measure(server_ctx, client_ctx, args.connections, release)
        kept, released = results[kind, False], results[kind, True]
        print(f"{kind:30s}: {kept:8,.0f} bytes malloc'd per idle server-side connection, "
              f"{released:8,.0f} with the handshake's BIOs given back ({kept - released:,.0f} less)")
    module_kinds = module_client_contexts(ca_key, ca_cert)
    for kind, client_ctx in module_kinds.items():
        results[kind, True] = measure(server_ctx, client_ctx, args.connections, True)
        print(f"{kind:30s}: {results[kind, True]:8,.0f} bytes malloc'd per idle server-side "
              "connection, BIOs given back")
    old, new = (results[kind, True] for kind in module_kinds)
    print(f"RESULT: a host as the module connects today keeps {new / 1000:.1f} KB of OpenSSL on "
          f"the server, {old / 1000:.1f} KB with the module's TLS settings before 2026-12-06 "
          f"(CA certificate sent along, Twisted's 42 cipher suites offered): {old - new:,.0f} "
          "bytes less")
    before = results["module certificate, TLS 1.3", False]
    floor = results["module certificate, TLS 1.3", True]
    print(f"RESULT: OpenSSL keeps {floor / 1000:.1f} KB per idle host connection before any "
          f"Python object, as the server leaves it ({before / 1000:.1f} KB with the handshake's "
          f"BIOs kept: {before / floor:.2f}x); target for everything per host <= 40 KB: "
          f"{floor / 40000:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
