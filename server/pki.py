"""The server's certificate authority: CA and server certificate files, signing module CSRs.

Pure functions over ``cryptography`` objects plus ``CertStore`` for the files in the cert folder.
What is issued is recorded in the database by the callers (``server.certificates``); this module
never touches the database.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.files import write_private, write_public  # noqa: F401 - used by CertStore
from protocol.identity import Identity, IdentityError, identity_of, make_csr  # noqa: F401

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class PKIError(ValueError):
    """A certificate problem worded as one line for the operator or module."""


# --- keys and files ---------------------------------------------------------------------------

def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(path: Path):
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"private key {path} does not exist")
    except (ValueError, TypeError) as exc:
        raise PKIError(f"private key {path} cannot be read ({exc}); it must be an unencrypted PEM key")


def load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"certificate file {path} does not exist")
    except ValueError as exc:
        raise PKIError(f"certificate file {path} is not PEM certificates: {exc}")
    if not certs:
        raise PKIError(f"certificate file {path} holds no certificate")
    return certs


def same_key(private_key, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def random_serial() -> int:
    """128 random bits, made positive and non-zero (RFC 5280 allows up to 20 octets)."""
    return secrets.randbits(127) | (1 << 126)


# --- building certificates --------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hausmeister"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])])


def create_ca(common_name: str = "Hausmeister CA", days: int = 3650,
              now: Clock = utcnow) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    start = now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(random_serial())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, subject: x509.Name, public_key,
          san: list[x509.GeneralName], usage: x509.ObjectIdentifier, days: int,
          now: Clock) -> x509.Certificate:
    start = now() - dt.timedelta(minutes=5)
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(ca_cert.subject)
        .public_key(public_key).serial_number(random_serial())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue_server_cert(ca_key, ca_cert: x509.Certificate, names: tuple[str, ...],
                      addresses: tuple[str, ...], days: int = 825,
                      now: Clock = utcnow) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = new_key()
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    if not san:
        raise PKIError("the server certificate needs at least one name or address "
                       "(config keys server.names / server.addresses)")
    common = names[0] if names else addresses[0]
    cert = _leaf(ca_key, ca_cert, _name(common), key.public_key(), san,
                 ExtendedKeyUsageOID.SERVER_AUTH, days, now)
    return key, cert


def parse_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    if isinstance(pem, str):
        pem = pem.encode()
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise PKIError(f"the certificate request is not a PEM CSR: {exc}")
    if not csr.is_signature_valid:
        raise PKIError("the certificate request's signature does not verify")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
        if isinstance(key, ec.EllipticCurvePublicKey):
            kind = f"an ECDSA {key.curve.name}"
        elif isinstance(key, rsa.RSAPublicKey):
            kind = f"an RSA-{key.key_size}"
        elif isinstance(key, ed25519.Ed25519PublicKey):
            kind = "an Ed25519"
        else:
            kind = "a " + type(key).__name__.replace("_", "").removesuffix("PublicKey")
        raise PKIError(f"the certificate request uses {kind} key; modules must use ECDSA P-256")
    return csr


def csr_identity(csr: x509.CertificateSigningRequest) -> Identity | None:
    """The identity a CSR asks for, if it names one (the server decides anyway)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        return None
    if len(uris) > 1:
        raise PKIError("the certificate request names more than one identity")
    try:
        return Identity.parse(uris[0])
    except IdentityError as exc:
        raise PKIError(f"the certificate request names an invalid identity: {exc}")


def sign_module_csr(ca_key, ca_cert: x509.Certificate, csr: x509.CertificateSigningRequest,
                    identity: Identity, days: int, now: Clock = utcnow) -> x509.Certificate:
    """Issue a module certificate for ``identity``; a CSR asking for anything else is refused."""
    asked = csr_identity(csr)
    if asked is not None and asked != identity:
        raise PKIError(f"the certificate request asks for identity {asked.uri}, "
                       f"but this enrollment is for {identity.uri}")
    return _leaf(ca_key, ca_cert, _name(f"{identity.role} {identity.name}"), csr.public_key(),
                 [x509.UniformResourceIdentifier(identity.uri)], ExtendedKeyUsageOID.CLIENT_AUTH,
                 days, now)


# --- checks -----------------------------------------------------------------------------------

def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def check_validity(cert: x509.Certificate, what: str, now: Clock = utcnow) -> None:
    moment = now()
    if moment < cert.not_valid_before_utc:
        raise PKIError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if moment > cert.not_valid_after_utc:
        raise PKIError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def check_module_cert(cert: x509.Certificate, ca_cert: x509.Certificate,
                      now: Clock = utcnow) -> Identity:
    """Signature by our CA, validity window, and the identity it carries."""
    if not issued_by(cert, ca_cert):
        raise PKIError("the certificate was not issued by this server's CA")
    check_validity(cert, "the certificate", now)
    try:
        return identity_of(cert)
    except IdentityError as exc:
        raise PKIError(str(exc))


# --- the cert folder --------------------------------------------------------------------------

@dataclass
class CertStore:
    """``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` in the operator's cert folder.

    ``ca.key`` may be absent when the operator installed their own CA: then the server can
    serve TLS but cannot enroll modules (it says so).
    """

    folder: Path

    @property
    def ca_cert_path(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert_path(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key_path(self) -> Path:
        return self.folder / "server.key"

    def exists(self) -> bool:
        return self.ca_cert_path.exists()

    def ca_cert(self) -> x509.Certificate:
        return load_certs(self.ca_cert_path)[0]

    def ca_key(self):
        if not self.ca_key_path.exists():
            raise PKIError(f"the CA key {self.ca_key_path} is not here: this server cannot issue "
                           "module certificates (install a CA with its key via `cert install --ca-key`)")
        return load_key(self.ca_key_path)

    def server_chain(self) -> list[x509.Certificate]:
        return load_certs(self.server_cert_path)

    def server_key(self):
        return load_key(self.server_key_path)

    def write_ca(self, key, cert: x509.Certificate) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        if key is not None:
            write_private(self.ca_key_path, key_pem(key))
        write_public(self.ca_cert_path, cert_pem(cert))

    def write_server(self, key, chain: list[x509.Certificate]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_private(self.server_key_path, key_pem(key))
        write_public(self.server_cert_path, b"".join(cert_pem(c) for c in chain))


def validate_install(ca_cert: x509.Certificate, ca_key, server_chain: list[x509.Certificate] | None,
                     server_key, now: Clock = utcnow) -> None:
    """Everything ``cert install`` checks before it writes a single file."""
    if not is_ca(ca_cert):
        raise PKIError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
    check_validity(ca_cert, "the CA certificate", now)
    if ca_key is not None and not same_key(ca_key, ca_cert):
        raise PKIError("the CA key does not match the CA certificate")
    if ca_key is not None and not isinstance(ca_key, (ec.EllipticCurvePrivateKey,
                                                      rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise PKIError("the CA key type is not supported (use ECDSA, RSA or Ed25519)")
    if server_chain is None:
        return
    leaf = server_chain[0]
    if server_key is None:
        raise PKIError("a server certificate needs its key (--server-key)")
    if not same_key(server_key, leaf):
        raise PKIError("the server key does not match the server certificate")
    check_validity(leaf, "the server certificate", now)
    # The chain must lead from the leaf to the CA through the given intermediates.
    issuer_ok = issued_by(leaf, ca_cert) or any(
        issued_by(leaf, c) and (issued_by(c, ca_cert) or c == ca_cert) for c in server_chain[1:])
    if not issuer_ok:
        raise PKIError("the server certificate is not issued by the given CA "
                       "(chain does not verify)")
