"""Single-use links mailed to users: ``invite`` (set the first password) and ``reset`` (set a new one).

The token is 128 random bits (``secrets``), shown only in the mail; the database keeps its
SHA-256.  A link works once and until it expires; issuing a new link of the same purpose for a
user voids the older ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from .db.models import User, UserLink

PURPOSES = ("invite", "reset")


class LinkError(ValueError):
    """The link is unknown, used or expired; the message says what to do."""


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue(session: Session, user: User, purpose: str, ttl_seconds: float,
          now: dt.datetime | None = None) -> str:
    """A new token for ``user``; older unused links of the same purpose stop working."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown link purpose {purpose!r}")
    now = now or _utcnow()
    session.execute(update(UserLink).where(UserLink.user_id == user.id, UserLink.purpose == purpose,
                                           UserLink.used_at.is_(None)).values(used_at=now))
    token = secrets.token_urlsafe(16)  # 128 bits
    session.add(UserLink(token_hash=_hash(token), user_id=user.id, purpose=purpose, created_at=now,
                         expires_at=now + dt.timedelta(seconds=ttl_seconds)))
    session.flush()
    return token


def _find(session: Session, token: str, purpose: str, now: dt.datetime) -> tuple[UserLink, User]:
    link = session.scalar(select(UserLink).where(UserLink.token_hash == _hash(token),
                                                 UserLink.purpose == purpose))
    what = "invitation" if purpose == "invite" else "password-reset"
    if link is None:
        raise LinkError(f"this {what} link is not valid; ask an admin for a new one")
    if link.used_at is not None:
        raise LinkError(f"this {what} link was already used; links work once — ask for a new one")
    if link.expires_at <= now:
        raise LinkError(f"this {what} link has expired; ask for a new one")
    user = session.get(User, link.user_id)
    if user is None or user.disabled:
        raise LinkError(f"this {what} link belongs to a user that is disabled or gone")
    return link, user


def check(session: Session, token: str, purpose: str, now: dt.datetime | None = None) -> User:
    """The user a valid, unused link belongs to (the link stays usable)."""
    return _find(session, token, purpose, now or _utcnow())[1]


def redeem(session: Session, token: str, purpose: str, now: dt.datetime | None = None) -> User:
    """Use the link once: marks it used atomically and returns its user."""
    now = now or _utcnow()
    link, user = _find(session, token, purpose, now)
    claimed = session.execute(update(UserLink).where(UserLink.id == link.id, UserLink.used_at.is_(None))
                              .values(used_at=now)).rowcount
    if claimed != 1:
        raise LinkError("this link was just used; links work once — ask for a new one")
    return user
