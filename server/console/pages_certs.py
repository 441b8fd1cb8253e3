"""Certificates of the admin's tenant: the CA to download with its fingerprint, the module
certificates of the tenant's hosts and users, and revocation with a reason.

A module certificate names its owner in the SAN URI (``hausmeister:host:<host id>`` or
``hausmeister:supporter:<user name>``); it belongs to a tenant through that host or user.  The
server certificate belongs to no tenant: only operator admins see it, and nobody revokes it
here (it is replaced with ``hausmeister-server cert install``).  The server's revocation poller
drops a revoked module's live connections.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import literal, select

from protocol.identity import SCHEME, Identity, IdentityError, fingerprint

from .. import accounts, certificates, pki
from ..db.models import Certificate, CertRole, Host, User
from ..i18n import Text
from ..pki import utcnow
from .core import MAX_ROWS, Ctx, PageError, route

HOST_PREFIX = f"{SCHEME}:host:"
SUPPORTER_PREFIX = f"{SCHEME}:supporter:"
MAX_REASON = 200


def cert_state(row: Certificate, now: dt.datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    return "expired" if row.not_after <= now else "valid"


def _row(cert: Certificate, owner: str, now: dt.datetime) -> dict[str, Any]:
    return {"serial": cert.serial, "role": cert.role.value, "identity": cert.identity,
            "owner": owner, "not_after": cert.not_after, "issued": cert.issued_at,
            "state": cert_state(cert, now), "revoked_at": cert.revoked_at,
            "reason": cert.revocation_reason or "", "replaced_by": cert.replaced_by or ""}


def tenant_certificates(session, tenant_id: int, operator: bool) -> list[dict[str, Any]]:
    """Newest first: certificates of the tenant's hosts and users (and the server's, for operators)."""
    now = utcnow()
    hosts = session.execute(
        select(Certificate, Host.name)
        .join(Host, Certificate.identity == literal(HOST_PREFIX).concat(Host.id))
        .where(Host.tenant_id == tenant_id).order_by(Certificate.issued_at.desc()).limit(MAX_ROWS))
    users = session.execute(
        select(Certificate, User.name)
        .join(User, Certificate.identity == literal(SUPPORTER_PREFIX).concat(User.name))
        .where(User.tenant_id == tenant_id).order_by(Certificate.issued_at.desc()).limit(MAX_ROWS))
    rows = [_row(c, name, now) for c, name in [*hosts, *users]]
    if operator:
        servers = session.scalars(select(Certificate).where(Certificate.role == CertRole.server)
                                  .order_by(Certificate.issued_at.desc()).limit(MAX_ROWS))
        rows += [_row(c, "", now) for c in servers]  # the template names "this server"
    rows.sort(key=lambda r: (r["issued"], r["serial"]), reverse=True)
    return rows[:MAX_ROWS]


def belongs_to(session, cert: Certificate, tenant_id: int) -> bool:
    """Whether a module certificate's host or user is in this tenant (never the server's)."""
    if cert.role == CertRole.server:
        return False
    try:
        identity = Identity.parse(cert.identity)
    except IdentityError:
        return False
    if identity.role == "host":
        host = session.get(Host, identity.name)
        return host is not None and host.tenant_id == tenant_id
    user = session.scalar(select(User).where(User.name == identity.name))
    return user is not None and user.tenant_id == tenant_id


def _ca(session, store) -> dict[str, Any]:
    ca = store.ca_cert()
    return {"ca_fingerprint": fingerprint(ca), "ca_subject": ca.subject.rfc4514_string(),
            "ca_not_after": ca.not_valid_after_utc}


def _page_data(session, store, tenant_id: int, operator: bool) -> dict[str, Any]:
    return {"certs": tenant_certificates(session, tenant_id, operator), **_ca(session, store)}


@route("GET", "certificates")
def certificates_page(ctx: Ctx):
    d = ctx.run(_page_data, ctx.console.store, ctx.session.tenant_id, ctx.session.operator)
    return d.addCallback(lambda data: ctx.page("certificates.html", notice=ctx.take_notice(),
                                               **data))


@route("GET", "certificates/ca.pem")
def ca_pem(ctx: Ctx):
    d = ctx.run(lambda _s: pki.cert_pem(ctx.console.store.ca_cert()))
    return d.addCallback(lambda pem: ctx.download(pem, b"application/x-pem-file",
                                                  "hausmeister-ca.pem"))


def _revoke(session, tenant_id: int, actor: str, serial: str, reason: str) -> dict[str, str]:
    serial = serial.lower()
    cert = session.get(Certificate, serial)
    if cert is None or not belongs_to(session, cert, tenant_id):
        # Another tenant's serial reads exactly like an unknown one.
        raise PageError(404, Text("there is no certificate with serial %(serial)s in this tenant",
                                  serial=serial))
    if cert.revoked_at is not None:
        raise PageError(409, Text("certificate %(serial)s is already revoked", serial=serial))
    certificates.revoke(session, cert.serial, reason)
    accounts.audit(session, actor, "certificate.revoke",
                   f"serial={cert.serial} identity={cert.identity} reason={reason}",
                   tenant_id=tenant_id)
    return {"serial": cert.serial, "identity": cert.identity}


@route("POST", "certificates/{serial}/revoke", roles=("admin",))
def revoke(ctx: Ctx):
    reason = " ".join(ctx.field("reason", MAX_REASON).split())
    if not reason:
        raise PageError(400, Text("give a reason for the revocation; nothing was revoked"))
    d = ctx.run(_revoke, ctx.session.tenant_id, ctx.session.user, ctx.params["serial"], reason)

    def done(revoked: dict[str, str]):
        ctx.flash(Text("Certificate %(serial)s (%(identity)s) revoked; a module still connected "
                       "with it is disconnected.", **revoked))
        return ctx.redirect("/console/certificates")

    return d.addCallback(done)
