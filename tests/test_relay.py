"""The relay plane: tokens, pairing, splicing with back-pressure, timeouts, teardown, and a
separate relay process — over real TLS on 127.0.0.1.

Every test here runs under the default reactor and under ``--reactor=asyncio``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import protocol, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer

from protocol.framing import BoxDecoder, encode_box
from server import pki, tls
from server.config import LimitsSection
from server.connection_guard import ConnectionGuard, GuardedTLSProtocol
from server.relay.core import LEG_BUFFER_BYTES, MAX_PENDING, PAUSE_PENDING, Relay
from server.relay.errors import InvalidToken, RelayRefusedError
from server.relay.listener import listen_relay
from server.relay.tokens import RelayTokens, load_or_create_secret

from .fixtures_server import ADMIN_PASSWORD, run_cli, write_config

SECRET = b"s" * 32


def _reactor():
    from twisted.internet import reactor
    return reactor


async def sleep(seconds: float) -> None:
    await deferLater(_reactor(), seconds, lambda: None)


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for ``condition()`` on the reactor, polling; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.005)


# --- TLS material and the relay under test --------------------------------------------------

@pytest.fixture(scope="module")
def pki_material():
    ca_key, ca_cert = pki.create_ca("Relay test CA")
    key, cert = pki.issue_server_cert(ca_key, ca_cert, ("localhost",), ("127.0.0.1",), 30)
    return {"ca_cert": ca_cert, "server_ctx": tls.module_context([cert], key, ca_cert, "1.2",
                                                                 lambda serial: False)}


def client_options(ca_cert):
    trust = ssl.Certificate.loadPEM(pki.cert_pem(ca_cert))
    return ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust)


class LegClient(protocol.Protocol):
    """A module's relay leg: sends ``OpenRelayLeg`` (plus ``early`` bytes in the same write),
    reads the AMP answer, then collects raw bytes."""

    def __init__(self, token: str, early: bytes = b"") -> None:
        self.token = token
        self.early = early
        self.decoder = BoxDecoder()
        self.answer: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.received = bytearray()
        self.digest = hashlib.sha256()
        self.count = 0
        self.keep = True  # keep the bytes (False: only hash and count them)
        self.reason = None

    def connectionMade(self) -> None:
        self.transport.write(encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"7",
                                         b"relay_token": self.token.encode()}) + self.early)

    def dataReceived(self, data: bytes) -> None:
        if self.decoder is not None:
            self.decoder.feed(data)
            box = self.decoder.next_box()
            if box is None:
                return
            self.decoder.pause()
            data = self.decoder.take_unparsed()
            self.decoder = None
            self.answer.callback(box)
        self.count += len(data)
        self.digest.update(data)
        if self.keep:
            self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if not self.answer.called:
            self.answer.callback(None)
        self.lost.callback(None)

    @property
    def closed(self) -> bool:
        return self.lost.called


class RawClient(protocol.Protocol):
    """Sends whatever the test wants as the first bytes."""

    def __init__(self, first: bytes) -> None:
        self.first = first
        self.lost: Deferred = Deferred()
        self.received = bytearray()

    def connectionMade(self) -> None:
        self.transport.write(self.first)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


class RelayUnderTest:
    def __init__(self, pki_material, **relay_args) -> None:
        self.reactor = _reactor()
        self.tokens = relay_args.pop("tokens", None) or RelayTokens(SECRET)
        self.ended: list = []
        guard = relay_args.pop("guard", None)
        self.relay = Relay(self.tokens, self.reactor, on_ended=self.ended.append, **relay_args)
        self.port = listen_relay(self.reactor, 0, self.relay,
                                 tls.ServerContextFactory(pki_material["server_ctx"]), guard=guard)
        self.options = client_options(pki_material["ca_cert"])
        self.clients: list = []

    async def connect(self, client):
        factory = protocol.ClientFactory.forProtocol(lambda: client)
        self.reactor.connectSSL("127.0.0.1", self.port.getHost().port, factory, self.options)
        self.clients.append(client)
        return client

    async def leg(self, token: str, early: bytes = b"") -> tuple[LegClient, dict]:
        client = await self.connect(LegClient(token, early))
        answer = await client.answer
        return client, answer

    def session_tokens(self, session_id: str | None = None) -> tuple[str, str, str]:
        sid = session_id or str(uuid.uuid4())
        return sid, self.tokens.issue(sid, "supporter"), self.tokens.issue(sid, "peer")

    async def close(self) -> None:
        await self.port.stopListening()
        self.relay.close_all("test over")
        for client in self.clients:
            if client.transport is not None and not client.lost.called:
                client.transport.abortConnection()
        for client in self.clients:
            if client.transport is not None:
                await client.lost


@pytest.fixture
def relay_factory(pki_material):
    made: list[RelayUnderTest] = []

    def make(**relay_args) -> RelayUnderTest:
        made.append(RelayUnderTest(pki_material, **relay_args))
        return made[-1]

    yield make
    for r in made:
        pytest_twisted.blockon(Deferred.fromCoroutine(r.close()))


@pytest.fixture
def relay_log():
    """Every ``hausmeister.relay`` log event while the test runs."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "hausmeister.relay":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def messages(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events]


def _is_error(box: dict | None, code: bytes = b"RELAY_REFUSED") -> bool:
    return box is not None and box.get(b"_error") == b"7" and box.get(b"_error_code") == code


# --- bytes flow -------------------------------------------------------------------------------

@pytest.mark.parametrize("record_splice", [True, False], ids=["record-splice", "twisted-tls"])
@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways_with_counters_and_early_bytes(relay_factory, record_splice):
    r = relay_factory(record_splice=record_splice)
    sid, sup_token, peer_token = r.session_tokens()
    early = b"sent in the same packet as the command"
    supporter, answer = await r.leg(sup_token, early=early)
    assert answer == {b"_answer": b"7", b"session_id": sid.encode()}
    assert r.relay.sessions[sid].legs["supporter"].transport is not None
    peer, answer = await r.leg(peer_token)
    assert answer[b"session_id"] == sid.encode()

    to_peer = os.urandom(3 * 1024 * 1024 + 17)
    to_supporter = os.urandom(700_001)
    supporter.transport.write(to_peer)
    peer.transport.write(to_supporter)
    await until(lambda: peer.count >= len(early) + len(to_peer) and
                supporter.count >= len(to_supporter), what="both directions delivered")
    assert bytes(peer.received) == early + to_peer
    assert bytes(supporter.received) == to_supporter
    session = r.relay.sessions[sid]
    # the paired legs' records went through record_splice (or, switched off, Twisted's TLS)
    assert r.relay.spliced_sessions == int(record_splice)
    assert all((leg.splice is not None) == record_splice for leg in session.legs.values())
    assert session.legs["supporter"].bytes_forwarded == len(early) + len(to_peer)
    assert session.legs["peer"].bytes_forwarded == len(to_supporter)

    supporter.transport.loseConnection()
    await peer.lost
    await supporter.lost
    assert len(r.ended) == 1
    stats = r.ended[0]
    assert stats.session_id == sid
    assert stats.bytes_supporter_to_peer == len(early) + len(to_peer)
    assert stats.bytes_peer_to_supporter == len(to_supporter)
    assert stats.end_reason == "supporter closed the connection"
    assert stats.started_at is not None and stats.started_at <= stats.ended_at
    assert sid not in r.relay.sessions


@pytest_twisted.ensureDeferred
async def test_a_modules_leg_sends_short_records_without_waiting_for_delayed_acks(
        relay_factory, pki_material):
    """TCP_NODELAY on both ends of a leg: the module's (``open_leg``, what the modules use) and
    the relay's, so the last short record of a screen update is not held ~40 ms by Nagle."""
    import socket

    from modules.common.link.session_stream import open_leg
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    leg = await open_leg(r.reactor, "127.0.0.1", r.port.getHost().port, sup_token,
                         pki.cert_pem(pki_material["ca_cert"]), None)
    try:
        mine = leg.transport.transport.getHandle()
        assert mine.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        relays = r.relay.sessions[sid].legs["supporter"].transport
        theirs = getattr(relays, "transport", relays).getHandle()
        assert theirs.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        leg.close()
        await leg.ended


@pytest_twisted.ensureDeferred
async def test_one_leg_aborting_tears_down_the_other_and_on_ended_fires_once(relay_factory):
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    peer.transport.abortConnection()  # a reset, not a clean close
    await supporter.lost
    await sleep(0.05)
    assert len(r.ended) == 1
    assert r.ended[0].end_reason.startswith("peer connection lost")
    assert (r.ended[0].bytes_supporter_to_peer, r.ended[0].bytes_peer_to_supporter) == (5, 0)


@pytest_twisted.ensureDeferred
async def test_spliced_legs_behind_the_connection_guard_keep_the_bios_the_splice_holds(
        relay_factory):
    """The guarded TLS layer (relay processes, the module port) swaps a connection's
    handshake-sized memory BIOs for fresh ones once; a leg on the record splice keeps pointers
    to its BIOs (and its partner writes into them), so once it is attached nothing may swap
    them — that would free what the splice writes into."""
    limits = LimitsSection(tls_handshake_seconds=30, first_command_seconds=30,
                           http_header_seconds=30, pending_per_address=100, pending_total=100,
                           raise_open_file_limit=False, refusal_log_seconds=60)
    r = relay_factory(guard=ConnectionGuard(limits, _reactor()))
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token, early=b"early")
    peer, _ = await r.leg(peer_token)
    to_peer, to_supporter = os.urandom(1_000_003), os.urandom(300_001)
    supporter.transport.write(to_peer)
    peer.transport.write(to_supporter)
    await until(lambda: peer.count >= 5 + len(to_peer) and supporter.count >= len(to_supporter),
                what="both directions delivered")
    assert bytes(peer.received) == b"early" + to_peer
    assert bytes(supporter.received) == to_supporter
    for leg in r.relay.sessions[sid].legs.values():
        conn = leg.transport._tlsConnection
        assert leg.splice is not None and isinstance(leg.transport, GuardedTLSProtocol)
        assert (leg.splice.rbio, leg.splice.wbio) == (conn._into_ssl, conn._from_ssl)


@pytest_twisted.ensureDeferred
async def test_a_forged_record_on_a_spliced_leg_ends_the_session_through_twisted_tls(
        relay_factory):
    """Bytes that are not a valid TLS record (injected below the client's TLS) fail
    authentication in the fast path's SSL_read; the leg goes back to Twisted's TLS, which
    closes it, and the session ends with a TLS error.  Nothing forged reaches the partner."""
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    session = r.relay.sessions[sid]
    assert session.legs["supporter"].splice is not None
    forged = bytes([23, 3, 3, 0, 40]) + os.urandom(40)  # application-data header, random body
    supporter.transport.transport.write(forged)  # the TCP transport under the client's TLS
    await peer.lost
    await supporter.lost
    assert len(r.ended) == 1
    assert r.ended[0].end_reason.startswith("supporter connection lost")
    assert bytes(peer.received) == b"hello"
    assert r.ended[0].bytes_supporter_to_peer == 5


# --- token refusals ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reused_expired_tampered_tokens_and_a_second_leg_of_one_side_are_refused(
        relay_factory, relay_log):
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)

    # the same side twice (a second supporter token of this session): refused, first undisturbed
    dup, answer = await r.leg(r.tokens.issue(sid, "supporter"))
    assert _is_error(answer)
    assert answer[b"_error_description"] == b"relay session already has a supporter leg"
    await dup.lost

    # reused: the token of the waiting supporter leg
    reuse, answer = await r.leg(sup_token)
    assert _is_error(answer) and answer[b"_error_description"] == b"relay token already used"
    await reuse.lost

    # expired: issued by a clock 40 s in the past with the default 30 s lifetime
    old = RelayTokens(SECRET, clock=lambda: time.time() - 40).issue(str(uuid.uuid4()), "peer")
    late, answer = await r.leg(old)
    assert _is_error(answer) and b"expired" in answer[b"_error_description"]
    await late.lost

    # tampered: one character of the payload changed
    i = 10
    tampered = peer_token[:i] + ("A" if peer_token[i] != "A" else "B") + peer_token[i + 1:]
    forged, answer = await r.leg(tampered)
    assert _is_error(answer)
    assert answer[b"_error_description"].startswith(b"relay token is not genuine")
    await forged.lost

    # another secret: not genuine either
    foreign = RelayTokens(b"x" * 32).issue(sid, "peer")
    stranger, answer = await r.leg(foreign)
    assert _is_error(answer) and b"not genuine" in answer[b"_error_description"]
    await stranger.lost

    # the session is undisturbed: the real peer pairs and bytes flow
    peer, answer = await r.leg(peer_token)
    assert answer[b"session_id"] == sid.encode()
    peer.transport.write(b"still here")
    await until(lambda: supporter.received == b"still here", what="bytes after refusals")
    assert not supporter.closed

    refusals = [e for e in relay_log if e.get("log_format", "").startswith("relay refused leg")]
    reasons = [e["reason"] for e in refusals]
    assert "relay session already has a supporter leg" in reasons
    assert "relay token already used" in reasons
    assert any("expired" in x for x in reasons) and any("not genuine" in x for x in reasons)
    dup_event = next(e for e in refusals if e["reason"].startswith("relay session already has"))
    assert (dup_event["session_id"], dup_event["side"], dup_event["address"]) == (
        sid, "supporter", "127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_a_waiting_leg_whose_client_leaves_ends_the_session_at_once(relay_factory):
    r = relay_factory()  # pair timeout 30 s: the end below is not the timeout
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token, early=b"a little")
    supporter.transport.loseConnection()
    await supporter.lost
    await until(lambda: r.ended, timeout=5, what="the session to end")
    assert r.ended[0].end_reason == "supporter left before the relay partner arrived"
    late_peer, answer = await r.leg(peer_token)
    assert _is_error(answer)
    assert answer[b"_error_description"] == (
        b"relay session already ended (supporter left before the relay partner arrived)")


@pytest_twisted.ensureDeferred
async def test_a_token_of_an_ended_session_is_refused(relay_factory):
    r = relay_factory(pair_timeout=0.2)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    await supporter.lost  # pair timeout
    late_peer, answer = await r.leg(peer_token)
    assert _is_error(answer)
    assert answer[b"_error_description"].startswith(b"relay session already ended")


# --- timeouts ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_half_open_leg_is_closed_after_the_pair_timeout(relay_factory, relay_log):
    r = relay_factory(pair_timeout=0.3)
    sid, sup_token, _ = r.session_tokens()
    started = time.monotonic()
    supporter, answer = await r.leg(sup_token)
    assert answer[b"session_id"] == sid.encode()
    await supporter.lost
    waited = time.monotonic() - started
    assert 0.25 <= waited < 5
    assert len(r.ended) == 1
    assert r.ended[0].end_reason == "relay partner did not arrive within 0.3 s"
    assert r.ended[0].started_at is None
    assert any(e.get("reason") == "relay partner did not arrive within 0.3 s"
               and e.get("session_id") == sid and e.get("side") == "supporter"
               for e in relay_log)
    assert sid not in r.relay.sessions


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_both_legs(relay_factory):
    r = relay_factory(idle_timeout=0.4)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    # activity keeps the session alive past the idle timeout
    for _ in range(6):
        supporter.transport.write(b"x")
        quiet_from = time.monotonic()  # the relay sees the last byte after this
        await sleep(0.1)
    assert not supporter.closed and not peer.closed
    await until(lambda: peer.count == 6, what="keep-alive bytes")
    await supporter.lost
    await peer.lost
    assert 0.3 <= time.monotonic() - quiet_from < 5
    assert [s.end_reason for s in r.ended] == ["idle: no bytes either way for 0.4 s"]
    assert r.ended[0].bytes_supporter_to_peer == 6


# --- back-pressure ----------------------------------------------------------------------------

@implementer(IPushProducer)
class Pusher:
    """Writes random chunks as fast as its transport takes them, up to ``limit`` bytes."""

    def __init__(self, transport, limit: int, chunk: int = 64 * 1024) -> None:
        self.transport = transport
        self.limit = limit
        self.block = os.urandom(chunk)
        self.sent = 0
        self.digest = hashlib.sha256()
        self.paused = False
        self.paused_since = time.monotonic()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.sent < self.limit:
            # vary the bytes so reordering or loss would show in the hash
            chunk = self.sent.to_bytes(8, "big") + self.block[8:]
            self.digest.update(chunk)
            self.sent += len(chunk)
            self.transport.write(chunk)

    def pauseProducing(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()

    def stopProducing(self) -> None:
        self.paused = True


def _outgoing_bytes(tls_transport) -> int:
    """What a relay-side TLS transport holds to send: TLS layer plus TCP write buffer."""
    tcp = tls_transport.transport
    return (sum(len(b) for b in tls_transport._appSendBuffer)
            + len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen)


@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_pauses_the_sender_and_keeps_memory_bounded(relay_factory):
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    peer.keep = False
    await sleep(0.02)
    peer.transport.pauseProducing()  # the peer's client stops reading
    session = r.relay.sessions[sid]
    sup_leg, peer_leg = session.legs["supporter"], session.legs["peer"]

    limit = 256 * 1024 * 1024  # never reached: back-pressure must stop the sender long before
    pusher = Pusher(supporter.transport, limit)
    supporter.transport.registerProducer(pusher, True)
    pusher.resumeProducing()
    held = []
    deadline = time.monotonic() + 15
    # stalled = the sender has been paused for 0.5 s, i.e. nothing moves any more
    while not (pusher.paused and time.monotonic() - pusher.paused_since > 0.5):
        assert time.monotonic() < deadline, "the sender never stalled"
        assert pusher.sent < limit, "back-pressure did not stop the sender"
        held.append(_outgoing_bytes(peer_leg.transport))
        await sleep(0.01)

    assert sup_leg.splice is not None  # back-pressure holds on the fast path too
    assert sup_leg.pause_count >= 1
    assert not sup_leg._reading  # the relay stopped reading from the supporter
    # what the relay holds for the peer: its transport's buffer plus at most one read
    assert max(held) <= 2 * LEG_BUFFER_BYTES + 64 * 1024, max(held)
    stalled_at = pusher.sent
    assert stalled_at < 64 * 1024 * 1024  # what is in flight is kernel buffers, not the relay

    # The peer reads again: everything arrives, in order, and the sender is resumed.
    supporter.transport.unregisterProducer()
    pusher.limit = pusher.sent + 2 * 1024 * 1024
    supporter.transport.registerProducer(pusher, True)
    peer.transport.resumeProducing()
    pusher.resumeProducing()
    await until(lambda: peer.count == pusher.limit, timeout=20, what="all bytes after resume")
    assert peer.digest.hexdigest() == pusher.digest.hexdigest()
    assert sup_leg._reading
    assert session.legs["supporter"].bytes_forwarded == pusher.limit
    assert pusher.limit > stalled_at


# --- one leg closes: the partner is always closed, the end recorded once --------------------

def _reset(client) -> None:
    """Close the client's socket with a TCP reset (SO_LINGER 0), no close_notify, no FIN."""
    import socket
    import struct
    sock = client.transport.transport.getHandle()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.transport.transport.abortConnection()


def _half_close(client) -> None:
    """A FIN without close_notify (the client's TLS is bypassed); the client still reads."""
    import socket
    client.transport.transport.getHandle().shutdown(socket.SHUT_WR)


CLOSE_PATHS = {
    "close_notify": lambda c: c.transport.loseConnection(),
    "fin": _half_close,
    "rst": _reset,
    "alert": lambda c: c.transport.transport.write(bytes([23, 3, 3, 0, 40]) + os.urandom(40)),
}


@pytest.mark.parametrize("how", sorted(CLOSE_PATHS))
@pytest_twisted.ensureDeferred
async def test_a_spliced_leg_closing_any_way_closes_its_partner_at_once(relay_factory, how):
    """close_notify, a bare FIN, a reset or a record that fails authentication on one leg, mid
    transfer: the other leg is closed well before ``close_grace`` (no abort needed) and the
    session's end is recorded once, naming the leg that went."""
    r = relay_factory(close_grace=60)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    assert all(leg.splice is not None for leg in r.relay.sessions[sid].legs.values())
    peer.transport.write(os.urandom(512 * 1024))  # in flight while the supporter goes
    CLOSE_PATHS[how](supporter)
    await until(lambda: peer.closed, what="the peer leg closed")
    if how == "fin":
        await until(lambda: supporter.closed, what="the supporter leg closed")
    assert len(r.ended) == 1 and r.ended[0].session_id == sid
    assert r.ended[0].end_reason.startswith("supporter "), r.ended[0].end_reason
    assert sid not in r.relay.sessions


@pytest_twisted.ensureDeferred
async def test_both_spliced_legs_closing_at_once_end_the_session_once(relay_factory):
    r = relay_factory(close_grace=60)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"a")
    peer.transport.write(b"b")
    await until(lambda: peer.count == 1 and supporter.count == 1, what="first bytes")
    _half_close(supporter)
    _half_close(peer)
    await until(lambda: peer.closed and supporter.closed, what="both legs closed")
    await sleep(0.05)
    assert len(r.ended) == 1 and sid not in r.relay.sessions


@pytest.mark.parametrize("record_splice", [True, False], ids=["record-splice", "twisted-tls"])
@pytest_twisted.ensureDeferred
async def test_a_revoked_session_mid_transfer_closes_both_legs(relay_factory, record_splice):
    r = relay_factory(close_grace=60, record_splice=record_splice)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    peer.transport.write(os.urandom(512 * 1024))
    supporter.transport.write(os.urandom(512 * 1024))
    from protocol.session_end import EndCause, EndReason
    assert r.relay.end_session(sid, EndReason(EndCause.REVOKED, "server", "test"))
    await until(lambda: peer.closed and supporter.closed, what="both legs closed")
    assert len(r.ended) == 1 and r.ended[0].end.cause == EndCause.REVOKED


async def _stall_towards(r, sender, receiver, sid: str, receiving_side: str):
    """``receiver``'s client stops reading and ``sender`` pushes until the relay holds more than
    the receiving leg's buffer and has paused the sending leg."""
    receiver.keep = False
    receiver.transport.pauseProducing()
    session = r.relay.sessions[sid]
    sending_leg = session.legs["peer" if receiving_side == "supporter" else "supporter"]
    pusher = Pusher(sender.transport, 256 * 1024 * 1024)
    sender.transport.registerProducer(pusher, True)
    pusher.resumeProducing()
    await until(lambda: not sending_leg._reading, timeout=20, what="the relay pauses the sender")
    receiving_tcp = session.legs[receiving_side].transport.transport
    assert receiving_tcp.producerPaused
    return pusher


@pytest.mark.parametrize("record_splice", [True, False], ids=["record-splice", "twisted-tls"])
@pytest_twisted.ensureDeferred
async def test_a_leg_that_closes_while_the_relay_still_holds_its_bytes_closes_its_partner(
        relay_factory, record_splice):
    """The supporter's client, busy, stops reading while the peer sends (its relay TCP buffer
    full, the peer leg paused), then closes with a close_notify and reads on until the relay's
    close_notify.  The relay's TCP transport drains with its producer paused: Twisted then
    resumes the producer instead of closing, and nothing reads or writes that connection any
    more — unless the relay lets go of it.  The peer leg must be closed and the end recorded
    (this was the e2e hang: a supporter gone, the customer's leg open)."""
    r = relay_factory(close_grace=60, record_splice=record_splice)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    pusher = await _stall_towards(r, peer, supporter, sid, "supporter")
    pusher.stopProducing()  # the peer's client sends nothing more (its own TCP may hold some)
    peer.transport.unregisterProducer()
    supporter.transport.loseConnection()  # close_notify; the client waits for the relay's
    sup_tcp = r.relay.sessions[sid].legs["supporter"].transport.transport
    await until(lambda: sup_tcp.disconnecting, what="the relay closing the supporter's TCP")
    supporter.transport.resumeProducing()  # reads the rest, then the relay's close_notify
    await until(lambda: supporter.closed, timeout=20, what="the supporter's client closed")
    await until(lambda: peer.closed, timeout=10, what="the peer leg closed")
    assert len(r.ended) == 1, r.ended
    assert r.ended[0].end_reason == "supporter closed the connection"


@pytest_twisted.ensureDeferred
async def test_a_session_ended_while_the_relay_holds_bytes_for_a_stalled_leg_aborts_it_after_grace(
        relay_factory):
    """The relay ends a spliced session (here: revocation) while a peer that reads nothing has
    bytes queued in its TCP transport: the supporter is closed at once, the peer leg aborted
    after ``close_grace``, the end recorded once."""
    from protocol.session_end import EndCause, EndReason
    r = relay_factory(close_grace=0.5)
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)
    supporter.transport.write(b"hello")
    await until(lambda: peer.count == 5, what="hello")
    pusher = await _stall_towards(r, supporter, peer, sid, "peer")
    pusher.stopProducing()
    supporter.transport.unregisterProducer()
    peer_leg = r.relay.sessions[sid].legs["peer"]
    assert r.relay.end_session(sid, EndReason(EndCause.REVOKED, "server", "test"))
    await until(lambda: supporter.closed, timeout=10, what="the supporter leg closed")
    await until(lambda: peer_leg.lost, timeout=10, what="the relay aborting the peer leg")
    peer.transport.resumeProducing()  # the client reads again and finds the connection gone
    await until(lambda: peer.closed, timeout=10, what="the peer's client closed")
    assert len(r.ended) == 1 and r.ended[0].end.cause == EndCause.REVOKED


# --- bad first boxes --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_malformed_first_boxes_are_logged_and_closed_other_sessions_undisturbed(
        relay_factory, relay_log):
    r = relay_factory()
    sid, sup_token, peer_token = r.session_tokens()
    supporter, _ = await r.leg(sup_token)
    peer, _ = await r.leg(peer_token)

    bad = [
        (b"\x01\x00" + b"k" * 256, "malformed first box: key length 256 exceeds 255"),
        (encode_box({b"_command": b"Hello", b"_ask": b"1", b"protocol_version": b"1"}),
         "first box must be an OpenRelayLeg command that asks for an answer, got 'Hello'"),
        (encode_box({b"_command": b"OpenRelayLeg", b"relay_token": peer_token.encode()}),
         "first box must be an OpenRelayLeg command that asks for an answer"),
        (encode_box({b"_command": b"OpenRelayLeg", b"_ask": b"1", b"pad": b"p" * 5000}),
         "malformed first box: box is larger than 4096 bytes"),
        (b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", "malformed first box"),
    ]
    for first, reason in bad:
        client = await r.connect(RawClient(first))
        await client.lost
        assert client.received == b""  # nothing answered, nothing relayed
        assert any(e.get("reason", "").startswith(reason) and e.get("address") == "127.0.0.1"
                   for e in relay_log), (reason, messages(relay_log))

    supporter.transport.write(b"ping")
    peer.transport.write(b"pong")
    await until(lambda: peer.received == b"ping" and supporter.received == b"pong",
                what="the paired session still relays")
    assert not supporter.closed and not peer.closed and r.ended == []


@pytest_twisted.ensureDeferred
async def test_a_connection_that_never_sends_its_command_is_closed(relay_factory, relay_log):
    r = relay_factory(pair_timeout=0.3)
    client = await r.connect(RawClient(b"\x00\x08_com"))  # an unfinished box
    await client.lost
    assert any("no OpenRelayLeg command within 0.3 s" in m for m in messages(relay_log))


# --- the relay core without sockets -----------------------------------------------------------

class _Transport(StringTransport):
    def abortConnection(self) -> None:
        self.loseConnection()


def test_core_waits_one_turn_before_writing_to_a_new_leg_and_bounds_early_bytes():
    clock = Clock()
    now = [1000.0]
    tokens = RelayTokens(SECRET, clock=lambda: now[0])
    ended = []
    relay = Relay(tokens, clock, pair_timeout=30, on_ended=ended.append)
    sid = "s1"
    t1, t2 = _Transport(), _Transport()
    leg1 = relay.open_leg(tokens.issue(sid, "supporter"), t1, "127.0.1.1")
    assert t1.producerState == "producing"  # read while waiting: a client that leaves is seen
    leg1.data_received(b"early")
    assert t1.producerState == "producing"
    leg2 = relay.open_leg(tokens.issue(sid, "peer"), t2, "127.0.1.2")
    t2.write(b"ANSWER")  # the glue answers after open_leg returned
    assert t2.value() == b"ANSWER"
    leg2.data_received(b"to supporter")  # the first leg was answered long ago
    assert t1.value() == b"to supporter"
    clock.advance(0)
    assert t2.value() == b"ANSWERearly"
    assert t1.producerState == "producing"
    assert t2.producer is leg1 and t1.producer is leg2

    # a second session whose first leg sends more than MAX_PENDING before its partner arrives
    t3 = _Transport()
    leg3 = relay.open_leg(tokens.issue("s2", "peer"), t3, "127.0.1.3")
    leg3.data_received(b"x" * (PAUSE_PENDING - 1))
    assert t3.producerState == "producing"
    leg3.data_received(b"x")
    assert t3.producerState == "paused"  # the rest waits in the kernel
    leg3.data_received(b"x" * (MAX_PENDING - PAUSE_PENDING))  # what was already in flight
    assert not t3.disconnecting
    leg3.data_received(b"y")
    assert t3.disconnecting
    assert ended[-1].session_id == "s2" and "more than 65536 bytes" in ended[-1].end_reason
    # the first session is untouched
    assert sid in relay.sessions and not t1.disconnecting

    # single use is remembered until the token expires, then forgotten
    token = tokens.issue("s3", "peer")
    relay.open_leg(token, _Transport(), "127.0.1.4")
    with pytest.raises(RelayRefusedError, match="already used"):
        relay.open_leg(token, _Transport(), "127.0.1.4")
    now[0] += 31
    with pytest.raises(InvalidToken, match="expired"):
        relay.open_leg(token, _Transport(), "127.0.1.4")
    assert not any(n for n, exp in relay._used_nonces.items() if exp < now[0])

    # claims the glue verified already (the module port): single use still holds
    token = tokens.issue("s4", "peer")
    claims = tokens.verify(token)
    relay.open_leg(token, _Transport(), "127.0.1.5", verified=claims)
    with pytest.raises(RelayRefusedError, match="already used"):
        relay.open_leg(token, _Transport(), "127.0.1.5", verified=tokens.verify(token))


def test_core_refuses_sides_it_cannot_pair_yet():
    clock = Clock()
    tokens = RelayTokens(SECRET)
    relay = Relay(tokens, clock)
    with pytest.raises(RelayRefusedError, match="not supported"):
        relay.open_leg(tokens.issue("s", "viewer:3"), _Transport(), "127.0.1.1")


def test_core_aborts_a_leg_that_does_not_take_its_last_bytes():
    clock = Clock()
    tokens = RelayTokens(SECRET)
    relay = Relay(tokens, clock, close_grace=5)

    class Stuck(_Transport):
        aborted = False

        def loseConnection(self):
            self.disconnecting = True  # never completes: the client does not read

        def abortConnection(self):
            self.aborted = True

    t1, t2 = Stuck(), Stuck()
    relay.open_leg(tokens.issue("s", "supporter"), t1, "a")
    leg2 = relay.open_leg(tokens.issue("s", "peer"), t2, "b")
    clock.advance(0)
    leg2.connection_lost(None)
    assert t1.disconnecting and not t1.aborted
    clock.advance(5)
    assert t1.aborted


# --- tokens -----------------------------------------------------------------------------------

def test_token_round_trip_and_claims():
    now = [5000.0]
    tokens = RelayTokens(SECRET, ttl=30, clock=lambda: now[0])
    token = tokens.issue("0f8fad5b-d9cb-469f-a165-70867728950e", "viewer:3")
    assert len(token) < 200 and token.isascii()
    claims = tokens.verify(token)
    assert (claims.session_id, claims.side, claims.expires_at) == (
        "0f8fad5b-d9cb-469f-a165-70867728950e", "viewer:3", 5030.0)
    assert tokens.issue("s", "peer") != tokens.issue("s", "peer")  # random nonce
    now[0] = 5029.9
    tokens.verify(token)
    now[0] = 5030.0
    with pytest.raises(InvalidToken, match="expired"):
        tokens.verify(token)
    with pytest.raises(ValueError):
        tokens.issue("has|bar", "peer")
    with pytest.raises(ValueError):
        tokens.issue("s", "Supporter")


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=600), st.from_regex(r"[A-Za-z0-9_-]{0,200}\.[A-Za-z0-9_-]{0,60}")))
def test_verify_of_arbitrary_strings_only_raises_invalid_token(text):
    tokens = RelayTokens(SECRET)
    with pytest.raises(InvalidToken):
        tokens.verify(text)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_verify_of_mutated_tokens_only_raises_invalid_token(data):
    tokens = RelayTokens(SECRET)
    token = tokens.issue("session-1", "peer")
    i = data.draw(st.integers(0, len(token) - 1))
    c = data.draw(st.characters(codec="ascii").filter(lambda ch: ch != token[i]))
    with pytest.raises(InvalidToken):
        tokens.verify(token[:i] + c + token[i + 1:])


def test_secret_file_is_created_once_private_and_shared(tmp_path):
    path = tmp_path / "sub" / "relay.secret"
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == results[0]
    assert [p.name for p in path.parent.iterdir()] == ["relay.secret"]  # no temporary left
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="needs at least 32"):
        load_or_create_secret(path)


# --- a separate relay process -----------------------------------------------------------------

@pytest.fixture
def relay_process_config(tmp_path, db_url):
    """An initialised data folder for a relay process, on SQLite and on PostgreSQL."""
    data = tmp_path / "data"
    config = write_config(tmp_path / "hausmeister.toml", data, db_url,
                          extra="[relay]\nport = 0\nidle_timeout_seconds = 30\n")
    result = run_cli("server", "-c", str(config), "init", "--password-stdin",
                     stdin=ADMIN_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return config, data, db_url


@pytest_twisted.ensureDeferred
async def test_a_session_through_a_separate_relay_process(relay_process_config, tmp_path):
    import datetime as dt

    from server.db import Database
    from server.db.models import Session
    config, data, db_url = relay_process_config
    secret = load_or_create_secret(data / "relay.secret")  # the relay process reads the same
    tokens = RelayTokens(secret)
    sid = str(uuid.uuid4())
    db = Database(db_url)
    with db.session() as s:
        s.add(Session(id=sid, kind="adhoc", created_at=dt.datetime.now(dt.timezone.utc)))

    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "-c", str(config),
                                 "--log-level", "debug", "run", "--role", "relay"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        state = data / f"relay-{proc.pid}.json"
        await until(lambda: state.exists() or proc.poll() is not None, timeout=30,
                    what="the relay process to listen")
        assert proc.poll() is None, log_path.read_text()
        port = json.loads(state.read_text())["ports"][0]
        reactor = _reactor()
        options = client_options(pki.load_certs(data / "certs" / "ca.crt")[0])
        legs = []
        for token in (tokens.issue(sid, "supporter"), tokens.issue(sid, "peer")):
            client = LegClient(token)
            reactor.connectSSL("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: client),
                               options)
            answer = await client.answer
            assert answer == {b"_answer": b"7", b"session_id": sid.encode()}, log_path.read_text()
            legs.append(client)
        supporter, peer = legs
        to_peer, to_supporter = os.urandom(1_000_000), os.urandom(123_456)
        supporter.transport.write(to_peer)
        peer.transport.write(to_supporter)
        await until(lambda: peer.count == len(to_peer) and supporter.count == len(to_supporter),
                    what="bytes through the relay process")
        assert bytes(peer.received) == to_peer and bytes(supporter.received) == to_supporter
        peer.transport.loseConnection()
        await supporter.lost

        def recorded():
            with db.session() as s:
                row = s.get(Session, sid)
                return row if row.ended_at is not None else None
        await until(lambda: recorded() is not None, timeout=10, what="the session record")
        row = recorded()
        assert (row.bytes_to_peer, row.bytes_to_supporter) == (len(to_peer), len(to_supporter))
        assert row.end_reason == f"the connection to the {'customer' if row.kind == 'adhoc' else 'host'} was lost"
        assert row.end_cause == "connection_lost"
        assert row.started_at is not None and row.started_at <= row.ended_at

        # a leg for a session the database does not know still works; its end is logged
        other = str(uuid.uuid4())
        stray = LegClient(tokens.issue(other, "supporter"))
        reactor.connectSSL("127.0.0.1", port, protocol.ClientFactory.forProtocol(lambda: stray), options)
        assert (await stray.answer)[b"session_id"] == other.encode()
        stray.transport.loseConnection()
        await stray.lost
        await until(lambda: f"relay session {other} has no sessions row" in log_path.read_text(),
                    what="the missing row to be logged")
        assert "supporter left before the relay partner arrived" in log_path.read_text()
    finally:
        db.dispose()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()
    assert not (data / f"relay-{proc.pid}.json").exists()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("ns") == "hausmeister.relay" and "paired" in line["msg"] for line in lines)


def test_relay_role_refuses_an_uninitialised_data_folder(tmp_path):
    config = write_config(tmp_path / "h.toml", tmp_path / "empty",
                          f"sqlite:///{tmp_path / 'h.sqlite3'}")
    result = run_cli("server", "-c", str(config), "run", "--role", "relay", timeout=30)
    assert result.returncode == 1
    assert "run `hausmeister-server init` first" in result.stderr
