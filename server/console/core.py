"""The console's HTTP machinery: routing, cookies, CSRF, templates, off-reactor database work.

Pages live in their own modules (``pages_*.py``, ``auth.py``) and register handlers with
:func:`route`.  A handler gets a :class:`Ctx` and returns the body (bytes) or a Deferred that
fires with it.  Every rule that holds for all pages is enforced here, before a handler runs:

* a POST without the session's CSRF token is refused with 403 before anything is read or changed
  (the login form included: a pre-login session holds its token);
* pages that need a login redirect to ``/console/login``; ``roles`` refuses others with 403;
* every response carries a strict Content-Security-Policy and the server's security headers;
* template values go through Jinja2 autoescape; forms are size-limited.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web import resource, server

from .. import accounts, i18n
from ..db import Database
from ..i18n import N_, Plural, Text
from ..web import OFFLINE_PAGES, SECURITY_HEADERS
from .sessions import IDLE_SECONDS, ConsoleSession, ConsoleSessions

log = Logger()

COOKIE = b"hm_console"
COOKIE_PATH = b"/console"
MAX_FORM_BYTES = 16 * 1024
MAX_FORM_FIELDS = 40
MAX_QUERY = 200
MAX_ROWS = 500
CONSOLE_ROLES = ("admin", "auditor")          # the tenant's pages
EVERYONE = ("admin", "auditor", "supporter")   # the own account, picture, logout


def landing(role: str | None) -> str:
    """Where a logged-in user starts: the hosts page, or a supporter's own account."""
    return "/console/hosts" if role in CONSOLE_ROLES else "/console/account"

CSP = (b"default-src 'none'; style-src 'self'; img-src 'self'; media-src 'self'; form-action 'self'; "
       b"frame-ancestors 'none'; base-uri 'none'")

STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(css|png|svg)$")
STATIC_TYPES = {"css": b"text/css; charset=utf-8", "png": b"image/png", "svg": b"image/svg+xml"}


class PageError(Exception):
    """Raise in a handler (or its database work) to answer with an error page and a status.

    ``message`` is a :class:`~server.i18n.Text`, translated for the reader when shown.
    """

    def __init__(self, status: int, message: "str | Text") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Console:
    """What the pages work with.  Optional parts are None when not configured (no mail relay...).

    ``base_url`` and ``module_endpoint`` are read at request time (ports may be chosen at start).
    """

    db: Database
    lockouts: accounts.Lockouts
    config: Any = None                 # server.config.Config
    outbox: Any = None                 # server.mail.Outbox, None when no SMTP relay is configured
    store: Any = None                  # server.pki.CertStore (CA certificate, fingerprint)
    broker: Any = None                 # server.broker.Broker (support terms live there)
    base_url: Callable[[], str] = lambda: ""
    module_endpoint: Callable[[], tuple[str, int]] = lambda: ("", 0)
    idle_seconds: float = IDLE_SECONDS
    clock: Callable[[], float] = time.monotonic
    extras: dict[str, Any] = field(default_factory=dict)  # per-area services (avatars, settings...)
    signin: Any = None                 # server.directory.signin.SignIn; None: local accounts only

    def __post_init__(self) -> None:
        if self.signin is None:
            from ..directory.signin import SignIn
            self.signin = SignIn(self.db, self.lockouts)
        self.sessions = ConsoleSessions(self.idle_seconds, self.clock, db=self.db)
        self._templates: dict[str, Environment] = {}
        self.templates = self.templates_for(i18n.DEFAULT)

    def templates_for(self, lang: str) -> Environment:
        """One Jinja2 environment per language: its catalogue and its date and number formats."""
        env = self._templates.get(lang)
        if env is None:
            env = self._templates[lang] = template_environment(lang)
        return env

    def resource(self) -> resource.Resource:
        from . import pages  # noqa: F401  (registers every page's routes)
        return ConsoleResource(self)


#: values from the database shown as words (roles, states, kinds): translated where shown
TERMS = {
    "admin": N_("admin"), "supporter": N_("supporter"), "auditor": N_("auditor"),
    "host": N_("host"), "server": N_("server"), "adhoc": N_("ad-hoc"),
    "online": N_("online"), "offline": N_("offline"), "active": N_("active"),
    "disabled": N_("disabled"), "valid": N_("valid"), "expired": N_("expired"),
    "revoked": N_("revoked"), "used": N_("used"), "unused": N_("unused"),
    "on": N_("on"), "off": N_("off"), "yes": N_("yes"), "no": N_("no"),
}


def template_environment(lang: str) -> Environment:
    texts = i18n.texts(lang)
    env = Environment(loader=FileSystemLoader(str(OFFLINE_PAGES)), autoescape=True,
                      extensions=["jinja2.ext.i18n"])
    env.policies["ext.i18n.trimmed"] = True   # msgids without the template's line breaks
    env.install_gettext_translations(texts.catalogue, newstyle=True)
    env.filters["when"] = texts.date_time
    env.filters["number"] = texts.number
    env.filters["size"] = texts.size
    env.filters["say"] = texts.say
    env.filters["term"] = lambda value: texts.gettext(TERMS[value]) if value in TERMS else value
    env.filters["leave"] = leave_url
    from .pages_help import link_outside_urls  # pages import core, hence here
    env.filters["outside_links"] = link_outside_urls
    env.globals["lang"] = lang
    env.globals["languages"] = i18n.NAMES
    return env


def leave_url(url: str) -> str:
    """The local warning page for a link that would leave the network."""
    return "/console/leave?to=" + quote(url, safe="")


# --- routing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    handler: Callable[["Ctx"], Any]
    login: bool
    roles: tuple[str, ...]


ROUTES: list[Route] = []


def route(method: str, path: str, *, login: bool = True, roles: tuple[str, ...] = CONSOLE_ROLES):
    """Register ``handler`` for ``METHOD path``; ``{name}`` matches one path segment."""
    regex = "^" + re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[A-Za-z0-9_.:@-]{1,200})", re.escape(path)) + "$"

    def register(handler):
        ROUTES.append(Route(method, re.compile(regex), handler, login, roles))
        return handler
    return register


def find(method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
    """The route, its path parameters, and whether the path exists for another method."""
    other = False
    for r in ROUTES:
        m = r.pattern.match(path)
        if m:
            if r.method == method:
                return r, m.groupdict(), False
            other = True
    return None, {}, other


# --- per-request context ------------------------------------------------------------------------

class Ctx:
    """One request: its session, parameters and form, and the helpers pages answer with."""

    def __init__(self, console: Console, request: server.Request, session: ConsoleSession | None,
                 params: dict[str, str], form: dict[bytes, list[bytes]] | None) -> None:
        self.console = console
        self.request = request
        self.session = session
        self.params = params
        self.form = form or {}
        self.status = 200

    @property
    def lang(self) -> str:
        """The reader's language: chosen on the switch (or stored with the account), else
        the browser's ``Accept-Language``."""
        chosen = i18n.known(self.session.language) if self.session is not None else None
        if chosen:
            return chosen
        header = self.request.getHeader(b"accept-language")
        return i18n.negotiate(header.decode("latin-1") if header else None)

    @property
    def texts(self) -> i18n.Texts:
        return i18n.texts(self.lang)

    def _(self, message: str, **values: Any) -> str:
        return self.texts.gettext(message, **values)

    @property
    def source(self) -> str:
        return self.request.getClientAddress().host

    @property
    def db(self) -> Database:
        return self.console.db

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """Database (or other blocking) work off the reactor; ``fn(session, *args)``."""
        return self.console.db.run(fn, *args, **kwargs)

    def arg(self, name: str, limit: int = MAX_QUERY) -> str:
        """A query-string value ('' if missing or not UTF-8), cut to ``limit`` characters."""
        return _first(self.request.args, name, limit)

    def field(self, name: str, limit: int = 1000) -> str:
        """A form value ('' if missing or not UTF-8); longer than ``limit`` → PageError 400."""
        value = _first(self.form, name, limit + 1)
        if len(value) > limit:
            raise PageError(400, Text("the field '%(name)s' is longer than %(limit)s characters",
                                      name=name, limit=limit))
        return value

    def fields(self, name: str, limit: int = 1000) -> list[str]:
        out = []
        for raw in self.form.get(name.encode(), []):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(text) > limit:
                raise PageError(400, Text("the field '%(name)s' is longer than %(limit)s characters",
                                      name=name, limit=limit))
            out.append(text)
        return out

    def page(self, template: str, status: int | None = None, **values: Any) -> bytes:
        if status is not None:
            self.status = status
        self.request.setResponseCode(self.status)
        self.headers()
        values.setdefault("session", self.session)
        values.setdefault("notice", None)
        values.setdefault("error", None)
        texts = self.texts
        for name, value in values.items():
            if isinstance(value, (Text, Plural, Exception)):
                values[name] = self.say(value)
        values.setdefault("here", self.here())
        env = self.console.templates_for(texts.lang)
        return env.get_template(f"console/{template}").render(**values).encode()

    def say(self, message: Any) -> str:
        """A message for the reader: a ``Text`` translated, an error by its translated text."""
        if isinstance(message, Exception):
            message = error_text(message)
        return self.texts.say(message)

    def here(self) -> str:
        """Where the language switch comes back to: this page, or after a form was sent (a POST
        address has no page of its own) the nearest page above it."""
        uri = self.request.uri.decode("ascii", "replace") if self.request.uri else "/console/"
        if not uri.startswith("/console") or len(uri) > 1000:
            return "/console/"
        if self.request.method == b"GET":
            return uri
        path = uri.split("?", 1)[0].removeprefix("/console").strip("/")
        sent_to, _, _ = find(self.request.method.decode("ascii", "replace"), path)
        if sent_to is not None and any(r.method == "GET" and r.pattern == sent_to.pattern
                                       for r in ROUTES):
            return "/console/" + path            # a form that posts to its own page (login...)
        path = path.rpartition("/")[0]
        while path:
            if find("GET", path)[0] is not None:
                return "/console/" + path
            path = path.rpartition("/")[0]
        return "/console/"

    def redirect(self, to: str) -> bytes:
        self.request.setResponseCode(303)
        self.headers()
        self.request.setHeader(b"Location", to.encode())
        return b""

    def download(self, body: bytes, content_type: bytes, filename: str) -> bytes:
        """A file the browser saves (CSV export, CA certificate...)."""
        self.headers()
        self.request.setHeader(b"Content-Type", content_type)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:100] or "download"
        self.request.setHeader(b"Content-Disposition", f'attachment; filename="{safe}"'.encode())
        return body

    def headers(self) -> None:
        _headers(self.request, self.console.extras.get(IMG_ORIGIN))

    def set_cookie(self, session: ConsoleSession) -> None:
        self.request.addCookie(COOKIE, session.id.encode(), path=COOKIE_PATH, secure=True,
                               httpOnly=True, sameSite="strict")

    def clear_cookie(self) -> None:
        self.request.addCookie(COOKIE, b"", path=COOKIE_PATH, secure=True, httpOnly=True,
                               sameSite="strict", max_age=b"0")

    def flash(self, text: "str | Text") -> None:
        """A notice shown once on the next page of this session."""
        if self.session is not None:
            self.session.notice = text

    def take_notice(self) -> str | None:
        if self.session is None:
            return None
        notice, self.session.notice = self.session.notice, None
        return notice


def term(value: str) -> "str | Text":
    """A role, state or kind from the database as a translatable word."""
    return Text(TERMS[value]) if value in TERMS else value


def role_refusal(roles: tuple[str, ...], role: str | None) -> Text:
    if len(roles) == 1:
        return Text("this page needs the role %(needed)s; you are %(role)s",
                    needed=term(roles[0]), role=term(role or ""))
    return Text("this page needs the role %(needed)s or %(other)s; you are %(role)s",
                needed=term(roles[0]), other=term(roles[1]), role=term(role or ""))


def error_text(error: Exception) -> "str | Text | Plural":
    """What a refusal says: its ``Text`` if it carries one, the lock-out with its wait, else the
    (English) text of an error from outside the console."""
    if isinstance(error, accounts.LockedOut):
        return Text("too many failed attempts: try again in %(wait)s s",
                    wait=max(1, round(error.wait_seconds)))
    if isinstance(error, PageError):
        return error.message
    if error.args and isinstance(error.args[0], (Text, Plural)):
        return error.args[0]
    return account_text(str(error))


def account_text(message: str) -> "str | Text":
    """The few messages of ``server.accounts`` a console user meets, as ``Text``."""
    for pattern, text in ACCOUNT_MESSAGES:
        m = pattern.fullmatch(message)
        if m:
            return Text(text, **m.groupdict())
    return message


_WAIT = r"; try again in (?P<wait>\d+) s"
ACCOUNT_MESSAGES = [(re.compile(pattern), text) for pattern, text in [
    (r"wrong user name or password", N_("wrong user name or password")),
    (r"wrong user name or password" + _WAIT,
     N_("wrong user name or password; try again in %(wait)s s")),
    (r"user '(?P<name>.*)' is disabled; ask an administrator",
     N_("user '%(name)s' is disabled; ask an administrator")),
    (r"user '(?P<name>.*)' is disabled; ask an administrator" + _WAIT,
     N_("user '%(name)s' is disabled; ask an administrator; try again in %(wait)s s")),
    (r"the current password is wrong; nothing was changed",
     N_("the current password is wrong; nothing was changed")),
    (r"the current password is wrong; nothing was changed" + _WAIT,
     N_("the current password is wrong; nothing was changed; try again in %(wait)s s")),
    (r"this code was already used; wait for the next one",
     N_("this code was already used; wait for the next one")),
    (r"this code was already used; wait for the next one" + _WAIT,
     N_("this code was already used; wait for the next one; try again in %(wait)s s")),
    (r"wrong or expired code", N_("wrong or expired code")),
    (r"wrong or expired code" + _WAIT, N_("wrong or expired code; try again in %(wait)s s")),
    (r"password is too short: use at least (?P<n>\d+) characters",
     N_("password is too short: use at least %(n)s characters")),
    (r"user '(?P<name>.*)' already exists", N_("user '%(name)s' already exists")),
    (r"user name '(?P<name>.*)' is not valid: use letters, digits, \. _ @ - "
     r"\(at most 100, starting with a letter or digit\)",
     N_("user name '%(name)s' is not valid: use letters, digits, . _ @ - (at most 100, "
        "starting with a letter or digit)")),
    (r"role '(?P<role>.*)' is unknown: use admin, supporter or auditor",
     N_("role '%(role)s' is unknown: use admin, supporter or auditor")),
    (r"the two new passwords differ; nothing was changed",
     N_("the two new passwords differ; nothing was changed")),
    # server.settings_store: values the settings page refuses
    (r"support terms: the text must not be empty \(customers accept it before every ad-hoc "
     r"session\)", N_("support terms: the text must not be empty (customers accept it before "
                      "every ad-hoc session)")),
    (r"support terms: at most (?P<max>\d+) characters, got (?P<got>\d+)",
     N_("support terms: at most %(max)s characters, got %(got)s")),
    (r"retention: expected a whole number of days from 0 to (?P<max>\d+) \(0 = keep forever\), "
     r"got (?P<got>.*)", N_("retention: expected a whole number of days from 0 to %(max)s "
                            "(0 = keep forever), got %(got)s")),
    # server.mail: an address the outbox refuses
    (r"not a single mail address: (?P<address>.*)", N_("not a single mail address: %(address)s")),
    # server.avatars: why an upload is refused
    (r"no file was uploaded: choose a picture first",
     N_("no file was uploaded: choose a picture first")),
    (r"the picture is (?P<size>\d+) KiB; at most (?P<max>\d+) KiB is allowed",
     N_("the picture is %(size)s KiB; at most %(max)s KiB is allowed")),
    (r"a (?P<kind>\S+) picture is not taken: upload PNG, JPEG, GIF or WebP",
     N_("a %(kind)s picture is not taken: upload PNG, JPEG, GIF or WebP")),
    (r"the picture is (?P<size>\d+×\d+) pixels; at most 4096×4096 is allowed",
     N_("the picture is %(size)s pixels; at most 4096×4096 is allowed")),
    (r"the file is not a picture: upload PNG, JPEG, GIF or WebP",
     N_("the file is not a picture: upload PNG, JPEG, GIF or WebP")),
    (r"the picture is damaged or incomplete \((?P<detail>.*)\); nothing was stored",
     N_("the picture is damaged or incomplete (%(detail)s); nothing was stored")),
]]


def _first(args: dict[bytes, list[bytes]], name: str, limit: int) -> str:
    values = args.get(name.encode())
    if not values:
        return ""
    try:
        return values[0].decode("utf-8")[:limit]
    except UnicodeDecodeError:
        return ""


IMG_ORIGIN = "img_origin"  # Console.extras key: an outside origin pictures may come from (Gravatar)


def csp(img_origin: str | None = None) -> bytes:
    """The console policy; while the operator has Gravatar on, its origin is allowed for images."""
    if not img_origin:
        return CSP
    return CSP.replace(b"img-src 'self'", b"img-src 'self' " + img_origin.encode("ascii"))


def _headers(request: server.Request, img_origin: str | None = None) -> None:
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Security-Policy", csp(img_origin))
    request.setHeader(b"Cache-Control", b"no-store")


# --- the resource -------------------------------------------------------------------------------

class ConsoleResource(resource.Resource):
    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.c = console

    def render_GET(self, request: server.Request):
        return self._render(request, "GET")

    def render_HEAD(self, request: server.Request):
        return self._render(request, "GET")

    def render_POST(self, request: server.Request):
        return self._render(request, "POST")

    def _path(self, request: server.Request) -> str:
        parts = list(request.postpath)
        if not parts or parts == [b""]:
            return ""
        try:
            return "/".join(p.decode("ascii") for p in parts).rstrip("/")
        except UnicodeDecodeError:
            return "?"

    def _session(self, request: server.Request) -> Deferred:
        """``(session, expired)``: a logged-in session comes from the database (any node)."""
        raw = request.getCookie(COOKIE)
        try:
            sid = raw.decode("ascii") if raw else None
        except UnicodeDecodeError:
            sid = None
        return self.c.sessions.lookup(sid)

    def _form(self, request: server.Request) -> dict[bytes, list[bytes]] | None:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype == b"multipart/form-data":
            return _multipart(request)
        raw = request.content.read(MAX_FORM_BYTES + 1) if request.content else b""
        if len(raw) > MAX_FORM_BYTES:
            return None
        try:
            return parse_qs(raw, keep_blank_values=True, strict_parsing=False,
                            max_num_fields=MAX_FORM_FIELDS)
        except ValueError:
            return None

    def _render(self, request: server.Request, method: str):
        path = self._path(request)
        if method == "GET" and path.startswith("static/"):
            return self._static(request, path[len("static/"):])
        state: dict[str, Any] = {}

        def found(result) -> None:
            session, expired = result
            body = self._render_for(request, method, path, session, expired)
            if state.get("waiting"):
                if body is not server.NOT_DONE_YET:
                    _finish(request, body)
            else:
                state["body"] = body

        def failed(failure) -> None:
            log.failure("console: could not read the console session", failure)
            ctx = Ctx(self.c, request, None, {}, None)
            found_body = ctx.page("error.html", 503, message=Text(
                "the database cannot be reached; try again in a moment"))
            if state.get("waiting"):
                _finish(request, found_body)
            else:
                state["body"] = found_body

        self._session(request).addCallbacks(found, failed)
        if "body" in state:
            return state["body"]
        state["waiting"] = True
        return server.NOT_DONE_YET

    def _render_for(self, request: server.Request, method: str, path: str,
                    session: ConsoleSession | None, expired: bool):
        r, params, other = find(method, path)
        form = None
        if method == "POST":
            form = self._form(request)
            ctx = Ctx(self.c, request, session, params, form)
            if form is None:
                return ctx.page("error.html", 413, message=Text("the form is too large or not valid; "
                                "nothing was changed"))
            if not self._csrf_ok(session, form):
                log.info("console: refused a POST to {path} from {address}: CSRF token missing or wrong",
                         path=request.path.decode(errors="replace"), address=ctx.source)
                return ctx.page("forbidden.html", 403)
        ctx = Ctx(self.c, request, session, params, form)
        if r is None:
            if other:
                request.setHeader(b"Allow", b"GET, POST")
                return ctx.page("error.html", 405, message=Text("%(method)s is not allowed here", method=method))
            return ctx.page("notfound.html", 404)
        if r.login and (session is None or not session.logged_in):
            if method == "POST":
                return ctx.redirect("/console/login")
            if session is None:
                session = ctx.session = self.c.sessions.new()
                ctx.set_cookie(session)
            if expired:
                session.notice = Text("Your console session ended after %(minutes)s minutes "
                                      "without activity; log in again.",
                                      minutes=f"{self.c.idle_seconds / 60:g}")
            return ctx.redirect("/console/login")
        if r.login and session.role not in r.roles:
            return ctx.page("error.html", 403, message=role_refusal(r.roles, session.role))
        if not r.login and session is None:
            session = ctx.session = self.c.sessions.new()
            ctx.set_cookie(session)
        return self._respond(ctx, maybeDeferred(r.handler, ctx))

    def _csrf_ok(self, session: ConsoleSession | None, form: dict[bytes, list[bytes]]) -> bool:
        if session is None:
            return False
        sent = form.get(b"csrf", [b""])[0]
        return bool(sent) and hmac.compare_digest(sent, session.csrf.encode())

    def _respond(self, ctx: Ctx, d: Deferred):
        """Answer at once if the handler was synchronous, else when its Deferred fires."""
        request = ctx.request
        state: dict[str, Any] = {}

        def done(body: bytes) -> None:
            if state.get("waiting"):
                _finish(request, body)
            else:
                state["body"] = body

        def failed(failure) -> None:
            if failure.check(PageError):
                body = ctx.page("error.html", failure.value.status, message=failure.value.message)
            else:
                log.failure("console request {path} failed", failure,
                            path=request.path.decode(errors="replace"))
                body = ctx.page("error.html", 500, message=Text("internal server error; see the server log"))
            done(body)

        d.addCallbacks(done, failed)
        if "body" in state:
            return state["body"]
        state["waiting"] = True
        return server.NOT_DONE_YET

    def _static(self, request: server.Request, name: str) -> bytes:
        if not STATIC_NAME.match(name) or not (OFFLINE_PAGES / "static" / name).is_file():
            ctx = Ctx(self.c, request, None, {}, None)
            return ctx.page("notfound.html", 404)
        _headers(request)
        request.setHeader(b"Content-Type", STATIC_TYPES[name.rsplit(".", 1)[1]])
        request.setHeader(b"Cache-Control", b"no-cache")
        return (OFFLINE_PAGES / "static" / name).read_bytes()


def _finish(request: server.Request, body: bytes) -> None:
    if not request.finished and not getattr(request, "_disconnected", False):
        request.write(body)
        request.finish()


def _multipart(request: server.Request) -> dict[bytes, list[bytes]] | None:
    """Twisted already parsed a multipart body into ``request.args`` (size-limited by the page)."""
    return dict(request.args)
