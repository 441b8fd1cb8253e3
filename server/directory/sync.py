"""The periodic directory sync: directory users who may no longer sign in lose their access.

Every ``directory.sync_interval`` the service account looks up each enabled directory user (the
local rows with ``directory_dn``).  One who is gone, filtered out by ``user_filter`` (disabled) or
in no mapped group any more is disabled here and their module certificates are revoked with
``certificates.revoke_identity``; the revocation watchers then drop their connections and end
their live sessions.  One still admitted gets role, tenant and mail updated; a role that can no
longer hold a supporter module (auditor) costs the certificates as well.

If the directory cannot be asked, nobody is judged in that round (a directory outage must not
lock everyone out); the next round tries again.  Sign-in never relies on this: it asks the
directory each time (``signin``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from twisted.application.service import Service
from twisted.internet import task
from twisted.internet.defer import inlineCallbacks, returnValue

from protocol.runtime import Logger, run_blocking

from .. import accounts, certificates
from ..db.models import Role, User
from .client import Directory, DirectoryAccount, DirectoryUnavailable

log = Logger(namespace="hausmeister.directory")

REMOVED_REASON = "removed from the directory"


def end_for_user(session, name: str) -> int:
    from ..console.sessions import end_for_user as end_console_sessions
    return end_console_sessions(session, name)


def directory_users(session) -> list[str]:
    return list(session.scalars(select(User.name).where(User.directory_dn.is_not(None),
                                                        User.disabled.is_(False))
                                .order_by(User.name)))


def apply(session, verdicts: dict[str, DirectoryAccount | str]) -> list[str]:
    """Disable and revoke whoever may no longer sign in; update the rest.  The names disabled."""
    disabled = []
    for name, verdict in verdicts.items():
        user = session.scalar(select(User).where(User.name == name))
        if user is None or user.directory_dn is None or user.disabled:
            continue
        identity = certificates.supporter_identity(name)
        if isinstance(verdict, str):
            user.disabled = True
            end_for_user(session, name)  # console logins end on every node
            revoked = certificates.revoke_identity(session, identity, REMOVED_REASON)
            accounts.audit(session, "directory", "user.disable",
                           f"{name}: {verdict}; {len(revoked)} certificate(s) revoked",
                           tenant_id=user.tenant_id)
            disabled.append(name)
            continue
        tenant = accounts.get_or_create_tenant(session, verdict.tenant)
        changes = {"role": Role(verdict.role), "tenant_id": tenant.id, "email": verdict.mail,
                   "directory_dn": verdict.dn}
        changed = [k for k, v in changes.items() if getattr(user, k) != v]
        if not changed:
            continue
        for key in changed:
            setattr(user, key, changes[key])
        detail = f"{name}: {', '.join(changed)} from the directory"
        if verdict.role not in ("supporter", "admin") or "tenant_id" in changed:
            revoked = certificates.revoke_identity(session, identity,
                                                   "role or tenant changed in the directory")
            detail += f"; {len(revoked)} certificate(s) revoked"
        accounts.audit(session, "directory", "user.update", detail, tenant_id=tenant.id)
    return disabled


class DirectorySync(Service):
    name = "directory-sync"

    def __init__(self, db: Any, directory: Directory, interval: float, reactor=None,
                 run=run_blocking) -> None:
        self.db = db
        self.directory = directory
        self.interval = interval
        self.reactor = reactor
        self.run = run
        self._loop: task.LoopingCall | None = None

    @inlineCallbacks
    def sync_once(self):
        """One round; the names it disabled (empty if the directory could not be asked)."""
        names = yield self.db.run(directory_users)
        if not names:
            returnValue([])
        try:
            verdicts = yield self.run(self.directory.still_admitted, names)
        except DirectoryUnavailable as exc:
            log.warn("directory sync skipped, nobody judged: {problem}", problem=str(exc))
            returnValue([])
        disabled = yield self.db.run(apply, verdicts)
        for name in disabled:
            log.info("directory sync: {user} disabled and certificates revoked ({reason})",
                     user=name, reason=verdicts[name])
        returnValue(disabled)

    def _round(self):
        return self.sync_once().addErrback(lambda f: log.failure("directory sync failed", f))

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._round)
        if self.reactor is not None:
            self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def service(app: Any) -> Service | None:
    section = app.config.directory
    if not section.enabled:
        return None
    return DirectorySync(app.db, Directory(section), section.sync_seconds, reactor=app.reactor)
