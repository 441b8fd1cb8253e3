"""End to end: a real server process, real module CLIs, real TLS on loopback, both databases.

A supporter and a host enroll, then use their certificates for a mutual-TLS handshake with the
module port; revoked, expired and foreign certificates are refused at the handshake.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import stat
import time

import pytest
from cryptography.hazmat.primitives import serialization

from server import pki
from protocol.identity import Identity

from .fixtures_server import SUPPORTER_PASSWORD, run_cli

pytestmark = pytest.mark.e2e


def module_tls(srv, cert_path=None, key_path=None, ca_pem: bytes | None = None,
               version: ssl.TLSVersion | None = None) -> ssl.SSLSocket:
    """A raw mutual-TLS handshake with the module port, as any module would do it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=(ca_pem or (srv.cert_dir / "ca.crt").read_bytes()).decode())
    if cert_path:
        ctx.load_cert_chain(cert_path, key_path)
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    raw = socket.create_connection(("127.0.0.1", srv.module_port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    return tls


def refused_at_handshake(sock_factory) -> bool:
    """TLS 1.3 sends the server's verdict on our certificate after the client's Finished:
    a refusal shows as an alert (or a closed socket) on the first read."""
    try:
        tls = sock_factory()
    except (ssl.SSLError, ConnectionResetError):
        return True
    try:
        tls.settimeout(10)
        data = tls.recv(1)
        return data == b""
    except (ssl.SSLError, ConnectionResetError):
        return True
    finally:
        tls.close()


def test_supporter_and_host_enroll_and_shake_hands_with_the_module_port(
        running_server, enrolled_supporter, enrolled_host):
    srv = running_server
    for home, kind in ((enrolled_supporter, "supporter"), (enrolled_host, "host")):
        assert stat.S_IMODE((home / "key.pem").stat().st_mode) == 0o600
        result = run_cli(kind, "status", "--home", str(home))
        assert result.returncode == 0, result.stderr
        assert f"hausmeister:{kind}:" in result.stdout
        assert "tenant default" in result.stdout
    host_id = json.loads((enrolled_host / "module.json").read_text())["host_id"]
    listing = srv.ok("cert", "list")
    assert "hausmeister:supporter:alice" in listing
    assert f"hausmeister:host:{host_id}" in listing

    # The private key never left the module: the server's record holds only the certificate.
    key_body = b"".join((enrolled_supporter / "key.pem").read_bytes().splitlines()[1:-1])
    sqlite_file = srv.data_dir / "hausmeister.sqlite3"
    if sqlite_file.exists():
        assert key_body not in sqlite_file.read_bytes()
    assert key_body not in srv.log().encode()

    # A raw mutual-TLS client with the enrolled key pair is admitted and stays connected.
    tls = module_tls(srv, enrolled_host / "cert.pem", enrolled_host / "key.pem")
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    tls.close()


def test_customer_without_certificate_reaches_the_module_port_anonymously(running_server):
    result = run_cli("customer", "check", "--server", running_server.url,
                     "--ca-fingerprint", running_server.fingerprint)
    assert result.returncode == 0, result.stderr
    assert "as anonymous" in result.stdout


def test_revocation_refuses_the_next_handshake_and_drops_the_live_connection(
        running_server, enrolled_supporter):
    srv = running_server
    cert, key = enrolled_supporter / "cert.pem", enrolled_supporter / "key.pem"
    live = module_tls(srv, cert, key)
    live.settimeout(0.2)
    with pytest.raises(socket.timeout):
        live.recv(1)  # admitted: the server keeps the connection open
    out = srv.ok("cert", "revoke", "hausmeister:supporter:alice", "--reason", "laptop stolen")
    assert "revoked" in out
    live.settimeout(10)
    try:
        assert live.recv(1) == b""
    except (ssl.SSLError, ConnectionResetError):
        pass  # an abort shows as a reset: dropped either way
    live.close()
    assert refused_at_handshake(lambda: module_tls(srv, cert, key))
    result = run_cli("supporter", "status", "--home", str(enrolled_supporter), "--no-renew")
    assert result.returncode == 1
    assert "error:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    again = srv.cli("cert", "revoke", "hausmeister:supporter:alice")
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_expired_and_foreign_certificates_are_refused_at_the_handshake(running_server, tmp_path):
    srv = running_server
    store = pki.CertStore(srv.cert_dir)
    key = pki.new_key()
    csr = pki.make_csr(key, Identity("supporter", "mallory"))
    past = lambda: dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=400)  # noqa: E731
    expired = pki.sign_module_csr(store.ca_key(), store.ca_cert(), csr,
                                  Identity("supporter", "mallory"), days=30, now=past)
    (tmp_path / "expired.pem").write_bytes(pki.cert_pem(expired))
    (tmp_path / "key.pem").write_bytes(pki.key_pem(key))
    assert refused_at_handshake(lambda: module_tls(srv, tmp_path / "expired.pem", tmp_path / "key.pem"))

    other_key, other_ca = pki.create_ca("Another CA")
    foreign = pki.sign_module_csr(other_key, other_ca, csr, Identity("supporter", "mallory"), days=30)
    (tmp_path / "foreign.pem").write_bytes(pki.cert_pem(foreign))
    assert refused_at_handshake(lambda: module_tls(srv, tmp_path / "foreign.pem", tmp_path / "key.pem"))
    assert "module port refused" in srv.log()


def test_module_port_refuses_tls_older_than_1_2(running_server):
    srv = running_server
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    raw = socket.create_connection(("127.0.0.1", srv.module_port), timeout=10)
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    raw.close()


def test_renewal_keeps_identity_without_token_or_password(running_server, enrolled_host):
    before = json.loads((enrolled_host / "module.json").read_text())
    old_serial = pki.load_certs(enrolled_host / "cert.pem")[0].serial_number
    old_key = (enrolled_host / "key.pem").read_bytes()
    result = run_cli("host", "renew", "--force", "--home", str(enrolled_host))
    assert result.returncode == 0, result.stderr
    new_cert = pki.load_certs(enrolled_host / "cert.pem")[0]
    assert new_cert.serial_number != old_serial
    assert (enrolled_host / "key.pem").read_bytes() != old_key  # new key pair too
    assert json.loads((enrolled_host / "module.json").read_text())["host_id"] == before["host_id"]
    status = run_cli("host", "status", "--home", str(enrolled_host))
    assert status.returncode == 0 and before["host_id"] in status.stdout
    not_due = run_cli("host", "renew", "--home", str(enrolled_host))
    assert "not due" in not_due.stdout


def test_status_renews_a_certificate_that_is_close_to_expiry(running_server, enrolled_supporter):
    settings_path = enrolled_supporter / "module.json"
    settings = json.loads(settings_path.read_text())
    settings["renew_before_days"] = 3650  # every certificate is "about to expire" now
    settings_path.write_text(json.dumps(settings))
    old_serial = pki.load_certs(enrolled_supporter / "cert.pem")[0].serial_number
    result = run_cli("supporter", "status", "--home", str(enrolled_supporter))
    assert result.returncode == 0, result.stderr
    assert "certificate renewed" in result.stdout
    assert pki.load_certs(enrolled_supporter / "cert.pem")[0].serial_number != old_serial


# --- bad input ---------------------------------------------------------------------------------

def test_wrong_password_is_refused_and_locks_out(running_server, tmp_path):
    srv = running_server
    srv.ok("user", "add", "bob", "--role", "supporter", "--password-stdin",
           stdin=SUPPORTER_PASSWORD + "\n")
    messages = []
    for _ in range(3):
        result = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                         srv.fingerprint, "--user", "bob", "--password-stdin",
                         "--home", str(tmp_path / "bob"), stdin="wrong-password\n")
        assert result.returncode == 1
        messages.append(result.stderr.strip())
        assert len(messages[-1].splitlines()) == 1
    assert "wrong user name or password" in messages[0]
    assert "try again in" in messages[-1]
    # Locked out now, even with the right password; nothing was written to the module folder.
    result = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint", srv.fingerprint,
                     "--user", "bob", "--password-stdin", "--home", str(tmp_path / "bob"),
                     stdin=SUPPORTER_PASSWORD + "\n")
    assert result.returncode == 1 and "try again in" in result.stderr
    assert not (tmp_path / "bob" / "cert.pem").exists()


def test_host_tokens_are_single_use_and_expire(running_server, tmp_path):
    srv = running_server
    srv.ok("group", "add", "lab")

    def enroll(token: str, name: str):
        return run_cli("host", "enroll", "--server", srv.url, "--ca-fingerprint", srv.fingerprint,
                       "--token", token, "--name", name, "--home", str(tmp_path / name))

    token = srv.ok("token", "create", "--group", "lab", "--ttl", "1h", "-q").strip()
    assert len(token) == 32  # 128 bits, hex
    assert enroll(token, "first").returncode == 0
    reused = enroll(token, "second")
    assert reused.returncode == 1 and "already used" in reused.stderr

    unknown = enroll("0" * 32, "third")
    assert unknown.returncode == 1 and "unknown" in unknown.stderr

    short = srv.ok("token", "create", "--group", "lab", "--ttl", "1s", "-q").strip()
    time.sleep(1.2)
    expired = enroll(short, "fourth")
    assert expired.returncode == 1 and "expired" in expired.stderr
    for name in ("second", "third", "fourth"):
        assert not (tmp_path / name / "cert.pem").exists()
    hosts = [line for line in srv.ok("cert", "list").splitlines() if " host " in line]
    assert len(hosts) == 1

    missing_group = srv.cli("token", "create", "--group", "nope")
    assert missing_group.returncode == 1 and "group add nope" in missing_group.stderr


def test_wrong_ca_fingerprint_sends_nothing(running_server, tmp_path):
    srv = running_server
    srv.ok("user", "add", "carol", "--role", "supporter", "--password-stdin",
           stdin=SUPPORTER_PASSWORD + "\n")
    wrong = "ab" * 32
    result = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint", wrong,
                     "--user", "carol", "--password-stdin", "--home", str(tmp_path / "carol"),
                     stdin=SUPPORTER_PASSWORD + "\n")
    assert result.returncode == 1
    assert "not the expected" in result.stderr and "nothing was sent" in result.stderr
    assert "enroll/supporter" not in srv.log()
    bad = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint", "xyz",
                  "--user", "carol", "--password-stdin", stdin="x\n")
    assert bad.returncode == 1 and "fingerprint" in bad.stderr


def test_enrollment_api_refuses_malformed_requests(running_server):
    srv = running_server
    ctx = ssl.create_default_context(cafile=str(srv.cert_dir / "ca.crt"))
    import urllib.error
    import urllib.request

    def post(path: str, body: bytes):
        req = urllib.request.Request(srv.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert post("/api/v1/enroll/supporter", b"not json") == (400, {"error": "the request body is not JSON"})
    status, body = post("/api/v1/enroll/supporter", json.dumps({"user": "x"}).encode())
    assert status == 400 and "missing" in body["error"]
    status, body = post("/api/v1/enroll/host", b"{" + b" " * 70000 + b"}")
    assert status == 413
    status, body = post("/api/v1/enroll/host", json.dumps(
        {"token": "a" * 32, "name": "x", "csr": "garbage"}).encode())
    assert status in (400, 403)
    status, body = post("/api/v1/renew", json.dumps({"csr": "x"}).encode())
    assert status == 401 and "client certificate" in body["error"]
    # The server is still serving everyone else.
    with urllib.request.urlopen(srv.url + "/ca.pem", context=ctx, timeout=10) as resp:
        assert b"BEGIN CERTIFICATE" in resp.read()


def test_csr_for_a_foreign_identity_or_wrong_key_type_is_refused(running_server, tmp_path):
    """Through the real HTTPS API with a hand-made CSR, as a tampered module would send it."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    srv = running_server
    srv.ok("user", "add", "dave", "--role", "supporter", "--password-stdin",
           stdin=SUPPORTER_PASSWORD + "\n")
    ctx = ssl.create_default_context(cafile=str(srv.cert_dir / "ca.crt"))
    import urllib.error
    import urllib.request

    def enroll_with(csr) -> str:
        body = json.dumps({"user": "dave", "password": SUPPORTER_PASSWORD,
                           "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode()
        req = urllib.request.Request(srv.url + "/api/v1/enroll/supporter", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, context=ctx, timeout=10)
        return json.loads(info.value.read())["error"]

    foreign = pki.make_csr(pki.new_key(), Identity("supporter", "admin"))
    assert "asks for identity hausmeister:supporter:admin" in enroll_with(foreign)
    rsa_csr = pki.make_csr(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                           Identity("supporter", "dave"))
    assert "ECDSA P-256" in enroll_with(rsa_csr)
    assert "hausmeister:supporter:dave" not in srv.ok("cert", "list")
