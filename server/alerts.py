"""Alert mails to the operator's admins: certificates that expire soon, folders running out of disk.

``check`` is one plain, blocking run (a database session, the time and a disk-usage function are
passed in, so tests drive it with a real database and a fake disk).  Each condition is mailed
once: the ``alerts_sent`` table keeps ``cert-expiry:<serial>`` per certificate and
``disk:<folder>:<date>`` per folder and day.  Recipients are the admins of the first (operator)
tenant that have a mail address; with none, nothing is recorded, so the alert goes out once one
has an address.  ``service(app)`` runs ``check`` every ``alerts.check_interval``; without a mail
relay there are no alerts at all.

Not here: renewing certificates or freeing space (the operator does that).
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet import task

from protocol.identity import serial_hex
from protocol.runtime import Logger

from . import mail_texts
from .config import parse_duration
from .db.models import AlertSent, Role, Tenant, User

log = Logger(namespace="hausmeister.alerts")

Usage = Callable[[str], Any]   # shutil.disk_usage: .total .used .free
Render = Callable[..., tuple[str, str]]   # render(language=...) -> (subject, body)


@dataclass(frozen=True)
class AlertPolicy:
    """What ``check`` looks at; 0 for a threshold turns that kind of alert off."""

    cert_expiry_days: int
    disk_free_percent: int
    folders: dict[str, Path]   # "protocol" / "recording" -> folder
    base_url: str


def recipients(session: Session) -> list[tuple[str, str | None]]:
    """Mail address and language of the enabled admins of the operator's (first) tenant."""
    first = session.scalar(select(func.min(Tenant.id)))
    if first is None:
        return []
    return [(a, lang) for a, lang in session.execute(
        select(User.email, User.language).where(User.tenant_id == first, User.role == Role.admin,
                                                User.disabled.is_(False), User.email.is_not(None))
        .order_by(User.id)) if a and a.strip()]


def _existing(path: Path) -> Path:
    """The folder itself or its nearest existing parent (a folder not yet created still has a disk)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cert_alerts(certs: Iterable[tuple[str, x509.Certificate]], days: int, now: dt.datetime,
                base_url: str) -> list[tuple[str, Render]]:
    """``(key, render)`` for every certificate that expires within ``days``;
    ``render(language)`` is the mail's ``(subject, body)`` in that language."""
    if days <= 0:
        return []
    out = []
    for what, cert in certs:
        not_after = cert.not_valid_after_utc
        left = not_after - now
        if left > dt.timedelta(days=days):
            continue
        days_left = left.days if left >= dt.timedelta(0) else -1
        serial = serial_hex(cert)
        out.append((f"cert-expiry:{serial}", partial(
            mail_texts.cert_expiry_alert, base_url, what, cert.subject.rfc4514_string(), serial,
            not_after, days_left)))
    return out


def disk_alerts(policy: AlertPolicy, now: dt.datetime, usage: Usage) -> list[tuple[str, Render]]:
    """``(key, render)`` for every folder whose disk has less free space than allowed."""
    if policy.disk_free_percent <= 0:
        return []
    out = []
    for what, folder in policy.folders.items():
        try:
            figures = usage(str(_existing(folder)))
        except OSError as exc:
            log.warn("alerts: cannot read the free space of {folder}: {error}", folder=str(folder),
                     error=str(exc))
            continue
        if not figures.total:
            continue
        free_percent = 100.0 * figures.free / figures.total
        if free_percent >= policy.disk_free_percent:
            continue
        out.append((f"disk:{folder}:{now.date().isoformat()}"[:200], partial(
            mail_texts.disk_alert, policy.base_url, what, str(folder), free_percent, figures.free,
            policy.disk_free_percent)))
    return out


def check(session: Session, outbox: Any, policy: AlertPolicy,
          certs: Iterable[tuple[str, x509.Certificate]], now: dt.datetime,
          usage: Usage = shutil.disk_usage) -> list[str]:
    """Queue the alerts not mailed yet; returns their keys (one transaction: the caller's)."""
    found = cert_alerts(certs, policy.cert_expiry_days, now, policy.base_url) + \
        disk_alerts(policy, now, usage)
    fresh = [a for a in found if session.get(AlertSent, a[0]) is None]
    if not fresh:
        return []
    to = recipients(session)
    if not to:
        log.warn("alerts: {n} alert(s) but no admin of the operator tenant has a mail address: {keys}",
                 n=len(fresh), keys=", ".join(k for k, _ in fresh))
        return []
    for key, render in fresh:
        for address, language in to:
            subject, body = render(language=language)   # in each admin's language
            try:
                outbox.enqueue(session, address, subject, body)
            except ValueError as exc:  # an address the outbox refuses: the others still get it
                log.warn("alerts: {key} not mailed to {address!r}: {error}", key=key,
                         address=address, error=str(exc))
        session.add(AlertSent(key=key, sent_at=now))
        log.info("alerts: {key} mailed to {n} admin(s)", key=key, n=len(to))
    session.flush()
    return [k for k, _ in fresh]


def protocol_failure(session: Session, outbox: Any, base_url: str, folder: str, problem: str,
                     now: dt.datetime) -> bool:
    """Mail the operator's admins that a session protocol could not be written (at most once an
    hour).  True if queued."""
    key = f"protocol-write:{now:%Y-%m-%dT%H}"
    if session.get(AlertSent, key) is not None:
        return False
    to = recipients(session)
    if not to:
        log.warn("alerts: session protocols cannot be written ({problem}) but no admin of the "
                 "operator tenant has a mail address", problem=problem)
        return False
    for address, language in to:
        subject, body = mail_texts.protocol_failure_alert(base_url, folder, problem,
                                                          language=language)
        try:
            outbox.enqueue(session, address, subject, body)
        except ValueError as exc:
            log.warn("alerts: {key} not mailed to {address!r}: {error}", key=key,
                     address=address, error=str(exc))
    session.add(AlertSent(key=key, sent_at=now))
    session.flush()
    log.info("alerts: {key} mailed to {n} admin(s)", key=key, n=len(to))
    return True


def _certificates(store: Any) -> list[tuple[str, x509.Certificate]]:
    certs = []
    for what, load in (("CA", lambda: store.ca_cert()), ("server", lambda: store.server_chain()[0])):
        try:
            certs.append((what, load()))
        except (OSError, IndexError, ValueError) as exc:
            log.warn("alerts: cannot read the {what} certificate: {error}", what=what, error=str(exc))
    return certs


class Periodic(Service):
    """Runs ``tick`` (which returns a Deferred) every ``interval`` seconds, the first time
    ``first_delay`` after start (the server writes its address in that reactor turn)."""

    def __init__(self, name: str, tick: Callable[[], Any], interval: float, clock: Any = None,
                 first_delay: float = 1.0) -> None:
        self.name = name
        self.tick = tick
        self.interval = interval
        self.clock = clock
        self.first_delay = first_delay
        self._loop: task.LoopingCall | None = None
        self._first: Any = None

    def _safe_tick(self):
        return self.tick().addErrback(lambda f: log.failure("{name}: run failed", f, name=self.name))

    def _begin(self) -> None:
        self._first = None
        self._loop = task.LoopingCall(self._safe_tick)
        self._loop.clock = self._clock()
        self._loop.start(self.interval, now=True)

    def _clock(self):
        if self.clock is not None:
            return self.clock
        from twisted.internet import reactor
        return reactor

    def startService(self) -> None:
        super().startService()
        self._first = self._clock().callLater(self.first_delay, self._begin)

    def stopService(self):
        super().stopService()
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def base_url_of(app: Any) -> str:
    return app.state.get("https_url") or f"https://{app.config.server.public_host}"


def service(app: Any) -> Service | None:
    if app.outbox is None:
        log.info("alerts are off: no SMTP relay configured ([mail] smtp_host)")
        return None
    cfg = app.config

    def tick():
        policy = AlertPolicy(cfg.alerts.cert_expiry_days, cfg.alerts.disk_free_percent,
                             {"protocol": cfg.server.protocol_dir,
                              "recording": cfg.server.recording_dir}, base_url_of(app))

        def run(session: Session) -> list[str]:
            return check(session, app.outbox, policy, _certificates(app.store),
                         dt.datetime.now(dt.timezone.utc))
        return app.db.run(run)
    return Periodic("alerts", tick, parse_duration(cfg.alerts.check_interval),
                    getattr(app, "reactor", None))
