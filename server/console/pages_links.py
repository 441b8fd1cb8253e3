"""Forgot password, and the single-use reset and invitation links (``user_links``).

The links set a password without being logged in; the forgot form answers the same whether the
user exists or not and is throttled per address.
"""

from __future__ import annotations

import dataclasses

from sqlalchemy import select
from twisted.logger import Logger

from .. import accounts, i18n, mail_texts, user_links
from ..config import parse_duration
from ..db.models import User
from ..i18n import N_, Text
from .core import Ctx, route

from .auth import MAX_NAME, MAX_PASSWORD

log = Logger()

DEFAULT_RESET_TTL = 3600.0     # without a config (bare ``WebPlane``): the config file's default
FORGOT_FREE_ATTEMPTS = 5       # forgot-password requests per address before the lock-out starts


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
            ttl_seconds: float, language: str = i18n.DEFAULT) -> None:
    """``language``: of the page the request came from, for a user who has chosen none."""
    """Queue a reset mail if the user can get one; the caller answers the same either way."""
    key = [f"forgot:{source}"]
    lockouts.check(session, key)
    lockouts.failed(session, key)  # every request counts: this throttles mail floods per address
    user = session.scalar(select(User).where(User.name == name))
    if (user is None or user.disabled or not user.email or outbox is None
            or user.directory_dn is not None):  # a directory password is reset in the directory
        log.info("console: no reset mail for {user!r} (unknown, disabled, no mail address, "
                 "directory user or mail off) from {address}", user=name, address=source)
        return
    token = user_links.issue(session, user, "reset", ttl_seconds)
    link = f"{base_url}/console/reset/{token}"
    subject, body = mail_texts.password_reset(base_url, user.name, link, ttl_seconds, source,
                                              language=user.language or language)
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
        return ctx.page("auth_forgot.html", 400, error=Text("enter your user name"),
                        name=name[:MAX_NAME],
                        sent=False, mail_on=mail_on)
    config = ctx.console.config
    ttl = parse_duration(config.console.reset_link_ttl) if config else DEFAULT_RESET_TTL

    def done(_):
        return ctx.page("auth_forgot.html", name=name, sent=True, mail_on=mail_on)

    def refused(failure):
        failure.trap(accounts.LockedOut)
        return ctx.page("auth_forgot.html", 429, error=failure.value, name=name, sent=False,
                        mail_on=mail_on)
    return ctx.run(_forgot, _forgot_lockouts(ctx.console), ctx.console.outbox, name, ctx.source,
                   ctx.console.base_url(), ttl, ctx.lang).addCallbacks(done, refused)


LINK_PAGES = {"reset": (N_("Set a new password"), "password.reset"),
              "invite": (N_("Set your password"), "password.first")}


def _title(purpose: str) -> Text:
    return Text(LINK_PAGES[purpose][0])


def _link_error(ctx: Ctx, purpose: str, error: user_links.LinkError) -> bytes:
    unknown = "is not valid" in str(error)
    return ctx.page("auth_link.html", 404 if unknown else 410, message=link_text(error),
                    title=_title(purpose))


#: what user_links says, as whole sentences per kind of link (its ``what`` is "reset"/"invitation")
LINK_MESSAGES = {
    "this password-reset link is not valid; ask an admin for a new one":
        N_("this password-reset link is not valid; ask an admin for a new one"),
    "this invitation link is not valid; ask an admin for a new one":
        N_("this invitation link is not valid; ask an admin for a new one"),
    "this password-reset link was already used; links work once — ask for a new one":
        N_("this password-reset link was already used; links work once — ask for a new one"),
    "this invitation link was already used; links work once — ask for a new one":
        N_("this invitation link was already used; links work once — ask for a new one"),
    "this password-reset link has expired; ask for a new one":
        N_("this password-reset link has expired; ask for a new one"),
    "this invitation link has expired; ask for a new one":
        N_("this invitation link has expired; ask for a new one"),
    "this password-reset link belongs to a user that is disabled or gone":
        N_("this password-reset link belongs to a user that is disabled or gone"),
    "this invitation link belongs to a user that is disabled or gone":
        N_("this invitation link belongs to a user that is disabled or gone"),
    "this link was just used; links work once — ask for a new one":
        N_("this link was just used; links work once — ask for a new one"),
}


def link_text(error: user_links.LinkError) -> "Text | str":
    message = str(error)
    return Text(LINK_MESSAGES[message]) if message in LINK_MESSAGES else message


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
                        title=_title(purpose))

    def bad(failure):
        failure.trap(user_links.LinkError)
        return _link_error(ctx, purpose, failure.value)
    return ctx.run(_link_user, token, purpose).addCallbacks(show, bad)


def _link_submit(ctx: Ctx, purpose: str):
    token = ctx.params["token"]
    password, again = ctx.field("password", MAX_PASSWORD), ctx.field("again", MAX_PASSWORD)

    def form_again(error: Text, status: int = 400):
        def show(name: str) -> bytes:
            return ctx.page("auth_password.html", status, purpose=purpose, token=token, name=name,
                            title=_title(purpose), error=error)
        return ctx.run(_link_user, token, purpose).addCallbacks(show, bad)

    def bad(failure):
        failure.trap(user_links.LinkError)
        return _link_error(ctx, purpose, failure.value)

    if password != again:
        return form_again(Text("the two passwords differ; nothing was changed"))
    if len(password) < accounts.MIN_PASSWORD_LENGTH:
        return form_again(Text("the password is too short: use at least %(n)s characters",
                               n=accounts.MIN_PASSWORD_LENGTH))

    def done(name: str) -> bytes:
        return ctx.console.sessions.drop_user(name).addCallback(ended_sessions, name)

    def ended_sessions(ended: int, name: str) -> bytes:
        log.info("console: {user} set a password by {purpose} link from {address} "
                 "({n} console sessions ended)", user=name, purpose=purpose, address=ctx.source, n=ended)
        if ctx.session is not None and ctx.session.user == name:
            ctx.clear_cookie()
        return ctx.page("auth_link.html", 200, title=_title(purpose), done=True, name=name,
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
