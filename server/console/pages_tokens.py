"""Host enrollment tokens of the admin's tenant: create (shown once, with the enroll command),
list with their state, revoke an unused one.

Only the token's hash is stored (``certificates.create_token``), so the token itself appears on
the answer to the create form and nowhere else.  Revoking sets ``expires_at`` to ``created_at``
(a lifetime of zero, which no created token has): enrollment refuses it as expired, the row
stays, and the list can still tell "revoked" from "expired".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from protocol.identity import fingerprint

from .. import accounts, certificates
from ..config import parse_duration
from ..db.models import EnrollmentToken, Host, HostGroup, Tenant
from ..i18n import Text
from ..pki import utcnow
from .core import MAX_ROWS, Ctx, PageError, route, term
from .pages_users import checked_groups, row_id, tenant_groups

TTL_CHOICES = ("15m", "1h", "1d", "7d", "30d")
MAX_TTL_SECONDS = 90 * 86400


def token_state(row: EnrollmentToken, now: dt.datetime) -> str:
    if row.used_at is not None:
        return "used"
    if row.expires_at <= row.created_at:
        return "revoked"
    return "expired" if row.expires_at <= now else "unused"


def _tokens(session, tenant_id: int) -> list[dict[str, Any]]:
    now = utcnow()
    rows = session.execute(
        select(EnrollmentToken, HostGroup.name, Host.name)
        .outerjoin(HostGroup, HostGroup.id == EnrollmentToken.group_id)
        .outerjoin(Host, Host.id == EnrollmentToken.used_by_host)
        .where(EnrollmentToken.tenant_id == tenant_id)
        .order_by(EnrollmentToken.created_at.desc(), EnrollmentToken.id.desc()).limit(MAX_ROWS))
    return [{"id": t.id, "group": group or "", "created_by": t.created_by, "created": t.created_at,
             "expires": t.expires_at, "used": t.used_at, "state": token_state(t, now),
             "host_id": t.used_by_host or "", "host_name": host or ""} for t, group, host in rows]


def listing(session, tenant_id: int) -> dict[str, Any]:
    return {"tokens": _tokens(session, tenant_id), "groups": tenant_groups(session, tenant_id)}


def ttl_choices(default: str) -> list[str]:
    return list(dict.fromkeys([default, *TTL_CHOICES]))


@dataclass(frozen=True)
class Created:
    token: str
    token_id: int
    group: str
    expires: dt.datetime


def _create(session, tenant_id: int, actor: str, group_id: str, ttl_text: str) -> Created:
    try:
        ttl = parse_duration(ttl_text)
    except ValueError as exc:
        raise accounts.AccountError(Text("lifetime: %(problem)s", problem=str(exc)))
    if ttl > MAX_TTL_SECONDS:
        raise accounts.AccountError(Text("lifetime: at most 90d; create a new token when one runs out"))
    group = None
    if group_id:
        group = checked_groups(session, tenant_id, [group_id])[0]
    tenant = session.get(Tenant, tenant_id)
    token, row = certificates.create_token(session, tenant, group, ttl, actor)
    accounts.audit(session, actor, "token.create",
                   f"id={row.id} group={group.name if group else '-'} ttl={int(ttl)}s",
                   tenant_id=tenant_id)
    return Created(token, row.id, group.name if group else "", row.expires_at)


def _ca_fingerprint(store) -> str:
    return fingerprint(store.ca_cert())


@route("GET", "tokens")
def tokens(ctx: Ctx):
    default = ctx.console.config.security.token_default_ttl
    d = ctx.run(listing, ctx.session.tenant_id)
    return d.addCallback(lambda data: ctx.page("tokens.html", notice=ctx.take_notice(),
                                               ttls=ttl_choices(default), ttl=default, **data))


@route("POST", "tokens/create", roles=("admin",))
def create(ctx: Ctx):
    default = ctx.console.config.security.token_default_ttl
    group_id = ctx.field("group", 20)
    ttl = ctx.field("ttl", 20).strip() or default
    d = ctx.run(_create, ctx.session.tenant_id, ctx.session.user, group_id, ttl)

    def shown(created: Created):
        # Reading the CA file is blocking, so it happens off the reactor like the database work.
        return ctx.run(lambda _s: _ca_fingerprint(ctx.console.store)).addCallback(
            lambda fp: ctx.page("tokens_created.html", created=created, fingerprint=fp,
                                server=ctx.console.base_url()))

    def refused(failure):
        failure.trap(accounts.AccountError)
        return ctx.run(listing, ctx.session.tenant_id).addCallback(
            lambda data: ctx.page("tokens.html", 400, error=failure.value,
                                  ttls=ttl_choices(default), ttl=ttl, **data))

    return d.addCallbacks(shown, refused)


def _revoke(session, tenant_id: int, actor: str, token_id: str) -> int:
    number = row_id(token_id)
    row = session.get(EnrollmentToken, number) if number is not None else None
    if row is None or row.tenant_id != tenant_id:
        raise PageError(404, Text("there is no enrollment token with id %(id)s in this tenant",
                                  id=token_id))
    now = utcnow()
    state = token_state(row, now)
    if state != "unused":
        raise PageError(409, Text("token %(id)s is %(state)s already; only an unused token can be "
                                  "revoked", id=row.id, state=term(state)))
    row.expires_at = row.created_at
    accounts.audit(session, actor, "token.revoke", f"id={row.id}", tenant_id=tenant_id)
    return row.id


@route("POST", "tokens/{token_id}/revoke", roles=("admin",))
def revoke(ctx: Ctx):
    d = ctx.run(_revoke, ctx.session.tenant_id, ctx.session.user, ctx.params["token_id"])

    def done(token_id: int):
        ctx.flash(Text("Token %(id)s revoked: it can no longer enroll a host.", id=token_id))
        return ctx.redirect("/console/tokens")

    return d.addCallback(done)
