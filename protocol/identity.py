"""Who a certificate belongs to: the ``hausmeister:<role>:<name>`` URI in its SAN.

Shared by server (issuing, checking) and modules (checking the peer in a session).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

SCHEME = "hausmeister"
MODULE_ROLES = ("supporter", "host")
_ROLES = {role: role for role in MODULE_ROLES}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class IdentityError(ValueError):
    pass


@dataclass(frozen=True, slots=True)  # one per connected module: no instance dict
class Identity:
    role: str
    name: str

    def __post_init__(self) -> None:
        if self.role not in MODULE_ROLES:
            raise IdentityError(f"unknown role {self.role!r}: expected one of {', '.join(MODULE_ROLES)}")
        pattern = _UUID if self.role == "host" else _NAME
        if not pattern.match(self.name):
            what = "a lowercase UUID" if self.role == "host" else "letters, digits, . _ @ -"
            raise IdentityError(f"{self.role} name {self.name!r} is not valid: expected {what}")

    @property
    def uri(self) -> str:
        return f"{SCHEME}:{self.role}:{self.name}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> "Identity":
        parts = uri.split(":", 2)
        if len(parts) != 3 or parts[0] != SCHEME:
            raise IdentityError(f"{uri!r} is not a hausmeister identity (hausmeister:ROLE:NAME)")
        # the role as the constant: not one more "host" string per connected host
        return cls(_ROLES.get(parts[1], parts[1]), parts[2])


def valid_user_name(name: str) -> bool:
    return bool(_NAME.match(name))


def identity_of(cert: x509.Certificate) -> Identity:
    """The single hausmeister identity in a module certificate's SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("certificate has no subject alternative name")
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(SCHEME + ":")]
    if len(uris) != 1:
        raise IdentityError(f"certificate must carry exactly one hausmeister identity, has {len(uris)}")
    return Identity.parse(uris[0])


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER encoding, lowercase hex: what operators pin and compare."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Accept 'AB:CD:...', 'sha256:abcd...' or plain hex; return lowercase hex or raise."""
    cleaned = text.strip().lower()
    if cleaned.startswith("sha256:"):
        cleaned = cleaned[7:]
    cleaned = cleaned.replace(":", "").replace(" ", "")
    if not re.fullmatch(r"[0-9a-f]{64}", cleaned):
        raise IdentityError(f"{text!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")
    return cleaned


def serial_hex(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def make_csr(key, identity: Identity | None = None) -> x509.CertificateSigningRequest:
    """The CSR a module sends: its own key, and the identity it expects (the server decides)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            identity.uri[:64] if identity else "hausmeister module")])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if identity is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False)
    return builder.sign(key, hashes.SHA256())
