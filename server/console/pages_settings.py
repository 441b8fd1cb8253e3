"""The settings page: server-wide settings, for admins of the operator's tenant only.

Shown from the config file (read only): the SMTP relay and the S3 endpoint — both widen the
server's egress allow-list, so the console cannot change them.  They can be tried: a test mail
goes through the outbox, the S3 test runs head_bucket and put/get/delete of a small object.
Changed here (``server.settings_store``, audited): the Gravatar switch, the ad-hoc support terms
(live in the broker at once) and the protocol retention.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from twisted.logger import Logger

from protocol.runtime import run_blocking

from .. import accounts, mail_texts, settings_store
from ..db.models import OutboxMail
from ..i18n import Plural, Text
from ..mail import FAILED, MailDisabled
from ..s3store import CheckReport
from .core import MAX_FORM_BYTES, Ctx, PageError, route
from .pages_avatars import avatar_store, remember_gravatar

log = Logger()

MAX_ADDRESS = 320
LAST_FAILURES = 5
NO_RELAY = Text("no SMTP relay configured; set [mail] smtp_host in the config file")


def _operator(ctx: Ctx) -> None:
    if not ctx.session.operator:
        raise PageError(403, Text("the settings are server-wide: only admins of the operator's "
                                  "tenant may see or change them"))


def _state(session, console: Any) -> dict[str, Any]:
    """Everything the page shows that comes from the database (blocking)."""
    values = settings_store.all_settings(session, console.config)
    state: dict[str, Any] = {"values": values, "changes": settings_store.changes(session),
                             "counts": None, "failures": []}
    if console.outbox is not None:
        state["counts"] = console.outbox.counts()
        rows = session.scalars(select(OutboxMail).where(OutboxMail.status == FAILED)
                               .order_by(OutboxMail.id.desc()).limit(LAST_FAILURES))
        state["failures"] = [{"to": r.to_address, "subject": r.subject, "error": r.last_error or "",
                              "at": r.next_attempt_at} for r in rows]
    return state


def _render(ctx: Ctx, status: int | None = None, **extra: Any):
    def show(state: dict[str, Any]) -> bytes:
        remember_gravatar(ctx.console, state["values"][settings_store.GRAVATAR])
        config = ctx.console.config
        values = dict(state, mail=config.mail, s3=config.s3, gravatar_url=config.avatars.gravatar_url,
                      max_terms=settings_store.MAX_TERMS, notice=ctx.take_notice())
        values.update(extra)
        values.setdefault("form", {})
        return ctx.page("settings.html", status, **values)
    def with_recording(state: dict[str, Any]):
        def add(policies: dict[str, Any]) -> dict[str, Any]:
            state["recording"] = policies
            return state
        return ctx.run(_recording_policies, ctx.session.tenant_id, ctx.console.config).addCallback(add)
    return ctx.run(_state, ctx.console).addCallback(with_recording).addCallback(show)


def _recording_policies(session, tenant_id: int, config: Any) -> dict[str, Any]:
    """The recording policy of this tenant and its host groups (set with ``hausmeister-server
    recording policy``; shown here, read only)."""
    from ..db.models import HostGroup, Tenant
    tenant = session.get(Tenant, tenant_id)
    groups = session.scalars(select(HostGroup).where(HostGroup.tenant_id == tenant_id)
                             .order_by(HostGroup.name))
    return {"default": config.recording.default_policy, "storage": config.recording.storage,
            "tenant": tenant.recording_policy if tenant else None, "tenant_name": tenant.name if tenant else "",
            "groups": [(g.name, g.recording_policy) for g in groups],
            "auditor_key": bool(config.recording.auditor_key), "input": config.recording.input}


@route("GET", "settings", roles=("admin",))
def settings_page(ctx: Ctx):
    _operator(ctx)
    return _render(ctx)


# --- mail ---------------------------------------------------------------------------------------

def _queue_test_mail(session, outbox: Any, actor: str, tenant_id: int, to: str, base_url: str,
                     language: str) -> None:
    subject, body = mail_texts.test_mail(base_url, actor, language=language)
    outbox.enqueue(session, to, subject, body)
    accounts.audit(session, actor, "settings.mail_test", f"to={to}", tenant_id=tenant_id)


@route("POST", "settings/mail-test", roles=("admin",))
def mail_test(ctx: Ctx):
    _operator(ctx)
    to = ctx.field("to", MAX_ADDRESS).strip()
    if ctx.console.outbox is None or not ctx.console.config.mail.enabled:
        return _render(ctx, 409, mail_error=NO_RELAY, form={"to": to})
    if not to:
        return _render(ctx, 400, mail_error=Text("enter the address the test mail goes to"),
                       form={"to": to})

    def done(_):
        ctx.flash(Text("Test mail to %(to)s queued; it goes out through the relay within "
                       "seconds (see the counts below).", to=to))
        return ctx.redirect("/console/settings")

    def refused(failure):
        failure.trap(ValueError, MailDisabled)
        message = NO_RELAY if failure.check(MailDisabled) else failure.value
        return _render(ctx, 400, mail_error=message, form={"to": to})

    d = ctx.run(_queue_test_mail, ctx.console.outbox, ctx.session.user, ctx.session.tenant_id, to,
                ctx.console.base_url(), ctx.lang)
    return d.addCallbacks(done, refused)


# --- S3 -----------------------------------------------------------------------------------------

def _audit(session, actor: str, tenant_id: int, action: str, detail: str) -> None:
    accounts.audit(session, actor, action, detail, tenant_id=tenant_id)


@route("POST", "settings/s3-test", roles=("admin",))
def s3_test(ctx: Ctx):
    _operator(ctx)
    store = avatar_store(ctx.console).s3
    if store is None:
        return _render(ctx, 409, s3_report=CheckReport(error=Text(
            "S3 is off: set [s3] enabled = true, endpoint_url and bucket in the config file")))

    def done(report: CheckReport):
        if not report.ok:
            log.warn("console: S3 test by {user} failed: {error}", user=ctx.session.user,
                     error=report.error)
        detail = "ok" if report.ok else report.error
        d = ctx.run(_audit, ctx.session.user, ctx.session.tenant_id, "settings.s3_test", detail[:500])
        return d.addCallback(lambda _: _render(ctx, 200 if report.ok else 502, s3_report=report))

    return run_blocking(store.test).addCallback(done)


# --- stored settings ----------------------------------------------------------------------------

def _store(session, key: str, value: Any, actor: str, tenant_id: int) -> Any:
    clean = settings_store.put(session, key, value, actor)
    shown = clean if key != settings_store.SUPPORT_TERMS else f"{len(clean)} characters"
    accounts.audit(session, actor, f"settings.{key}", f"{key}={shown}", tenant_id=tenant_id)
    return clean


def _change(ctx: Ctx, key: str, value: Any, message, apply=None):
    def done(clean: Any):
        if apply is not None:
            apply(clean)
        ctx.flash(message(clean))
        return ctx.redirect("/console/settings")

    def refused(failure):
        failure.trap(settings_store.SettingError)
        return _render(ctx, 400, setting_error=failure.value, form={key: value})

    d = ctx.run(_store, key, value, ctx.session.user, ctx.session.tenant_id)
    return d.addCallbacks(done, refused)


@route("POST", "settings/gravatar", roles=("admin",))
def gravatar(ctx: Ctx):
    _operator(ctx)
    value = ctx.field("gravatar", 10)
    return _change(ctx, settings_store.GRAVATAR, value,
                   lambda on: Text("Gravatar is on: users with a mail address and no uploaded "
                                   "picture show their Gravatar.") if on else
                   Text("Gravatar is off: pictures come only from this server."),
                   lambda on: remember_gravatar(ctx.console, on))


@route("POST", "settings/terms", roles=("admin",))
def terms(ctx: Ctx):
    _operator(ctx)
    text = ctx.field("terms", MAX_FORM_BYTES)  # the store says what is too long

    def apply(clean: str) -> None:
        if ctx.console.broker is not None:
            ctx.console.broker.terms = clean

    return _change(ctx, settings_store.SUPPORT_TERMS, text,
                   lambda clean: Plural("Support terms saved (%(num)s character); new ad-hoc "
                                        "sessions show them from now on.",
                                        "Support terms saved (%(num)s characters); new ad-hoc "
                                        "sessions show them from now on.", len(clean)), apply)


@route("POST", "settings/retention", roles=("admin",))
def retention(ctx: Ctx):
    _operator(ctx)
    days = ctx.field("days", 20)
    return _change(ctx, settings_store.RETENTION_DAYS, days,
                   lambda d: Text("Retention: protocols are kept forever.") if d == 0 else
                   Plural("Retention: session protocols older than %(num)s day are deleted at "
                          "the next daily run.",
                          "Retention: session protocols older than %(num)s days are deleted at "
                          "the next daily run.", d))
