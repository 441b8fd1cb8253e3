"""Logging in and out of the console, the second factor (TOTP), and the warning page for links
that leave the network (the own account is ``pages_account``, reset and invitation links
``pages_links``).

Login checks the password through ``directory.signin.SignIn`` (a local account's argon2id hash,
else the organisation's directory when one is configured) under the server's lock-out per user
and per address; the lock-out message says how long to wait, and a directory that cannot be
reached says so (local break-glass admins still get in).  Admins and auditors work on their
tenant's pages; a supporter gets only the own account (password, TOTP, picture, protocol mail).
A user with a TOTP secret is not logged in after the password: a ``console_pending_logins`` row
(keyed by the hash of the pre-login cookie) waits up to 5 minutes for ``/console/login/totp`` to
get a current code, on any node (a load balancer may switch nodes between the two steps); the
row is used once.  Wrong
codes count in the same lock-out (plus ``totp:NAME``, which only a right code clears, so knowing
the password does not reset the count); a code is accepted once per time step.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from dataclasses import dataclass

import pyotp
from sqlalchemy import delete, func, or_, select, update
from twisted.logger import Logger

from .. import accounts
from ..directory.signin import DirectoryDown
from ..db import KeepChanges
from ..db.models import ConsolePendingLogin, Role, Tenant, User
from ..i18n import Text
from .core import EVERYONE, Ctx, landing, route
from .sessions import id_hash

log = Logger()

MAX_NAME = 200
MAX_PASSWORD = 1024
MAX_CODE = 20
PENDING_SECONDS = 300          # a password step waits this long for its TOTP code


@dataclass(frozen=True)
class LoginResult:
    user: str
    user_id: int
    role: str
    tenant_id: int
    tenant: str
    operator: bool
    totp: bool = False             # a code is still needed
    language: str | None = None    # the account's console language, if the user chose one


class PendingGone(KeepChanges):
    """No login of this browser waits for a code (never begun, used, or older than 5 min; an
    expired row is deleted: the refusal keeps that change)."""

    def __init__(self, expired: bool) -> None:
        super().__init__("no login waits for a code")
        self.expired = expired


# --- TOTP ---------------------------------------------------------------------------------------

def _accept_step(session, user_id: int, step: int) -> bool:
    """Record ``step`` as used unless it or a later one already was (one atomic UPDATE)."""
    return session.execute(
        update(User).where(User.id == user_id,
                           or_(User.totp_last_step.is_(None), User.totp_last_step < step))
        .values(totp_last_step=step)).rowcount == 1


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


def _check_code(session, lockouts: accounts.Lockouts, user: User, secret: str, code: str,
                source: str) -> None:
    """A current, unused code for ``user`` or ``Refused`` (counted in the lock-out)."""
    keys = [f"user:{user.name}", f"addr:{source}", f"totp:{user.name}"]
    lockouts.check(session, keys)
    step = totp_step(secret, code)
    if step is not None and _accept_step(session, user.id, step):
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

def _result(session, user: User, totp: bool) -> LoginResult:
    tenant = session.get(Tenant, user.tenant_id)
    first_tenant = session.scalar(select(func.min(Tenant.id)))
    return LoginResult(user.name, user.id, user.role.value, tenant.id, tenant.name,
                       operator=user.role == Role.admin and tenant.id == first_tenant,
                       totp=totp, language=user.language)


def _login(session, lockouts: accounts.Lockouts, user_id: int, source: str, pending_key: str,
           chosen: str | None, now: dt.datetime) -> LoginResult:
    """The login of a user whose password ``SignIn`` accepted (local or directory); with TOTP
    the login waits for its code in a row (``pending_key``: the pre-login cookie's hash)."""
    user = session.get(User, user_id)
    if user is None or user.disabled:
        raise accounts.AccountError(Text("this login is no longer valid; log in again"))
    lockouts.check(session, [f"totp:{user.name}"])
    result = _result(session, user, totp=bool(user.totp_secret))
    if user.totp_secret:
        session.execute(delete(ConsolePendingLogin).where(or_(
            ConsolePendingLogin.id_hash == pending_key,
            ConsolePendingLogin.created_at < now - dt.timedelta(seconds=PENDING_SECONDS))))
        session.add(ConsolePendingLogin(id_hash=pending_key, user_id=user.id, language=chosen,
                                        created_at=now))
    else:
        accounts.audit(session, user.name, "console.login", f"address={source}",
                       tenant_id=result.tenant_id)
    return result


def _pending_row(session, pending_key: str, now: dt.datetime) -> ConsolePendingLogin:
    row = session.get(ConsolePendingLogin, pending_key)
    if row is None:
        raise PendingGone(expired=False)
    if (now - row.created_at).total_seconds() > PENDING_SECONDS:
        session.delete(row)
        raise PendingGone(expired=True)
    return row


def _pending_name(session, pending_key: str, now: dt.datetime) -> str:
    """Whose login waits for a code in this browser (``PendingGone`` if none)."""
    user = session.get(User, _pending_row(session, pending_key, now).user_id)
    if user is None:
        raise PendingGone(expired=False)
    return user.name


def _login_totp(session, lockouts: accounts.Lockouts, pending_key: str, code: str,
                source: str, now: dt.datetime) -> tuple[LoginResult, str | None]:
    """The waiting login with its code: the result and the language chosen before; the row is
    gone after a right code (a wrong one is counted and leaves it)."""
    row = _pending_row(session, pending_key, now)
    user = session.get(User, row.user_id)
    if user is None or user.disabled or not user.totp_secret:
        raise accounts.AccountError(Text("this login is no longer valid; log in again"))
    _check_code(session, lockouts, user, user.totp_secret, code, source)
    chosen = row.language
    session.delete(row)
    result = _result(session, user, totp=False)
    accounts.audit(session, user.name, "console.login", f"address={source} totp",
                   tenant_id=result.tenant_id)
    return result, chosen


def _logout(session, user: str, tenant_id: int, source: str) -> None:
    accounts.audit(session, user, "console.logout", f"address={source}", tenant_id=tenant_id)


def _keep_language(session, user_id: int, language: str) -> None:
    """The language chosen before logging in becomes the account's if it has none yet."""
    session.execute(update(User).where(User.id == user_id, User.language.is_(None))
                    .values(language=language))


def _start_session(ctx: Ctx, result: LoginResult, chosen: str | None = None):
    chosen = chosen or ctx.session.language
    fresh = ctx.console.sessions.login(ctx.session, result.user, result.role, result.tenant_id,
                                       result.tenant, user_id=result.user_id,
                                       operator=result.operator, language=result.language)
    ctx.set_cookie(fresh)
    log.info("console: {user} logged in from {address}", user=result.user, address=ctx.source)
    d = fresh.saved  # in the database before the browser comes back (maybe to another node)
    if result.language is None and chosen:
        d.addCallback(lambda _: ctx.run(_keep_language, result.user_id, chosen))
    return d.addCallback(lambda _: ctx.redirect(landing(result.role)))


def _directory(ctx: Ctx) -> bool:
    """Whether directory accounts sign in here (the login page says so)."""
    return getattr(ctx.console.signin, "directory", None) is not None


def _refused(ctx: Ctx, template: str, who: str, **values):
    def refused(failure) -> bytes:
        failure.trap(accounts.AccountError)
        status = 429 if failure.check(accounts.LockedOut) else 401
        if failure.check(DirectoryDown):
            status = 503
        log.info("console: login refused for {user!r} from {address}: {reason}",
                 user=who, address=ctx.source, reason=str(failure.value))
        return ctx.page(template, status, error=failure.value, **values)
    return refused


@route("GET", "", login=True, roles=EVERYONE)
def home(ctx: Ctx) -> bytes:
    return ctx.redirect(landing(ctx.session.role))


@route("GET", "login", login=False)
def login_form(ctx: Ctx) -> bytes:
    if ctx.session.logged_in:
        return ctx.redirect(landing(ctx.session.role))
    return ctx.page("login.html", notice=ctx.take_notice(), name="", directory=_directory(ctx))


@route("POST", "login", login=False)
def login(ctx: Ctx):
    session = ctx.session
    if session.logged_in:
        return ctx.redirect(landing(ctx.session.role))
    name = ctx.field("user", MAX_NAME + 1).strip()
    password = ctx.field("password", MAX_PASSWORD + 1)
    shown_name = name[:MAX_NAME]
    if not name or not password or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
        return ctx.page("login.html", 400, error=Text("enter a user name and a password"),
                        name=shown_name, directory=_directory(ctx))

    def done(result: LoginResult) -> bytes:
        if result.totp:
            return ctx.redirect("/console/login/totp")
        return _start_session(ctx, result)

    d = ctx.console.signin.authenticate(name, password, ctx.source)
    d.addCallback(lambda user_id: ctx.run(_login, ctx.console.lockouts, user_id, ctx.source,
                                          id_hash(session.id), session.language,
                                          ctx.console.sessions.wall()))
    return d.addCallbacks(done, _refused(ctx, "login.html", shown_name, name=shown_name,
                                         directory=_directory(ctx)))


def _back_to_login(ctx: Ctx):
    def gone(failure) -> bytes:
        failure.trap(PendingGone)
        if failure.value.expired:
            ctx.flash(Text("The code was not entered in time; log in again."))
        return ctx.redirect("/console/login")
    return gone


@route("GET", "login/totp", login=False)
def totp_form(ctx: Ctx):
    if ctx.session.logged_in:
        return ctx.redirect(landing(ctx.session.role))
    d = ctx.run(_pending_name, id_hash(ctx.session.id), ctx.console.sessions.wall())
    return d.addCallbacks(lambda name: ctx.page("auth_totp.html", name=name),
                          _back_to_login(ctx))


@route("POST", "login/totp", login=False)
def login_totp(ctx: Ctx):
    if ctx.session.logged_in:
        return ctx.redirect(landing(ctx.session.role))
    code = ctx.field("code", MAX_CODE)
    key, wall = id_hash(ctx.session.id), ctx.console.sessions.wall

    def named(name: str):
        d = ctx.run(_login_totp, ctx.console.lockouts, key, code, ctx.source, wall())
        return d.addCallbacks(lambda found: _start_session(ctx, *found),
                              _refused(ctx, "auth_totp.html", name, name=name))
    d = ctx.run(_pending_name, key, wall()).addCallback(named)
    return d.addErrback(_back_to_login(ctx))


@route("POST", "logout", login=True, roles=EVERYONE)
def logout(ctx: Ctx):
    session = ctx.session
    d = ctx.console.sessions.drop(session)
    ctx.clear_cookie()
    d.addCallback(lambda _: ctx.run(_logout, session.user, session.tenant_id, ctx.source))
    return d.addCallback(lambda _: ctx.redirect("/console/login"))


@route("GET", "leave", login=False)
def leave(ctx: Ctx) -> bytes:
    """An outside target shown as text; the page never links to it."""
    return ctx.page("leave.html", target=ctx.arg("to", 2000))
