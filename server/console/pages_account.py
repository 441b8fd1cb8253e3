"""The own account page: TOTP on and off (QR code drawn locally), the own password."""

from __future__ import annotations

import io

import pyotp
import segno
from twisted.logger import Logger

from .. import accounts
from ..db.models import User
from ..i18n import Text
from .auth import MAX_CODE, MAX_PASSWORD, _check_code, totp_uri
from .core import EVERYONE, Ctx, PageError, route

log = Logger()


def _setups(console) -> dict[str, str]:
    """TOTP secrets shown but not yet confirmed, per console session id."""
    return console.extras.setdefault("totp_setups", {})


def _me(session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None or user.disabled:
        raise PageError(403, Text("your user is disabled or gone; log in again"))
    return user


def _account(session, user_id: int) -> dict:
    user = _me(session, user_id)
    return {"name": user.name, "role": user.role.value, "tenant": user.tenant.name,
            "email": user.email or "", "totp": bool(user.totp_secret),
            "protocol_mail": bool(user.protocol_mail)}


def _account_page(ctx: Ctx, status: int | None = None, error=None):
    secret = _setups(ctx.console).get(ctx.session.id)
    issuer = ctx.console.config.console.totp_issuer if ctx.console.config else "Hausmeister"

    def show(me: dict) -> bytes:
        setup = None
        if secret and not me["totp"]:
            setup = {"secret": secret, "uri": totp_uri(secret, me["name"], issuer)}
        return ctx.page("account.html", status, me=me, setup=setup, error=error,
                        notice=ctx.take_notice())
    return ctx.run(_account, ctx.session.user_id).addCallback(show)


@route("GET", "account", roles=EVERYONE)
def account(ctx: Ctx):
    return _account_page(ctx)


@route("GET", "account/totp.svg", roles=EVERYONE)
def account_totp_qr(ctx: Ctx) -> bytes:
    """The QR code of the TOTP set-up being confirmed, drawn here (no outside service)."""
    secret = _setups(ctx.console).get(ctx.session.id)
    if not secret:
        raise PageError(404, Text("no TOTP set-up in progress; start it on the account page"))
    issuer = ctx.console.config.console.totp_issuer if ctx.console.config else "Hausmeister"
    out = io.BytesIO()
    # A standalone image needs the SVG namespace (an identifier; nothing is fetched from it).
    segno.make(totp_uri(secret, ctx.session.user, issuer), error="m").save(
        out, kind="svg", scale=5, border=2, xmldecl=False, svgns=True, title="TOTP key")
    ctx.headers()
    ctx.request.setHeader(b"Content-Type", b"image/svg+xml")
    ctx.request.setHeader(b"Cache-Control", b"no-store")
    return out.getvalue()


@route("POST", "account/totp/new", roles=EVERYONE)
def account_totp_new(ctx: Ctx):
    _setups(ctx.console)[ctx.session.id] = pyotp.random_base32()
    return ctx.redirect("/console/account#totp")


def _totp_enable(session, lockouts, user_id: int, secret: str, code: str, source: str) -> None:
    user = _me(session, user_id)
    if user.totp_secret:
        raise accounts.AccountError(Text("TOTP is already on for your user"))
    _check_code(session, lockouts, user, secret, code, source)
    user.totp_secret = secret
    accounts.audit(session, user.name, "totp.enable", f"user={user.name}", tenant_id=user.tenant_id)


def _totp_disable(session, lockouts, user_id: int, code: str, source: str) -> None:
    user = _me(session, user_id)
    if not user.totp_secret:
        raise accounts.AccountError(Text("TOTP is not on for your user"))
    _check_code(session, lockouts, user, user.totp_secret, code, source)
    user.totp_secret = None
    accounts.audit(session, user.name, "totp.disable", f"user={user.name}", tenant_id=user.tenant_id)


def _account_refused(ctx: Ctx):
    def refused(failure):
        failure.trap(accounts.AccountError)
        status = 429 if failure.check(accounts.LockedOut) else 400
        return _account_page(ctx, status, failure.value)
    return refused


@route("POST", "account/totp/confirm", roles=EVERYONE)
def account_totp_confirm(ctx: Ctx):
    secret = _setups(ctx.console).get(ctx.session.id)
    if not secret:
        raise PageError(409, Text("no TOTP set-up in progress; start it again on the account page"))
    code = ctx.field("code", MAX_CODE)

    def done(_):
        _setups(ctx.console).pop(ctx.session.id, None)
        ctx.flash(Text("TOTP is on: from now on the login asks for a code from your app."))
        return ctx.redirect("/console/account")
    return ctx.run(_totp_enable, ctx.console.lockouts, ctx.session.user_id,
                   secret, code, ctx.source).addCallbacks(done, _account_refused(ctx))


@route("POST", "account/totp/off", roles=EVERYONE)
def account_totp_off(ctx: Ctx):
    code = ctx.field("code", MAX_CODE)

    def done(_):
        ctx.flash(Text("TOTP is off: the login asks only for the password."))
        return ctx.redirect("/console/account")
    return ctx.run(_totp_disable, ctx.console.lockouts, ctx.session.user_id,
                   code, ctx.source).addCallbacks(done, _account_refused(ctx))


def _change_password(session, lockouts, user_id: int, current: str, new: str, source: str) -> str:
    user = _me(session, user_id)
    if user.directory_dn is not None:
        raise accounts.AccountError(Text("your password is your organisation's directory "
                                         "password; change it there"))
    try:
        accounts.authenticate(session, lockouts, user.name, current, source)
    except accounts.Refused as exc:  # counted like a failed login; worded for this form
        raise accounts.Refused(str(exc).replace("wrong user name or password",
                                                "the current password is wrong; nothing was changed"))
    user.password_hash = accounts.hash_password(new)
    accounts.audit(session, user.name, "password.change", f"user={user.name}", tenant_id=user.tenant_id)
    return user.name


@route("POST", "account/password", roles=EVERYONE)
def account_password(ctx: Ctx):
    current = ctx.field("current", MAX_PASSWORD)
    new, again = ctx.field("new", MAX_PASSWORD), ctx.field("again", MAX_PASSWORD)
    if new != again:
        return _account_page(ctx, 400, Text("the two new passwords differ; nothing was changed"))
    if len(new) < accounts.MIN_PASSWORD_LENGTH:
        return _account_page(ctx, 400, Text("the new password is too short: use at least "
                                            "%(n)s characters", n=accounts.MIN_PASSWORD_LENGTH))
    old = ctx.session

    def done(name: str) -> bytes:
        # Other browsers logged in as this user end; this one continues with a fresh id.
        d = ctx.console.sessions.drop_user(name)

        def fresh_session(_):
            fresh = ctx.console.sessions.login(old, old.user, old.role, old.tenant_id, old.tenant,
                                               user_id=old.user_id, operator=old.operator)
            fresh.notice = Text("Your password was changed; other console sessions of your user "
                                "ended.")
            ctx.set_cookie(fresh)
            return fresh.saved.addCallback(lambda _: ctx.redirect("/console/account"))
        return d.addCallback(fresh_session)
    return ctx.run(_change_password, ctx.console.lockouts, old.user_id, current, new,
                   ctx.source).addCallbacks(done, _account_refused(ctx))


def _protocol_mail(session, user_id: int, wanted: bool, source: str) -> str:
    user = _me(session, user_id)
    if wanted and not user.email:
        raise accounts.AccountError(Text("you have no mail address; ask an admin to set one first"))
    user.protocol_mail = wanted
    accounts.audit(session, user.name, "user.protocol_mail",
                   f"name={user.name} {'on' if wanted else 'off'} address={source}",
                   tenant_id=user.tenant_id)
    return (Text("Session protocols will be mailed to you after each session.") if wanted
            else Text("Session protocols are no longer mailed to you."))


@route("POST", "account/protocol-mail", roles=EVERYONE)
def account_protocol_mail(ctx: Ctx):
    """Opt in to (or out of) getting each session's protocol by mail."""
    wanted = ctx.field("on", 3) == "1"

    def done(message: Text) -> bytes:
        ctx.flash(message)
        return ctx.redirect("/console/account#protocol-mail")
    return ctx.run(_protocol_mail, ctx.session.user_id, wanted, ctx.source).addCallbacks(
        done, _account_refused(ctx))
