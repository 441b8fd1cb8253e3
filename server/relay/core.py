"""The relay: pairs the two legs of a session and splices their bytes, with back-pressure.

This is the whole relay logic, independent of how a leg's token arrived (the module port's AMP
connection in the server process, or ``server.relay.listener`` in a separate relay process).
A glue hands over a connection whose ``OpenRelayLeg`` it has answered::

    leg = relay.open_leg(token, transport, peer_address)   # RelayRefusedError / InvalidToken
    ...  protocol.dataReceived   -> leg.data_received(data)
    ...  protocol.connectionLost -> leg.connection_lost(reason)

and from then on must not write to the transport itself.  The relay writes the partner's bytes
to ``transport`` starting on the next reactor turn at the earliest, so the glue's answer (written
before its call stack unwinds) always comes first.

What it does
    * Tokens are single use: a token's nonce is remembered until the token expires.
    * Pairing: the first leg waits for its partner.  It is read while it sends nothing, so a
      client that leaves is noticed at once; once ``pause_pending`` bytes have come in, its
      transport is paused (``pauseProducing``) and the rest waits in the kernel.  Those bytes
      (at most ``max_pending``: more is refused) are delivered after pairing.  A paused
      connection no longer notices that its client went away, and a client may vanish without
      a word, so a leg that waits longer than ``pair_timeout`` is closed.
    * Splicing: each leg is registered as the streaming producer of its partner's transport, so
      a client that stops reading makes the relay stop reading from the other side: what the
      relay holds per direction is bounded by the transports' own buffers (``leg_buffer_bytes``,
      256 KiB, plus one read).
    * ``idle_timeout`` without a byte either way closes both legs.
    * When one leg goes the other is closed after flushing what it has (aborted if its client
      does not take it within ``close_grace``), and ``on_ended(SessionStats)`` is called once.

What it does not do: touch the disk (bytes live only in transport buffers), decide who may have
a session (the broker did, when it issued the tokens), or look inside the bytes.
"""

from __future__ import annotations

import heapq
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.interfaces import IPushProducer
from twisted.internet.error import ConnectionDone
from protocol.runtime import Logger  # debug() is free when not logged
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from protocol.session_end import EndCause, EndReason

from . import record_splice
from .errors import InvalidToken, RelayRefusedError
from .tokens import RelayTokens, TokenClaims

log = Logger(namespace="hausmeister.relay")

#: Which side pairs with which.  More parties later (``viewer:N``) get their own rule here.
PARTNER = {"supporter": "peer", "peer": "supporter"}
MAX_PENDING = 64 * 1024
PAUSE_PENDING = 16 * 1024
LEG_BUFFER_BYTES = 256 * 1024


@dataclass(frozen=True)
class SessionStats:
    session_id: str
    bytes_supporter_to_peer: int
    bytes_peer_to_supporter: int
    started_at: float | None  # when both legs were there (None: never paired); reactor seconds
    ended_at: float
    end_reason: str
    #: the same reason, structured; ``by`` is a relay side ("supporter"/"peer"), "relay" or
    #: "server" — ``record_session_end`` names the peer (customer or host) from the session row
    end: EndReason | None = None


def _peer_certificate(transport: Any) -> tuple[str | None, str | None]:
    """(serial in lowercase hex, identity URI) of the leg's client certificate, if it sent one."""
    try:
        peer = transport.getPeerCertificate()
    except Exception:
        return None, None
    if peer is None:
        return None, None
    cert = peer.to_cryptography()
    try:
        from protocol.identity import identity_of
        identity = identity_of(cert)
        uri = identity.uri if identity else None
    except Exception:
        uri = None
    return format(cert.serial_number, "x"), uri


def unbuffer_tls_writes(transport: Any) -> bool:
    """Turn off Twisted's small-write aggregation on one TLS connection (True if it was on).

    ``BufferingTLSTransport`` copies every write into a list and joins it on the next reactor
    turn; a relay only ever forwards whole TLS records (up to 16 KiB), which gain nothing from
    that and lose ~20 % throughput (bench/README.md).
    """
    aggregator = getattr(transport, "_aggregator", None)
    if aggregator is None or not isinstance(transport, TLSMemoryBIOProtocol):
        return False
    aggregator.flush()
    transport.write = types.MethodType(TLSMemoryBIOProtocol.write, transport)
    transport.writeSequence = types.MethodType(TLSMemoryBIOProtocol.writeSequence, transport)
    return True


def tune_leg_transport(transport: Any, buffer_bytes: int | None,
                       tls_write_aggregation: bool = False) -> None:
    """Set a relay leg's connection up for bulk forwarding (see bench/README.md for figures).

    ``buffer_bytes`` becomes the TCP transport's ``bufferSize``: its read size and how much it
    holds before it pauses its producer (the partner leg).  Twisted's 64 KiB makes a busy relay
    pause and resume the other side after nearly every read; 256 KiB costs at most ~0.5 MiB per
    direction of a stalled session and saves ~30 % CPU per byte.
    """
    if not tls_write_aggregation:
        unbuffer_tls_writes(transport)
    tcp = getattr(transport, "transport", None) if isinstance(transport, TLSMemoryBIOProtocol) \
        else transport
    if buffer_bytes and hasattr(tcp, "bufferSize"):
        tcp.bufferSize = buffer_bytes
    if hasattr(tcp, "setTcpNoDelay"):
        tcp.setTcpNoDelay(True)  # small records must not wait for a delayed ACK


def _tcp_closing(transport: Any) -> bool:
    """The TCP connection under a leg's transport is closing (``loseConnection`` was called on
    it, e.g. by its TLS layer after a close_notify or an alert)."""
    tcp = transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport
    return bool(getattr(tcp, "disconnecting", False)) and bool(getattr(tcp, "connected", False))


def _describe(reason: Failure | None) -> str:
    if reason is None or reason.check(ConnectionDone):
        return "closed the connection"
    return f"connection lost ({reason.getErrorMessage()})"


def _lost(side: str, reason: Failure | None) -> EndReason:
    clean = reason is None or reason.check(ConnectionDone)
    return EndReason(EndCause.CONNECTION_LOST, side,
                     "" if clean else reason.getErrorMessage()[:120])


@implementer(IPushProducer)
class RelayLeg:
    """One party's connection to the relay.  Also the producer registered with its partner's
    transport: the partner's transport pauses it when it cannot send fast enough."""

    def __init__(self, relay: "Relay", session: "_RelaySession", claims: TokenClaims,
                 transport: Any, peer_address: str, splice_ok: bool = False,
                 peer: tuple[str | None, str | None] | None = None) -> None:
        self.relay = relay
        self.session = session
        self.session_id = claims.session_id
        self.side = claims.side
        self.peer_address = peer_address
        self.transport = transport
        #: the client certificate's serial and identity (None for an ad-hoc customer): a
        #: revoked certificate ends the session (``Relay.end_revoked``)
        self.serial, self.identity = peer if peer is not None else _peer_certificate(transport)
        self.partner: RelayLeg | None = None
        #: Bytes this leg's client sent that were passed on to the partner.
        self.bytes_forwarded = 0
        #: How often the partner's transport asked us to stop reading (back-pressure).
        self.pause_count = 0
        self.closed = False
        self.lost = False
        self._pending: bytearray | None = bytearray()  # bytes that came before the partner
        self._write: Callable[[bytes], None] | None = None  # the partner's transport.write
        self._held = False       # paused: enough bytes came before the partner
        self._throttled = False  # paused because the partner's transport is full
        self._reading = True
        self._abort_call = None
        #: the glue delivers our bytes only through ``data_received`` (nothing held back), so
        #: the fast path may read this leg's socket itself once paired (``record_splice``)
        self.splice_ok = splice_ok
        self.splice: record_splice.SpliceSide | None = None

    def __repr__(self) -> str:
        return f"<RelayLeg {self.session_id} {self.side} from {self.peer_address}>"

    # --- from the glue ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        write = self._write
        if write is not None:  # the hot path: splice
            self.bytes_forwarded += len(data)
            self.session.last_active = self.relay.seconds()
            write(data)
        elif self._pending is not None and not self.closed:
            self._pending += data
            if len(self._pending) > self.relay.max_pending:
                self.relay._refuse_leg(self, f"{self.side} sent more than {self.relay.max_pending} "
                                       "bytes before its relay partner arrived")
            elif len(self._pending) >= self.relay.pause_pending and not self._held:
                self._held = True  # the rest waits in the kernel until the partner is here
                self._update_reading()
        # else: the session is over; what still trickles in is dropped.

    def connection_lost(self, reason: Failure | None = None) -> None:
        if self.lost:
            return
        self.lost = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        if self.session.ended:
            return
        if self.partner is None:
            why = f"{self.side} left before the relay partner arrived"
        else:
            why = f"{self.side} {_describe(reason)}"
        self.relay._end(self.session, why, _lost(self.side, reason))

    # --- IPushProducer, called by the partner's transport -----------------------------------

    def pauseProducing(self) -> None:
        self.pause_count += 1
        self._throttled = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._throttled = False
        partner = self.partner
        if partner is not None and not partner.lost and _tcp_closing(partner.transport):
            # The partner's TLS ended (its client's close_notify or an alert) while its TCP
            # buffer held more than ``bufferSize``: the buffer has now drained, and Twisted
            # resumes a paused producer *instead of* closing -- the connection would then never
            # close (nothing reads or writes it any more), and the session never end.  Let go
            # of it so it closes; its ``connection_lost`` ends the session with the real reason.
            partner.transport.unregisterProducer()
        self._update_reading()

    def stopProducing(self) -> None:
        # The partner's transport is going away; its connection_lost normally follows at once
        # with the better reason, so only make sure the session ends if it does not.
        if not self.session.ended:
            self.relay.reactor.callLater(0, self._partner_gone)

    def _partner_gone(self) -> None:
        if not self.session.ended:
            side = self.partner.side if self.partner else "peer"
            self.relay._end(self.session, f"{side} connection lost",
                            EndReason(EndCause.CONNECTION_LOST, side))

    # --- the relay's own controls -----------------------------------------------------------

    def _update_reading(self) -> None:
        want = self.closed or not (self._held or self._throttled)
        if want != self._reading and not self.lost:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _start_splicing(self) -> None:
        """Partner present and answered: our bytes may go to it now."""
        partner = self.partner
        pending, self._pending = self._pending, None
        partner.transport.registerProducer(self, True)
        self._write = partner.transport.write
        self._held = False
        # Resume first: the reactor reads on a later turn, so ``pending`` still goes out first;
        # and if writing it fills the partner's buffer, that pause comes after this resume.
        self._update_reading()
        if pending:
            self.bytes_forwarded += len(pending)
            self._write(bytes(pending))

    def _close(self, grace: float) -> None:
        """Stop splicing and close after flushing; abort if the client does not take it."""
        if self.closed:
            return
        self.closed = True
        self._write = None
        self._pending = None
        if self.splice is not None:
            self.splice.detach()  # closing goes Twisted's way (close_notify, flush, abort)
        if self.lost:
            return
        transport = self.transport
        try:
            # A registered producer keeps a transport from closing; then read again, so our
            # close_notify's answer (and whatever else arrives, dropped) can come in.
            transport.unregisterProducer()
            self._update_reading()
            transport.loseConnection()
        except Exception:
            log.failure("closing relay leg {leg} failed; aborting it", leg=repr(self))
            transport.abortConnection()
            return
        self._abort_call = self.relay.reactor.callLater(grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self.lost:
            log.info("relay leg {side} of session {session_id} from {address} did not take its "
                     "last bytes within {grace} s: aborted", side=self.side,
                     session_id=self.session_id, address=self.peer_address,
                     grace=self.relay.close_grace)
            self.transport.abortConnection()


@dataclass(eq=False)
class _RelaySession:
    session_id: str
    created_at: float
    forget_at: float  # wall clock: when no token of this session can still be valid
    legs: dict[str, RelayLeg] = field(default_factory=dict)
    started_at: float | None = None
    last_active: float = 0.0
    ended: bool = False
    end_reason: str = ""
    pair_timer: Any = None
    idle_timer: Any = None


class Relay:
    """All relay sessions of one process."""

    def __init__(self, tokens: RelayTokens, reactor: Any, pair_timeout: float = 30.0,
                 idle_timeout: float = 300.0,
                 on_ended: Callable[[SessionStats], None] | None = None,
                 max_pending: int = MAX_PENDING, pause_pending: int = PAUSE_PENDING,
                 close_grace: float = 10.0, leg_buffer_bytes: int | None = LEG_BUFFER_BYTES,
                 tls_write_aggregation: bool = False, record_splice: bool = True) -> None:
        self.tokens = tokens
        self.reactor = reactor
        self.seconds = reactor.seconds
        self.pair_timeout = pair_timeout
        self.idle_timeout = idle_timeout
        self.on_ended = on_ended
        self.max_pending = max_pending
        self.pause_pending = min(pause_pending, max_pending)
        self.close_grace = close_grace
        self.tls_write_aggregation = tls_write_aggregation
        self.leg_buffer_bytes = leg_buffer_bytes
        #: move records of paired legs in C calls (``record_splice``) where the glue allows it
        self.record_splice = record_splice and not tls_write_aggregation
        self.spliced_sessions = 0  # how many sessions went on the fast path (tests, benchmarks)
        self.sessions: dict[str, _RelaySession] = {}
        self.accepting = True
        self._used_nonces: dict[str, float] = {}
        self._ended: dict[str, str] = {}  # session id -> end reason, until its tokens expire
        self._forget: list[tuple[float, str, str]] = []  # (wall time, kind, key) heap

    # --- the glue's entry point -------------------------------------------------------------

    def open_leg(self, token: str, transport: Any, peer_address: str,
                 splice_ok: bool = False, verified: TokenClaims | None = None,
                 peer: tuple[str | None, str | None] | None = None) -> RelayLeg:
        """Admit ``transport`` as a relay leg, or raise ``RelayRefusedError`` (logged here).

        ``splice_ok``: the glue passes every byte after the answer straight to
        ``data_received`` (nothing held back for a later turn), so once paired the relay may
        read the leg's socket itself (``record_splice``).  ``verified``: the claims the caller
        got from ``self.tokens.verify(token)`` in this same reactor turn (the module port checks
        the token before it answers): not verified a second time.  Single use, the session's
        state and the side are checked here either way.  ``peer``: (serial, identity URI) of the
        leg's client certificate as the caller already knows them (the module port, from its
        handshake; (None, None) for none): the certificate is not parsed a second time."""
        self._expire_memory()
        try:
            claims = verified if verified is not None else self.tokens.verify(token)
        except InvalidToken as exc:
            self._log_refusal(None, None, peer_address, exc.reason)
            raise
        try:
            session = self._admit(claims)
        except RelayRefusedError as exc:
            self._log_refusal(claims.session_id, claims.side, peer_address, exc.reason)
            raise
        self._remember(claims.expires_at, "nonce", claims.nonce)
        self._used_nonces[claims.nonce] = claims.expires_at
        leg = RelayLeg(self, session, claims, transport, peer_address, splice_ok, peer)
        tune_leg_transport(transport, self.leg_buffer_bytes, self.tls_write_aggregation)
        session.legs[claims.side] = leg
        partner = session.legs.get(PARTNER[claims.side])
        if partner is None:
            session.pair_timer = self.reactor.callLater(self.pair_timeout, self._pair_timed_out,
                                                        session)
            log.debug("relay leg {side} of session {session_id} from {address} waits for its partner",
                     session_id=session.session_id, side=leg.side, address=peer_address)
        else:
            self._pair(session, partner, leg)
        return leg

    def _admit(self, claims: TokenClaims) -> _RelaySession:
        if not self.accepting:
            raise RelayRefusedError("the relay is shutting down")
        if claims.nonce in self._used_nonces:
            raise RelayRefusedError("relay token already used")
        if claims.side not in PARTNER:
            raise RelayRefusedError(f"relay side {claims.side!r} is not supported by this relay")
        if claims.session_id in self._ended:
            raise RelayRefusedError(f"relay session already ended ({self._ended[claims.session_id]})")
        session = self.sessions.get(claims.session_id)
        if session is None:
            session = _RelaySession(claims.session_id, self.seconds(),
                                    forget_at=claims.expires_at + self.tokens.ttl)
            self.sessions[claims.session_id] = session
            return session
        if claims.side in session.legs:
            raise RelayRefusedError(f"relay session already has a {claims.side} leg")
        session.forget_at = max(session.forget_at, claims.expires_at + self.tokens.ttl)
        return session

    # --- pairing, timers, teardown ----------------------------------------------------------

    def _pair(self, session: _RelaySession, waiting: RelayLeg, arriving: RelayLeg) -> None:
        if session.pair_timer is not None and session.pair_timer.active():
            session.pair_timer.cancel()
        session.pair_timer = None
        waiting.partner, arriving.partner = arriving, waiting
        session.started_at = session.last_active = self.seconds()
        # The waiting leg's answer went out long ago: the new leg's bytes may flow at once.
        arriving._pending = None
        waiting.transport.registerProducer(arriving, True)
        arriving._write = waiting.transport.write
        # The other way waits one turn, until the new leg's glue has written its answer.
        self.reactor.callLater(0, self._activate, session, waiting)
        session.idle_timer = self.reactor.callLater(self.idle_timeout, self._idle_check, session)
        log.debug("relay session {session_id} paired: {first} from {first_address}, {second} from "
                 "{second_address}", session_id=session.session_id, first=waiting.side,
                 first_address=waiting.peer_address, second=arriving.side,
                 second_address=arriving.peer_address)

    def _activate(self, session: _RelaySession, leg: RelayLeg) -> None:
        if session.ended:
            return
        leg._start_splicing()
        partner = leg.partner
        if (self.record_splice and leg.splice_ok and partner is not None and partner.splice_ok
                and not session.ended and record_splice.attach_pair(leg, partner)):
            self.spliced_sessions += 1

    def _pair_timed_out(self, session: _RelaySession) -> None:
        session.pair_timer = None
        if session.ended:
            return
        for leg in session.legs.values():
            self._log_refusal(session.session_id, leg.side, leg.peer_address,
                              f"relay partner did not arrive within {self.pair_timeout:g} s")
        missing = next((side for side in PARTNER if side not in session.legs), "peer")
        self._end(session, f"relay partner did not arrive within {self.pair_timeout:g} s",
                  EndReason(EndCause.PAIR_TIMEOUT, missing,
                            f"not within {self.pair_timeout:g} s"))

    def _idle_check(self, session: _RelaySession) -> None:
        session.idle_timer = None
        if session.ended:
            return
        quiet = self.seconds() - session.last_active
        if quiet >= self.idle_timeout:
            self._end(session, f"idle: no bytes either way for {self.idle_timeout:g} s",
                      EndReason(EndCause.IDLE_TIMEOUT, "relay",
                                f"no data either way for {self.idle_timeout:g} s"))
        else:
            session.idle_timer = self.reactor.callLater(self.idle_timeout - quiet,
                                                        self._idle_check, session)

    def _refuse_leg(self, leg: RelayLeg, reason: str) -> None:
        self._log_refusal(leg.session_id, leg.side, leg.peer_address, reason)
        self._end(leg.session, reason, EndReason(EndCause.ERROR, leg.side, reason))

    def _end(self, session: _RelaySession, reason: str, end: EndReason | None = None) -> None:
        if session.ended:
            return
        session.ended = True
        session.end_reason = reason
        for timer in (session.pair_timer, session.idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        session.pair_timer = session.idle_timer = None
        if self.sessions.get(session.session_id) is session:
            del self.sessions[session.session_id]
        self._ended[session.session_id] = reason
        self._remember(session.forget_at, "session", session.session_id)
        for leg in list(session.legs.values()):
            leg._close(self.close_grace)
        supporter, peer = session.legs.get("supporter"), session.legs.get("peer")
        stats = SessionStats(
            session_id=session.session_id,
            bytes_supporter_to_peer=supporter.bytes_forwarded if supporter else 0,
            bytes_peer_to_supporter=peer.bytes_forwarded if peer else 0,
            started_at=session.started_at, ended_at=self.seconds(), end_reason=reason,
            end=end or EndReason(EndCause.ERROR, "relay", reason[:120]))
        log.info("relay session {session_id} ended: {reason} (supporter to peer {to_peer} bytes, "
                 "peer to supporter {to_supporter} bytes)", session_id=session.session_id,
                 reason=reason, to_peer=stats.bytes_supporter_to_peer,
                 to_supporter=stats.bytes_peer_to_supporter)
        if self.on_ended is not None:
            try:
                self.on_ended(stats)
            except Exception:
                log.failure("recording the end of relay session {session_id} failed",
                            session_id=session.session_id)

    def close_all(self, reason: str = "the relay is shutting down") -> None:
        """Refuse new legs and end every session (each ``on_ended`` is called before return)."""
        self.accepting = False
        for session in list(self.sessions.values()):
            self._end(session, reason, EndReason(EndCause.SERVER_SHUTDOWN, "server"))

    def end_session(self, session_id: str, end: EndReason) -> bool:
        """End a live session for a reason the server decided (an unwritable protocol, ...)."""
        session = self.sessions.get(session_id)
        if session is None or session.ended:
            return False
        self._end(session, end.text(), end)
        return True

    def end_revoked(self, revoked: set[str],
                    detail: Callable[[str], str] | None = None) -> list[str]:
        """End every session one of whose legs presented a certificate whose serial is in
        ``revoked``; ``detail(serial)`` says why (e.g. "certificate of … revoked: user disabled").
        Returns the ended session ids."""
        ended = []
        for session in list(self.sessions.values()):
            for leg in session.legs.values():
                if leg.serial is not None and leg.serial in revoked:
                    why = detail(leg.serial) if detail else f"certificate {leg.serial} revoked"
                    log.warn("relay session {session_id}: the {side} leg's certificate {serial} "
                             "was revoked; ending the session", session_id=session.session_id,
                             side=leg.side, serial=leg.serial)
                    self._end(session, f"access revoked: {why}",
                              EndReason(EndCause.REVOKED, "server", why))
                    ended.append(session.session_id)
                    break
        return ended

    def live_session_ids(self) -> list[str]:
        return list(self.sessions)

    # --- memory of used tokens and ended sessions -------------------------------------------

    def _remember(self, until: float, kind: str, key: str) -> None:
        heapq.heappush(self._forget, (until, kind, key))

    def _expire_memory(self) -> None:
        now = self.tokens.clock()
        heap = self._forget
        while heap and heap[0][0] <= now:
            _, kind, key = heapq.heappop(heap)
            if kind == "nonce":
                self._used_nonces.pop(key, None)
            else:
                self._ended.pop(key, None)

    @staticmethod
    def _log_refusal(session_id: str | None, side: str | None, address: str, reason: str) -> None:
        log.warn("relay refused leg {side} of session {session_id} from {address}: {reason}",
                 session_id=session_id, side=side, address=address, reason=reason)


__all__ = ["Relay", "RelayLeg", "SessionStats", "PARTNER", "MAX_PENDING", "PAUSE_PENDING",
           "LEG_BUFFER_BYTES", "unbuffer_tls_writes", "tune_leg_transport",
           "RelayRefusedError", "InvalidToken"]
