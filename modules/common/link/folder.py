"""A module's own folder: its private key (0600, never leaves), certificate, pinned CA, settings.

Layout: ``key.pem``, ``cert.pem``, ``ca.pem``, ``module.json`` (server URL, module port, host id).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.files import write_private, write_public
from protocol.identity import Identity, identity_of


class ModuleFolderError(RuntimeError):
    pass


def default_home(kind: str) -> Path:
    env = os.environ.get("HAUSMEISTER_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hausmeister" / kind


@dataclass
class ModuleFolder:
    path: Path

    @property
    def key_path(self) -> Path:
        return self.path / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.path / "cert.pem"

    @property
    def ca_path(self) -> Path:
        return self.path / "ca.pem"

    @property
    def settings_path(self) -> Path:
        return self.path / "module.json"

    def is_enrolled(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists() and self.settings_path.exists()

    def require_enrolled(self, kind: str) -> None:
        if not self.is_enrolled():
            raise ModuleFolderError(f"this {kind} module is not enrolled (no certificate in {self.path}): "
                                    f"run `hausmeister-{kind} enroll ...` first")

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)

    def settings(self) -> dict[str, Any]:
        try:
            return json.loads(self.settings_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModuleFolderError(f"module settings {self.settings_path} cannot be read: {exc}")

    def save(self, key, cert_pem: bytes, ca_pem: bytes, settings: dict[str, Any]) -> None:
        """Key first, then certificate: a crash in between leaves the old pair unusable but
        never a certificate for a key we do not have."""
        self.prepare()
        if key is not None:
            write_private(self.key_path, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        write_public(self.cert_path, cert_pem)
        write_public(self.ca_path, ca_pem)
        if "servers" not in settings and self.settings_path.exists():
            try:  # a renewal keeps the server list the operator set
                kept = json.loads(self.settings_path.read_text()).get("servers")
            except (OSError, ValueError, AttributeError):
                kept = None
            if kept:
                settings = {**settings, "servers": kept}
        self.save_settings(settings)

    def save_settings(self, settings: dict[str, Any]) -> None:
        write_public(self.settings_path, json.dumps(settings, indent=1).encode())

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())

    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_path.read_bytes())

    def private_key(self):
        return serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)

    def identity(self) -> Identity:
        return identity_of(self.certificate())

    def renewal_due(self, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.timezone.utc)
        days = int(self.settings().get("renew_before_days", 30))
        return self.certificate().not_valid_after_utc - now <= dt.timedelta(days=days)
