"""Mail outbox against real aiosmtpd relays on 127.0.0.1 (plain, STARTTLS + AUTH, implicit TLS),
on SQLite and PostgreSQL: delivery, no relay configured, relay down then back, wrong password."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import email
import email.policy
import socket
import ssl
from typing import Iterator

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from sqlalchemy import select

from server.config import MailSection
from server.db.models import OutboxMail
from server.mail import FAILED, QUEUED, SENT, MailDisabled, Outbox

USER, PASSWORD = "relayuser", "relay-secret"
FROM = "hausmeister@example.test"
T0 = dt.datetime(2026, 11, 23, 4, 0, tzinfo=dt.timezone.utc)


class FakeClock:
    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


class StoreHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, str | None]] = []

    async def handle_DATA(self, server, session, envelope):
        login = getattr(session.auth_data, "login", None)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                              login.decode() if login else None))
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (isinstance(auth_data, LoginPassword)
          and (auth_data.login, auth_data.password) == (USER.encode(), PASSWORD.encode()))
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_ctx(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def server_ctx(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def relays() -> Iterator[list[Controller]]:
    started: list[Controller] = []
    yield started
    for controller in started:
        controller.stop()


def start_relay(relays: list[Controller], port: int | None = None, **kwargs):
    handler = StoreHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port or free_port(), **kwargs)
    controller.start()
    relays.append(controller)
    return handler, controller


def mail_config(port: int, security: str = "none", username: str = "",
                password: str = "", host: str = "127.0.0.1") -> MailSection:
    return MailSection(smtp_host=host, smtp_port=port, security=security, username=username,
                       password=password, from_address=FROM)


def rows(database) -> list[OutboxMail]:
    return database.call(lambda s: list(s.scalars(select(OutboxMail).order_by(OutboxMail.id))))


def parse(content: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(content, policy=email.policy.default)


def test_plain_relay_delivers_with_right_envelope_and_headers(database, relays):
    handler, controller = start_relay(relays)
    outbox = Outbox(database, mail_config(controller.port), FakeClock())
    mail_id = outbox.queue("alice@example.test", "Your invitation", "Hello Alice,\nwelcome. äöü\n")
    assert outbox.counts() == {"queued": 1, "sent": 0, "failed": 0}

    report = asyncio.run(outbox.deliver_due())

    assert report.sent == [mail_id] and report.retry == [] and report.failed == []
    assert len(handler.messages) == 1
    mail_from, rcpt_tos, content, login = handler.messages[0]
    assert (mail_from, rcpt_tos, login) == (FROM, ["alice@example.test"], None)
    message = parse(content)
    assert message["From"] == FROM
    assert message["To"] == "alice@example.test"
    assert message["Subject"] == "Your invitation"
    assert message.get_content().replace("\r\n", "\n") == "Hello Alice,\nwelcome. äöü\n"
    [row] = rows(database)
    assert (row.status, row.attempts, row.last_error) == (SENT, 1, None)
    assert row.sent_at == T0
    assert outbox.counts() == {"queued": 0, "sent": 1, "failed": 0}
    # a sent mail is not sent again
    assert asyncio.run(outbox.deliver_due()).sent == []
    assert len(handler.messages) == 1


def test_starttls_relay_with_auth(database, relays, server_ctx, client_ctx):
    handler, controller = start_relay(relays, tls_context=server_ctx, require_starttls=True,
                                      authenticator=authenticator, auth_required=True)
    outbox = Outbox(database, mail_config(controller.port, "starttls", USER, PASSWORD),
                    FakeClock(), tls_context=client_ctx)
    outbox.queue("bob@example.test", "Password reset", "Use this link once.")

    report = asyncio.run(outbox.deliver_due())

    assert len(report.sent) == 1
    mail_from, rcpt_tos, content, login = handler.messages[0]
    assert (mail_from, rcpt_tos, login) == (FROM, ["bob@example.test"], USER)
    assert parse(content)["Subject"] == "Password reset"
    assert [r.status for r in rows(database)] == [SENT]


def test_implicit_tls_relay(database, relays, server_ctx, client_ctx):
    handler, controller = start_relay(relays, ssl_context=server_ctx)
    outbox = Outbox(database, mail_config(controller.port, "tls"), FakeClock(),
                    tls_context=client_ctx)
    outbox.queue("carol@example.test", "Alert: disk space", "protocol folder 91 % full")

    assert len(asyncio.run(outbox.deliver_due()).sent) == 1
    assert parse(handler.messages[0][2])["Subject"] == "Alert: disk space"


def test_relay_certificate_trusted_through_the_configured_ca_bundle(database, relays, server_ctx,
                                                                    ca, tmp_path):
    handler, controller = start_relay(relays, tls_context=server_ctx, require_starttls=True)
    bundle = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    mail = dataclasses.replace(mail_config(controller.port, "starttls"), ca_bundle=str(bundle))
    outbox = Outbox(database, mail, FakeClock())  # no tls_context: built from mail.ca_bundle
    outbox.queue("erin@example.test", "Trusted relay", "via the operator's CA")

    assert len(asyncio.run(outbox.deliver_due()).sent) == 1
    assert parse(handler.messages[0][2])["Subject"] == "Trusted relay"


def test_untrusted_relay_certificate_keeps_mail_queued(database, relays, server_ctx):
    handler, controller = start_relay(relays, tls_context=server_ctx, require_starttls=True)
    # default context: the system CAs, which do not know the test CA
    outbox = Outbox(database, mail_config(controller.port, "starttls"), FakeClock())
    outbox.queue("dave@example.test", "x", "y")

    report = asyncio.run(outbox.deliver_due())

    assert report.sent == [] and len(report.retry) == 1
    [row] = rows(database)
    assert row.status == QUEUED and row.attempts == 1
    assert "certificate" in row.last_error.lower() and "\n" not in row.last_error
    assert handler.messages == []


def test_no_relay_configured_refuses_and_stores_nothing(database):
    outbox = Outbox(database, mail_config(0, host=""), FakeClock())
    with pytest.raises(MailDisabled) as info:
        outbox.queue("alice@example.test", "Your invitation", "Hello")
    message = str(info.value)
    assert "\n" not in message and "no SMTP relay is configured" in message
    assert rows(database) == []
    assert outbox.counts() == {"queued": 0, "sent": 0, "failed": 0}
    # and delivery does nothing at all (no connection attempt)
    assert asyncio.run(outbox.deliver_due()).sent == []


def test_relay_down_then_back_delivers_everything(database, relays):
    port = free_port()  # nothing listens here yet
    clock = FakeClock()
    outbox = Outbox(database, mail_config(port), clock)
    first = outbox.queue("alice@example.test", "first", "one")
    second = outbox.queue("bob@example.test", "second", "two")

    report = asyncio.run(outbox.deliver_due())

    assert report.sent == [] and report.retry == [first]  # the run stops at the dead relay
    by_id = {r.id: r for r in rows(database)}
    assert by_id[first].status == QUEUED and by_id[first].attempts == 1
    assert "SMTPConnectError" in by_id[first].last_error
    assert str(port) in by_id[first].last_error
    assert by_id[first].next_attempt_at == T0 + dt.timedelta(seconds=30)
    assert by_id[second].status == QUEUED and by_id[second].attempts == 0

    # still down, time moved on: the mail due longest (the second) is tried and backs off
    clock.advance(30)
    report = asyncio.run(outbox.deliver_due())
    assert report.retry == [second]
    by_id = {r.id: r for r in rows(database)}
    assert by_id[second].attempts == 1
    assert by_id[second].next_attempt_at == clock.now + dt.timedelta(seconds=30)
    assert outbox.counts() == {"queued": 2, "sent": 0, "failed": 0}

    handler, _controller = start_relay(relays, port=port)
    # relay is back; the second mail's back-off has not passed yet: only the first goes now
    report = asyncio.run(outbox.deliver_due())
    assert report.sent == [first]
    clock.advance(30)
    report = asyncio.run(outbox.deliver_due())
    assert report.sent == [second]

    assert sorted(m[1][0] for m in handler.messages) == ["alice@example.test",
                                                          "bob@example.test"]
    assert outbox.counts() == {"queued": 0, "sent": 2, "failed": 0}
    assert all(r.last_error is None for r in rows(database))


def test_wrong_password_stays_queued_with_clear_error(database, relays, server_ctx, client_ctx):
    handler, controller = start_relay(relays, tls_context=server_ctx, require_starttls=True,
                                      authenticator=authenticator, auth_required=True)
    clock = FakeClock()
    outbox = Outbox(database, mail_config(controller.port, "starttls", USER, "wrong"), clock,
                    tls_context=client_ctx)
    outbox.queue("alice@example.test", "x", "y")

    report = asyncio.run(outbox.deliver_due())

    assert report.retry and not report.sent
    [row] = rows(database)
    assert row.status == QUEUED and row.attempts == 1
    assert row.last_error.startswith("SMTPAuthenticationError: 535")
    assert "\n" not in row.last_error
    assert row.next_attempt_at == T0 + dt.timedelta(seconds=30)
    assert handler.messages == []
    # the operator fixes the password: the same row goes out, nothing was lost
    fixed = Outbox(database, mail_config(controller.port, "starttls", USER, PASSWORD), clock,
                   tls_context=client_ctx)
    clock.advance(30)
    assert len(asyncio.run(fixed.deliver_due()).sent) == 1
    assert handler.messages[0][3] == USER


def test_back_off_is_capped_and_gives_up_after_max_attempts(database):
    port = free_port()
    clock = FakeClock()
    outbox = Outbox(database, mail_config(port), clock, max_attempts=9)
    outbox.queue("alice@example.test", "x", "y")
    waits = []
    for _ in range(9):
        before = clock.now
        asyncio.run(outbox.deliver_due())
        [row] = rows(database)
        if row.status == QUEUED:
            waits.append((row.next_attempt_at - before).total_seconds())
            clock.now = row.next_attempt_at
    assert waits == [30, 60, 120, 240, 480, 960, 1920, 3600]
    [row] = rows(database)
    assert row.status == FAILED and row.attempts == 9
    assert outbox.counts() == {"queued": 0, "sent": 0, "failed": 1}
    clock.advance(10 * 3600)
    asyncio.run(outbox.deliver_due())
    assert rows(database)[0].attempts == 9  # failed mails are not tried again


def test_permanent_recipient_refusal_fails_at_once(database, relays):
    class RefuseRcpt(StoreHandler):
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            return "550 5.1.1 no such user"

    handler = RefuseRcpt()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    relays.append(controller)
    outbox = Outbox(database, mail_config(controller.port), FakeClock())
    outbox.queue("nobody@example.test", "x", "y")

    report = asyncio.run(outbox.deliver_due())

    assert len(report.failed) == 1
    [row] = rows(database)
    assert row.status == FAILED and row.attempts == 1
    assert "550" in row.last_error and "nobody@example.test" in row.last_error


@pytest.mark.parametrize("bad", ["", "no-at-sign", "a@b.test\r\nBcc: x@evil.test",
                                 "a@b.test, c@d.test", "<a@b.test>"])
def test_queue_refuses_anything_but_one_address(database, bad):
    outbox = Outbox(database, mail_config(free_port()), FakeClock())
    with pytest.raises(ValueError):
        outbox.queue(bad, "x", "y")
    assert rows(database) == []


def test_subject_is_one_line(database, relays):
    handler, controller = start_relay(relays)
    outbox = Outbox(database, mail_config(controller.port), FakeClock())
    outbox.queue("alice@example.test", "Hi\r\nBcc: evil@example.test", "body")
    asyncio.run(outbox.deliver_due())
    message = parse(handler.messages[0][2])
    assert message["Bcc"] is None and message["Subject"] == "Hi Bcc: evil@example.test"
    assert handler.messages[0][1] == ["alice@example.test"]


SERVICE_SCRIPT = r'''
import json, sys
from server.cli import _install_reactor
_install_reactor()  # the reactor `hausmeister-server run` installs
from twisted.internet import defer, reactor, task
from twisted.internet.epollreactor import EPollReactor
assert isinstance(reactor, EPollReactor), reactor  # no asyncio loop runs in this thread
from aiosmtpd.controller import Controller
from server.config import MailSection
from server.db import Database
from server.mail import Outbox, OutboxService

db_url, port = sys.argv[1], int(sys.argv[2])
received = []

class Handler:
    async def handle_DATA(self, server, session, envelope):
        received.append((envelope.mail_from, envelope.rcpt_tos))
        return "250 OK"

db = Database(db_url); db.migrate()
mail = MailSection(smtp_host="127.0.0.1", smtp_port=port, security="none", username="",
                   password="", from_address="hausmeister@example.test")
outbox = Outbox(db, mail)

async def main():
    service = OutboxService(outbox, interval=0.05)
    outbox.queue("alice@example.test", "while down", "queued before the relay ran")
    service.startService()
    for _ in range(200):  # relay down: the mail stays queued with an error
        await task.deferLater(reactor, 0.02, lambda: None)
        if outbox.counts()["queued"] == 1 and db.call(
                lambda s: s.execute(__import__("sqlalchemy").text(
                    "select attempts from outbox_mails")).scalar()) >= 1:
            break
    down = outbox.counts()
    down_row = db.call(lambda s: list(s.execute(__import__("sqlalchemy").text(
        "select attempts, last_error from outbox_mails")).one()))
    outbox.backoff = lambda attempts: 0.0  # no waiting for the test's sake
    db.call(lambda s: s.execute(__import__("sqlalchemy").text(
        "update outbox_mails set next_attempt_at = created_at")))
    controller = Controller(Handler(), hostname="127.0.0.1", port=port); controller.start()
    try:
        for _ in range(250):
            await task.deferLater(reactor, 0.02, lambda: None)
            if outbox.counts()["sent"] == 1:
                break
    finally:
        await service.stopService()
        controller.stop()
    print(json.dumps({"down": down, "down_row": down_row, "after": outbox.counts(), "received": received}))

task.react(lambda _reactor: defer.ensureDeferred(main()))
'''


def test_outbox_service_under_the_servers_reactor(tmp_path):
    """The Twisted service on the server's epoll reactor: each delivery run in the blocking pool
    on an asyncio loop of its own; relay down (row keeps an error), then back (sent once)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    db_url = f"sqlite:///{tmp_path / 'svc.db'}"
    result = subprocess.run([sys.executable, "-c", SERVICE_SCRIPT, db_url, str(port)],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["down"] == {"queued": 1, "sent": 0, "failed": 0}
    attempts, last_error = outcome["down_row"]
    assert attempts >= 1 and last_error.startswith("SMTPConnectError")
    assert outcome["after"] == {"queued": 0, "sent": 1, "failed": 0}
    assert outcome["received"] == [["hausmeister@example.test", ["alice@example.test"]]]
