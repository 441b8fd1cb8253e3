"""Issuing, recording, listing and revoking certificates; enrollment tokens; module enrollment.

The CA files come from ``pki.CertStore``; every certificate issued is recorded in the database,
where revocation lives.  Functions take an open session and raise ``EnrollmentError`` (one line
for the module's user) when they refuse.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from protocol.identity import Identity, fingerprint, serial_hex

from . import accounts, pki
from .db import KeepChanges
from .db.models import CertRole, Certificate, EnrollmentToken, Host, HostGroup, Role, Tenant, User
from .pki import utcnow

Clock = Callable[[], dt.datetime]


class EnrollmentError(ValueError):
    pass


class EnrollmentRefused(EnrollmentError, KeepChanges):
    """Refused after recording a failure (token guess, wrong password)."""


# --- recording and revocation -----------------------------------------------------------------

def record(session: Session, cert: x509.Certificate, role: CertRole, identity: str,
           now: Clock = utcnow) -> Certificate:
    row = Certificate(serial=serial_hex(cert), role=role, identity=identity,
                      fingerprint=fingerprint(cert), not_before=cert.not_valid_before_utc,
                      not_after=cert.not_valid_after_utc, pem=pki.cert_pem(cert).decode(),
                      issued_at=now())
    session.add(row)
    session.flush()
    return row


def list_certificates(session: Session, include_revoked: bool = True) -> list[Certificate]:
    query = select(Certificate).order_by(Certificate.issued_at, Certificate.serial)
    if not include_revoked:
        query = query.where(Certificate.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke(session: Session, target: str, reason: str, now: Clock = utcnow) -> list[Certificate]:
    """Revoke by serial (hex) or by identity (all of its live certificates)."""
    target = target.strip()
    serial = target.lower().removeprefix("0x").replace(":", "").lstrip("0")
    rows = list(session.scalars(select(Certificate).where(
        or_(Certificate.serial == serial, Certificate.identity == target))))
    if not rows:
        raise EnrollmentError(f"no certificate with serial or identity {target!r} "
                              "(see `hausmeister-server cert list`)")
    live = [r for r in rows if r.revoked_at is None]
    if not live:
        raise EnrollmentError(f"every certificate matching {target!r} is already revoked")
    for row in live:
        row.revoked_at = now()
        row.revocation_reason = reason or "revoked by administrator"
    session.flush()
    return live


def revoke_identity(session: Session, identity: str, reason: str,
                    now: Clock = utcnow) -> list[Certificate]:
    """Revoke every live certificate of ``identity`` (none is fine): a disabled user or a removed
    host loses its module access and, through the revocation watchers, its live sessions."""
    rows = list(session.scalars(select(Certificate).where(
        Certificate.identity == identity, Certificate.revoked_at.is_(None))))
    for row in rows:
        row.revoked_at = now()
        row.revocation_reason = reason
    session.flush()
    return rows


def supporter_identity(user_name: str) -> str:
    return f"hausmeister:supporter:{user_name}"


#: what every server polls for (every ``certificates.revocation_poll_seconds``);
#: answered from the partial index ``ix_certificates_revoked``, not by reading every certificate
REVOKED_SERIALS = select(Certificate.serial).where(Certificate.revoked_at.is_not(None))


def revoked_serials(session: Session) -> set[str]:
    return set(session.scalars(REVOKED_SERIALS))


def revocation_details(session: Session, serials: set[str] | list[str]) -> dict[str, str]:
    """Why each of ``serials`` was revoked, as the detail of a session's end reason:
    ``certificate of hausmeister:supporter:alice revoked (user disabled)``."""
    wanted = sorted(serials)
    details: dict[str, str] = {}
    for start in range(0, len(wanted), 500):
        for row in session.scalars(select(Certificate).where(
                Certificate.serial.in_(wanted[start:start + 500]))):
            details[row.serial] = (f"certificate of {row.identity} revoked "
                                   f"({row.revocation_reason or 'revoked'})")[:200]
    return details


# --- tokens -----------------------------------------------------------------------------------

def _token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def create_token(session: Session, tenant: Tenant, group: HostGroup | None, ttl_seconds: float,
                 created_by: str, now: Clock = utcnow) -> tuple[str, EnrollmentToken]:
    """A single-use 128-bit host enrollment token; only its hash is stored."""
    token = secrets.token_hex(16)
    moment = now()
    row = EnrollmentToken(token_hash=_token_hash(token), tenant_id=tenant.id,
                          group_id=group.id if group else None, created_by=created_by,
                          created_at=moment, expires_at=moment + dt.timedelta(seconds=ttl_seconds))
    session.add(row)
    session.flush()
    return token, row


# --- enrollment -------------------------------------------------------------------------------

@dataclass
class Issued:
    certificate: x509.Certificate
    ca_certificate: x509.Certificate
    identity: Identity
    host_id: str | None = None
    tenant: str | None = None


class Enrollment:
    """Signs module CSRs after checking a supporter's password or a host's one-time token."""

    def __init__(self, store: pki.CertStore, lockouts: accounts.Lockouts, module_days: int,
                 now: Clock = utcnow) -> None:
        self.store = store
        self.lockouts = lockouts
        self.module_days = module_days
        self.now = now

    def _sign(self, session: Session, csr_pem: str, identity: Identity, role: CertRole) -> Issued:
        csr = pki.parse_csr(csr_pem)
        ca_cert = self.store.ca_cert()
        cert = pki.sign_module_csr(self.store.ca_key(), ca_cert, csr, identity,
                                   self.module_days, self.now)
        record(session, cert, role, identity.uri, self.now)
        return Issued(cert, ca_cert, identity)

    def enroll_supporter(self, session: Session, user_name: str, password: str, csr_pem: str,
                         source: str) -> Issued:
        try:
            user = accounts.authenticate(session, self.lockouts, user_name, password, source)
        except accounts.Refused as exc:
            raise EnrollmentRefused(str(exc))
        except accounts.AccountError as exc:
            raise EnrollmentError(str(exc))
        return self._enroll_supporter(session, user, csr_pem, source)

    def enroll_user(self, session: Session, user_id: int, csr_pem: str, source: str) -> Issued:
        """A supporter module for a user whose password was already checked (``directory.signin``:
        a local account or the directory)."""
        user = session.get(User, user_id)
        if user is None or user.disabled:
            raise EnrollmentError("this user is disabled or gone; ask an administrator")
        return self._enroll_supporter(session, user, csr_pem, source)

    def _enroll_supporter(self, session: Session, user: User, csr_pem: str, source: str) -> Issued:
        user_name = user.name
        if user.role not in (Role.supporter, Role.admin):
            raise EnrollmentError(f"user {user_name!r} has role {user.role.value}; "
                                  "only supporters and admins can enroll a supporter module")
        try:
            issued = self._sign(session, csr_pem, Identity("supporter", user.name), CertRole.supporter)
        except pki.PKIError as exc:
            raise EnrollmentError(str(exc))
        issued.tenant = user.tenant.name
        accounts.audit(session, user.name, "enroll.supporter",
                       f"serial={serial_hex(issued.certificate)} from={source}", self.now,
                       tenant_id=user.tenant_id)
        return issued

    def enroll_host(self, session: Session, token: str, name: str, csr_pem: str,
                    source: str) -> Issued:
        keys = [f"token-addr:{source}"]
        try:
            self.lockouts.check(session, keys)
        except accounts.LockedOut as exc:
            raise EnrollmentError(str(exc))
        row = session.scalar(select(EnrollmentToken).where(
            EnrollmentToken.token_hash == _token_hash(token)))
        moment = self.now()
        problem = None
        if row is None:
            problem = "the enrollment token is unknown"
        elif row.used_at is not None:
            problem = "the enrollment token was already used"
        elif row.expires_at <= moment:
            problem = f"the enrollment token expired at {row.expires_at:%Y-%m-%d %H:%M} UTC"
        if problem:
            wait = self.lockouts.failed(session, keys)
            hint = "; ask an administrator for a new one (`hausmeister-server token create`)"
            if wait:
                hint += f"; try again in {max(1, round(wait))} s"
            raise EnrollmentRefused(problem + hint)
        name = name.strip()
        if not name or len(name) > 200:
            raise EnrollmentError("the host name must be 1 to 200 characters")
        host_id = str(uuid.uuid4())
        # Claim the token atomically: with a plain read-then-write, two concurrent enrollments
        # with one token both got through (on SQLite and PostgreSQL alike).
        claimed = session.execute(
            update(EnrollmentToken)
            .where(EnrollmentToken.id == row.id, EnrollmentToken.used_at.is_(None))
            .values(used_at=moment, used_by_host=host_id)).rowcount
        if claimed != 1:
            raise EnrollmentError("the enrollment token was already used")
        try:
            issued = self._sign(session, csr_pem, Identity("host", host_id), CertRole.host)
        except pki.PKIError as exc:
            raise EnrollmentError(str(exc))
        session.add(Host(id=host_id, tenant_id=row.tenant_id, group_id=row.group_id, name=name,
                         enrolled_at=moment, last_address=source, online=False))
        self.lockouts.succeeded(session, keys)
        accounts.audit(session, f"host:{host_id}", "enroll.host",
                       f"name={name} token_id={row.id} from={source}", self.now,
                       tenant_id=row.tenant_id)
        issued.host_id = host_id
        issued.tenant = session.get(Tenant, row.tenant_id).name
        return issued

    def renew(self, session: Session, presented: x509.Certificate, csr_pem: str,
              source: str) -> Issued:
        """A module with a valid, unrevoked certificate gets a new one for the same identity."""
        try:
            identity = pki.check_module_cert(presented, self.store.ca_cert(), self.now)
        except pki.PKIError as exc:
            raise EnrollmentError(str(exc))
        row = session.get(Certificate, serial_hex(presented))
        if row is None or row.revoked_at is not None:
            raise EnrollmentError("the presented certificate is revoked or unknown; enroll again")
        if identity.role == "supporter":
            user = session.scalar(select(User).where(User.name == identity.name))
            if user is None or user.disabled:
                raise EnrollmentError(f"user {identity.name!r} is disabled or gone; cannot renew")
        else:
            if session.get(Host, identity.name) is None:
                raise EnrollmentError("this host was removed from the server; enroll again")
        try:
            issued = self._sign(session, csr_pem, identity, row.role)
        except pki.PKIError as exc:
            raise EnrollmentError(str(exc))
        row.replaced_by = serial_hex(issued.certificate)
        accounts.audit(session, identity.uri, "certificate.renew",
                       f"old={row.serial} new={row.replaced_by} from={source}", self.now,
                       tenant_id=getattr(accounts.tenant_of_identity(session, identity), "id", None))
        if identity.role == "host":
            issued.host_id = identity.name
        return issued
