"""Logging in and out of the console, and the warning page for links that leave the network.

Login checks the argon2id hash through ``accounts.authenticate`` under the server's lock-out per
user and per address; the lock-out message says how long to wait.  Only admins and auditors get a
console session.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from twisted.logger import Logger

from .. import accounts
from ..db.models import Role, Tenant
from .core import Ctx, route

log = Logger()

MAX_NAME = 200
MAX_PASSWORD = 1024
CONSOLE_ROLES = (Role.admin, Role.auditor)


@dataclass(frozen=True)
class LoginResult:
    user: str
    user_id: int
    role: str
    tenant_id: int
    tenant: str
    operator: bool


def _login(session, lockouts: accounts.Lockouts, name: str, password: str, source: str) -> LoginResult:
    user = accounts.authenticate(session, lockouts, name, password, source)
    if user.role not in CONSOLE_ROLES:
        raise accounts.AccountError(
            f"user {name!r} is a {user.role.value}; the console is for admins and auditors")
    tenant = session.get(Tenant, user.tenant_id)
    first_tenant = session.scalar(select(func.min(Tenant.id)))
    accounts.audit(session, user.name, "console.login", f"address={source}", tenant_id=tenant.id)
    return LoginResult(user.name, user.id, user.role.value, tenant.id, tenant.name,
                       operator=user.role == Role.admin and tenant.id == first_tenant)


def _logout(session, user: str, tenant_id: int, source: str) -> None:
    accounts.audit(session, user, "console.logout", f"address={source}", tenant_id=tenant_id)


@route("GET", "", login=True)
def home(ctx: Ctx) -> bytes:
    return ctx.redirect("/console/hosts")


@route("GET", "login", login=False)
def login_form(ctx: Ctx) -> bytes:
    if ctx.session.logged_in:
        return ctx.redirect("/console/hosts")
    return ctx.page("login.html", notice=ctx.take_notice(), name="")


@route("POST", "login", login=False)
def login(ctx: Ctx):
    session = ctx.session
    if session.logged_in:
        return ctx.redirect("/console/hosts")
    name = ctx.field("user", MAX_NAME + 1).strip()
    password = ctx.field("password", MAX_PASSWORD + 1)
    shown_name = name[:MAX_NAME]
    if not name or not password or len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
        return ctx.page("login.html", 400, error="enter a user name and a password", name=shown_name)
    source = ctx.source

    def done(result: LoginResult) -> bytes:
        fresh = ctx.console.sessions.login(session, result.user, result.role, result.tenant_id,
                                           result.tenant, user_id=result.user_id,
                                           operator=result.operator)
        ctx.set_cookie(fresh)
        log.info("console: {user} logged in from {address}", user=result.user, address=source)
        return ctx.redirect("/console/hosts")

    def refused(failure) -> bytes:
        failure.trap(accounts.AccountError)
        status = 429 if failure.check(accounts.LockedOut) else 401
        log.info("console: login refused for {user!r} from {address}: {reason}",
                 user=shown_name, address=source, reason=str(failure.value))
        return ctx.page("login.html", status, error=str(failure.value), name=shown_name)

    return ctx.run(_login, ctx.console.lockouts, name, password, source).addCallbacks(done, refused)


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
