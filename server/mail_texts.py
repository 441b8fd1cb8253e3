"""Subject and body of every mail the server sends: invitation, password reset, alerts, protocols.

Only text: plain ``(subject, body)`` pairs.  Queuing them (``Outbox.enqueue``) is the caller's
job.  Values from users (names, protocol lines) end up in a text/plain mail, so nothing here is
HTML-escaped; line breaks in one-line values are flattened so they cannot forge header-like lines
in a subject.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

SIGNATURE = "-- \nHausmeister remote support server\n"


def _line(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (subjects and names)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def ttl_text(seconds: float) -> str:
    """A duration as people say it: '1 hour', '7 days', '90 seconds'."""
    seconds = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def invitation(base_url: str, user_name: str, inviter: str, link: str, ttl_text: str) -> tuple[str, str]:
    """The mail to a new user with the single-use link to set the first password."""
    subject = _line(f"Hausmeister: your account {user_name}")
    body = (f"Hello,\n\n"
            f"{_line(inviter)} created the account \"{_line(user_name)}\" for you on the Hausmeister "
            f"server {base_url}.\n\n"
            f"Set your password here (the link works once and for {ttl_text}):\n\n"
            f"  {link}\n\n"
            f"Then log in with the user name \"{_line(user_name)}\".\n"
            f"If you did not expect this mail, ignore it; nothing happens without the link.\n\n"
            + SIGNATURE)
    return subject, body


def password_reset(base_url: str, user_name: str, link: str, ttl_text: str, source: str) -> tuple[str, str]:
    """The mail with the single-use link to set a new password."""
    subject = _line(f"Hausmeister: reset the password of {user_name}")
    body = (f"Hello,\n\n"
            f"someone (address {_line(source, 100)}) asked to reset the password of the account "
            f"\"{_line(user_name)}\" on the Hausmeister server {base_url}.\n\n"
            f"Set a new password here (the link works once and for {ttl_text}):\n\n"
            f"  {link}\n\n"
            f"If that was not you, ignore this mail: your password stays as it is.\n\n"
            + SIGNATURE)
    return subject, body


def cert_expiry_alert(base_url: str, what: str, subject_name: str, serial: str,
                      not_after: dt.datetime, days_left: int) -> tuple[str, str]:
    """Alert: a certificate of the server or the CA expires soon (or already did)."""
    when = not_after.strftime("%Y-%m-%d %H:%M UTC")
    state = "has expired" if days_left < 0 else f"expires in {days_left} day{'s' if days_left != 1 else ''}"
    subject = _line(f"Hausmeister alert: the {what} certificate {state}")
    body = (f"The {what} certificate of the Hausmeister server {base_url} {state}.\n\n"
            f"  subject:   {_line(subject_name)}\n"
            f"  serial:    {serial}\n"
            f"  not after: {when}\n\n"
            f"Renew it before that date; modules and browsers refuse an expired certificate.\n"
            f"This alert is sent once per certificate.\n\n"
            + SIGNATURE)
    return subject, body


def disk_alert(base_url: str, what: str, path: str, free_percent: float, free_bytes: int,
               threshold: int) -> tuple[str, str]:
    """Alert: the folder for protocols or recordings is running out of space."""
    subject = _line(f"Hausmeister alert: {free_percent:.1f}% free for the {what} folder")
    body = (f"The disk holding the {what} folder of the Hausmeister server {base_url} has only "
            f"{free_percent:.1f}% free space ({free_bytes / 2**30:.2f} GiB), below the alert "
            f"threshold of {threshold}%.\n\n"
            f"  folder: {path}\n\n"
            f"Free some space or lower the retention of old protocols.\n"
            f"This alert is sent at most once a day per folder.\n\n"
            + SIGNATURE)
    return subject, body


def session_protocol(base_url: str, supporter: str, session_label: str, started: dt.datetime | None,
                     ended: dt.datetime | None, lines: Iterable[str]) -> tuple[str, str]:
    """The protocol of one ended support session, for the supporter who opted in."""
    def when(value: dt.datetime | None) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"
    subject = _line(f"Hausmeister: protocol of session {session_label}")
    text = "\n".join(f"  {line}" for line in lines) or "  (no events recorded)"
    body = (f"Hello {_line(supporter)},\n\n"
            f"the support session {_line(session_label)} on {base_url} has ended.\n\n"
            f"  started: {when(started)}\n"
            f"  ended:   {when(ended)}\n\n"
            f"Protocol:\n{text}\n\n"
            f"You get this mail because protocol mails are on for your account.\n\n"
            + SIGNATURE)
    return subject, body
