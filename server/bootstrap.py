"""First start: data folders, CA and server certificate, database schema, first tenant and admin.

Used by ``hausmeister-server init`` and by ``run`` when it finds an empty data folder.  An
existing CA is never overwritten, not even with ``--force``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from protocol.identity import fingerprint

from . import accounts, certificates, pki
from .config import Config
from .db import Database
from .db.models import CertRole, Role


class InitError(RuntimeError):
    pass


@dataclass
class InitResult:
    created_ca: bool
    ca_fingerprint: str
    admin_name: str | None
    admin_password: str | None
    tenant: str


def _non_empty(folder: Path) -> bool:
    return folder.exists() and any(folder.iterdir())


def is_initialised(config: Config) -> bool:
    return pki.CertStore(config.server.cert_dir).exists()


def make_folders(config: Config) -> None:
    s = config.server
    for folder, mode in ((s.data_dir, 0o700), (s.cert_dir, 0o700), (s.protocol_dir, 0o750),
                         (s.recording_dir, 0o750), (s.downloads_dir, 0o755)):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, mode)


def initialise(config: Config, force: bool = False, admin_name: str = "admin",
               tenant_name: str = "default", admin_password: str | None = None) -> InitResult:
    s = config.server
    store = pki.CertStore(s.cert_dir)
    if _non_empty(s.data_dir) and not force:
        raise InitError(f"data folder {s.data_dir} is not empty: refusing to initialise over it "
                        "(use --force to complete a partial setup; an existing CA is never replaced)")
    make_folders(config)
    created_ca = False
    if not store.exists():
        ca_key, ca_cert = pki.create_ca()
        store.write_ca(ca_key, ca_cert)
        created_ca = True
    ca_cert = store.ca_cert()
    from .recordings import keys as recording_keys
    recording_keys.ensure(s.cert_dir)  # the operator's recording key (back it up with the CA)
    db = Database(config.database_url)
    try:
        db.migrate()
        server_cert = None
        if created_ca or not store.server_cert_path.exists():
            key, server_cert = pki.issue_server_cert(store.ca_key(), ca_cert, s.names, s.addresses,
                                                     config.certificates.server_days)
            store.write_server(key, [server_cert])
        password = None
        with db.session() as session:
            tenant = accounts.get_or_create_tenant(session, tenant_name)
            if server_cert is not None:
                certificates.record(session, server_cert, CertRole.server,
                                    ",".join(s.names + s.addresses))
            existing_admin = session.query(accounts.User).filter_by(role=Role.admin).first()
            if existing_admin is None:
                password = admin_password or accounts.generate_password()
                accounts.add_user(session, tenant, admin_name, Role.admin, password)
                accounts.audit(session, "init", "user.add", f"name={admin_name} role=admin")
            accounts.audit(session, "init", "init", f"created_ca={created_ca}")
    finally:
        db.dispose()
    return InitResult(created_ca, fingerprint(ca_cert), admin_name if password else None,
                      password, tenant_name)
