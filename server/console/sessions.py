"""Console sessions: in memory, keyed by a random 256-bit id in a cookie, with an idle timeout.

The id is replaced at login (no fixation), dropped at logout and after ``idle_seconds`` without
a request.  Each session holds its own CSRF token.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

IDLE_SECONDS = 15 * 60
MAX_ANONYMOUS = 5000          # pre-login sessions kept at most (oldest dropped first)


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
    pending: Any = None         # a login waiting for its second factor (``auth``)

    @property
    def logged_in(self) -> bool:
        return self.user is not None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class ConsoleSessions:
    """In-memory console sessions with an idle timeout; ``clock`` is injectable (seconds)."""

    idle_seconds: float = IDLE_SECONDS
    clock: Callable[[], float] = time.monotonic
    _by_id: dict[str, ConsoleSession] = field(default_factory=dict)

    def new(self) -> ConsoleSession:
        anonymous = [s for s in self._by_id.values() if not s.logged_in]
        if len(anonymous) >= MAX_ANONYMOUS:
            for old in sorted(anonymous, key=lambda s: s.last_active)[:len(anonymous) - MAX_ANONYMOUS + 1]:
                self._by_id.pop(old.id, None)
        session = ConsoleSession(id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32),
                                 last_active=self.clock())
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> tuple[ConsoleSession | None, bool]:
        """The live session for this id (touched), and whether it had just expired."""
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

    def login(self, old: ConsoleSession, user: str, role: str, tenant_id: int, tenant: str, *,
              user_id: int | None = None, operator: bool = False,
              language: str | None = None) -> ConsoleSession:
        """A fresh id and CSRF token for the logged-in user; the pre-login id stops working.

        The language is the account's, else the one chosen before logging in."""
        self._by_id.pop(old.id, None)
        session = self.new()
        session.language = language or old.language
        session.user, session.role, session.tenant_id, session.tenant = user, role, tenant_id, tenant
        session.user_id, session.operator = user_id, operator
        return session

    def drop(self, session: ConsoleSession) -> None:
        self._by_id.pop(session.id, None)

    def drop_user(self, user: str) -> int:
        """End every console session of ``user`` (password changed, user disabled)."""
        gone = [s for s in self._by_id.values() if s.user == user]
        for s in gone:
            self._by_id.pop(s.id, None)
        return len(gone)

    def __len__(self) -> int:
        return len(self._by_id)
