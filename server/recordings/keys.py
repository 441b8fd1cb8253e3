"""The operator's recording key (X25519, in the certificate folder) and the optional auditor key.

Modules wrap each recording's key for every public key the server hands out at ``RecordingStart``:
the operator's (its private half beside the CA, so ``recording export`` and the console can open
recordings) and, if ``recording.auditor_key`` names one, an auditor's whose private half stays
with the auditor.  With an auditor key the recording key is split between the two (split
knowledge): watching needs the operator's key here *and* the auditor's (``recording export --key``
with the auditor's file); the console cannot play such a recording on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol import recording

PRIVATE_FILE = "recording_key.pem"
PUBLIC_FILE = "recording_key.pub.pem"


class KeyProblem(RuntimeError):
    """A recording key is missing or unreadable; the message says which and what to do."""


def private_path(cert_dir: Path) -> Path:
    return Path(cert_dir) / PRIVATE_FILE


def create(cert_dir: Path, force: bool = False) -> str:
    """Create the operator's recording key pair; returns its key id.  Refuses to overwrite (old
    recordings need the old key) unless ``force``, which keeps the old one as ``.old-<id>``."""
    cert_dir = Path(cert_dir)
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    priv = private_path(cert_dir)
    if priv.exists():
        if not force:
            raise KeyProblem(f"{priv} exists: recordings made for it need it; use --force to make a "
                             "new key (the old one is kept beside it)")
        old = recording.load_private(priv.read_bytes())
        priv.rename(priv.with_name(f"{PRIVATE_FILE}.old-{recording.key_id(old.public_key())}"))
    key = X25519PrivateKey.generate()
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(recording.private_pem(key))
    (cert_dir / PUBLIC_FILE).write_text(recording.public_pem(key.public_key()))
    return recording.key_id(key.public_key())


def ensure(cert_dir: Path) -> None:
    if not private_path(cert_dir).exists():
        create(cert_dir)


def operator_private(cert_dir: Path) -> X25519PrivateKey:
    path = private_path(cert_dir)
    try:
        return recording.load_private(path.read_bytes())
    except FileNotFoundError:
        raise KeyProblem(f"the recording key {path} does not exist: run `hausmeister-server "
                         "recording keygen` (or give the key with --key)") from None
    except OSError as exc:
        raise KeyProblem(f"the recording key {path} cannot be read: {exc.strerror}; run as the "
                         "server's user") from None
    except recording.RecordingError as exc:
        raise KeyProblem(f"{path}: {exc}") from None


def old_private_keys(cert_dir: Path) -> list[X25519PrivateKey]:
    """Keys replaced by ``keygen --force`` (older recordings are wrapped for them)."""
    found = []
    for path in sorted(Path(cert_dir).glob(f"{PRIVATE_FILE}.old-*")):
        try:
            found.append(recording.load_private(path.read_bytes()))
        except (OSError, recording.RecordingError):
            continue
    return found


def load_key_file(path: Path) -> X25519PrivateKey:
    try:
        return recording.load_private(Path(path).read_bytes())
    except OSError as exc:
        raise KeyProblem(f"the key file {path} cannot be read: {exc.strerror}; give the PEM file "
                         "of the operator's or the auditor's recording key") from None
    except recording.RecordingError as exc:
        raise KeyProblem(f"{path}: {exc}; give the PEM file of a recording key") from None


def public_keys(cert_dir: Path, auditor_key: str) -> list[X25519PublicKey]:
    """What recordings are wrapped for: the operator's key first, then the auditor's."""
    keys = [operator_private(cert_dir).public_key()]
    if auditor_key:
        try:
            keys.append(recording.load_public(Path(auditor_key).read_bytes()))
        except (OSError, recording.RecordingError) as exc:
            raise KeyProblem(f"recording.auditor_key {auditor_key}: {exc}") from None
    return keys


def unwrapper(cert_dir: Path, extra: X25519PrivateKey | None = None):
    """``unwrap(header) -> key`` from the given key (an auditor's, or the operator's from
    elsewhere) together with the operator's current and old keys found here: one of them opens
    a recording wrapped for each; a split one (``key_split``) needs the share of every holder."""
    def unwrap(header: dict) -> bytes:
        if extra is not None and not recording.is_split(header):
            return recording.unwrap_key(header, extra)  # the key given is the one to use
        candidates = [extra] if extra is not None else []
        try:
            candidates.append(operator_private(cert_dir))
        except KeyProblem:
            if extra is None:
                raise
        candidates += old_private_keys(cert_dir)
        return recording.open_key(header, candidates)
    return unwrap
