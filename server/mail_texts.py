"""Subject and body of every mail the server sends: invitation, password reset, alerts, protocols,
the test mail — each in the recipient's language (``language``: 'en' or 'de', see ``server.i18n``).

Only text: plain ``(subject, body)`` pairs.  Queuing them (``Outbox.enqueue``) is the caller's
job.  Values from users (names, protocol lines) end up in a text/plain mail, so nothing here is
HTML-escaped; line breaks in one-line values are flattened so they cannot forge header-like lines
in a subject.  Each paragraph is one translatable sentence with named placeholders.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable

from . import i18n


def _texts(language: str | None) -> i18n.Texts:
    return i18n.texts(language)


def _signature(t: i18n.Texts) -> str:
    return "-- \n" + t.gettext("Hausmeister remote support server") + "\n"


def _line(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (subjects and names)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def ttl_text(seconds: float, language: str | None = None) -> str:
    """A duration as people say it: '1 hour', '7 days', '90 seconds' (German: '1 Stunde')."""
    return _texts(language).duration(seconds)


def invitation(base_url: str, user_name: str, inviter: str, link: str, ttl: float | str,
               language: str | None = None) -> tuple[str, str]:
    """The mail to a new user with the single-use link to set the first password.

    ``ttl``: the link's lifetime in seconds (a text is taken as already written out)."""
    t = _texts(language)
    ttl_words = ttl if isinstance(ttl, str) else t.duration(ttl)
    name = _line(user_name)
    subject = _line(t.gettext("Hausmeister: your account %(name)s", name=name))
    body = "".join([
        t.gettext("Hello,"), "\n\n",
        t.gettext('%(inviter)s created the account "%(name)s" for you on the Hausmeister server '
                  '%(server)s.', inviter=_line(inviter), name=name, server=base_url), "\n\n",
        t.gettext("Set your password here (the link works once and for %(ttl)s):", ttl=ttl_words),
        "\n\n  ", link, "\n\n",
        t.gettext('Then log in with the user name "%(name)s".', name=name), "\n",
        t.gettext("If you did not expect this mail, ignore it; nothing happens without the link."),
        "\n\n", _signature(t)])
    return subject, body


def password_reset(base_url: str, user_name: str, link: str, ttl: float | str, source: str,
                   language: str | None = None) -> tuple[str, str]:
    """The mail with the single-use link to set a new password."""
    t = _texts(language)
    ttl_words = ttl if isinstance(ttl, str) else t.duration(ttl)
    name = _line(user_name)
    subject = _line(t.gettext("Hausmeister: reset the password of %(name)s", name=name))
    body = "".join([
        t.gettext("Hello,"), "\n\n",
        t.gettext('someone (address %(source)s) asked to reset the password of the account '
                  '"%(name)s" on the Hausmeister server %(server)s.', source=_line(source, 100),
                  name=name, server=base_url), "\n\n",
        t.gettext("Set a new password here (the link works once and for %(ttl)s):", ttl=ttl_words),
        "\n\n  ", link, "\n\n",
        t.gettext("If that was not you, ignore this mail: your password stays as it is."),
        "\n\n", _signature(t)])
    return subject, body


def cert_expiry_alert(base_url: str, what: str, subject_name: str, serial: str,
                      not_after: dt.datetime, days_left: int,
                      language: str | None = None) -> tuple[str, str]:
    """Alert: a certificate of the server or the CA expires soon (or already did).

    ``what`` is "CA" or "server"."""
    t = _texts(language)
    if what == "CA":
        if days_left < 0:
            subject = t.gettext("Hausmeister alert: the CA certificate has expired")
            first = t.gettext("The CA certificate of the Hausmeister server %(server)s has "
                              "expired.", server=base_url)
        else:
            subject = t.ngettext("Hausmeister alert: the CA certificate expires in %(num)s day",
                                 "Hausmeister alert: the CA certificate expires in %(num)s days",
                                 days_left)
            first = t.ngettext("The CA certificate of the Hausmeister server %(server)s expires "
                               "in %(num)s day.",
                               "The CA certificate of the Hausmeister server %(server)s expires "
                               "in %(num)s days.", days_left, server=base_url)
    else:
        if days_left < 0:
            subject = t.gettext("Hausmeister alert: the server certificate has expired")
            first = t.gettext("The server certificate of the Hausmeister server %(server)s has "
                              "expired.", server=base_url)
        else:
            subject = t.ngettext("Hausmeister alert: the server certificate expires in %(num)s day",
                                 "Hausmeister alert: the server certificate expires in %(num)s days",
                                 days_left)
            first = t.ngettext("The server certificate of the Hausmeister server %(server)s "
                               "expires in %(num)s day.",
                               "The server certificate of the Hausmeister server %(server)s "
                               "expires in %(num)s days.", days_left, server=base_url)
    body = "".join([
        first, "\n\n",
        "  ", t.gettext("subject:"), "   ", _line(subject_name), "\n",
        "  ", t.gettext("serial:"), "    ", serial, "\n",
        "  ", t.gettext("not after:"), " ", t.date_time(not_after), "\n\n",
        t.gettext("Renew it before that date; modules and browsers refuse an expired "
                  "certificate."), "\n",
        t.gettext("This alert is sent once per certificate."), "\n\n",
        _signature(t)])
    return _line(subject), body


def disk_alert(base_url: str, what: str, path: str, free_percent: float, free_bytes: int,
               threshold: int, language: str | None = None) -> tuple[str, str]:
    """Alert: the folder for protocols or recordings is running out of space.

    ``what`` is "protocol" or "recording"."""
    t = _texts(language)
    values = {"percent": t.number(free_percent, 1), "server": base_url,
              "free": t.number(free_bytes / 2**30, 2), "threshold": t.number(threshold)}
    if what == "recording":
        subject = t.gettext("Hausmeister alert: %(percent)s%% free for the recording folder",
                            **values)
        first = t.gettext("The disk holding the recording folder of the Hausmeister server "
                          "%(server)s has only %(percent)s%% free space (%(free)s GiB), below "
                          "the alert threshold of %(threshold)s%%.", **values)
    else:
        subject = t.gettext("Hausmeister alert: %(percent)s%% free for the protocol folder",
                            **values)
        first = t.gettext("The disk holding the protocol folder of the Hausmeister server "
                          "%(server)s has only %(percent)s%% free space (%(free)s GiB), below "
                          "the alert threshold of %(threshold)s%%.", **values)
    body = "".join([
        first, "\n\n",
        "  ", t.gettext("folder:"), " ", path, "\n\n",
        t.gettext("Free some space or lower the retention of old protocols."), "\n",
        t.gettext("This alert is sent at most once a day per folder."), "\n\n",
        _signature(t)])
    return _line(subject), body


def session_protocol(base_url: str, supporter: str, session_label: str, started: dt.datetime | None,
                     ended: dt.datetime | None, lines: Iterable[str],
                     language: str | None = None, peer: str | None = None) -> tuple[str, str]:
    """The protocol of one ended support session, for the supporter who opted in.

    ``session_label`` is the session id; ``peer`` the customer or host it was with."""
    t = _texts(language)

    def when(value: dt.datetime | None) -> str:
        return t.date_time(value) if value else "-"
    if peer:
        label = _line(t.gettext("%(session)s with %(peer)s", session=session_label, peer=peer))
    else:
        label = _line(session_label)
    subject = _line(t.gettext("Hausmeister: protocol of session %(session)s", session=label))
    text = "\n".join(f"  {line}" for line in lines) or "  " + t.gettext("(no events recorded)")
    body = "".join([
        t.gettext("Hello %(name)s,", name=_line(supporter)), "\n\n",
        t.gettext("the support session %(session)s on %(server)s has ended.", session=label,
                  server=base_url), "\n\n",
        "  ", t.gettext("started:"), " ", when(started), "\n",
        "  ", t.gettext("ended:"), "   ", when(ended), "\n\n",
        t.gettext("Protocol:"), "\n", text, "\n\n",
        t.gettext("You get this mail because protocol mails are on for your account."), "\n\n",
        _signature(t)])
    return subject, body


def test_mail(base_url: str, actor: str, language: str | None = None) -> tuple[str, str]:
    """The test mail from the settings page."""
    t = _texts(language)
    body = "".join([
        t.gettext("This is a test mail from the Hausmeister server %(server)s, sent by %(actor)s "
                  "from the console's settings page.", server=base_url, actor=_line(actor)),
        "\n\n", t.gettext("It shows that the SMTP relay in the config file works."), "\n"])
    return t.gettext("Hausmeister test mail"), body


def protocol_failure_alert(base_url: str, folder: str, problem: str,
                           language: str | None = None) -> tuple[str, str]:
    """Alert: a session protocol could not be written; sessions are ended and refused."""
    t = _texts(language)
    subject = t.gettext("Hausmeister alert: session protocols cannot be written")
    body = "".join([
        t.gettext("The Hausmeister server %(server)s could not write a session protocol. "
                  "Running sessions whose protocol failed were ended, and new sessions are "
                  "refused until the folder takes writes again.", server=base_url), "\n\n",
        "  ", t.gettext("folder:"), " ", _line(folder), "\n",
        "  ", t.gettext("problem:"), " ", _line(problem), "\n\n",
        t.gettext("Make the folder writable (mounted read-write, with free space); the server "
                  "checks it every few seconds and allows sessions again by itself."), "\n",
        t.gettext("This alert is sent at most once an hour."), "\n\n",
        _signature(t)])
    return _line(subject), body
