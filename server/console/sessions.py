"""Console sessions, keyed by a random 256-bit id in a cookie, with an idle timeout.

The id is replaced at login (no fixation), dropped at logout and after ``idle_seconds`` without
a request.  Each session holds its own CSRF token.

Before login a session lives in this process's memory only (a flood of anonymous visitors costs
no database writes), yet any node can continue it: its CSRF token is derived from the cookie
value (``anonymous_csrf``; the value is secret, so the token is too), so a node that never saw
the cookie takes it as the same anonymous session.  A login waiting for its TOTP code is a row
(``console_pending_logins``, written only after a right password; ``auth``).  A logged-in session is a ``console_sessions`` row when a database is given
(the server always gives one): every node of several on one database reads it, so a login works
on each node and a restart logs nobody out.  Only the SHA-256 of the cookie value is stored.
Each request reads the row (a logout, a disabled user or a changed password on another node ends
it here at once); ``last_active`` is written at most every ``TOUCH_SECONDS``.  A notice shown
once ("password changed") stays with the node that set it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import delete, select, update
from twisted.internet import defer

IDLE_SECONDS = 15 * 60
MAX_ANONYMOUS = 5000          # pre-login sessions kept at most (oldest dropped first)
TOUCH_SECONDS = 30.0          # a logged-in session's last activity is written at most this often


@dataclass
class ConsoleSession:
    id: str
    csrf: str
    last_active: float
    user: str | None = None
    user_id: int | None = None
    role: str | None = None
    tenant_id: int | None = None
    tenant: str | None = None
    operator: bool = False      # an admin of the operator's tenant (the first one): server-wide settings
    notice: Any = None          # shown once on the next page (e.g. "session expired"; an i18n.Text)
    language: str | None = None # chosen on the switch or stored with the account; None: the browser's
    #: fires once a logged-in session is in the database (every node knows it from then on)
    saved: Any = None

    @property
    def logged_in(self) -> bool:
        return self.user is not None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


#: what ``secrets.token_urlsafe(32)`` gives: a cookie value of another shape is no session
COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")


def anonymous_csrf(session_id: str) -> str:
    """The CSRF token of a session before login, the same on every node (a hash of the secret
    cookie value under its own label, so it tells nothing about the cookie)."""
    return hashlib.sha256(b"hausmeister console csrf\0" +
                          session_id.encode("ascii", "replace")).hexdigest()


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class ConsoleSessions:
    """Console sessions with an idle timeout; ``clock`` is injectable (seconds, the in-memory
    part), ``wall`` too (UTC datetimes, the database part).  Without ``db`` everything stays in
    memory (unit tests)."""

    idle_seconds: float = IDLE_SECONDS
    clock: Callable[[], float] = time.monotonic
    db: Any = None               # server.db.Database
    wall: Callable[[], dt.datetime] = _utcnow
    _by_id: dict[str, ConsoleSession] = field(default_factory=dict)
    #: logged-in sessions this node served (their notices); the database row is the authority
    _known: dict[str, ConsoleSession] = field(default_factory=dict)

    def new(self) -> ConsoleSession:
        return self._anonymous(secrets.token_urlsafe(32))

    def _anonymous(self, session_id: str) -> ConsoleSession:
        anonymous = [s for s in self._by_id.values() if not s.logged_in]
        if len(anonymous) >= MAX_ANONYMOUS:
            for old in sorted(anonymous, key=lambda s: s.last_active)[:len(anonymous) - MAX_ANONYMOUS + 1]:
                self._by_id.pop(old.id, None)
        session = ConsoleSession(id=session_id, csrf=anonymous_csrf(session_id),
                                 last_active=self.clock())
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> tuple[ConsoleSession | None, bool]:
        """The live in-memory session for this id (touched), and whether it had just expired."""
        if not session_id:
            return None, False
        session = self._by_id.get(session_id)
        if session is None:
            return None, False
        now = self.clock()
        if now - session.last_active > self.idle_seconds:
            del self._by_id[session_id]
            return None, session.logged_in
        session.last_active = now
        return session, False

    def lookup(self, session_id: str | None) -> defer.Deferred:
        """``(session, expired)`` for a cookie value: from memory before login, from the database
        after (a Deferred either way)."""
        if self.db is None or not session_id or session_id in self._by_id:
            return defer.succeed(self.get(session_id))
        d = self.db.run(_load, id_hash(session_id), self.wall(), self.idle_seconds, TOUCH_SECONDS)

        def loaded(found):
            if found in ("gone", "expired"):
                self._known.pop(session_id, None)
                if found == "gone" and COOKIE_VALUE.fullmatch(session_id):
                    # a login begun on another node (or before this node's restart)
                    return self._anonymous(session_id), False
                return None, found == "expired"
            session = self._known.get(session_id)
            if session is None:
                session = self._known[session_id] = ConsoleSession(
                    id=session_id, csrf=found["csrf"], last_active=self.clock())
            session.last_active = self.clock()
            for name in ("user", "user_id", "role", "tenant_id", "tenant", "operator",
                         "language", "csrf"):
                setattr(session, name, found[name])
            return session, False
        return d.addCallback(loaded)

    def login(self, old: ConsoleSession, user: str, role: str, tenant_id: int, tenant: str, *,
              user_id: int | None = None, operator: bool = False,
              language: str | None = None) -> ConsoleSession:
        """A fresh id and CSRF token for the logged-in user; the pre-login id stops working.
        Wait for ``saved`` before the browser may come back (possibly to another node).

        The language is the account's, else the one chosen before logging in."""
        self._by_id.pop(old.id, None)
        self._known.pop(old.id, None)
        session = ConsoleSession(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32),
                                 last_active=self.clock())
        session.language = language or old.language
        session.user, session.role, session.tenant_id, session.tenant = user, role, tenant_id, tenant
        session.user_id, session.operator = user_id, operator
        if self.db is None:
            self._by_id[session.id] = session
            session.saved = defer.succeed(None)
            return session
        self._forget_idle()
        self._known[session.id] = session
        session.saved = self.db.run(_insert, id_hash(session.id), session, self.wall(),
                                    self.idle_seconds)
        if old.logged_in and old.id:
            self.db.run(_delete, id_hash(old.id))
        return session

    def save_language(self, session: ConsoleSession) -> defer.Deferred:
        if self.db is None or not session.logged_in:
            return defer.succeed(None)
        return self.db.run(_set_language, id_hash(session.id), session.language)

    def drop(self, session: ConsoleSession) -> defer.Deferred:
        self._by_id.pop(session.id, None)
        self._known.pop(session.id, None)
        if self.db is None or not session.logged_in:
            return defer.succeed(None)
        return self.db.run(_delete, id_hash(session.id))

    def drop_user(self, user: str) -> defer.Deferred:
        """End every console session of ``user`` on every node (password changed, user
        disabled); a Deferred with how many ended."""
        gone = [s for s in list(self._by_id.values()) + list(self._known.values())
                if s.user == user]
        for s in gone:
            self._by_id.pop(s.id, None)
            self._known.pop(s.id, None)
        if self.db is None:
            return defer.succeed(len(gone))
        return self.db.run(_delete_user, user)

    def _forget_idle(self) -> None:
        now = self.clock()
        for sid, session in list(self._known.items()):
            if now - session.last_active > self.idle_seconds:
                del self._known[sid]

    def __len__(self) -> int:
        return len(self._by_id) + len(self._known)


# --- database work (runs in the blocking pool) -------------------------------------------------

def _load(session, key: str, now: dt.datetime, idle: float, touch_after: float):
    from ..db.models import ConsoleSessionRow
    row = session.get(ConsoleSessionRow, key)
    if row is None:
        return "gone"
    quiet = (now - row.last_active).total_seconds()
    if quiet > idle:
        session.delete(row)
        return "expired"
    if quiet > touch_after:
        row.last_active = now
    return {"user": row.user_name, "user_id": row.user_id, "role": row.role,
            "tenant_id": row.tenant_id, "tenant": row.tenant, "operator": bool(row.operator),
            "language": row.language, "csrf": row.csrf}


def _insert(session, key: str, console_session: ConsoleSession, now: dt.datetime,
            idle: float) -> None:
    from ..db.models import ConsoleSessionRow
    # rows nobody came back for: gone with the next login
    session.execute(delete(ConsoleSessionRow).where(
        ConsoleSessionRow.last_active < now - dt.timedelta(seconds=idle)))
    s = console_session
    session.add(ConsoleSessionRow(id_hash=key, csrf=s.csrf, user_name=s.user, user_id=s.user_id,
                                  role=s.role, tenant_id=s.tenant_id, tenant=s.tenant,
                                  operator=bool(s.operator), language=s.language,
                                  created_at=now, last_active=now))


def _delete(session, key: str) -> None:
    from ..db.models import ConsoleSessionRow
    session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.id_hash == key))


def end_for_user(session, user: str) -> int:
    """Inside another transaction (the CLI, the directory sync): ``user``'s console sessions
    end on every node; how many."""
    return _delete_user(session, user)


def _delete_user(session, user: str) -> int:
    from ..db.models import ConsoleSessionRow
    keys = list(session.scalars(select(ConsoleSessionRow.id_hash)
                                .where(ConsoleSessionRow.user_name == user)))
    session.execute(delete(ConsoleSessionRow).where(ConsoleSessionRow.user_name == user))
    return len(keys)


def _set_language(session, key: str, language: str | None) -> None:
    from ..db.models import ConsoleSessionRow
    session.execute(update(ConsoleSessionRow).where(ConsoleSessionRow.id_hash == key)
                    .values(language=language))
