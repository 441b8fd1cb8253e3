"""The sessions pages: a tenant's sessions, filterable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select

from ..db.models import Session as SessionRow
from .core import MAX_QUERY, MAX_ROWS, Ctx, route


def _sessions(session, tenant_id: int, query: str) -> list[dict[str, Any]]:
    stmt = select(SessionRow).where(SessionRow.tenant_id == tenant_id)
    if query:
        stmt = stmt.where(or_(SessionRow.supporter_identity.contains(query, autoescape=True),
                              SessionRow.peer_identity.contains(query, autoescape=True),
                              SessionRow.kind.contains(query, autoescape=True)))
    rows = session.scalars(stmt.order_by(SessionRow.created_at.desc()).limit(MAX_ROWS))
    return [{"id": s.id, "kind": s.kind, "supporter": s.supporter_identity or "",
             "peer": s.peer_identity or "", "peer_address": s.peer_address or "",
             "started": s.started_at or s.created_at, "ended": s.ended_at,
             "bytes_to_peer": s.bytes_to_peer or 0, "bytes_to_supporter": s.bytes_to_supporter or 0,
             "end_reason": s.end_reason or ""} for s in rows]


@route("GET", "sessions")
def sessions(ctx: Ctx):
    query = ctx.arg("q", MAX_QUERY).strip()
    d = ctx.run(_sessions, ctx.session.tenant_id, query)
    return d.addCallback(lambda rows: ctx.page("sessions.html", rows=rows, q=query))
