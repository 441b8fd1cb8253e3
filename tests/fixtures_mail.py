"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what the server under test delivers.

``smtp_inbox`` yields ``(inbox, port)``; ``mail_toml(port)`` is the ``[mail]`` block that points a
test server at it.  Mailboxes starting with ``bounce@`` are refused for good (550), so tests can
see a permanent failure too.
"""

from __future__ import annotations

import email
import email.policy
import time

import pytest
from aiosmtpd.controller import Controller

from tests.fixtures_server import free_port

MAIL_WAIT_SECONDS = 30.0  # the server's outbox runs every 5 s


class Inbox:
    """The aiosmtpd handler: every accepted mail, parsed, with ``X-Envelope-To`` added."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce@"):
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        message["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"

    def wait(self, subject: str = "", count: int = 1,
             timeout: float = MAIL_WAIT_SECONDS) -> list[email.message.EmailMessage]:
        """The first ``count`` mails whose subject contains ``subject`` (others may come too)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages if subject in m["Subject"]]
            if len(found) >= count:
                return found
            assert time.monotonic() < deadline, (
                f"{len(found)} of {count} mails with {subject!r} arrived; all: "
                f"{[m['Subject'] for m in self.messages]}")
            time.sleep(0.1)


@pytest.fixture
def smtp_inbox():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield inbox, controller.port
    finally:
        controller.stop()


def mail_toml(port: int, from_address: str = "hausmeister@example.test") -> str:
    return f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {port}
security = "none"
from_address = "{from_address}"
"""
