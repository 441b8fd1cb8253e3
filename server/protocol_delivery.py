"""Mail the protocol of an ended session to its supporter, for supporters who opted in.

``deliver`` is one plain, blocking scan: every ended session whose ``protocol_mailed_at`` is still
empty is looked at once; if its supporter (the ``hausmeister:supporter:<name>`` identity of the
session) is an enabled user of the session's tenant with ``protocol_mail`` on and a mail address,
a mail with the protocol timeline (``session_protocol.render``) is queued.  Either way the session
gets ``protocol_mailed_at``, so the scan only ever reads new rows.  Sessions that ended long before
the service started (``since``) are marked without a mail: turning the feature on must not mail
a backlog of old sessions.

Not here: writing protocols (``session_protocol``), sending mail (``mail.Outbox``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session as DbSession
from twisted.application.service import Service

from protocol.identity import Identity, IdentityError
from protocol.runtime import Logger

from . import mail_texts
from .alerts import Periodic, base_url_of
from .db.models import Session, Tenant, User
from .session_protocol import find_session, render, tenant_folder

log = Logger(namespace="hausmeister.protocol-mail")

INTERVAL_SECONDS = 10.0
BATCH = 200
#: Sessions that ended at most this long before the service started are still mailed (a restart
#: right after a session must not lose its mail); older ones are marked without one.
GRACE = dt.timedelta(hours=1)
#: The relay writes the protocol's ``ended`` line just after ``ended_at``: give it this long.
SETTLE = dt.timedelta(seconds=3)


def supporter_name(identity: str | None) -> str | None:
    """The user name in a session's supporter identity, or None if it is not a supporter."""
    if not identity:
        return None
    try:
        parsed = Identity.parse(identity)
    except IdentityError:
        return None
    return parsed.name if parsed.role == "supporter" else None


def protocol_lines(protocol_dir: Path, tenant: str, session_id: str) -> list[str]:
    """The timeline of the session's file in its tenant's folder (none: an empty list)."""
    folder = tenant_folder(tenant)
    try:
        files = [p for p in find_session(protocol_dir, session_id)
                 if p.relative_to(protocol_dir).parts[0] == folder]
    except ValueError:
        return []
    return [line for path in files for line in render(path).splitlines()]


def _recipient(session: DbSession, row: Session) -> User | None:
    name = supporter_name(row.supporter_identity)
    if name is None:
        return None
    user = session.scalar(select(User).where(User.name == name))
    if (user is None or user.disabled or not user.protocol_mail or not user.email
            or user.tenant_id != row.tenant_id):
        return None
    return user


def deliver(session: DbSession, outbox: Any, protocol_dir: Path, base_url: str, since: dt.datetime,
            now: dt.datetime) -> list[str]:
    """Queue protocol mails for newly ended sessions; returns the ids of the sessions mailed."""
    session.execute(update(Session).where(Session.ended_at.is_not(None),
                                          Session.protocol_mailed_at.is_(None),
                                          Session.ended_at < since - GRACE)
                    .values(protocol_mailed_at=now))
    rows = session.scalars(select(Session).where(Session.ended_at.is_not(None),
                                                 Session.protocol_mailed_at.is_(None),
                                                 Session.ended_at <= now - SETTLE)
                           .order_by(Session.ended_at).limit(BATCH)).all()
    mailed = []
    for row in rows:
        row.protocol_mailed_at = now
        user = _recipient(session, row)
        if user is None:
            continue
        tenant = session.get(Tenant, row.tenant_id)
        subject, body = mail_texts.session_protocol(
            base_url, user.name, row.id, row.started_at or row.created_at, row.ended_at,
            protocol_lines(Path(protocol_dir), tenant.name, row.id), language=user.language,
            peer=row.peer_identity)
        try:
            outbox.enqueue(session, user.email, subject, body)
        except ValueError as exc:  # an address the outbox refuses: no mail, the scan goes on
            log.warn("protocol of session {session_id} not mailed to {user}: {error}",
                     session_id=row.id, user=user.name, error=str(exc))
            continue
        mailed.append(row.id)
        log.info("protocol of session {session_id} mailed to {user}", session_id=row.id, user=user.name)
    session.flush()
    return mailed


def service(app: Any) -> Service | None:
    if app.outbox is None:
        return None
    since = dt.datetime.now(dt.timezone.utc)

    def tick():
        return app.db.run(deliver, app.outbox, app.config.server.protocol_dir, base_url_of(app),
                          since, dt.datetime.now(dt.timezone.utc))
    return Periodic("protocol delivery", tick, INTERVAL_SECONDS, getattr(app, "reactor", None))
