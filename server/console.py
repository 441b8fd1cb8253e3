"""The web console under ``/console/``: server-rendered pages for a tenant's admins and auditors.

Security properties (each covered by tests/test_console.py):

* login checks the argon2id hash through ``accounts.authenticate`` under the server's lock-out
  per user and per address; the lock-out message says how long to wait;
* console sessions live in memory only, keyed by a random 256-bit id in a cookie
  ``Secure; HttpOnly; SameSite=Strict; Path=/console``; the id is replaced at login (no
  fixation), dropped at logout and after ``idle_seconds`` without a request;
* every form carries the session's CSRF token in a hidden field, and every POST (the login form
  included: a pre-login session holds its token) is refused with 403 when the token is missing or
  does not match, before anything is changed;
* pages only ever show the logged-in user's tenant; every value goes through Jinja2 autoescape;
* responses carry a strict Content-Security-Policy (``default-src 'none'``, styles from 'self'),
  the templates have no inline script or style and no URL that leaves the server;
  ``/console/leave?to=URL`` shows an outside target as text and never follows it;
* database work runs off the reactor through ``Database.run``.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs

from jinja2 import Environment, FileSystemLoader
from sqlalchemy import or_, select
from twisted.logger import Logger
from twisted.web import resource, server

from . import accounts
from .db import Database
from .db.models import Host, HostGroup, Role, Session as SessionRow, Tenant
from .web import OFFLINE_PAGES, SECURITY_HEADERS

log = Logger()

COOKIE = b"hm_console"
COOKIE_PATH = b"/console"
IDLE_SECONDS = 15 * 60
MAX_ANONYMOUS = 5000          # pre-login sessions kept at most (oldest dropped first)
MAX_FORM_BYTES = 16 * 1024
MAX_NAME = 200
MAX_PASSWORD = 1024
MAX_QUERY = 200
MAX_ROWS = 500
CONSOLE_ROLES = (Role.admin, Role.auditor)

CSP = (b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       b"frame-ancestors 'none'; base-uri 'none'")

STATIC = {"console.css": ("static/console.css", b"text/css; charset=utf-8")}


@dataclass
class ConsoleSession:
    id: str
    csrf: str
    last_active: float
    user: str | None = None
    role: str | None = None
    tenant_id: int | None = None
    tenant: str | None = None
    notice: str | None = None  # shown once on the next page (e.g. "session expired")

    @property
    def logged_in(self) -> bool:
        return self.user is not None


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

    def login(self, old: ConsoleSession, user: str, role: str, tenant_id: int,
              tenant: str) -> ConsoleSession:
        """A fresh id and CSRF token for the logged-in user; the pre-login id stops working."""
        self._by_id.pop(old.id, None)
        session = self.new()
        session.user, session.role, session.tenant_id, session.tenant = user, role, tenant_id, tenant
        return session

    def drop(self, session: ConsoleSession) -> None:
        self._by_id.pop(session.id, None)

    def __len__(self) -> int:
        return len(self._by_id)


# --- database work (runs in the blocking pool) ------------------------------------------------

@dataclass(frozen=True)
class LoginResult:
    user: str
    role: str
    tenant_id: int
    tenant: str


def _login(session, lockouts: accounts.Lockouts, name: str, password: str, source: str) -> LoginResult:
    user = accounts.authenticate(session, lockouts, name, password, source)
    if user.role not in CONSOLE_ROLES:
        raise accounts.AccountError(
            f"user {name!r} is a {user.role.value}; the console is for admins and auditors")
    tenant = session.get(Tenant, user.tenant_id)
    accounts.audit(session, user.name, "console.login", f"address={source}")
    return LoginResult(user.name, user.role.value, tenant.id, tenant.name)


def _hosts(session, tenant_id: int, query: str) -> list[dict[str, Any]]:
    stmt = (select(Host, HostGroup.name).outerjoin(HostGroup, Host.group_id == HostGroup.id)
            .where(Host.tenant_id == tenant_id))
    if query:
        stmt = stmt.where(or_(Host.name.contains(query, autoescape=True),
                              HostGroup.name.contains(query, autoescape=True)))
    rows = session.execute(stmt.order_by(Host.name).limit(MAX_ROWS)).all()
    return [{"name": h.name, "id": h.id, "group": group or "", "online": bool(h.online),
             "last_seen": h.last_seen, "address": h.last_address or "",
             "version": h.module_version or ""} for h, group in rows]


def _sessions(session, tenant_id: int, query: str) -> list[dict[str, Any]]:
    stmt = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
    if query:
        stmt = stmt.where(or_(SessionRow.supporter_identity.contains(query, autoescape=True),
                              SessionRow.peer_identity.contains(query, autoescape=True),
                              SessionRow.kind.contains(query, autoescape=True)))
    rows = session.scalars(stmt.order_by(SessionRow.created_at.desc()).limit(MAX_ROWS))
    return [{"id": s.id, "kind": s.kind, "supporter": s.supporter_identity or "",
             "peer": s.peer_identity or "", "peer_address": s.peer_address or "",
             "started": s.started_at or s.created_at, "ended": s.ended_at,
             "bytes_to_peer": s.bytes_to_peer or 0, "bytes_to_supporter": s.bytes_to_supporter or 0,
             "end_reason": s.end_reason or ""} for s in rows]


def _logout(session, user: str, source: str) -> None:
    accounts.audit(session, user, "console.logout", f"address={source}")


# --- HTTP ---------------------------------------------------------------------------------------

def _fmt_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


class Console:
    def __init__(self, db: Database, lockouts: accounts.Lockouts, *,
                 idle_seconds: float = IDLE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.lockouts = lockouts
        self.sessions = ConsoleSessions(idle_seconds, clock)
        self.templates = Environment(loader=FileSystemLoader(str(OFFLINE_PAGES)), autoescape=True)
        self.templates.filters["when"] = _fmt_time

    def resource(self) -> resource.Resource:
        return ConsoleResource(self)


class ConsoleResource(resource.Resource):
    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.c = console

    # helpers ------------------------------------------------------------------------------------

    def _headers(self, request: server.Request) -> None:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Security-Policy", CSP)

    def _set_cookie(self, request: server.Request, session: ConsoleSession) -> None:
        request.addCookie(COOKIE, session.id.encode(), path=COOKIE_PATH, secure=True,
                          httpOnly=True, sameSite="strict")

    def _clear_cookie(self, request: server.Request) -> None:
        request.addCookie(COOKIE, b"", path=COOKIE_PATH, secure=True, httpOnly=True,
                          sameSite="strict", max_age=b"0")

    def _page(self, request: server.Request, template: str, status: int = 200, **values) -> bytes:
        request.setResponseCode(status)
        self._headers(request)
        return self.c.templates.get_template(f"console/{template}").render(**values).encode()

    def _redirect(self, request: server.Request, to: bytes) -> bytes:
        request.setResponseCode(303)
        self._headers(request)
        request.setHeader(b"Location", to)
        return b""

    def _session(self, request: server.Request) -> tuple[ConsoleSession | None, bool]:
        raw = request.getCookie(COOKIE)
        try:
            sid = raw.decode("ascii") if raw else None
        except UnicodeDecodeError:
            sid = None
        return self.c.sessions.get(sid)

    def _route(self, request: server.Request) -> str:
        parts = [p for p in request.postpath]
        if not parts or parts == [b""]:
            return ""
        try:
            return "/".join(p.decode("ascii") for p in parts).rstrip("/")
        except UnicodeDecodeError:
            return "?"

    @staticmethod
    def _arg(args: dict[bytes, list[bytes]], name: str, limit: int) -> str | None:
        values = args.get(name.encode())
        if not values:
            return None
        try:
            text = values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text[:limit]

    def _form(self, request: server.Request) -> dict[bytes, list[bytes]] | None:
        raw = request.content.read(MAX_FORM_BYTES + 1) if request.content else b""
        if len(raw) > MAX_FORM_BYTES:
            return None
        try:
            return parse_qs(raw, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
        except ValueError:
            return None

    def _csrf_ok(self, session: ConsoleSession | None, form: dict[bytes, list[bytes]]) -> bool:
        if session is None:
            return False
        sent = form.get(b"csrf", [b""])[0]
        return bool(sent) and hmac.compare_digest(sent, session.csrf.encode())

    def _forbidden(self, request: server.Request, session: ConsoleSession | None) -> bytes:
        log.info("console: refused a POST to {path} from {address}: CSRF token missing or wrong",
                 path=request.path.decode(errors="replace"), address=request.getClientAddress().host)
        return self._page(request, "forbidden.html", 403, session=session)

    # GET ----------------------------------------------------------------------------------------

    def render_GET(self, request: server.Request):
        route = self._route(request)
        if route.startswith("static/"):
            return self._static(request, route[len("static/"):])
        if route == "leave":
            session, _ = self._session(request)
            target = self._arg(request.args, "to", 2000) or ""
            return self._page(request, "leave.html", session=session, target=target)
        session, expired = self._session(request)
        if route == "login" or session is None or not session.logged_in:
            if route not in ("", "login", "hosts", "sessions"):
                return self._page(request, "notfound.html", 404, session=None)
            if session is not None and session.logged_in:
                return self._redirect(request, b"/console/hosts")
            if session is None:
                session = self.c.sessions.new()
                self._set_cookie(request, session)
            if expired:
                session.notice = "Your console session ended after 15 minutes without activity; log in again."
            notice, session.notice = session.notice, None
            if route != "login":
                return self._redirect(request, b"/console/login")
            return self._page(request, "login.html", session=session, notice=notice, error=None,
                              name="")
        if route == "":
            return self._redirect(request, b"/console/hosts")
        if route == "hosts":
            query = (self._arg(request.args, "q", MAX_QUERY) or "").strip()
            return self._deferred(request, self.c.db.run(_hosts, session.tenant_id, query),
                                  lambda hosts: self._page(request, "hosts.html", session=session,
                                                           hosts=hosts, q=query))
        if route == "sessions":
            query = (self._arg(request.args, "q", MAX_QUERY) or "").strip()
            return self._deferred(request, self.c.db.run(_sessions, session.tenant_id, query),
                                  lambda rows: self._page(request, "sessions.html", session=session,
                                                          rows=rows, q=query))
        return self._page(request, "notfound.html", 404, session=session)

    def _static(self, request: server.Request, name: str) -> bytes:
        entry = STATIC.get(name)
        if entry is None:
            return self._page(request, "notfound.html", 404, session=None)
        path, content_type = entry
        self._headers(request)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        return (OFFLINE_PAGES / path).read_bytes()

    def _deferred(self, request: server.Request, d, render: Callable[[Any], bytes]):
        def done(value) -> None:
            body = render(value)
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()

        def failed(failure) -> None:
            log.failure("console request failed", failure)
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(self._page(request, "error.html", 500, session=None,
                                         message="internal server error; see the server log"))
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    # POST ---------------------------------------------------------------------------------------

    def render_POST(self, request: server.Request):
        route = self._route(request)
        session, _ = self._session(request)
        form = self._form(request)
        if form is None:
            return self._page(request, "error.html", 413, session=session,
                              message=f"the form is larger than {MAX_FORM_BYTES} bytes or not valid")
        if not self._csrf_ok(session, form):
            return self._forbidden(request, session)
        if route == "login":
            return self._login(request, session, form)
        if route == "logout":
            if not session.logged_in:
                return self._redirect(request, b"/console/login")
            self.c.sessions.drop(session)
            self._clear_cookie(request)
            source = request.getClientAddress().host
            d = self.c.db.run(_logout, session.user, source)
            return self._deferred(request, d, lambda _: self._redirect(request, b"/console/login"))
        return self._page(request, "notfound.html", 404, session=session)

    def _login(self, request: server.Request, session: ConsoleSession, form) -> Any:
        name = (self._arg(form, "user", MAX_NAME + 1) or "").strip()
        password = self._arg(form, "password", MAX_PASSWORD + 1) or ""
        shown_name = name[:MAX_NAME]
        if session.logged_in:
            return self._redirect(request, b"/console/hosts")
        if not name or not password or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
            return self._page(request, "login.html", 400, session=session, notice=None,
                              error="enter a user name and a password", name=shown_name)
        source = request.getClientAddress().host

        def done(result: LoginResult) -> None:
            fresh = self.c.sessions.login(session, result.user, result.role, result.tenant_id,
                                          result.tenant)
            self._set_cookie(request, fresh)
            log.info("console: {user} logged in from {address}", user=result.user, address=source)
            request.write(self._redirect(request, b"/console/hosts"))
            request.finish()

        def refused(failure) -> None:
            if failure.check(accounts.LockedOut):
                status = 429
            elif failure.check(accounts.AccountError):
                status = 401
            else:
                log.failure("console login failed", failure)
                request.write(self._page(request, "error.html", 500, session=None,
                                         message="internal server error; see the server log"))
                request.finish()
                return
            log.info("console: login refused for {user!r} from {address}: {reason}",
                     user=shown_name, address=source, reason=str(failure.value))
            request.write(self._page(request, "login.html", status, session=session, notice=None,
                                     error=str(failure.value), name=shown_name))
            request.finish()

        d = self.c.db.run(_login, self.c.lockouts, name, password, source)
        d.addCallbacks(done, refused)
        return server.NOT_DONE_YET
