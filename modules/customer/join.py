"""The customer's way into a session, for the CLI and the app alike: the server's pinned CA,
a control connection without a certificate, ``JoinAdhoc`` with the first four digits, then the
session with the whole code (the last four digits never leave this machine)."""

from __future__ import annotations

from typing import Any, Callable

from cryptography.hazmat.primitives import serialization

from protocol import control
from protocol.runtime import run_blocking

from ..common.session.channel import SessionChannel, adhoc_password
from ..common.errors import ModuleError
from ..common.link.connection import ServerAddress, connect, hello
from ..common.session.consent import ConsentState
from ..common.session.recorder import RESUME_WAIT_SECONDS, send_the_rest
from ..common.link.enrollment import fetch_pinned_ca, server_info
from ..common.session.session_runner import SessionRunner, open_session, release_screen_offer


def parse_adhoc_id(text: str) -> tuple[str, str]:
    digits = "".join(text.split()).replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        raise ModuleError(f"{text!r} is not an ad-hoc ID: it has 8 digits, like 1234 5678")
    return digits[:4], digits[4:]


def pinned_server(server: str, fingerprint: str) -> tuple[Any, dict]:
    """(CA certificate, the server's public info) — blocking HTTPS, run it off the reactor."""
    ca = fetch_pinned_ca(server, fingerprint)
    return ca, server_info(server, ca)


async def join(reactor, server: str, fingerprint: str, adhoc_id: str,
               make_ui: Callable[[dict, ConsentState], Any], *,
               on_joined: Callable[[dict], None] | None = None,
               **session_options: Any) -> tuple[Any, SessionRunner]:
    """Join the supporter who read out ``adhoc_id``; returns (control connection, runner) —
    the caller awaits ``runner.run()`` and closes the connection afterwards.  ``make_ui(ticket,
    consent)`` builds the consent UI once the supporter's name is known."""
    try:
        return await _join(reactor, server, fingerprint, adhoc_id, make_ui, on_joined,
                           session_options)
    except BaseException:
        # a wrong ID, an unreachable server: the screen the app opened for this try goes now
        release_screen_offer(session_options.get("screen"))
        raise


async def _join(reactor, server: str, fingerprint: str, adhoc_id: str,
                make_ui: Callable[[dict, ConsentState], Any],
                on_joined: Callable[[dict], None] | None,
                session_options: dict[str, Any]) -> tuple[Any, SessionRunner]:
    nameplate, secret = parse_adhoc_id(adhoc_id)
    ca, info = await run_blocking(pinned_server, server, fingerprint)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    conn = await connect(reactor, ServerAddress(info["module_host"], int(info["module_port"])),
                         ca_pem, None)
    await hello(conn, "customer")
    try:
        ticket = await conn.callRemote(control.JoinAdhoc, nameplate=nameplate)
    except (control.UnknownNameplate, control.LockedOut) as exc:
        conn.transport.loseConnection()
        raise ModuleError(str(exc)) from exc
    if on_joined is not None:
        on_joined(ticket)

    def channel(session_id: str) -> SessionChannel:
        return SessionChannel("peer", adhoc_password(nameplate + secret), session_id,
                              mode="adhoc", ca_certificate=ca,
                              expected_peer=f"hausmeister:supporter:{ticket['supporter']}",
                              peer_fingerprint=ticket["supporter_fingerprint"] or None)
    consent = ConsentState("customer", terms=ticket["terms"])
    runner = await open_session(reactor, conn, ticket, ca_pem, None, channel, consent,
                                make_ui(ticket, consent), **session_options)
    return conn, runner


async def upload_cut_off_recording(reactor, server: str, fingerprint: str,
                                   timeout: float = RESUME_WAIT_SECONDS) -> bool:
    """After a session whose control connection was lost while this module recorded: connect
    again (as a customer, no certificate needed) and send the rest of the recording with its
    resume token.  True once nothing is left to send; bounded by ``timeout`` seconds."""
    async def connect_again():
        ca, info = await run_blocking(pinned_server, server, fingerprint)
        conn = await connect(reactor, ServerAddress(info["module_host"], int(info["module_port"])),
                             ca.public_bytes(serialization.Encoding.PEM), None)
        await hello(conn, "customer")
        return conn
    return await send_the_rest(reactor, connect_again, timeout)
