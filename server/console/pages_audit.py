"""The audit log of the admin's tenant: every admin action, newest first, filterable, in pages.

A tenant's admins and auditors see the entries of their tenant; operator admins also see the
server-wide ones (``tenant_id`` NULL: CLI actions that concern no single tenant).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select

from ..db.models import AuditEntry
from .core import MAX_QUERY, MAX_ROWS, Ctx, route

PAGE_SIZE = MAX_ROWS
MAX_PAGE = 10_000


def _entries(session, tenant_id: int, operator: bool, actor: str, action: str,
             page: int) -> dict[str, Any]:
    scope = AuditEntry.tenant_id == tenant_id
    if operator:
        scope = or_(scope, AuditEntry.tenant_id.is_(None))
    stmt = select(AuditEntry).where(scope)
    if actor:
        stmt = stmt.where(AuditEntry.actor.contains(actor, autoescape=True))
    if action:
        stmt = stmt.where(AuditEntry.action.contains(action, autoescape=True))
    # One row more than a page says whether an older page exists.
    rows = list(session.scalars(stmt.order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
                                .offset(page * PAGE_SIZE).limit(PAGE_SIZE + 1)))
    return {"entries": [{"id": e.id, "at": e.at, "actor": e.actor, "action": e.action,
                         "detail": e.detail or "", "server_wide": e.tenant_id is None}
                        for e in rows[:PAGE_SIZE]],
            "older": len(rows) > PAGE_SIZE}


def _page_number(text: str) -> int:
    return min(int(text), MAX_PAGE) if text.isascii() and text.isdigit() and len(text) < 8 else 0


@route("GET", "audit")
def audit(ctx: Ctx):
    actor = ctx.arg("actor", MAX_QUERY).strip()
    action = ctx.arg("action", MAX_QUERY).strip()
    page = _page_number(ctx.arg("page", 8))
    d = ctx.run(_entries, ctx.session.tenant_id, ctx.session.operator, actor, action, page)
    return d.addCallback(lambda data: ctx.page("audit.html", actor=actor, action=action, page=page,
                                               page_size=PAGE_SIZE, **data))
