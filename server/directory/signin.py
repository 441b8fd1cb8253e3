"""The one password check of the console login and of supporter enrollment.

A name that is a local account (no ``directory_dn``) is checked here, by its argon2id hash, as
before: local accounts are the break-glass admins and work while the directory is down.  Any other
name goes to the directory (off the reactor); a user it admits gets or updates a local "shadow"
row (role, tenant and mail from the directory, ``directory_dn`` set, no usable password), whose id
is the result.  Nothing about the password or the membership is cached: each sign-in asks the
directory again, so a user removed there cannot sign in even before the sync has run.

Lock-out counts directory failures under the same keys as local ones (``user:NAME``,
``addr:SOURCE``), checked before the directory is asked.  TOTP and the console session are the
caller's business (``console.auth``); so is what an enrollment does with the user.
"""

from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import select
from twisted.internet.defer import Deferred, inlineCallbacks, returnValue

from protocol.runtime import Logger, run_blocking

from .. import accounts
from ..db.models import Role, User
from ..i18n import Text
from ..pki import utcnow
from .client import Directory, DirectoryAccount, DirectoryRefused, DirectoryUnavailable

log = Logger(namespace="hausmeister.directory")

#: a directory user's stored hash: not an argon2 hash, so no password ever matches it
NO_LOCAL_PASSWORD = "!directory"


class DirectoryDown(accounts.AccountError):
    """The directory could not be asked; directory users cannot sign in right now."""

    def __init__(self) -> None:
        super().__init__(Text(
            "The directory (LDAP) cannot be reached right now, so directory accounts cannot "
            "sign in. Local administrator accounts still work. Try again later or tell your "
            "administrator."))


class NotInGroup(accounts.AccountError):
    def __init__(self, name: str) -> None:
        super().__init__(Text(
            "user '%(name)s' is not in a directory group that may use Hausmeister; ask your "
            "administrator", name=name))


def _wrong(wait: float) -> accounts.Refused:
    if wait:
        return accounts.Refused(f"wrong user name or password; try again in {max(1, round(wait))} s")
    return accounts.Refused("wrong user name or password")


class SignIn:
    def __init__(self, db: Any, lockouts: accounts.Lockouts, directory: Directory | None = None,
                 run: Callable[..., Deferred] = run_blocking) -> None:
        self.db = db
        self.lockouts = lockouts
        self.directory = directory
        self.run = run

    @inlineCallbacks
    def authenticate(self, name: str, password: str, source: str):
        """Deferred user id; fails with ``accounts.AccountError`` (``Refused``, ``LockedOut``,
        ``DirectoryDown``, ``NotInGroup``) worded for the user."""
        local_id = yield self.db.run(self._local, name, password, source)
        if local_id is not None:
            returnValue(local_id)
        try:
            account = yield self.run(self.directory.authenticate, name, password)
        except DirectoryUnavailable as exc:
            log.error("directory sign-in of {user!r} from {address} impossible: {problem}",
                      user=name, address=source, problem=str(exc))
            raise DirectoryDown()
        except DirectoryRefused as exc:
            log.info("directory refused {user!r} from {address}: {reason}", user=name,
                     address=source, reason=str(exc))
            yield self.db.run(self._refused, name, source, exc.password_ok)
            raise AssertionError("unreachable")  # _refused always raises
        user_id = yield self.db.run(self._admitted, name, account, source)
        returnValue(user_id)

    def _keys(self, name: str, source: str) -> list[str]:
        return [f"user:{name}", f"addr:{source}"]

    def _local(self, session, name: str, password: str, source: str) -> int | None:
        """The id of a local account whose password matched; None: ask the directory."""
        if self.directory is None:
            return accounts.authenticate(session, self.lockouts, name, password, source).id
        self.lockouts.check(session, self._keys(name, source))
        user = session.scalar(select(User).where(User.name == name))
        if user is not None and user.directory_dn is None:
            return accounts.authenticate(session, self.lockouts, name, password, source).id
        return None

    def _refused(self, session, name: str, source: str, password_ok: bool) -> None:
        if password_ok:  # the right password, but no mapped group: not a guess
            raise NotInGroup(name)
        raise _wrong(self.lockouts.failed(session, self._keys(name, source)))

    def _admitted(self, session, login: str, account: DirectoryAccount, source: str) -> int:
        user = session.scalar(select(User).where(User.name == account.name))
        tenant = accounts.get_or_create_tenant(session, account.tenant)
        if user is None:
            user = User(tenant_id=tenant.id, name=account.name, role=Role(account.role),
                        password_hash=NO_LOCAL_PASSWORD, email=account.mail, disabled=False,
                        created_at=utcnow(), directory_dn=account.dn)
            session.add(user)
            session.flush()
            accounts.audit(session, "directory", "user.add",
                           f"{user.name} role={account.role} from the directory ({account.dn})",
                           tenant_id=tenant.id)
        elif user.directory_dn is None:
            # a local account of the same name: never taken over by a directory entry
            raise _wrong(self.lockouts.failed(session, self._keys(login, source)))
        if user.disabled:
            wait = self.lockouts.failed(session, self._keys(login, source))
            message = f"user {user.name!r} is disabled; ask an administrator"
            raise accounts.Refused(message + (f"; try again in {max(1, round(wait))} s" if wait else ""))
        changes = {"role": Role(account.role), "tenant_id": tenant.id, "email": account.mail,
                   "directory_dn": account.dn}
        changed = [k for k, v in changes.items() if getattr(user, k) != v]
        for key in changed:
            setattr(user, key, changes[key])
        if changed:
            accounts.audit(session, "directory", "user.update",
                           f"{user.name}: {', '.join(changed)} from the directory",
                           tenant_id=tenant.id)
        self.lockouts.succeeded(session, [f"user:{login}"])
        return user.id
