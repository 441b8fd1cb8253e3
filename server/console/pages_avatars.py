"""Profile pictures in the console: ``/console/avatar/<user id>`` and the upload page.

``GET avatar/<id>`` (users of the viewer's own tenant only, others are 404) answers with the
uploaded picture, else — when the operator switched Gravatar on and the user has a mail address —
a 303 to the Gravatar URL, else the generated initials.  An uploaded picture that cannot be read
(S3 down) falls back to the initials and is logged.  ``/console/avatar`` lets the logged-in user
upload (checked and re-encoded by ``server.avatars``) or delete their own picture.

Gravatar pictures come from another origin, which the console's ``img-src 'self'`` refuses; the
origin allowed is kept in ``console.extras["img_origin"]`` while Gravatar is on, and this module's
own page sends it in its policy.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from protocol.runtime import run_blocking

from .. import accounts, avatars, settings_store
from ..db.models import User
from ..web import SECURITY_HEADERS
from ..i18n import Text
from .core import CSP, EVERYONE, IMG_ORIGIN, Ctx, PageError, route

log = Logger()



def avatar_store(console: Any) -> avatars.AvatarStore:
    """One store (and one boto3 client) per console."""
    store = console.extras.get("avatar_store")
    if store is None:
        store = console.extras["avatar_store"] = avatars.store_for(console.config)
    return store


def remember_gravatar(console: Any, on: bool) -> None:
    """Keep the Gravatar origin the console's img-src must allow (None while Gravatar is off)."""
    console.extras[IMG_ORIGIN] = avatars.origin(console.config.avatars.gravatar_url) if on else None


def _user_id(ctx: Ctx) -> int:
    text = ctx.params.get("user_id", "")
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise PageError(404, Text("no such user"))
    return int(text)


def _lookup(session, config: Any, tenant_id: int, user_id: int) -> dict[str, Any]:
    user = session.get(User, user_id)
    if user is None or user.tenant_id != tenant_id:
        raise PageError(404, Text("no such user in your tenant"))
    return {"name": user.name, "email": user.email or "", "key": user.avatar_key,
            "gravatar": settings_store.get(session, config, settings_store.GRAVATAR)}


def _image(ctx: Ctx, body: bytes, content_type: bytes) -> bytes:
    request = ctx.request
    request.setResponseCode(200)
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"Content-Security-Policy", CSP)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"private, no-store")
    return body


def _initials(ctx: Ctx, name: str) -> bytes:
    return _image(ctx, avatars.initials_svg(name), b"image/svg+xml")


@route("GET", "avatar/{user_id}", roles=EVERYONE)
def avatar(ctx: Ctx):
    user_id = _user_id(ctx)
    config = ctx.console.config

    def answer(user: dict[str, Any]):
        remember_gravatar(ctx.console, user["gravatar"])
        if user["key"]:
            d = run_blocking(avatar_store(ctx.console).load, user["key"])

            def unreadable(failure):
                log.warn("avatar of user {user_id} ({key}) cannot be read, showing initials: "
                         "{error}", user_id=user_id, key=user["key"], error=str(failure.value))
                return _initials(ctx, user["name"])
            return d.addCallbacks(lambda png: _image(ctx, png, b"image/png"), unreadable)
        if user["gravatar"] and user["email"]:
            return ctx.redirect(avatars.gravatar_url(config.avatars.gravatar_url, user["email"]))
        return _initials(ctx, user["name"])

    return ctx.run(_lookup, config, ctx.session.tenant_id, user_id).addCallback(answer)


# --- the upload page ----------------------------------------------------------------------------

def _page(ctx: Ctx, status: int | None = None, **values: Any):
    def show(user: dict[str, Any]) -> bytes:
        remember_gravatar(ctx.console, user["gravatar"])
        config = ctx.console.config
        body = ctx.page("avatar.html", status, user=user, max_kib=config.avatars.max_upload_kib,
                        storage=Text("the S3 bucket %(bucket)s", bucket=config.s3.bucket)
                        if config.s3.enabled else Text("this server's data folder"),
                        notice=ctx.take_notice(), **values)
        return body
    return ctx.run(_lookup, ctx.console.config, ctx.session.tenant_id, ctx.session.user_id
                   ).addCallback(show)


@route("GET", "avatar", roles=EVERYONE)
def avatar_page(ctx: Ctx):
    return _page(ctx)


def _record(session, user_id: int, actor: str, tenant_id: int, key: str | None) -> str | None:
    """Set the user's avatar key; returns the previous one (to delete if it differs)."""
    user = session.get(User, user_id)
    old, user.avatar_key = user.avatar_key, key
    accounts.audit(session, actor, "avatar.upload" if key else "avatar.delete",
                   f"user={user.name} stored={key or '-'}", tenant_id=tenant_id)
    return old


def _forget(ctx: Ctx, old: str | None, new: str | None):
    """Remove a picture no longer referenced (a failure only leaves an orphan, logged)."""
    if not old or old == new:
        return None
    d = run_blocking(avatar_store(ctx.console).delete, old)
    d.addErrback(lambda f: log.warn("could not delete the old avatar {key}: {error}", key=old,
                                    error=str(f.value)))
    return d


@route("POST", "avatar", roles=EVERYONE)
def upload(ctx: Ctx):
    data = (ctx.form.get(b"picture") or [b""])[0]
    max_kib = ctx.console.config.avatars.max_upload_kib
    store = avatar_store(ctx.console)
    session = ctx.session

    def store_it(png: bytes):
        return run_blocking(store.save, session.user_id, png)

    def record(key: str):
        d = ctx.run(_record, session.user_id, session.user, session.tenant_id, key)
        d.addCallback(lambda old: _forget(ctx, old, key))
        return d

    def done(_):
        log.info("console: {user} uploaded a profile picture", user=session.user)
        ctx.flash(Text("Your picture is saved."))
        return ctx.redirect("/console/avatar")

    def refused(failure):
        from ..s3store import S3Error
        failure.trap(avatars.AvatarError, S3Error, OSError)
        if not failure.check(avatars.AvatarError):
            log.warn("console: avatar of {user} not stored: {error}", user=session.user,
                     error=str(failure.value))
        status = 400 if failure.check(avatars.AvatarError) else 502
        return _page(ctx, status, error=Text("Not stored: %(reason)s",
                                             reason=ctx.say(failure.value)))

    d = run_blocking(avatars.clean_upload, data, max_kib)
    d.addCallback(store_it).addCallback(record)
    return d.addCallbacks(done, refused)


@route("POST", "avatar/delete", roles=EVERYONE)
def delete(ctx: Ctx):
    session = ctx.session

    def done(old: str | None):
        ctx.flash(Text("Your picture is deleted; the initials show again.") if old else
                  Text("You had no uploaded picture."))
        return ctx.redirect("/console/avatar")

    def cleared(old: str | None):
        d = _forget(ctx, old, None)
        return (d.addCallback(lambda _: old) if d is not None else old)

    d = ctx.run(_record, session.user_id, session.user, session.tenant_id, None)
    return d.addCallback(cleared).addCallback(done)
