"""Users and roles of the admin's tenant: list, add with an invitation, change, disable.

Every query is scoped to ``ctx.session.tenant_id``: a user id of another tenant is "not found",
never shown or changed.  Auditors see the pages; only admins change anything, and an admin can
neither disable nor demote themselves (a tenant could lose its last admin that way).  A new
user gets an unusable random password and a single-use invitation link, mailed through the
outbox when a relay is configured, else shown once to the admin to hand over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from twisted.internet.defer import maybeDeferred

from .. import accounts, certificates, i18n, mail_texts, user_links
from ..config import parse_duration
from ..db.models import HostGroup, Role, Tenant, User, UserGroup
from ..i18n import N_, Text
from ..mail import _check_address
from .core import MAX_ROWS, Ctx, PageError, route, term

ROLES = tuple(r.value for r in Role)
MAX_NAME = 100
MAX_EMAIL = 255


@dataclass(frozen=True)
class Invitation:
    """What the admin is told after inviting: mailed to an address, or a link to hand over."""

    user: str
    mailed_to: str | None
    link: str | None


# --- reading ------------------------------------------------------------------------------------

def row_id(text: str) -> int | None:
    """A database id from a path or form value, or None ('²' and '1e3' are no ids)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) < 12 else None


def tenant_user(session, tenant_id: int, user_id: str) -> User:
    """The user with this id in this tenant; anything else is "not found" (no cross-tenant hint)."""
    number = row_id(user_id)
    user = session.get(User, number) if number is not None else None
    if user is None or user.tenant_id != tenant_id:
        raise PageError(404, Text("there is no user with id %(id)s in this tenant", id=user_id))
    return user


def tenant_groups(session, tenant_id: int) -> list[dict[str, Any]]:
    rows = session.scalars(select(HostGroup).where(HostGroup.tenant_id == tenant_id)
                           .order_by(HostGroup.name))
    return [{"id": g.id, "name": g.name} for g in rows]


def _groups_by_user(session, tenant_id: int) -> dict[int, list[str]]:
    rows = session.execute(select(UserGroup.user_id, HostGroup.name)
                           .join(HostGroup, HostGroup.id == UserGroup.group_id)
                           .where(HostGroup.tenant_id == tenant_id).order_by(HostGroup.name))
    out: dict[int, list[str]] = {}
    for user_id, name in rows:
        out.setdefault(user_id, []).append(name)
    return out


def _row(user: User, groups: list[str]) -> dict[str, Any]:
    return {"id": user.id, "name": user.name, "role": user.role.value, "email": user.email or "",
            "groups": groups, "totp": bool(user.totp_secret), "disabled": bool(user.disabled),
            "protocol_mail": bool(user.protocol_mail), "created": user.created_at,
            "language": user.language or ""}


def listing(session, tenant_id: int) -> dict[str, Any]:
    groups = _groups_by_user(session, tenant_id)
    users = session.scalars(select(User).where(User.tenant_id == tenant_id)
                            .order_by(User.name).limit(MAX_ROWS))
    return {"users": [_row(u, groups.get(u.id, [])) for u in users],
            "groups": tenant_groups(session, tenant_id)}


def detail(session, tenant_id: int, user_id: str) -> dict[str, Any]:
    user = tenant_user(session, tenant_id, user_id)
    member = set(accounts.memberships(session, user))
    return {"user": _row(user, sorted(member)), "groups": tenant_groups(session, tenant_id)}


# --- checks -------------------------------------------------------------------------------------

def checked_email(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if len(text) > MAX_EMAIL:
        raise accounts.AccountError(Text("the mail address is longer than %(n)s characters",
                                         n=MAX_EMAIL))
    try:
        return _check_address(text)
    except ValueError as exc:
        raise accounts.AccountError(str(exc))


def checked_groups(session, tenant_id: int, ids: list[str]) -> list[HostGroup]:
    """Host groups of this tenant by id; an id of another tenant is refused like an unknown one."""
    groups = []
    for raw in dict.fromkeys(ids):
        number = row_id(raw)
        group = session.get(HostGroup, number) if number is not None else None
        if group is None or group.tenant_id != tenant_id:
            raise accounts.AccountError(Text("there is no host group with id '%(id)s' in this "
                                             "tenant", id=raw))
        groups.append(group)
    return groups


def _set_groups(session, user: User, wanted: list[HostGroup], tenant_id: int) -> list[str]:
    ids = {g.id for g in wanted}
    for group in session.scalars(select(HostGroup).where(HostGroup.tenant_id == tenant_id)):
        accounts.set_membership(session, user, group, group.id in ids)
    return sorted(g.name for g in wanted)


# --- inviting -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class InviteContext:
    """What an invitation needs from the request (read on the reactor thread)."""

    actor: str
    tenant_id: int
    base_url: str
    ttl: str
    outbox: Any
    language: str = i18n.DEFAULT   # of the invitation, for a user who has chosen none yet


def invite(session, user: User, how: InviteContext) -> Invitation:
    """A fresh invitation link for ``user``; mailed in this transaction when possible."""
    token = user_links.issue(session, user, "invite", parse_duration(how.ttl))
    link = f"{how.base_url}/console/invite/{token}"
    if how.outbox is not None and user.email:
        language = user.language or how.language
        subject, body = mail_texts.invitation(how.base_url, user.name, how.actor, link,
                                              parse_duration(how.ttl), language=language)
        how.outbox.enqueue(session, user.email, subject, body)
        return Invitation(user.name, user.email, None)
    return Invitation(user.name, None, link)


def _add(session, how: InviteContext, name: str, role_text: str, email_text: str,
         group_ids: list[str], language: str | None = None) -> Invitation:
    role = accounts.parse_role(role_text)
    email = checked_email(email_text)
    groups = checked_groups(session, how.tenant_id, group_ids)
    if groups and role != Role.supporter:
        raise accounts.AccountError(Text("host groups limit supporters only; leave them empty "
                                         "for the role %(role)s", role=term(role.value)))
    tenant = session.get(Tenant, how.tenant_id)
    # A random password nobody learns: the user sets their own through the invitation link.
    try:
        user = accounts.add_user(session, tenant, name, role, accounts.generate_password(), email)
    except IntegrityError:  # the same name added at the same moment elsewhere
        raise accounts.AccountError(Text("user '%(name)s' already exists", name=name))
    _set_groups(session, user, groups, how.tenant_id)
    user.language = i18n.known(language)
    invitation = invite(session, user, how)
    accounts.audit(session, how.actor, "user.add",
                   f"name={name} role={role.value} email={email or '-'} "
                   f"groups={','.join(g.name for g in groups) or '-'} "
                   f"invitation={'mailed' if invitation.mailed_to else 'shown'}",
                   tenant_id=how.tenant_id)
    return invitation


def _invite_context(ctx: Ctx) -> InviteContext:
    return InviteContext(ctx.session.user, ctx.session.tenant_id, ctx.console.base_url(),
                         ctx.console.config.console.invitation_ttl, ctx.console.outbox, ctx.lang)


def _invitation_notice(inv: Invitation) -> Text:
    if inv.mailed_to:
        return Text("User %(user)s invited: the invitation mail to %(address)s is queued.",
                    user=inv.user, address=inv.mailed_to)
    return Text("User %(user)s invited. No invitation mail was sent: hand the link below to "
                "%(user)s; it is shown only now.", user=inv.user)


def _show_invitation(ctx: Ctx, inv: Invitation, back: str):
    """A mailed invitation: back to the page with a notice; a link: shown once, on this answer."""
    if inv.link is None:
        ctx.flash(_invitation_notice(inv))
        return ctx.redirect(back)
    d = ctx.run(listing, ctx.session.tenant_id)
    return d.addCallback(lambda data: ctx.page("users.html", notice=_invitation_notice(inv),
                                               invite_link=inv.link, invited=inv.user,
                                               form={}, roles=ROLES, **data))


# --- pages --------------------------------------------------------------------------------------

@route("GET", "users")
def users(ctx: Ctx):
    d = ctx.run(listing, ctx.session.tenant_id)
    return d.addCallback(lambda data: ctx.page("users.html", notice=ctx.take_notice(), form={},
                                               roles=ROLES, **data))


@route("POST", "users/add", roles=("admin",))
def add(ctx: Ctx):
    form = {"name": ctx.field("name", MAX_NAME * 2).strip(), "role": ctx.field("role", 20),
            "email": ctx.field("email", MAX_EMAIL * 2), "groups": ctx.fields("groups", 20),
            "language": ctx.field("language", 10) or ctx.lang}
    d = ctx.run(_add, _invite_context(ctx), form["name"], form["role"], form["email"],
                form["groups"], form["language"])

    def refused(failure):
        failure.trap(accounts.AccountError)
        return ctx.run(listing, ctx.session.tenant_id).addCallback(
            lambda data: ctx.page("users.html", 400, error=failure.value, form=form,
                                  roles=ROLES, **data))

    return d.addCallbacks(lambda inv: _show_invitation(ctx, inv, "/console/users"), refused)


@route("GET", "users/{user_id}")
def user_page(ctx: Ctx):
    d = ctx.run(detail, ctx.session.tenant_id, ctx.params["user_id"])
    return d.addCallback(lambda data: ctx.page("users_edit.html", notice=ctx.take_notice(),
                                               roles=ROLES, **data))


# Each change: (session, user, ctx-derived values) → audit detail; raises AccountError to refuse.

def _not_self(user: User, actor_id: int, refusal: Text) -> None:
    if user.id == actor_id:
        raise accounts.AccountError(refusal)


def change_role(session, user, actor_id, role_text):
    role = accounts.parse_role(role_text)
    if role != user.role:
        _not_self(user, actor_id, Text("you cannot change the role of yourself; ask another admin"))
    old, user.role = user.role, role
    return f"role {old.value} → {role.value}"


def change_email(session, user, actor_id, email_text):
    user.email = checked_email(email_text)
    if user.email is None:
        user.protocol_mail = False  # nowhere to send it
    return f"email={user.email or '-'}"


def change_disabled(session, user, actor_id, disabled):
    if disabled:
        _not_self(user, actor_id, Text("you cannot disable yourself; ask another admin"))
    user.disabled = disabled
    if disabled:  # its modules lose access and its live sessions end (the revocation watchers)
        revoked = certificates.revoke_identity(session, certificates.supporter_identity(user.name),
                                               "user disabled")
        return f"disabled revoked={len(revoked)}" if revoked else "disabled"
    return "enabled"


def reset_totp(session, user, actor_id):
    if not user.totp_secret:
        raise accounts.AccountError(Text("%(name)s has no TOTP to reset", name=user.name))
    user.totp_secret = None
    return "TOTP removed; the next login asks only for the password"


def change_protocol_mail(session, user, actor_id, wanted):
    if wanted and not user.email:
        raise accounts.AccountError(Text("%(name)s has no mail address; set one first",
                                         name=user.name))
    user.protocol_mail = wanted
    return f"protocol mail {'on' if wanted else 'off'}"


def change_language(session, user, actor_id, language_text):
    language = i18n.known(language_text)
    if language is None:
        raise accounts.AccountError(Text("choose one of these languages: %(languages)s",
                                         languages=", ".join(i18n.NAMES.values())))
    user.language = language
    return f"language={language}"


def change_groups(session, user, actor_id, group_ids):
    groups = checked_groups(session, user.tenant_id, group_ids)
    if groups and user.role != Role.supporter:
        raise accounts.AccountError(Text("host groups limit supporters only"))
    names = _set_groups(session, user, groups, user.tenant_id)
    return f"groups={','.join(names) or '-'}"


def _apply(session, tenant_id: int, user_id: str, actor: str, actor_id: int, action: str,
           change: Callable[..., str], args: tuple) -> str:
    user = tenant_user(session, tenant_id, user_id)
    said = change(session, user, actor_id, *args)
    accounts.audit(session, actor, action, f"name={user.name} {said}", tenant_id=tenant_id)
    return user.name


#: the notice after each change, by audit action
SAVED = {
    "user.role": N_("%(name)s: saved (role)."),
    "user.email": N_("%(name)s: saved (mail address)."),
    "user.disable": N_("%(name)s: saved (disabled)."),
    "user.enable": N_("%(name)s: saved (enabled)."),
    "user.totp_reset": N_("%(name)s: saved (TOTP reset)."),
    "user.protocol_mail": N_("%(name)s: saved (protocol mail)."),
    "user.groups": N_("%(name)s: saved (host groups)."),
    "user.language": N_("%(name)s: saved (language)."),
}


def _changed(ctx: Ctx, action: str, change: Callable[..., str], *args: Any,
             after: Callable[[str], None] | None = None):
    uid = ctx.params["user_id"]
    back = f"/console/users/{uid}"
    d = ctx.run(_apply, ctx.session.tenant_id, uid, ctx.session.user, ctx.session.user_id,
                action, change, args)

    def done(name: str):
        ctx.flash(Text(SAVED[action], name=name))
        if after:  # e.g. the user's console sessions end on every node before the answer
            return maybeDeferred(after, name).addCallback(lambda _: ctx.redirect(back))
        return ctx.redirect(back)

    def refused(failure):
        failure.trap(accounts.AccountError)
        return ctx.run(detail, ctx.session.tenant_id, uid).addCallback(
            lambda data: ctx.page("users_edit.html", 400, error=failure.value, roles=ROLES,
                                  **data))

    return d.addCallbacks(done, refused)


@route("POST", "users/{user_id}/role", roles=("admin",))
def post_role(ctx: Ctx):
    return _changed(ctx, "user.role", change_role, ctx.field("role", 20))


@route("POST", "users/{user_id}/email", roles=("admin",))
def post_email(ctx: Ctx):
    return _changed(ctx, "user.email", change_email, ctx.field("email", MAX_EMAIL * 2))


@route("POST", "users/{user_id}/disable", roles=("admin",))
def post_disable(ctx: Ctx):
    # Ends the user's console sessions at once, not at their next idle timeout.
    return _changed(ctx, "user.disable", change_disabled, True,
                    after=ctx.console.sessions.drop_user)


@route("POST", "users/{user_id}/enable", roles=("admin",))
def post_enable(ctx: Ctx):
    return _changed(ctx, "user.enable", change_disabled, False)


@route("POST", "users/{user_id}/totp-reset", roles=("admin",))
def post_totp_reset(ctx: Ctx):
    return _changed(ctx, "user.totp_reset", reset_totp)


@route("POST", "users/{user_id}/protocol-mail", roles=("admin",))
def post_protocol_mail(ctx: Ctx):
    return _changed(ctx, "user.protocol_mail", change_protocol_mail, ctx.field("on", 3) == "1")


@route("POST", "users/{user_id}/language", roles=("admin",))
def post_language(ctx: Ctx):
    return _changed(ctx, "user.language", change_language, ctx.field("language", 10))


@route("POST", "users/{user_id}/groups", roles=("admin",))
def post_groups(ctx: Ctx):
    return _changed(ctx, "user.groups", change_groups, ctx.fields("groups", 20))


def _reinvite(session, how: InviteContext, user_id: str) -> Invitation:
    user = tenant_user(session, how.tenant_id, user_id)
    if user.disabled:
        raise PageError(400, Text("%(name)s is disabled; enable the user before inviting again",
                                  name=user.name))
    invitation = invite(session, user, how)
    accounts.audit(session, how.actor, "user.invite",
                   f"name={user.name} invitation={'mailed' if invitation.mailed_to else 'shown'}",
                   tenant_id=how.tenant_id)
    return invitation


@route("POST", "users/{user_id}/invite", roles=("admin",))
def post_invite(ctx: Ctx):
    """A new invitation (the old link stops working): for a lost or expired one."""
    uid = ctx.params["user_id"]
    d = ctx.run(_reinvite, _invite_context(ctx), uid)
    return d.addCallback(lambda inv: _show_invitation(ctx, inv, f"/console/users/{uid}"))
