"""Logging in and out of the console, the second factor (TOTP), the own account page, password
reset and invitation links, and the warning page for links that leave the network.

Login checks the argon2id hash through ``accounts.authenticate`` under the server's lock-out per
user and per address; the lock-out message says how long to wait.  Only admins and auditors get a
console session.  A user with a TOTP secret is not logged in after the password: the session holds
the :class:`LoginResult` in ``pending`` until ``/console/login/totp`` gets a current code.  Wrong
codes count in the same lock-out (plus ``totp:NAME``, which only a right code clears, so knowing
the password does not reset the count); a code is accepted once per time step.

Reset and invitation links (``user_links``) set a password without being logged in; the forgot
form answers the same whether the user exists or not and is throttled per address.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import io
import threading
import time
from dataclasses import dataclass

import pyotp
import segno
from sqlalchemy import func, select
from twisted.logger import Logger

from .. import accounts, mail_texts, user_links
from ..config import parse_duration
from ..db.models import Role, Tenant, User
from .core import Ctx, PageError, _headers, route

log = Logger()

MAX_NAME = 200
MAX_PASSWORD = 1024
MAX_CODE = 20
CONSOLE_ROLES = (Role.admin, Role.auditor)
PENDING_SECONDS = 300          # a password step waits this long for its TOTP code
DEFAULT_RESET_TTL = 3600.0     # without a config (bare ``WebPlane``): the config file's default
FORGOT_FREE_ATTEMPTS = 5       # forgot-password requests per address before the lock-out starts


@dataclass(frozen=True)
class LoginResult:
    user: str
    user_id: int
    role: str
    tenant_id: int
    tenant: str
    operator: bool
    totp: bool = False             # a code is still needed
    since: float = 0.0             # when the password step passed (monotonic)


# --- TOTP ---------------------------------------------------------------------------------------

class UsedSteps:
    """The last accepted TOTP time step per user, so a code works once (in memory)."""

    def __init__(self) -> None:
        self._last: dict[int, int] = {}
        self._lock = threading.Lock()

    def accept(self, user_id: int, step: int) -> bool:
        with self._lock:
            if step <= self._last.get(user_id, -1):
                return False
            self._last[user_id] = step
            return True


def _used_steps(console) -> UsedSteps:
    return console.extras.setdefault("totp_used_steps", UsedSteps())


def totp_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (within ±1, ``valid_window=1``) whose code is ``code``, or None."""
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not (code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    moment = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc)
    current = totp.timecode(moment)
    for step in (current - 1, current, current + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step
    return None


def _check_code(session, lockouts: accounts.Lockouts, used: UsedSteps, user: User, secret: str,
                code: str, source: str) -> None:
    """A current, unused code for ``user`` or ``Refused`` (counted in the lock-out)."""
    keys = [f"user:{user.name}", f"addr:{source}", f"totp:{user.name}"]
    lockouts.check(session, keys)
    step = totp_step(secret, code)
    if step is not None and used.accept(user.id, step):
        lockouts.succeeded(session, [f"user:{user.name}", f"totp:{user.name}"])
        return
    wait = lockouts.failed(session, keys)
    message = ("this code was already used; wait for the next one" if step is not None
               else "wrong or expired code")
    if wait:
        message += f"; try again in {max(1, round(wait))} s"
    raise accounts.Refused(message)


def totp_uri(secret: str, user: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=user, issuer_name=issuer or "Hausmeister")


# --- login and logout ---------------------------------------------------------------------------

def _login(session, lockouts: accounts.Lockouts, name: str, password: str, source: str) -> LoginResult:
    user = accounts.authenticate(session, lockouts, name, password, source)
    if user.role not in CONSOLE_ROLES:
        raise accounts.AccountError(
            f"user {name!r} is a {user.role.value}; the console is for admins and auditors")
    lockouts.check(session, [f"totp:{user.name}"])
    tenant = session.get(Tenant, user.tenant_id)
    first_tenant = session.scalar(select(func.min(Tenant.id)))
    if not user.totp_secret:
        accounts.audit(session, user.name, "console.login", f"address={source}", tenant_id=tenant.id)
    return LoginResult(user.name, user.id, user.role.value, tenant.id, tenant.name,
                       operator=user.role == Role.admin and tenant.id == first_tenant,
                       totp=bool(user.totp_secret), since=time.monotonic())


def _login_totp(session, lockouts: accounts.Lockouts, used: UsedSteps, pending: LoginResult,
                code: str, source: str) -> LoginResult:
    user = session.get(User, pending.user_id)
    if user is None or user.disabled or not user.totp_secret:
        raise accounts.AccountError("this login is no longer valid; log in again")
    _check_code(session, lockouts, used, user, user.totp_secret, code, source)
    accounts.audit(session, user.name, "console.login", f"address={source} totp",
                   tenant_id=pending.tenant_id)
    return dataclasses.replace(pending, totp=False)


def _logout(session, user: str, tenant_id: int, source: str) -> None:
    accounts.audit(session, user, "console.logout", f"address={source}", tenant_id=tenant_id)


def _start_session(ctx: Ctx, result: LoginResult) -> bytes:
    fresh = ctx.console.sessions.login(ctx.session, result.user, result.role, result.tenant_id,
                                       result.tenant, user_id=result.user_id,
                                       operator=result.operator)
    ctx.set_cookie(fresh)
    log.info("console: {user} logged in from {address}", user=result.user, address=ctx.source)
    return ctx.redirect("/console/hosts")


def _refused(ctx: Ctx, template: str, who: str, **values):
    def refused(failure) -> bytes:
        failure.trap(accounts.AccountError)
        status = 429 if failure.check(accounts.LockedOut) else 401
        log.info("console: login refused for {user!r} from {address}: {reason}",
                 user=who, address=ctx.source, reason=str(failure.value))
        return ctx.page(template, status, error=str(failure.value), **values)
    return refused


@route("GET", "", login=True)
def home(ctx: Ctx) -> bytes:
    return ctx.redirect("/console/hosts")


@route("GET", "login", login=False)
def login_form(ctx: Ctx) -> bytes:
    if ctx.session.logged_in:
        return ctx.redirect("/console/hosts")
    ctx.session.pending = None
    return ctx.page("login.html", notice=ctx.take_notice(), name="")


@route("POST", "login", login=False)
def login(ctx: Ctx):
    session = ctx.session
    if session.logged_in:
        return ctx.redirect("/console/hosts")
    session.pending = None
    name = ctx.field("user", MAX_NAME + 1).strip()
    password = ctx.field("password", MAX_PASSWORD + 1)
    shown_name = name[:MAX_NAME]
    if not name or not password or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
        return ctx.page("login.html", 400, error="enter a user name and a password", name=shown_name)

    def done(result: LoginResult) -> bytes:
        if result.totp:
            session.pending = result
            return ctx.redirect("/console/login/totp")
        return _start_session(ctx, result)

    return ctx.run(_login, ctx.console.lockouts, name, password, ctx.source).addCallbacks(
        done, _refused(ctx, "login.html", shown_name, name=shown_name))


def _pending(ctx: Ctx) -> LoginResult | None:
    pending = ctx.session.pending
    if not isinstance(pending, LoginResult) or not pending.totp:
        return None
    if time.monotonic() - pending.since > PENDING_SECONDS:
        ctx.session.pending = None
        ctx.flash("The code was not entered in time; log in again.")
        return None
    return pending


@route("GET", "login/totp", login=False)
def totp_form(ctx: Ctx) -> bytes:
    if ctx.session.logged_in:
        return ctx.redirect("/console/hosts")
    pending = _pending(ctx)
    if pending is None:
        return ctx.redirect("/console/login")
    return ctx.page("auth_totp.html", name=pending.user)


@route("POST", "login/totp", login=False)
def login_totp(ctx: Ctx):
    if ctx.session.logged_in:
        return ctx.redirect("/console/hosts")
    pending = _pending(ctx)
    if pending is None:
        return ctx.redirect("/console/login")
    code = ctx.field("code", MAX_CODE)
    return ctx.run(_login_totp, ctx.console.lockouts, _used_steps(ctx.console), pending, code,
                   ctx.source).addCallbacks(lambda result: _start_session(ctx, result),
                                            _refused(ctx, "auth_totp.html", pending.user,
                                                     name=pending.user))


@route("POST", "logout", login=True)
def logout(ctx: Ctx):
    session = ctx.session
    ctx.console.sessions.drop(session)
    ctx.clear_cookie()
    d = ctx.run(_logout, session.user, session.tenant_id, ctx.source)
    return d.addCallback(lambda _: ctx.redirect("/console/login"))


@route("GET", "leave", login=False)
def leave(ctx: Ctx) -> bytes:
    """An outside target shown as text; the page never links to it."""
    return ctx.page("leave.html", target=ctx.arg("to", 2000))


# --- the own account: TOTP on/off, password -----------------------------------------------------

def _setups(console) -> dict[str, str]:
    """TOTP secrets shown but not yet confirmed, per console session id."""
    return console.extras.setdefault("totp_setups", {})


def _me(session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.disabled:
        raise PageError(403, "your user is disabled or gone; log in again")
    return user


def _account(session, user_id: int) -> dict:
    user = _me(session, user_id)
    return {"name": user.name, "role": user.role.value, "tenant": user.tenant.name,
            "email": user.email or "", "totp": bool(user.totp_secret),
            "protocol_mail": bool(user.protocol_mail)}


def _account_page(ctx: Ctx, status: int | None = None, error: str | None = None):
    secret = _setups(ctx.console).get(ctx.session.id)
    issuer = ctx.console.config.console.totp_issuer if ctx.console.config else "Hausmeister"

    def show(me: dict) -> bytes:
        setup = None
        if secret and not me["totp"]:
            setup = {"secret": secret, "uri": totp_uri(secret, me["name"], issuer)}
        return ctx.page("account.html", status, me=me, setup=setup, error=error,
                        notice=ctx.take_notice())
    return ctx.run(_account, ctx.session.user_id).addCallback(show)


@route("GET", "account")
def account(ctx: Ctx):
    return _account_page(ctx)


@route("GET", "account/totp.svg")
def account_totp_qr(ctx: Ctx) -> bytes:
    """The QR code of the TOTP set-up being confirmed, drawn here (no outside service)."""
    secret = _setups(ctx.console).get(ctx.session.id)
    if not secret:
        raise PageError(404, "no TOTP set-up in progress; start it on the account page")
    issuer = ctx.console.config.console.totp_issuer if ctx.console.config else "Hausmeister"
    out = io.BytesIO()
    # A standalone image needs the SVG namespace (an identifier; nothing is fetched from it).
    segno.make(totp_uri(secret, ctx.session.user, issuer), error="m").save(
        out, kind="svg", scale=5, border=2, xmldecl=False, svgns=True, title="TOTP key")
    _headers(ctx.request)
    ctx.request.setHeader(b"Content-Type", b"image/svg+xml")
    return out.getvalue()


@route("POST", "account/totp/new")
def account_totp_new(ctx: Ctx):
    _setups(ctx.console)[ctx.session.id] = pyotp.random_base32()
    return ctx.redirect("/console/account#totp")


def _totp_enable(session, lockouts, used, user_id: int, secret: str, code: str, source: str) -> None:
    user = _me(session, user_id)
    if user.totp_secret:
        raise accounts.AccountError("TOTP is already on for your user")
    _check_code(session, lockouts, used, user, secret, code, source)
    user.totp_secret = secret
    accounts.audit(session, user.name, "totp.enable", f"user={user.name}", tenant_id=user.tenant_id)


def _totp_disable(session, lockouts, used, user_id: int, code: str, source: str) -> None:
    user = _me(session, user_id)
    if not user.totp_secret:
        raise accounts.AccountError("TOTP is not on for your user")
    _check_code(session, lockouts, used, user, user.totp_secret, code, source)
    user.totp_secret = None
    accounts.audit(session, user.name, "totp.disable", f"user={user.name}", tenant_id=user.tenant_id)


def _account_refused(ctx: Ctx):
    def refused(failure):
        failure.trap(accounts.AccountError)
        status = 429 if failure.check(accounts.LockedOut) else 400
        return _account_page(ctx, status, str(failure.value))
    return refused


@route("POST", "account/totp/confirm")
def account_totp_confirm(ctx: Ctx):
    secret = _setups(ctx.console).get(ctx.session.id)
    if not secret:
        raise PageError(409, "no TOTP set-up in progress; start it again on the account page")
    code = ctx.field("code", MAX_CODE)

    def done(_):
        _setups(ctx.console).pop(ctx.session.id, None)
        ctx.flash("TOTP is on: from now on the login asks for a code from your app.")
        return ctx.redirect("/console/account")
    return ctx.run(_totp_enable, ctx.console.lockouts, _used_steps(ctx.console), ctx.session.user_id,
                   secret, code, ctx.source).addCallbacks(done, _account_refused(ctx))


@route("POST", "account/totp/off")
def account_totp_off(ctx: Ctx):
    code = ctx.field("code", MAX_CODE)

    def done(_):
        ctx.flash("TOTP is off: the login asks only for the password.")
        return ctx.redirect("/console/account")
    return ctx.run(_totp_disable, ctx.console.lockouts, _used_steps(ctx.console), ctx.session.user_id,
                   code, ctx.source).addCallbacks(done, _account_refused(ctx))


def _change_password(session, lockouts, user_id: int, current: str, new: str, source: str) -> str:
    user = _me(session, user_id)
    try:
        accounts.authenticate(session, lockouts, user.name, current, source)
    except accounts.Refused as exc:  # counted like a failed login; worded for this form
        raise accounts.Refused(str(exc).replace("wrong user name or password",
                                                "the current password is wrong; nothing was changed"))
    user.password_hash = accounts.hash_password(new)
    accounts.audit(session, user.name, "password.change", f"user={user.name}", tenant_id=user.tenant_id)
    return user.name


@route("POST", "account/password")
def account_password(ctx: Ctx):
    current = ctx.field("current", MAX_PASSWORD)
    new, again = ctx.field("new", MAX_PASSWORD), ctx.field("again", MAX_PASSWORD)
    if new != again:
        return _account_page(ctx, 400, "the two new passwords differ; nothing was changed")
    if len(new) < accounts.MIN_PASSWORD_LENGTH:
        return _account_page(ctx, 400, f"the new password is too short: use at least "
                             f"{accounts.MIN_PASSWORD_LENGTH} characters")
    old = ctx.session

    def done(name: str) -> bytes:
        # Other browsers logged in as this user end; this one continues with a fresh id.
        ctx.console.sessions.drop_user(name)
        fresh = ctx.console.sessions.login(old, old.user, old.role, old.tenant_id, old.tenant,
                                           user_id=old.user_id, operator=old.operator)
        fresh.notice = "Your password was changed; other console sessions of your user ended."
        ctx.set_cookie(fresh)
        return ctx.redirect("/console/account")
    return ctx.run(_change_password, ctx.console.lockouts, old.user_id, current, new,
                   ctx.source).addCallbacks(done, _account_refused(ctx))


# --- forgot password, reset and invitation links ------------------------------------------------

def _forgot_lockouts(console) -> accounts.Lockouts:
    """Its own counter per address (``forgot:IP``) so resets cannot lock anyone's login."""
    found = console.extras.get("forgot_lockouts")
    if found is None:
        policy = console.lockouts.policy
        found = accounts.Lockouts(dataclasses.replace(
            policy, free_attempts=max(FORGOT_FREE_ATTEMPTS, policy.free_attempts)), console.lockouts.now)
        console.extras["forgot_lockouts"] = found
    return found


def _forgot(session, lockouts: accounts.Lockouts, outbox, name: str, source: str, base_url: str,
            ttl_seconds: float) -> None:
    """Queue a reset mail if the user can get one; the caller answers the same either way."""
    key = [f"forgot:{source}"]
    lockouts.check(session, key)
    lockouts.failed(session, key)  # every request counts: this throttles mail floods per address
    user = session.scalar(select(User).where(User.name == name))
    if user is None or user.disabled or not user.email or outbox is None:
        log.info("console: no reset mail for {user!r} (unknown, disabled, no mail address or "
                 "mail off) from {address}", user=name, address=source)
        return
    token = user_links.issue(session, user, "reset", ttl_seconds)
    link = f"{base_url}/console/reset/{token}"
    subject, body = mail_texts.password_reset(base_url, user.name, link,
                                              mail_texts.ttl_text(ttl_seconds), source)
    outbox.enqueue(session, user.email, subject, body)
    accounts.audit(session, user.name, "password.reset-request", f"address={source}",
                   tenant_id=user.tenant_id)
    log.info("console: reset mail queued for {user} from {address}", user=user.name, address=source)


@route("GET", "forgot", login=False)
def forgot_form(ctx: Ctx) -> bytes:
    return ctx.page("auth_forgot.html", name="", sent=False, mail_on=ctx.console.outbox is not None)


@route("POST", "forgot", login=False)
def forgot(ctx: Ctx):
    name = ctx.field("user", MAX_NAME + 1).strip()
    mail_on = ctx.console.outbox is not None
    if not name or len(name) > MAX_NAME:
        return ctx.page("auth_forgot.html", 400, error="enter your user name", name=name[:MAX_NAME],
                        sent=False, mail_on=mail_on)
    config = ctx.console.config
    ttl = parse_duration(config.console.reset_link_ttl) if config else DEFAULT_RESET_TTL

    def done(_):
        return ctx.page("auth_forgot.html", name=name, sent=True, mail_on=mail_on)

    def refused(failure):
        failure.trap(accounts.LockedOut)
        return ctx.page("auth_forgot.html", 429, error=f"{failure.value}", name=name, sent=False,
                        mail_on=mail_on)
    return ctx.run(_forgot, _forgot_lockouts(ctx.console), ctx.console.outbox, name, ctx.source,
                   ctx.console.base_url(), ttl).addCallbacks(done, refused)


LINK_PAGES = {"reset": ("Set a new password", "password.reset"),
              "invite": ("Set your password", "password.first")}


def _link_error(ctx: Ctx, purpose: str, error: user_links.LinkError) -> bytes:
    unknown = "is not valid" in str(error)
    return ctx.page("auth_link.html", 404 if unknown else 410, message=str(error),
                    title=LINK_PAGES[purpose][0])


def _link_user(session, token: str, purpose: str) -> str:
    return user_links.check(session, token, purpose).name


def _set_by_link(session, lockouts: accounts.Lockouts, token: str, purpose: str, password: str,
                 source: str) -> str:
    password_hash = accounts.hash_password(password)
    user = user_links.redeem(session, token, purpose)
    user.password_hash = password_hash
    lockouts.succeeded(session, [f"user:{user.name}"])
    accounts.audit(session, user.name, LINK_PAGES[purpose][1],
                   f"user={user.name} address={source} by {purpose} link", tenant_id=user.tenant_id)
    return user.name


def _link_form(ctx: Ctx, purpose: str):
    token = ctx.params["token"]

    def show(name: str) -> bytes:
        return ctx.page("auth_password.html", purpose=purpose, token=token, name=name,
                        title=LINK_PAGES[purpose][0])

    def bad(failure):
        failure.trap(user_links.LinkError)
        return _link_error(ctx, purpose, failure.value)
    return ctx.run(_link_user, token, purpose).addCallbacks(show, bad)


def _link_submit(ctx: Ctx, purpose: str):
    token = ctx.params["token"]
    password, again = ctx.field("password", MAX_PASSWORD), ctx.field("again", MAX_PASSWORD)

    def form_again(error: str, status: int = 400):
        def show(name: str) -> bytes:
            return ctx.page("auth_password.html", status, purpose=purpose, token=token, name=name,
                            title=LINK_PAGES[purpose][0], error=error)
        return ctx.run(_link_user, token, purpose).addCallbacks(show, bad)

    def bad(failure):
        failure.trap(user_links.LinkError)
        return _link_error(ctx, purpose, failure.value)

    if password != again:
        return form_again("the two passwords differ; nothing was changed")
    if len(password) < accounts.MIN_PASSWORD_LENGTH:
        return form_again(f"the password is too short: use at least "
                          f"{accounts.MIN_PASSWORD_LENGTH} characters")

    def done(name: str) -> bytes:
        ended = ctx.console.sessions.drop_user(name)
        log.info("console: {user} set a password by {purpose} link from {address} "
                 "({n} console sessions ended)", user=name, purpose=purpose, address=ctx.source, n=ended)
        if ctx.session is not None and ctx.session.user == name:
            ctx.clear_cookie()
        return ctx.page("auth_link.html", 200, title=LINK_PAGES[purpose][0], done=True, name=name,
                        session=None)
    return ctx.run(_set_by_link, ctx.console.lockouts, token, purpose, password,
                   ctx.source).addCallbacks(done, bad)


@route("GET", "reset/{token}", login=False)
def reset_form(ctx: Ctx):
    return _link_form(ctx, "reset")


@route("POST", "reset/{token}", login=False)
def reset(ctx: Ctx):
    return _link_submit(ctx, "reset")


@route("GET", "invite/{token}", login=False)
def invite_form(ctx: Ctx):
    return _link_form(ctx, "invite")


@route("POST", "invite/{token}", login=False)
def invite(ctx: Ctx):
    return _link_submit(ctx, "invite")
