"""The hosts page: a tenant's hosts, online or offline, last seen, group, searchable."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select

from ..db.models import Host, HostGroup
from .core import MAX_QUERY, MAX_ROWS, Ctx, route


def _hosts(session, tenant_id: int, query: str) -> list[dict[str, Any]]:
    stmt = (select(Host, HostGroup.name).outerjoin(HostGroup, Host.group_id == HostGroup.id)
            .where(Host.tenant_id == tenant_id))
    if query:
        stmt = stmt.where(or_(Host.name.contains(query, autoescape=True),
                              HostGroup.name.contains(query, autoescape=True)))
    rows = session.execute(stmt.order_by(Host.name).limit(MAX_ROWS)).all()
    return [{"name": h.name, "id": h.id, "group": group or "", "online": bool(h.online),
             "last_seen": h.last_seen, "address": h.last_address or "",
             "version": h.module_version or ""} for h, group in rows]


@route("GET", "hosts")
def hosts(ctx: Ctx):
    query = ctx.arg("q", MAX_QUERY).strip()
    d = ctx.run(_hosts, ctx.session.tenant_id, query)
    return d.addCallback(lambda rows: ctx.page("hosts.html", hosts=rows, q=query,
                                               notice=ctx.take_notice()))
