"""Tenants, users and passwords, and the exponential lock-out that throttles guessing.

Functions take an open SQLAlchemy session (from ``Database.session`` or ``Database.run``); they
never open their own, so callers decide what is one transaction.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Callable, Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol.identity import Identity, IdentityError, valid_user_name

from .db import KeepChanges
from .db.models import AuditEntry, Host, HostGroup, Lockout, Role, Tenant, User, UserGroup
from .pki import utcnow

Clock = Callable[[], dt.datetime]

_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
MIN_PASSWORD_LENGTH = 10


class AccountError(ValueError):
    """A refused account operation, worded as one line."""


class Refused(AccountError, KeepChanges):
    """A failed check whose failure count must be committed although the call raises."""


class LockedOut(AccountError):
    def __init__(self, wait_seconds: float) -> None:
        self.wait_seconds = wait_seconds
        super().__init__(f"too many failed attempts: try again in {max(1, round(wait_seconds))} s")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password is too short: use at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def password_matches(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# Verifying against this when the user does not exist keeps the timing of "no such user" and
# "wrong password" alike.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))


def generate_password() -> str:
    return secrets.token_urlsafe(15)


# --- tenants, groups, users -------------------------------------------------------------------

def get_or_create_tenant(session: Session, name: str, now: Clock = utcnow) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name, created_at=now())
        session.add(tenant)
        session.flush()
    return tenant


def tenant_named(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        known = ", ".join(session.scalars(select(Tenant.name).order_by(Tenant.name))) or "none"
        raise AccountError(f"tenant {name!r} does not exist (known tenants: {known})")
    return tenant


def group_named(session: Session, tenant: Tenant, name: str) -> HostGroup:
    group = session.scalar(select(HostGroup).where(HostGroup.tenant_id == tenant.id,
                                                   HostGroup.name == name))
    if group is None:
        raise AccountError(f"group {name!r} does not exist in tenant {tenant.name!r}: "
                           f"create it with `hausmeister-server group add {name}`")
    return group


def add_group(session: Session, tenant: Tenant, name: str) -> HostGroup:
    if not valid_user_name(name):
        raise AccountError(f"group name {name!r} is not valid: use letters, digits, . _ @ -")
    if session.scalar(select(HostGroup).where(HostGroup.tenant_id == tenant.id,
                                              HostGroup.name == name)):
        raise AccountError(f"group {name!r} already exists in tenant {tenant.name!r}")
    group = HostGroup(tenant_id=tenant.id, name=name)
    session.add(group)
    session.flush()
    return group


def user_named(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AccountError(f"user {name!r} does not exist (see `hausmeister-server user list`)")
    return user


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise AccountError(f"role {text!r} is unknown: use admin, supporter or auditor")


def add_user(session: Session, tenant: Tenant, name: str, role: Role, password: str,
             email: str | None = None, now: Clock = utcnow) -> User:
    if not valid_user_name(name):
        raise AccountError(f"user name {name!r} is not valid: use letters, digits, . _ @ - "
                           "(at most 100, starting with a letter or digit)")
    if session.scalar(select(User).where(User.name == name)):
        raise AccountError(f"user {name!r} already exists")
    user = User(tenant_id=tenant.id, name=name, role=role, password_hash=hash_password(password),
                email=email, disabled=False, created_at=now())
    session.add(user)
    session.flush()
    return user


def set_membership(session: Session, user: User, group: HostGroup, member: bool) -> None:
    row = session.get(UserGroup, (user.id, group.id))
    if member and row is None:
        session.add(UserGroup(user_id=user.id, group_id=group.id))
    elif not member and row is not None:
        session.delete(row)
    session.flush()


def memberships(session: Session, user: User) -> list[str]:
    return list(session.scalars(select(HostGroup.name).join(UserGroup, UserGroup.group_id == HostGroup.id)
                                .where(UserGroup.user_id == user.id).order_by(HostGroup.name)))


def tenant_of_identity(session: Session, identity: Identity | str) -> Tenant | None:
    """The tenant a module identity belongs to (via its user or host row), None if gone."""
    if isinstance(identity, str):
        try:
            identity = Identity.parse(identity)
        except IdentityError:
            return None
    if identity.role == "supporter":
        user = session.scalar(select(User).where(User.name == identity.name))
        return user.tenant if user else None
    host = session.get(Host, identity.name)
    return session.get(Tenant, host.tenant_id) if host else None


def audit(session: Session, actor: str, action: str, detail: str = "", now: Clock = utcnow,
          tenant_id: int | None = None) -> None:
    """Record an admin action; ``tenant_id`` (the tenant it concerns) lets that tenant's admins see it."""
    session.add(AuditEntry(at=now(), actor=actor, action=action, detail=detail or None,
                           tenant_id=tenant_id))


# --- lock-out ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LockoutPolicy:
    """After ``free_attempts`` failures each further one doubles the wait, up to ``max_seconds``."""

    free_attempts: int = 3
    base_seconds: float = 1.0
    max_seconds: float = 900.0

    def wait_after(self, failures: int) -> float:
        over = failures - self.free_attempts
        if over <= 0:
            return 0.0
        return min(self.max_seconds, self.base_seconds * 2 ** (over - 1))

    @property
    def forget_after(self) -> dt.timedelta:
        # A quiet period long enough that the counter starts again from zero.
        return dt.timedelta(seconds=max(self.max_seconds * 4, 3600))


class Lockouts:
    """Counts failures per key (``user:NAME``, ``addr:IP``...) and says how long to wait."""

    def __init__(self, policy: LockoutPolicy, now: Clock = utcnow) -> None:
        self.policy = policy
        self.now = now

    def wait_seconds(self, session: Session, keys: Iterable[str]) -> float:
        moment = self.now()
        wait = 0.0
        for row in session.scalars(select(Lockout).where(Lockout.key.in_(list(keys)))):
            if row.locked_until and row.locked_until > moment:
                wait = max(wait, (row.locked_until - moment).total_seconds())
        return wait

    def check(self, session: Session, keys: Iterable[str]) -> None:
        wait = self.wait_seconds(session, keys)
        if wait > 0:
            raise LockedOut(wait)

    def failed(self, session: Session, keys: Iterable[str]) -> float:
        """Record one failure for every key; returns the longest wait now imposed."""
        moment = self.now()
        longest = 0.0
        for key in keys:
            row = session.get(Lockout, key)
            if row is None:
                row = Lockout(key=key, failures=0, last_failure=moment)
                session.add(row)
            elif moment - row.last_failure > self.policy.forget_after:
                row.failures = 0
            row.failures += 1
            row.last_failure = moment
            wait = self.policy.wait_after(row.failures)
            row.locked_until = moment + dt.timedelta(seconds=wait) if wait else None
            longest = max(longest, wait)
        session.flush()
        return longest

    def succeeded(self, session: Session, keys: Iterable[str]) -> None:
        for key in keys:
            row = session.get(Lockout, key)
            if row is not None:
                session.delete(row)


def authenticate(session: Session, lockouts: Lockouts, name: str, password: str,
                 source: str) -> User:
    """Check a user's password under lock-out per user and per source address."""
    keys = [f"user:{name}", f"addr:{source}"]
    lockouts.check(session, keys)
    user = session.scalar(select(User).where(User.name == name))
    ok = password_matches(user.password_hash if user else _DUMMY_HASH, password)
    if not ok or user is None or user.disabled:
        wait = lockouts.failed(session, keys)
        message = "wrong user name or password"
        if user is not None and user.disabled and ok:
            message = f"user {name!r} is disabled; ask an administrator"
        if wait:
            message += f"; try again in {max(1, round(wait))} s"
        raise Refused(message)
    lockouts.succeeded(session, [f"user:{name}"])
    return user
