"""What a download signature signs, shared by the server (signs) and the modules (verify).

The server signs each file in its downloads folder with an Ed25519 key of its own
(``<cert_dir>/downloads-signing.key``).  A signature covers the file's name and SHA-256, not the
whole file, so a 70 MB installer is hashed in chunks and never held in memory:

    b"hausmeister-download-1\\n" + name + b"\\n" + sha256 hex + b"\\n"

``NAME.sig`` beside the file holds the base64 signature; ``SHA256SUMS`` lists every signed file
(``sha256  name``) and ``SHA256SUMS.sig`` signs that list's bytes directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CONTEXT = b"hausmeister-download-1\n"
SIG_SUFFIX = ".sig"
SUMS_NAME = "SHA256SUMS"


def signed_message(name: str, sha256_hex: str) -> bytes:
    return CONTEXT + name.encode() + b"\n" + sha256_hex.encode() + b"\n"


def key_fingerprint(public: Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, hex: what the download page shows."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def verify_file(public: Ed25519PublicKey, name: str, sha256_hex: str, signature_b64: bytes) -> bool:
    try:
        public.verify(base64.b64decode(signature_b64.strip(), validate=True),
                      signed_message(name, sha256_hex))
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False


def verify_sums(public: Ed25519PublicKey, sums: bytes, signature_b64: bytes) -> bool:
    try:
        public.verify(base64.b64decode(signature_b64.strip(), validate=True), sums)
        return True
    except (InvalidSignature, binascii.Error, ValueError):
        return False
