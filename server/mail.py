"""Mail through the operator's SMTP relay only, via a persistent outbox in the database.

``Outbox.queue`` stores a mail as an ``OutboxMail`` row (status ``queued``); nothing is sent
there.  ``Outbox.deliver_due`` (a coroutine) sends every due row through the configured relay
with ``aiosmtplib`` (plain, STARTTLS or implicit TLS per ``mail.security``, AUTH when
``mail.username`` is set) and marks it ``sent``.  A failure keeps the row: ``attempts`` goes up,
``last_error`` says what went wrong in one line and ``next_attempt_at`` moves by an exponential
back-off (``base_delay * 2**(attempts-1)``, capped at ``max_delay``); after ``max_attempts``
failed attempts, or on a permanent refusal by the relay (5xx for the recipient or the message),
the row becomes ``failed``.  So an SMTP outage loses nothing: the mail goes out once the relay is
back.  Delivery is at-least-once: a crash between the relay's "250" and the status update sends
that mail again on the next run.

When no relay is configured (``mail.smtp_host`` empty) there is no mail at all: ``queue`` raises
``MailDisabled`` and nothing is stored.

Threads and loops: ``queue`` and ``counts`` block (call them through ``Database.run`` on the
reactor thread, or pass a session to ``enqueue`` inside a transaction you already have).
``deliver_due`` is a plain asyncio coroutine (aiosmtplib is asyncio); its database work goes
through the ``run`` argument (default: the asyncio loop's executor), so tests drive it with
``asyncio.run``.  ``OutboxService`` runs it every ``interval`` seconds in a thread of the
blocking pool (``run_blocking``): ``Outbox.deliver_due_blocking`` gives the run an asyncio loop
of its own (``asyncio.run``) and makes its database calls plainly in that thread.  So the
server's reactor needs no asyncio: it is Twisted's default (epoll), which costs less Python per
ready socket than the asyncio reactor on the module port's hot paths (bench/README.md, "the
server on the epoll reactor").  A delivery run holds one pool thread while it talks to the relay
(at most ``timeout`` per mail; a relay that cannot be reached ends the run at the first mail).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import functools
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Awaitable, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from twisted.application.service import Service
from twisted.internet import defer, task

from protocol.runtime import Logger, run_blocking

from .config import MailSection
from .db import Database
from .db.models import OutboxMail

log = Logger(namespace="hausmeister.mail")

Clock = Callable[[], dt.datetime]
Runner = Callable[..., Awaitable[Any]]

QUEUED, SENT, FAILED = "queued", "sent", "failed"
STATUSES = (QUEUED, SENT, FAILED)

MAX_ADDRESS = 320
MAX_SUBJECT = 998
MAX_ERROR = 1000


class MailDisabled(RuntimeError):
    """No SMTP relay is configured, so the server sends no mail at all."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _one_line(text: str, limit: int = MAX_ERROR) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _check_address(address: str) -> str:
    address = address.strip()
    if (not address or len(address) > MAX_ADDRESS or any(c in address for c in "\r\n\0 <>,;")
            or address.count("@") != 1 or address.startswith("@") or address.endswith("@")):
        raise ValueError(f"not a single mail address: {address!r}")
    return address


def describe_error(exc: BaseException) -> str:
    """One line for ``last_error``: the exception type, the SMTP code and the relay's text."""
    import aiosmtplib
    name = type(exc).__name__
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        parts = [f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients]
        return _one_line(f"{name}: " + "; ".join(parts))
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc) or repr(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and not str(exc):
        message = "timed out"
    if isinstance(code, int) and code > 0:
        return _one_line(f"{name}: {code} {message}")
    return _one_line(f"{name}: {message}")


def _is_permanent(exc: BaseException) -> bool:
    """A refusal that retrying cannot fix: 5xx for every recipient, or 5xx for the message."""
    import aiosmtplib
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(r.code >= 500 for r in exc.recipients)
    if isinstance(exc, (aiosmtplib.SMTPRecipientRefused, aiosmtplib.SMTPDataError)):
        return exc.code >= 500
    return False


def _is_connection_problem(exc: BaseException) -> bool:
    """The relay cannot be reached at all: no point trying the other due mails in this run."""
    import aiosmtplib
    return isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPConnectTimeoutError,
                            aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError,
                            ConnectionError, TimeoutError, asyncio.TimeoutError, ssl.SSLError))


@dataclass
class DeliveryReport:
    """What one ``deliver_due`` run did (mail ids)."""

    sent: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


async def _executor_run(db: Database, fn: Callable[..., Any], *args: Any) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(db.call, fn, *args))


async def _inline_run(db: Database, fn: Callable[..., Any], *args: Any) -> Any:
    """The database call right here: the thread is a pool thread whose loop has nothing else
    to do while it waits (``deliver_due`` awaits one step at a time)."""
    return db.call(fn, *args)


class Outbox:
    def __init__(self, db: Database, mail: MailSection, clock: Clock = utcnow, *,
                 tls_context: ssl.SSLContext | None = None, max_attempts: int = 20,
                 base_delay: float = 30.0, max_delay: float = 3600.0, timeout: float = 30.0,
                 batch_size: int = 50) -> None:
        self.db = db
        self.mail = mail
        self.clock = clock
        self.tls_context = tls_context
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.batch_size = batch_size

    # -- queueing (blocking) -------------------------------------------------------------------

    def _refuse_if_disabled(self) -> None:
        if not self.mail.enabled:
            raise MailDisabled("mail is off: no SMTP relay is configured ([mail] smtp_host is "
                               "empty), so no mail is queued or sent")

    def enqueue(self, session: Session, to: str, subject: str, body: str) -> OutboxMail:
        """Add a mail inside the caller's transaction; raises ``MailDisabled`` without a relay."""
        self._refuse_if_disabled()
        to = _check_address(to)
        subject = _one_line(subject, MAX_SUBJECT)
        now = self.clock()
        row = OutboxMail(to_address=to, subject=subject, body_text=body, created_at=now,
                         attempts=0, next_attempt_at=now, status=QUEUED)
        session.add(row)
        session.flush()
        return row

    def queue(self, to: str, subject: str, body: str) -> int:
        """Store one mail for delivery (blocking); returns its id."""
        self._refuse_if_disabled()
        return self.db.call(lambda s: self.enqueue(s, to, subject, body).id)

    def counts(self) -> dict[str, int]:
        """``{"queued": n, "sent": n, "failed": n}`` for the console (blocking)."""
        def count(session: Session) -> dict[str, int]:
            rows = session.execute(
                select(OutboxMail.status, func.count()).group_by(OutboxMail.status)).all()
            result = dict.fromkeys(STATUSES, 0)
            result.update({status: n for status, n in rows})
            return result
        return self.db.call(count)

    # -- delivery ------------------------------------------------------------------------------

    def _due(self, session: Session, now: dt.datetime) -> list[dict[str, Any]]:
        rows = session.scalars(
            select(OutboxMail)
            .where(OutboxMail.status == QUEUED, OutboxMail.next_attempt_at <= now)
            .order_by(OutboxMail.next_attempt_at, OutboxMail.id)
            .limit(self.batch_size)).all()
        return [{"id": r.id, "to": r.to_address, "subject": r.subject, "body": r.body_text,
                 "created_at": r.created_at} for r in rows]

    def _mark_sent(self, session: Session, mail_id: int, now: dt.datetime) -> None:
        row = session.get(OutboxMail, mail_id)
        row.status = SENT
        row.sent_at = now
        row.attempts += 1
        row.last_error = None

    def _mark_failure(self, session: Session, mail_id: int, now: dt.datetime, error: str,
                      permanent: bool) -> str:
        row = session.get(OutboxMail, mail_id)
        row.attempts += 1
        row.last_error = error
        if permanent or row.attempts >= self.max_attempts:
            row.status = FAILED
        else:
            row.next_attempt_at = now + dt.timedelta(seconds=self.backoff(row.attempts))
        return row.status

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts (1, 2, ...)."""
        return min(self.base_delay * 2 ** max(attempts - 1, 0), self.max_delay)

    def build_message(self, to: str, subject: str, body: str,
                      date: dt.datetime | None = None) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.mail.from_address
        msg["To"] = to
        msg["Subject"] = subject
        msg["Date"] = email.utils.format_datetime(date or self.clock())
        domain = self.mail.from_address.rpartition("@")[2] or "localhost"
        msg["Message-ID"] = email.utils.make_msgid(domain=domain)
        msg.set_content(body)
        return msg

    def _smtp_options(self) -> dict[str, Any]:
        security = self.mail.security
        options: dict[str, Any] = {
            "hostname": self.mail.smtp_host, "port": self.mail.smtp_port,
            "timeout": self.timeout, "use_tls": security == "tls",
            "start_tls": security == "starttls",
        }
        if security in ("tls", "starttls"):
            options["tls_context"] = self.tls_context or ssl.create_default_context(
                cafile=self.mail.ca_bundle or None)
        if self.mail.username:
            options["username"] = self.mail.username
            options["password"] = self.mail.password
        return options

    async def send_now(self, message: EmailMessage, to: str) -> None:
        """Hand one message to the relay; raises on any failure."""
        import aiosmtplib
        await aiosmtplib.send(message, sender=self.mail.from_address, recipients=[to],
                              **self._smtp_options())

    async def deliver_due(self, run: Runner | None = None) -> DeliveryReport:
        """Send every mail whose ``next_attempt_at`` has come; see the module text."""
        report = DeliveryReport()
        if not self.mail.enabled:
            return report
        if run is None:
            run = functools.partial(_executor_run, self.db)
        due = await run(self._due, self.clock())
        for item in due:
            try:
                message = self.build_message(item["to"], item["subject"], item["body"],
                                             item["created_at"])
                await self.send_now(message, item["to"])
            except Exception as exc:  # every failure is recorded on the row, none is lost
                error = describe_error(exc)
                status = await run(self._mark_failure, item["id"], self.clock(), error,
                                   _is_permanent(exc))
                (report.failed if status == FAILED else report.retry).append(item["id"])
                log.warn("mail {mail_id} to {to} not delivered ({status}): {error}",
                         mail_id=item["id"], to=item["to"], status=status, error=error)
                if _is_connection_problem(exc):
                    break  # the others stay due for the next run, their attempts untouched
            else:
                await run(self._mark_sent, item["id"], self.clock())
                report.sent.append(item["id"])
        return report

    def deliver_due_blocking(self) -> DeliveryReport:
        """``deliver_due`` on an asyncio loop of its own, blocking (for a pool thread)."""
        return asyncio.run(self.deliver_due(functools.partial(_inline_run, self.db)))


class OutboxService(Service):
    """Runs ``outbox.deliver_due`` every ``interval`` seconds in the blocking pool (any reactor)."""

    def __init__(self, outbox: Outbox, interval: float = 15.0, reactor: Any = None,
                 runner: Any = None) -> None:
        self.outbox = outbox
        #: server.cluster.SingleRunner: with several nodes only the lock holder delivers
        self.runner = runner
        self.interval = interval
        self._reactor = reactor
        self._loop: task.LoopingCall | None = None
        self._running_run: defer.Deferred | None = None
        self._holding = False  # whether the last tick held the outbox lock

    def tick(self) -> defer.Deferred:
        """One delivery run; a run still busy from the last tick is not overlapped."""
        if self._running_run is not None:
            return defer.succeed(None)
        if self.runner is not None and self.runner.shared:
            d = run_blocking(self.runner.holds)
            d.addCallback(lambda mine: run_blocking(self.outbox.deliver_due_blocking)
                          if self._lock_held(mine) else None)
        else:
            d = run_blocking(self.outbox.deliver_due_blocking)

        def done(result: Any) -> Any:
            self._running_run = None
            return result

        def failed(failure: Any) -> None:
            log.failure("mail delivery run failed", failure)

        d.addBoth(done)
        d.addErrback(failed)
        self._running_run = d if not d.called else None
        return d

    def _lock_held(self, mine: bool) -> bool:
        """Say when this node takes over or loses the delivery (several nodes: one at a time)."""
        if mine != self._holding:
            self._holding = mine
            if mine:
                log.info("mail outbox: this node delivers the mail now (it holds the outbox "
                         "lock)")
            else:
                log.warn("mail outbox: another node holds the outbox lock now; this node stops "
                         "delivering")
        return mine

    def startService(self) -> None:
        super().startService()
        if not self.outbox.mail.enabled:
            log.info("mail is off: no SMTP relay configured")
            return
        self._loop = task.LoopingCall(self.tick)
        if self._reactor is not None:
            self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("mail outbox loop stopped", f))

    def stopService(self) -> defer.Deferred:
        """Stops the loop; the Deferred fires when a delivery run in progress has ended."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        running, self._running_run = self._running_run, None
        if self.runner is not None and self.runner.shared:  # another node takes over at once
            release = run_blocking(self.runner.release)
            running = release if running is None else defer.DeferredList([running, release])
        if running is None:
            return defer.succeed(None)
        waiter: defer.Deferred = defer.Deferred()
        running.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter


__all__ = ["Outbox", "OutboxService", "MailDisabled", "DeliveryReport", "describe_error",
           "QUEUED", "SENT", "FAILED"]
