"""The CA (server/pki.py) and certificate services (server/certificates.py) with a CA in tmp_path.

Everything that touches the database runs on SQLite and PostgreSQL (``database`` fixture).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import secrets
import stat
import threading
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import event, func, inspect, select

from protocol.identity import Identity, fingerprint, identity_of, serial_hex
from server import accounts, certificates, pki
from server.accounts import LockoutPolicy, Lockouts
from server.certificates import Enrollment, EnrollmentError, EnrollmentRefused
from server.db import Database, KeepChanges
from server.db.models import (
    AuditEntry, CertRole, Certificate, EnrollmentToken, Host, Lockout, Role,
)

START = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.timezone.utc)
PASSWORD = "supporter password 1"


class Clock:
    def __init__(self, start: dt.datetime = START) -> None:
        self.moment = start

    def __call__(self) -> dt.datetime:
        return self.moment

    def advance(self, seconds: float) -> None:
        self.moment += dt.timedelta(seconds=seconds)


# --- helpers ----------------------------------------------------------------------------------

def make_csr(key, *uris: str, algorithm=hashes.SHA256()) -> str:
    """A module's CSR: its own key, asking for the given identity URIs (maybe none)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test module")]))
    if uris:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def eku(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def is_p256(public_key) -> bool:
    return (isinstance(public_key, ec.EllipticCurvePublicKey)
            and public_key.curve.name == "secp256r1")


def count(db: Database, model) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(model))


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock: Clock) -> pki.CertStore:
    """``init``'s result: a CA and a server certificate in a cert folder."""
    store = pki.CertStore(tmp_path / "certs")
    ca_key, ca_cert = pki.create_ca(now=clock)
    store.write_ca(ca_key, ca_cert)
    key, cert = pki.issue_server_cert(ca_key, ca_cert, ("hausmeister.internal",), ("127.0.0.1",),
                                      now=clock)
    store.write_server(key, [cert])
    return store


@pytest.fixture
def other_ca(clock: Clock):
    return pki.create_ca("Somebody Else's CA", now=clock)


@pytest.fixture
def lockouts(clock: Clock) -> Lockouts:
    return Lockouts(LockoutPolicy(free_attempts=3, base_seconds=1.0, max_seconds=900.0), now=clock)


@pytest.fixture
def enrollment(store: pki.CertStore, lockouts: Lockouts, clock: Clock) -> Enrollment:
    return Enrollment(store, lockouts, module_days=30, now=clock)


@pytest.fixture
def certs_db(database: Database, fast_password_hashing) -> Database:
    """Tenant acme with group office; users alice (supporter), adam (admin), audrey (auditor)."""
    with database.session() as session:
        tenant = accounts.get_or_create_tenant(session, "acme", now=lambda: START)
        accounts.add_group(session, tenant, "office")
        for name, role in (("alice", Role.supporter), ("adam", Role.admin),
                           ("audrey", Role.auditor)):
            accounts.add_user(session, tenant, name, role, PASSWORD, now=lambda: START)
    return database


def new_token(db: Database, ttl: float = 3600, group: str | None = "office",
              now=lambda: START) -> str:
    with db.session() as session:
        tenant = accounts.tenant_named(session, "acme")
        grp = accounts.group_named(session, tenant, group) if group else None
        token, _row = certificates.create_token(session, tenant, grp, ttl, "admin", now=now)
    return token


def enroll_host(db: Database, enrollment: Enrollment, token: str, name: str = "till-1",
                key=None, source: str = "10.1.0.1") -> certificates.Issued:
    key = key or pki.new_key()
    return db.call(enrollment.enroll_host, token, name, make_csr(key), source)


def enroll_supporter(db: Database, enrollment: Enrollment, user: str = "alice",
                     password: str = PASSWORD, csr: str | None = None,
                     source: str = "10.2.0.1") -> certificates.Issued:
    csr = csr or make_csr(pki.new_key(), f"hausmeister:supporter:{user}")
    return db.call(enrollment.enroll_supporter, user, password, csr, source)


# === pki: CA, server certificate, CSR signing (no database) ======================================

def test_create_ca(clock: Clock) -> None:
    key, cert = pki.create_ca(now=clock)
    assert is_p256(cert.public_key()) and is_p256(key.public_key())
    assert pki.is_ca(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert cert.issuer == cert.subject
    assert pki.issued_by(cert, cert)  # self-signed
    assert pki.same_key(key, cert)
    assert cert.not_valid_before_utc <= clock() < cert.not_valid_after_utc
    assert cert.signature_hash_algorithm.name == "sha256"


def test_serials_are_random_128_bit() -> None:
    serials = {pki.random_serial() for _ in range(200)}
    assert len(serials) == 200
    for serial in serials:
        assert 2 ** 126 <= serial < 2 ** 127  # positive, full ~127 random bits, < 20 octets
    # The issued certificates carry such serials too.
    _key, cert = pki.create_ca()
    assert cert.serial_number.bit_length() == 127


def test_server_certificate(store: pki.CertStore, clock: Clock) -> None:
    ca_key, ca_cert = store.ca_key(), store.ca_cert()
    key, cert = pki.issue_server_cert(ca_key, ca_cert, ("hausmeister.internal", "localhost"),
                                      ("127.0.0.1", "::1"), now=clock)
    names = san(cert)
    assert names.get_values_for_type(x509.DNSName) == ["hausmeister.internal", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                         ipaddress.ip_address("::1")]
    assert eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not pki.is_ca(cert)
    assert is_p256(cert.public_key()) and pki.same_key(key, cert)
    assert pki.issued_by(cert, ca_cert)
    assert cert.issuer == ca_cert.subject
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert cert.serial_number != ca_cert.serial_number
    # An address-only server certificate is fine; one with neither is refused.
    _k, by_ip = pki.issue_server_cert(ca_key, ca_cert, (), ("10.0.0.1",), now=clock)
    assert san(by_ip).get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    with pytest.raises(pki.PKIError, match="needs at least one name or address"):
        pki.issue_server_cert(ca_key, ca_cert, (), (), now=clock)


def test_leaf_lifetime_never_exceeds_the_ca(clock: Clock) -> None:
    ca_key, ca_cert = pki.create_ca(days=10, now=clock)
    _key, cert = pki.issue_server_cert(ca_key, ca_cert, ("x.internal",), (), days=825, now=clock)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_cert_store_files(store: pki.CertStore) -> None:
    assert store.exists()
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.ca_key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.server_key_path.stat().st_mode) == 0o600
    assert pki.same_key(store.ca_key(), store.ca_cert())
    chain = store.server_chain()
    assert len(chain) == 1 and pki.same_key(store.server_key(), chain[0])
    assert pki.issued_by(chain[0], store.ca_cert())
    store.ca_key_path.unlink()
    with pytest.raises(pki.PKIError, match="cannot issue module certificates"):
        store.ca_key()


def test_cert_store_unreadable_files_named_clearly(tmp_path) -> None:
    store = pki.CertStore(tmp_path / "empty")
    assert not store.exists()
    with pytest.raises(pki.PKIError, match="does not exist"):
        store.ca_cert()
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(pki.PKIError, match="cannot be read"):
        pki.load_key(tmp_path / "bad.key")
    (tmp_path / "bad.crt").write_text("not a certificate")
    with pytest.raises(pki.PKIError, match="bad.crt"):
        pki.load_certs(tmp_path / "bad.crt")


@pytest.mark.parametrize("identity", [Identity("supporter", "alice"),
                                      Identity("host", str(uuid.uuid4()))])
def test_sign_module_csr(store: pki.CertStore, clock: Clock, identity: Identity) -> None:
    key = pki.new_key()
    csr = pki.parse_csr(make_csr(key, identity.uri))
    assert pki.csr_identity(csr) == identity
    cert = pki.sign_module_csr(store.ca_key(), store.ca_cert(), csr, identity, days=30, now=clock)
    assert san(cert).get_values_for_type(x509.UniformResourceIdentifier) == [identity.uri]
    assert identity_of(cert) == identity
    assert identity.uri == f"hausmeister:{identity.role}:{identity.name}"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not pki.is_ca(cert)
    assert pki.same_key(key, cert)  # the module's own key: it never leaves the module
    assert pki.issued_by(cert, store.ca_cert())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30)
    assert cert.serial_number.bit_length() == 127
    assert pki.check_module_cert(cert, store.ca_cert(), now=clock) == identity


def test_csr_without_identity_gets_the_servers_choice(store: pki.CertStore, clock: Clock) -> None:
    csr = pki.parse_csr(make_csr(pki.new_key()))
    assert pki.csr_identity(csr) is None
    identity = Identity("supporter", "alice")
    cert = pki.sign_module_csr(store.ca_key(), store.ca_cert(), csr, identity, 30, now=clock)
    assert identity_of(cert) == identity


def test_csr_with_foreign_identity_refused(store: pki.CertStore, clock: Clock) -> None:
    csr = pki.parse_csr(make_csr(pki.new_key(), "hausmeister:supporter:mallory"))
    with pytest.raises(pki.PKIError, match="asks for identity hausmeister:supporter:mallory, but "
                                           "this enrollment is for hausmeister:supporter:alice"):
        pki.sign_module_csr(store.ca_key(), store.ca_cert(), csr, Identity("supporter", "alice"),
                            30, now=clock)


def test_csr_with_two_or_invalid_identities_refused() -> None:
    two = pki.parse_csr(make_csr(pki.new_key(), "hausmeister:supporter:alice",
                                 "hausmeister:supporter:bob"))
    with pytest.raises(pki.PKIError, match="more than one identity"):
        pki.csr_identity(two)
    bad = pki.parse_csr(make_csr(pki.new_key(), "hausmeister:admin:root"))
    with pytest.raises(pki.PKIError, match="invalid identity"):
        pki.csr_identity(bad)
    bad_host = pki.parse_csr(make_csr(pki.new_key(), "hausmeister:host:not-a-uuid"))
    with pytest.raises(pki.PKIError, match="invalid identity"):
        pki.csr_identity(bad_host)


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "p384"])
def test_csr_with_wrong_key_type_refused(kind: str) -> None:
    if kind == "rsa":
        key, algorithm, shown = rsa.generate_private_key(65537, 2048), hashes.SHA256(), "RSA"
    elif kind == "ed25519":
        key, algorithm, shown = ed25519.Ed25519PrivateKey.generate(), None, "Ed25519"
    else:
        key, algorithm = ec.generate_private_key(ec.SECP384R1()), hashes.SHA256()
        shown = "secp384r1"
    pem = make_csr(key, "hausmeister:supporter:alice", algorithm=algorithm)
    with pytest.raises(pki.PKIError, match=f"uses an? [^;]*{shown}[^;]* key; "
                                           "modules must use ECDSA P-256"):
        pki.parse_csr(pem)


@pytest.mark.parametrize("garbage", [
    "", "garbage", b"\x00\x01\x02",
    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
])
def test_garbage_csr_refused(garbage) -> None:
    with pytest.raises(pki.PKIError, match="not a PEM CSR"):
        pki.parse_csr(garbage)


def test_csr_with_broken_signature_refused() -> None:
    pem = make_csr(pki.new_key(), "hausmeister:supporter:alice")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the ECDSA signature
    broken = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(der))
              + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(pki.PKIError, match="signature does not verify"):
        pki.parse_csr(broken)


def test_certificate_presented_as_csr_refused(store: pki.CertStore) -> None:
    with pytest.raises(pki.PKIError, match="not a PEM CSR"):
        pki.parse_csr(pki.cert_pem(store.ca_cert()))


def test_check_module_cert_refusals(store: pki.CertStore, other_ca, clock: Clock) -> None:
    identity = Identity("supporter", "alice")
    csr = pki.parse_csr(make_csr(pki.new_key()))
    foreign = pki.sign_module_csr(*other_ca, csr, identity, 30, now=clock)
    with pytest.raises(pki.PKIError, match="not issued by this server's CA"):
        pki.check_module_cert(foreign, store.ca_cert(), now=clock)
    ours = pki.sign_module_csr(store.ca_key(), store.ca_cert(), csr, identity, 30, now=clock)
    clock.advance(31 * 86400)
    with pytest.raises(pki.PKIError, match="expired on"):
        pki.check_module_cert(ours, store.ca_cert(), now=clock)
    # The server certificate carries no module identity.
    with pytest.raises(pki.PKIError, match="exactly one hausmeister identity"):
        pki.check_module_cert(store.server_chain()[0], store.ca_cert(), now=lambda: START)


# --- validate_install -------------------------------------------------------------------------

def test_validate_install_accepts_a_matching_set(store: pki.CertStore, clock: Clock) -> None:
    pki.validate_install(store.ca_cert(), store.ca_key(), store.server_chain(),
                         store.server_key(), now=clock)
    pki.validate_install(store.ca_cert(), None, None, None, now=clock)  # CA only, no key
    # A chain that repeats the CA after the leaf is fine too.
    pki.validate_install(store.ca_cert(), None, store.server_chain() + [store.ca_cert()],
                         store.server_key(), now=clock)


def test_validate_install_refuses_a_key_that_does_not_match(store: pki.CertStore,
                                                            clock: Clock) -> None:
    with pytest.raises(pki.PKIError, match="server key does not match the server certificate"):
        pki.validate_install(store.ca_cert(), store.ca_key(), store.server_chain(),
                             pki.new_key(), now=clock)
    with pytest.raises(pki.PKIError, match="CA key does not match the CA certificate"):
        pki.validate_install(store.ca_cert(), pki.new_key(), None, None, now=clock)
    with pytest.raises(pki.PKIError, match="needs its key"):
        pki.validate_install(store.ca_cert(), None, store.server_chain(), None, now=clock)


def test_validate_install_refuses_a_server_cert_from_another_ca(store: pki.CertStore, other_ca,
                                                                clock: Clock) -> None:
    other_key, other_cert = other_ca
    key, cert = pki.issue_server_cert(other_key, other_cert, ("hausmeister.internal",), (),
                                      now=clock)
    with pytest.raises(pki.PKIError, match="not issued by the given CA"):
        pki.validate_install(store.ca_cert(), store.ca_key(), [cert], key, now=clock)
    # Adding the foreign CA as an "intermediate" does not make it chain to ours.
    with pytest.raises(pki.PKIError, match="not issued by the given CA"):
        pki.validate_install(store.ca_cert(), store.ca_key(), [cert, other_cert], key, now=clock)


def test_validate_install_refuses_non_ca_and_expired(store: pki.CertStore, clock: Clock) -> None:
    leaf = store.server_chain()[0]
    with pytest.raises(pki.PKIError, match="is not a CA"):
        pki.validate_install(leaf, store.server_key(), None, None, now=clock)
    later = START + dt.timedelta(days=826)
    with pytest.raises(pki.PKIError, match="the server certificate expired on"):
        pki.validate_install(store.ca_cert(), store.ca_key(), store.server_chain(),
                             store.server_key(), now=lambda: later)
    with pytest.raises(pki.PKIError, match="the CA certificate expired on"):
        pki.validate_install(store.ca_cert(), store.ca_key(), None, None,
                             now=lambda: START + dt.timedelta(days=3651))


# === certificates: recording, revocation, tokens, enrollment (both backends) =====================

def test_record_and_list(certs_db: Database, store: pki.CertStore, clock: Clock) -> None:
    cert = store.server_chain()[0]
    with certs_db.session() as session:
        certificates.record(session, cert, CertRole.server, "hausmeister.internal", now=clock)
    with certs_db.session() as session:
        [row] = certificates.list_certificates(session)
        assert row.serial == serial_hex(cert) == format(cert.serial_number, "x")
        assert row.fingerprint == fingerprint(cert)
        assert row.role is CertRole.server
        assert row.not_before == cert.not_valid_before_utc
        assert row.not_after == cert.not_valid_after_utc
        assert x509.load_pem_x509_certificate(row.pem.encode()) == cert
        assert row.issued_at == START and row.revoked_at is None


def test_enroll_supporter(certs_db: Database, enrollment: Enrollment,
                          store: pki.CertStore) -> None:
    key = pki.new_key()
    csr = make_csr(key, "hausmeister:supporter:alice")
    issued = enroll_supporter(certs_db, enrollment, csr=csr)
    assert issued.identity == Identity("supporter", "alice")
    assert issued.tenant == "acme" and issued.host_id is None
    assert issued.ca_certificate == store.ca_cert()
    cert = issued.certificate
    assert identity_of(cert) == issued.identity
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.same_key(key, cert) and pki.issued_by(cert, store.ca_cert())
    with certs_db.session() as session:
        [row] = certificates.list_certificates(session)
        assert (row.serial, row.role, row.identity) == (serial_hex(cert), CertRole.supporter,
                                                        "hausmeister:supporter:alice")
        audit = session.scalar(select(AuditEntry).where(AuditEntry.action == "enroll.supporter"))
        assert audit.actor == "alice" and "from=10.2.0.1" in audit.detail
    # An admin may enroll a supporter module too.
    assert enroll_supporter(certs_db, enrollment, user="adam").identity.name == "adam"


def test_enroll_supporter_wrong_password_is_recorded_and_lockout_grows(
        certs_db: Database, enrollment: Enrollment, clock: Clock) -> None:
    for attempt in range(1, 4):
        with pytest.raises(EnrollmentRefused, match="^wrong user name or password$") as info:
            enroll_supporter(certs_db, enrollment, password="wrong password")
        assert isinstance(info.value, KeepChanges)
        with certs_db.session() as session:
            assert session.get(Lockout, "user:alice").failures == attempt
    for wait in (1, 2, 4):
        with pytest.raises(EnrollmentRefused, match=f"try again in {wait} s$"):
            enroll_supporter(certs_db, enrollment, password="wrong password")
        # Locked: even the right password is refused with the wait, and nothing is issued.
        with pytest.raises(EnrollmentError,
                           match=f"too many failed attempts: try again in {wait} s"):
            enroll_supporter(certs_db, enrollment)
        clock.advance(wait)
    with certs_db.session() as session:
        assert session.get(Lockout, "user:alice").failures == 6
        assert session.get(Lockout, "addr:10.2.0.1").failures == 6
    assert count(certs_db, Certificate) == 0
    # After the wait the right password enrolls.
    assert enroll_supporter(certs_db, enrollment).identity.name == "alice"
    assert count(certs_db, Certificate) == 1


def test_enroll_supporter_auditor_refused(certs_db: Database, enrollment: Enrollment) -> None:
    with pytest.raises(EnrollmentError, match="user 'audrey' has role auditor; only supporters "
                                              "and admins can enroll") as info:
        enroll_supporter(certs_db, enrollment, user="audrey")
    assert not isinstance(info.value, KeepChanges)
    assert count(certs_db, Certificate) == 0


def test_enroll_supporter_disabled_and_unknown_users_refused(certs_db: Database,
                                                             enrollment: Enrollment) -> None:
    with certs_db.session() as session:
        accounts.user_named(session, "alice").disabled = True
    with pytest.raises(EnrollmentRefused, match="disabled"):
        enroll_supporter(certs_db, enrollment)
    with pytest.raises(EnrollmentRefused, match="^wrong user name or password$"):
        enroll_supporter(certs_db, enrollment, user="nobody")
    assert count(certs_db, Certificate) == 0


def test_enroll_supporter_csr_for_someone_else_refused(certs_db: Database,
                                                       enrollment: Enrollment) -> None:
    csr = make_csr(pki.new_key(), "hausmeister:supporter:adam")
    with pytest.raises(EnrollmentError, match="asks for identity hausmeister:supporter:adam"):
        enroll_supporter(certs_db, enrollment, csr=csr)
    host_csr = make_csr(pki.new_key(), f"hausmeister:host:{uuid.uuid4()}")
    with pytest.raises(EnrollmentError, match="asks for identity hausmeister:host:"):
        enroll_supporter(certs_db, enrollment, csr=host_csr)
    assert count(certs_db, Certificate) == 0


@pytest.mark.parametrize("csr", ["garbage", "wrong-key"])
def test_enroll_supporter_bad_csr_refused(certs_db: Database, enrollment: Enrollment,
                                          csr: str) -> None:
    pem = "garbage" if csr == "garbage" else make_csr(rsa.generate_private_key(65537, 2048))
    with pytest.raises(EnrollmentError, match="not a PEM CSR|modules must use ECDSA P-256"):
        enroll_supporter(certs_db, enrollment, csr=pem)
    assert count(certs_db, Certificate) == 0


def test_token_is_stored_only_as_hash(certs_db: Database) -> None:
    token = new_token(certs_db, ttl=600)
    assert len(token) == 32 and int(token, 16) >= 0  # 128 bits, hex
    with certs_db.session() as session:
        [row] = session.scalars(select(EnrollmentToken))
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        values = [str(getattr(row, column.key)) for column in EnrollmentToken.__table__.columns]
        assert not any(token in value for value in values)
        assert row.expires_at - row.created_at == dt.timedelta(seconds=600)
        assert row.used_at is None
    assert new_token(certs_db) != token


def test_enroll_host(certs_db: Database, enrollment: Enrollment, store: pki.CertStore,
                     clock: Clock) -> None:
    token = new_token(certs_db)
    key = pki.new_key()
    issued = enroll_host(certs_db, enrollment, f"  {token}\n", name=" till 1 ", key=key)
    host_id = issued.host_id
    assert str(uuid.UUID(host_id)) == host_id
    assert issued.identity == Identity("host", host_id)
    assert issued.tenant == "acme"
    cert = issued.certificate
    assert identity_of(cert).uri == f"hausmeister:host:{host_id}"
    assert eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.same_key(key, cert) and pki.issued_by(cert, store.ca_cert())
    with certs_db.session() as session:
        host = session.get(Host, host_id)
        assert host.name == "till 1" and host.group.name == "office"
        assert host.last_address == "10.1.0.1" and host.online is False
        assert host.enrolled_at == START
        row = session.get(Certificate, serial_hex(cert))
        assert row.role is CertRole.host and row.identity == issued.identity.uri
        token_row = session.scalar(select(EnrollmentToken))
        assert token_row.used_at == START and token_row.used_by_host == host_id


def _assert_nothing_created(db: Database) -> None:
    assert count(db, Host) == 0
    assert count(db, Certificate) == 0


def test_enroll_host_unknown_token_refused(certs_db: Database, enrollment: Enrollment) -> None:
    new_token(certs_db)
    with pytest.raises(EnrollmentRefused, match="the enrollment token is unknown; ask an "
                                                "administrator for a new one"):
        enroll_host(certs_db, enrollment, "0" * 32)
    _assert_nothing_created(certs_db)
    with certs_db.session() as session:  # the guess was counted and committed
        assert session.get(Lockout, "token-addr:10.1.0.1").failures == 1


def test_enroll_host_reused_token_refused(certs_db: Database, enrollment: Enrollment) -> None:
    token = new_token(certs_db)
    first = enroll_host(certs_db, enrollment, token, name="first")
    with pytest.raises(EnrollmentRefused, match="the enrollment token was already used"):
        enroll_host(certs_db, enrollment, token, name="second", source="10.1.0.2")
    with certs_db.session() as session:
        assert [h.id for h in session.scalars(select(Host))] == [first.host_id]
        assert [c.serial for c in session.scalars(select(Certificate))] == [
            serial_hex(first.certificate)]


def test_enroll_host_expired_token_refused(certs_db: Database, enrollment: Enrollment,
                                           clock: Clock) -> None:
    token = new_token(certs_db, ttl=600)
    clock.advance(600)
    with pytest.raises(EnrollmentRefused, match="the enrollment token expired at 2026-11-23 09:10"):
        enroll_host(certs_db, enrollment, token)
    _assert_nothing_created(certs_db)


def test_enroll_host_token_just_before_expiry_works(certs_db: Database, enrollment: Enrollment,
                                                    clock: Clock) -> None:
    token = new_token(certs_db, ttl=600)
    clock.advance(599)
    assert enroll_host(certs_db, enrollment, token).host_id


def test_enroll_host_bad_name_or_csr_does_not_use_up_the_token(certs_db: Database,
                                                               enrollment: Enrollment) -> None:
    token = new_token(certs_db)
    with pytest.raises(EnrollmentError, match="host name must be 1 to 200 characters"):
        enroll_host(certs_db, enrollment, token, name="   ")
    ed_csr = make_csr(ed25519.Ed25519PrivateKey.generate(), algorithm=None)
    with pytest.raises(EnrollmentError, match="uses an Ed25519 key; modules must use ECDSA P-256"):
        certs_db.call(enrollment.enroll_host, token, "till", ed_csr, "10.1.0.1")
    with pytest.raises(EnrollmentError, match="asks for identity hausmeister:supporter:alice"):
        certs_db.call(enrollment.enroll_host, token, "till",
                      make_csr(pki.new_key(), "hausmeister:supporter:alice"), "10.1.0.1")
    _assert_nothing_created(certs_db)
    assert enroll_host(certs_db, enrollment, token).host_id  # still usable


def test_enroll_host_token_guessing_is_throttled_per_source(certs_db: Database,
                                                            enrollment: Enrollment,
                                                            clock: Clock) -> None:
    token = new_token(certs_db)
    guesser = "192.0.2.7"
    for _ in range(3):
        with pytest.raises(EnrollmentRefused, match="unknown"):
            enroll_host(certs_db, enrollment, secrets.token_hex(16), source=guesser)
    with pytest.raises(EnrollmentRefused, match="try again in 1 s$"):
        enroll_host(certs_db, enrollment, secrets.token_hex(16), source=guesser)
    # Locked: from that address even the right token is refused, and stays unused...
    with pytest.raises(EnrollmentError, match="too many failed attempts"):
        enroll_host(certs_db, enrollment, token, source=guesser)
    _assert_nothing_created(certs_db)
    # ...while another address enrolls at once.
    assert enroll_host(certs_db, enrollment, token, source="10.1.0.9").host_id


# --- renewal ----------------------------------------------------------------------------------

def test_renew_host_keeps_identity_and_host_id(certs_db: Database, enrollment: Enrollment,
                                               clock: Clock) -> None:
    first = enroll_host(certs_db, enrollment, new_token(certs_db))
    clock.advance(20 * 86400)
    key = pki.new_key()
    renewed = certs_db.call(enrollment.renew, first.certificate,
                            make_csr(key, first.identity.uri), "10.1.0.5")
    assert renewed.identity == first.identity
    assert renewed.host_id == first.host_id
    assert identity_of(renewed.certificate) == first.identity
    assert pki.same_key(key, renewed.certificate)
    assert renewed.certificate.serial_number != first.certificate.serial_number
    assert renewed.certificate.not_valid_after_utc > first.certificate.not_valid_after_utc
    with certs_db.session() as session:
        old = session.get(Certificate, serial_hex(first.certificate))
        new = session.get(Certificate, serial_hex(renewed.certificate))
        assert old.replaced_by == new.serial
        assert new.role is CertRole.host and new.identity == first.identity.uri
        assert session.scalar(select(func.count()).select_from(Host)) == 1
        assert session.scalar(select(AuditEntry).where(
            AuditEntry.action == "certificate.renew")).actor == first.identity.uri


def test_renew_supporter(certs_db: Database, enrollment: Enrollment) -> None:
    first = enroll_supporter(certs_db, enrollment)
    renewed = certs_db.call(enrollment.renew, first.certificate, make_csr(pki.new_key()),
                            "10.2.0.1")
    assert renewed.identity == Identity("supporter", "alice")
    assert renewed.host_id is None
    # A disabled user cannot renew.
    with certs_db.session() as session:
        accounts.user_named(session, "alice").disabled = True
    with pytest.raises(EnrollmentError, match="disabled or gone"):
        certs_db.call(enrollment.renew, renewed.certificate, make_csr(pki.new_key()), "10.2.0.1")


def test_renew_refused_for_revoked_certificate(certs_db: Database, enrollment: Enrollment) -> None:
    first = enroll_host(certs_db, enrollment, new_token(certs_db))
    with certs_db.session() as session:
        certificates.revoke(session, serial_hex(first.certificate), "stolen laptop")
    with pytest.raises(EnrollmentError, match="revoked or unknown; enroll again"):
        certs_db.call(enrollment.renew, first.certificate, make_csr(pki.new_key()), "10.1.0.1")
    assert count(certs_db, Certificate) == 1


def test_renew_refused_for_certificate_from_another_ca(certs_db: Database, enrollment: Enrollment,
                                                       other_ca, clock: Clock) -> None:
    first = enroll_host(certs_db, enrollment, new_token(certs_db))
    # Same identity, same key, but signed by another CA.
    forged = pki.sign_module_csr(*other_ca, pki.parse_csr(make_csr(pki.new_key())),
                                 first.identity, 30, now=clock)
    with pytest.raises(EnrollmentError, match="not issued by this server's CA"):
        certs_db.call(enrollment.renew, forged, make_csr(pki.new_key()), "10.1.0.1")
    assert count(certs_db, Certificate) == 1


def test_renew_refused_for_expired_unknown_or_foreign_identity(
        certs_db: Database, enrollment: Enrollment, store: pki.CertStore, clock: Clock) -> None:
    first = enroll_host(certs_db, enrollment, new_token(certs_db))
    # Issued by our CA but never recorded (e.g. a restored backup lost it): refused.
    unrecorded = pki.sign_module_csr(store.ca_key(), store.ca_cert(),
                                     pki.parse_csr(make_csr(pki.new_key())),
                                     Identity("host", str(uuid.uuid4())), 30, now=clock)
    with pytest.raises(EnrollmentError, match="revoked or unknown"):
        certs_db.call(enrollment.renew, unrecorded, make_csr(pki.new_key()), "10.1.0.1")
    # A CSR for another identity is refused.
    with pytest.raises(EnrollmentError, match="asks for identity hausmeister:supporter:alice"):
        certs_db.call(enrollment.renew, first.certificate,
                      make_csr(pki.new_key(), "hausmeister:supporter:alice"), "10.1.0.1")
    clock.advance(31 * 86400)
    with pytest.raises(EnrollmentError, match="expired on"):
        certs_db.call(enrollment.renew, first.certificate, make_csr(pki.new_key()), "10.1.0.1")
    assert count(certs_db, Certificate) == 1


# --- revocation -------------------------------------------------------------------------------

def test_revoke_by_serial(certs_db: Database, enrollment: Enrollment, clock: Clock) -> None:
    issued = enroll_supporter(certs_db, enrollment)
    other = enroll_supporter(certs_db, enrollment, user="adam")
    serial = serial_hex(issued.certificate)
    typed = "0x" + ":".join(serial[i:i + 2] for i in range(0, len(serial), 2)).upper()
    clock.advance(60)
    with certs_db.session() as session:
        [row] = certificates.revoke(session, typed, "left the company", now=clock)
        assert row.serial == serial
    with certs_db.session() as session:
        row = session.get(Certificate, serial)
        assert row.revoked_at == START + dt.timedelta(seconds=60)
        assert row.revocation_reason == "left the company"
        assert certificates.revoked_serials(session) == {serial}
        live = certificates.list_certificates(session, include_revoked=False)
        assert [r.serial for r in live] == [serial_hex(other.certificate)]
        assert len(certificates.list_certificates(session)) == 2
    with pytest.raises(EnrollmentError, match="already revoked"):
        certs_db.call(certificates.revoke, serial, "again")


def test_the_revocation_poll_reads_the_revoked_rows_only(certs_db: Database,
                                                         enrollment: Enrollment) -> None:
    """Every server polls for revoked serials every few seconds: from a partial index, not by
    reading the whole table (~9 ms per poll at 20,000 hosts on SQLite, bench/README.md)."""
    enroll_supporter(certs_db, enrollment)
    indexes = {ix["name"] for ix in inspect(certs_db.engine).get_indexes("certificates")}
    assert "ix_certificates_revoked" in indexes
    if certs_db.engine.dialect.name == "sqlite":  # PostgreSQL's planner scans a table this small
        statement = certificates.REVOKED_SERIALS.compile(certs_db.engine)
        with certs_db.engine.connect() as conn:
            plan = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(statement)).all()
        assert "USING INDEX ix_certificates_revoked" in " ".join(str(row) for row in plan)


def test_revoke_by_identity_revokes_all_live_certificates(certs_db: Database,
                                                          enrollment: Enrollment) -> None:
    first = enroll_supporter(certs_db, enrollment)
    second = certs_db.call(enrollment.renew, first.certificate, make_csr(pki.new_key()), "10.2.0.1")
    enroll_supporter(certs_db, enrollment, user="adam")
    rows = certs_db.call(certificates.revoke, "hausmeister:supporter:alice", "")
    assert {r.serial for r in rows} == {serial_hex(first.certificate),
                                        serial_hex(second.certificate)}
    assert {r.revocation_reason for r in rows} == {"revoked by administrator"}
    with certs_db.session() as session:
        assert len(certificates.revoked_serials(session)) == 2
        adam = session.scalar(select(Certificate).where(
            Certificate.identity == "hausmeister:supporter:adam"))
        assert adam.revoked_at is None
    with pytest.raises(EnrollmentError, match="every certificate matching "
                                              "'hausmeister:supporter:alice' is already revoked"):
        certs_db.call(certificates.revoke, "hausmeister:supporter:alice", "")


def test_revoke_unknown_target(certs_db: Database) -> None:
    with pytest.raises(EnrollmentError, match="no certificate with serial or identity 'abc123'"):
        certs_db.call(certificates.revoke, "abc123", "")


def test_token_is_single_use_under_concurrent_enrollments(certs_db: Database,
                                                          enrollment: Enrollment) -> None:
    """Two enrollments racing with one token: exactly one host, whichever backend.

    Enrollment A runs in an open transaction; enrollment B (another thread, as with
    ``Database.run``) reads the token while A has not committed yet; then A commits.
    """
    token = new_token(certs_db)
    b_read_token = threading.Event()
    b_thread: list[threading.Thread] = []

    def after_execute(_conn, _cursor, statement, *_args):
        if (b_thread and threading.current_thread() is b_thread[0]
                and statement.lstrip().upper().startswith("SELECT")
                and "enrollment_tokens" in statement):
            b_read_token.set()

    outcome: dict = {}

    def enroll_b():
        try:
            outcome["issued"] = enroll_host(certs_db, enrollment, token, name="b",
                                            source="10.1.0.2")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    event.listen(certs_db.engine, "after_cursor_execute", after_execute)
    try:
        with certs_db.session() as session:
            first = enrollment.enroll_host(session, token, "a", make_csr(pki.new_key()),
                                           "10.1.0.1")
            b_thread.append(threading.Thread(target=enroll_b))
            b_thread[0].start()
            assert b_read_token.wait(timeout=20), "enrollment B never read the token"
        b_thread[0].join(timeout=30)
        assert not b_thread[0].is_alive()
    finally:
        event.remove(certs_db.engine, "after_cursor_execute", after_execute)

    assert "issued" not in outcome, "one token enrolled two hosts"
    assert isinstance(outcome["error"], EnrollmentError)
    assert "already used" in str(outcome["error"])
    with certs_db.session() as session:
        assert [h.id for h in session.scalars(select(Host))] == [first.host_id]
        assert [c.identity for c in session.scalars(select(Certificate))] == [first.identity.uri]
