"""A separate relay process (``hausmeister-server run --role relay``): a TLS port for relay legs.

Each connection must open with exactly one AMP box, ``OpenRelayLeg``; it gets an AMP answer
(``session_id``) or an AMP error (``RELAY_REFUSED`` and the reason) and from then on is a raw
byte pipe spliced by ``server.relay.core``.  Anything else as the first box, a box that never
completes, or no box within the pair timeout: logged and closed.  Client certificates are
optional (an ad-hoc customer has none; the relay token is the authority), but one that is
presented is checked like on the module port, revocation included.

``RelayService`` is the process: listener, relay core, and the session records it writes into
the ``sessions`` table when a relay session ends (``record_session_end``, which the in-process
relay of the server uses too).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from protocol.control import OpenRelayLeg, RelayRefused
from protocol.framing import BoxDecoder, FramingError, encode_box
from protocol.runtime import run_blocking
from protocol.session_end import EndCause, EndReason

from .. import certificates, tls
from ..config import Config
from ..connection_guard import ConnectionGuard, GuardedTLSFactory, GuardedTLSProtocol, settle
from ..tls import LISTEN_BACKLOG
from ..db import Database
from ..db.models import Session
from ..pki import CertStore
from ..group_commit import GroupCommit
from ..session_commit import _detail_of, close_sessions
from ..session_protocol import SessionProtocols
from .core import Relay, RelayLeg, SessionStats
from .errors import InvalidToken, RelayRefusedError
from .tokens import RelayTokens, load_or_create_secret

log = Logger(namespace="hausmeister.relay")

#: The only box a relay connection may send: a token is ~150 bytes, so this is generous.
MAX_COMMAND_BYTES = 4096
_COMMAND = OpenRelayLeg.commandName  # b"OpenRelayLeg"


class RelayLegProtocol(protocol.Protocol):
    """One connection to a relay process: the ``OpenRelayLeg`` handshake, then raw bytes."""

    def __init__(self, relay: Relay, command_timeout: float, claim=None) -> None:
        self.relay = relay
        self.command_timeout = command_timeout
        #: several relay processes: ``claim(claims)`` -> Deferred[bool], the token's first use
        self.claim = claim
        self.claiming: bytearray | None = None  # bytes that came while the claim was asked
        self.gone = False
        self.decoder: BoxDecoder | None = BoxDecoder(max_box_bytes=MAX_COMMAND_BYTES, max_keys=8)
        self.leg: RelayLeg | None = None
        self.address = "?"
        self._timer = None

    def connectionMade(self) -> None:
        self.address = self.transport.getPeer().host
        self._timer = self.relay.reactor.callLater(self.command_timeout, self._no_command)

    def dataReceived(self, data: bytes) -> None:
        leg = self.leg
        if leg is not None:
            leg.data_received(data)
            return
        if self.claiming is not None:
            self.claiming += data
            return
        decoder = self.decoder
        if decoder is None:
            return  # refused and closing: ignore the rest
        try:
            decoder.feed(data)
            box = decoder.next_box()
        except FramingError as exc:
            self._reject(f"malformed first box: {exc}")
            return
        if box is None:
            return
        decoder.pause()  # nothing behind the command is parsed: it belongs to the session
        rest = decoder.take_unparsed()
        self.decoder = None
        self._cancel_timer()
        self._command(box, rest)

    def _command(self, box: dict[bytes, bytes], rest: bytes) -> None:
        command, tag = box.get(b"_command"), box.get(b"_ask")
        if command != _COMMAND or not tag:
            shown = command.decode("ascii", "replace")[:40] if command else "no command"
            self._reject(f"first box must be an OpenRelayLeg command that asks for an answer, "
                         f"got {shown!r}")
            return
        token = box.get(b"relay_token", b"").decode("utf-8", "replace")
        if self.claim is not None:
            try:
                claims = self.relay.tokens.verify(token)
            except InvalidToken:
                claims = None  # open_leg refuses it with the reason and logs it
            if claims is not None:
                self.claiming = bytearray(rest)
                self.claim(claims).addCallbacks(
                    lambda first: self._claimed(first, tag, token),
                    lambda failure: self._claimed(None, tag, token, failure))
                return
        self._open(tag, token, rest)

    def _claimed(self, first: bool | None, tag: bytes, token: str, failure=None) -> None:
        rest, self.claiming = bytes(self.claiming or b""), None
        if self.gone:
            return
        if first:
            self._open(tag, token, rest)
            return
        if failure is not None:
            log.failure("relay: could not check a relay token's single use", failure)
        reason = ("relay token already used" if first is False
                  else "the relay cannot check relay tokens right now (database)")
        log.warn("relay refused connection from {address}: {reason}", address=self.address,
                 reason=reason, session_id=None, side=None)
        self.transport.write(encode_box({b"_error": tag, b"_error_code": RelayRefused.code,
                                         b"_error_description": reason.encode("utf-8")}))
        self.transport.loseConnection()

    def _open(self, tag: bytes, token: str, rest: bytes) -> None:
        try:
            # splice_ok: every later byte goes straight to the leg (``dataReceived`` above)
            leg = self.relay.open_leg(token, self.transport, self.address, splice_ok=True)
        except RelayRefusedError as exc:  # logged by the relay with session, side and address
            self.transport.write(encode_box({b"_error": tag, b"_error_code": RelayRefused.code,
                                             b"_error_description": exc.reason.encode("utf-8")}))
            self.transport.loseConnection()
            return
        settle(self.transport)  # a valid relay token: no longer a pending connection
        # The answer goes out before this call returns; the relay writes the partner's bytes on a
        # later reactor turn.
        self.transport.write(encode_box({b"_answer": tag, b"session_id": leg.session_id.encode()}))
        self.leg = leg
        if rest:
            leg.data_received(rest)

    def _reject(self, reason: str) -> None:
        log.warn("relay refused connection from {address}: {reason}", address=self.address,
                 reason=reason, session_id=None, side=None)
        self.decoder = None
        self._cancel_timer()
        self.transport.loseConnection()

    def _no_command(self) -> None:
        self._timer = None
        if self.leg is None and self.decoder is not None:
            self._reject(f"no OpenRelayLeg command within {self.command_timeout:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason) -> None:
        self._cancel_timer()
        self.gone = True
        if self.leg is not None:
            self.leg.connection_lost(reason)


class RelayFactory(protocol.Factory):
    noisy = False

    def __init__(self, relay: Relay, command_timeout: float | None = None, claim=None) -> None:
        self.relay = relay
        self.command_timeout = relay.pair_timeout if command_timeout is None else command_timeout
        self.claim = claim

    def buildProtocol(self, addr) -> RelayLegProtocol:
        proto = RelayLegProtocol(self.relay, self.command_timeout, self.claim)
        proto.factory = self
        return proto


def listen_relay(reactor: Any, port: int, relay: Relay, context_factory: Any,
                 interface: str = "127.0.0.1", tls_write_aggregation: bool = False,
                 guard: ConnectionGuard | None = None, claim=None):
    """Listen for relay legs with TLS on ``interface:port`` (0: any free port); an IListeningPort.

    With a ``guard``, connections that have not sent a valid ``OpenRelayLeg`` are held to its
    deadlines and caps (``[limits]``)."""
    if guard is None:
        tls_factory = TLSMemoryBIOFactory(context_factory, False, RelayFactory(relay, claim=claim),
                                          clock=reactor)
    else:
        tls_factory = GuardedTLSFactory(guard, "relay", ("OpenRelayLeg",
                                                         guard.limits.first_command_seconds),
                                        context_factory, RelayFactory(relay, claim=claim), clock=reactor)
    if not tls_write_aggregation:  # the relay forwards whole TLS records: nothing to aggregate
        tls_factory.protocol = TLSMemoryBIOProtocol if guard is None else GuardedTLSProtocol
    return reactor.listenTCP(port, tls_factory, interface=interface, backlog=LISTEN_BACKLOG)


# --- session records --------------------------------------------------------------------------

def _utc(seconds: float | None) -> dt.datetime | None:
    return None if seconds is None else dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def server_end_requests(session, session_ids: list[str]) -> dict[str, EndReason]:
    """Running sessions among ``session_ids`` that the server decided to end (the broker wrote
    its reason into the row: revocation, unwritable protocol), with that reason."""
    found: dict[str, EndReason] = {}
    for start in range(0, len(session_ids), 500):
        rows = session.scalars(select(Session).where(
            Session.id.in_(session_ids[start:start + 500]), Session.ended_at.is_(None),
            Session.ended_by == "server"))
        for row in rows:
            try:
                cause = EndCause(row.end_cause)
            except ValueError:
                continue
            found[row.id] = EndReason(cause, "server",
                                      _detail_of(row.end_reason or "", row.end_cause, "server"))
    return found


def claim_token(session, nonce: str, expires_at: dt.datetime, now: dt.datetime) -> bool:
    """True the first time a relay process claims ``nonce``; False after (any process)."""
    from sqlalchemy import delete
    from sqlalchemy.exc import IntegrityError
    from ..db.models import RelayTokenUse
    session.execute(delete(RelayTokenUse).where(RelayTokenUse.expires_at < now))
    try:
        with session.begin_nested():
            session.add(RelayTokenUse(nonce=nonce, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


class SessionEnds:
    """Relay session ends as group commits: the sessions that end while one batch is written
    share the next pool job, transaction and fsyncs (``server.session_commit.end_sessions``)."""

    def __init__(self, db: Database, protocols: SessionProtocols | None,
                 blocking=run_blocking) -> None:
        self.db = db
        self.protocols = protocols
        self.commits = GroupCommit(self._work, blocking=blocking)

    def _work(self, batch: list[SessionStats]) -> list:
        return close_sessions(self.db, self.protocols, batch)

    def record(self, stats: SessionStats) -> defer.Deferred:
        """Write a relay session's end into its ``sessions`` row and, given the operator's
        protocol folder, close its protocol file with the ``ended`` line and the billing row.

        A missing row (a session the broker of another database set up, or already purged) is
        logged and skipped; errors are logged.  The Deferred never fails.
        """
        def done(outcome) -> None:
            if outcome is None:
                log.warn("relay session {session_id} has no sessions row: its end ({reason}) is "
                         "not recorded", session_id=stats.session_id, reason=stats.end_reason)

        def failed(failure) -> None:
            log.failure("could not record the end of relay session {session_id}", failure,
                        session_id=stats.session_id)

        return self.commits.submit(stats).addCallbacks(done, failed)


def record_session_end(db: Database, stats: SessionStats,
                       protocols: SessionProtocols | None = None,
                       blocking=run_blocking) -> defer.Deferred:
    """One relay session's end on its own (``SessionEnds.record`` batches them)."""
    return SessionEnds(db, protocols, blocking).record(stats)


# --- the relay process ------------------------------------------------------------------------

class RelayService(service.Service):
    """A relay process: TLS listener(s), relay core, session records, revocation polling."""

    def __init__(self, config: Config, reactor: Any = None, ports: list[int] | None = None,
                 db: Database | None = None, **relay_options: Any) -> None:
        """``relay_options`` go to ``Relay`` (e.g. ``leg_buffer_bytes``, for the benchmark)."""
        if reactor is None:
            from twisted.internet import reactor  # noqa: F811 - the installed reactor
        self.config = config
        self.reactor = reactor
        self.ports_wanted = list(ports) if ports else [config.relay.port]
        self.db = db or Database(config.database_url)
        self.db.check_current()
        self.store = CertStore(config.server.cert_dir)
        self.tokens = RelayTokens(load_or_create_secret(config.relay.secret_file),
                                  ttl=config.relay.pair_timeout_seconds)
        self.relay = Relay(self.tokens, reactor, pair_timeout=config.relay.pair_timeout_seconds,
                           idle_timeout=config.relay.idle_timeout_seconds,
                           on_ended=self._ended, **relay_options)
        self.protocols = SessionProtocols(config.server.protocol_dir)
        self.ends = SessionEnds(self.db, self.protocols)
        self.revoked: set[str] = set()
        self.listening: list[Any] = []
        self.guard: ConnectionGuard | None = None
        self._pending: set[defer.Deferred] = set()
        self._poll: task.LoopingCall | None = None
        self.state_path: Path | None = None
        self.registry = None  # server.cluster.NodeRegistry with several nodes

    def _claim(self, claims) -> defer.Deferred:
        """Several relay processes: a token opens one leg at one of them, not one at each."""
        return self.db.run(claim_token, claims.nonce, _utc(claims.expires_at), _utc(time.time()))

    def _ended(self, stats: SessionStats) -> None:
        d = self.ends.record(stats)
        self._pending.add(d)
        d.addBoth(lambda _: self._pending.discard(d))

    @defer.inlineCallbacks
    def _poll_revocations(self):
        """Every ``revocation_poll_seconds``: end the sessions of newly revoked certificates and
        those the server asked to end (an unwritable protocol, a revoked party whose leg this
        relay could not tell by its certificate)."""
        try:
            revoked = yield self.db.run(certificates.revoked_serials)
        except Exception:
            log.failure("could not read the revocation list; keeping the previous one")
            return
        new, self.revoked = revoked - self.revoked, revoked
        if new:
            try:
                details = yield self.db.run(certificates.revocation_details, new)
            except Exception:
                details = {}
            self.relay.end_revoked(new, lambda serial: details.get(
                serial, f"certificate {serial} revoked"))
        live = self.relay.live_session_ids()
        if self.state_path is not None:
            try:
                self.write_state(self.ports)
            except OSError as exc:
                log.warn("could not write the relay state file: {why}", why=str(exc))
        if not live:
            return
        try:
            requests = yield self.db.run(server_end_requests, live)
        except Exception:
            log.failure("could not read the server's session end requests")
            return
        for session_id, end in requests.items():
            self.relay.end_session(session_id, end)

    def startService(self) -> None:
        super().startService()
        c = self.config
        self.revoked = self.db.call(certificates.revoked_serials)
        ctx = tls.module_context(self.store.server_chain(), self.store.server_key(),
                                 self.store.ca_cert(), c.certificates.min_tls,
                                 lambda serial: serial in self.revoked)
        self.guard = ConnectionGuard.from_config(c.limits, self.reactor)
        for port in self.ports_wanted:
            self.listening.append(listen_relay(self.reactor, port, self.relay,
                                               tls.ServerContextFactory(ctx), c.listen.interface,
                                               self.relay.tls_write_aggregation, self.guard,
                                               self._claim if c.cluster.enabled else None))
        self._poll = task.LoopingCall(self._poll_revocations)
        self._poll.clock = self.reactor
        self._poll.start(c.certificates.revocation_poll_seconds, now=False)
        if c.cluster.enabled:  # the nodes' crash recovery leaves what this relay carries alone
            from ..cluster import NodeRegistry
            name = f"relay-{socket.gethostname()}-{os.getpid()}"[:64]
            self.registry = NodeRegistry(self.db, name, "relay", c.cluster.node_timeout_seconds,
                                         self.reactor, sessions=self.relay.live_session_ids)
            self.registry.register_now()
            self.registry.startService()
        ports = [p.getHost().port for p in self.listening]
        self.write_state(ports)
        log.info("Hausmeister relay listening on {interface} port(s) {ports}",
                 interface=c.listen.interface, ports=", ".join(map(str, ports)))

    @property
    def ports(self) -> list[int]:
        return [p.getHost().port for p in self.listening]

    def write_state(self, ports: list[int]) -> None:
        """``relay-<pid>.json`` in the data folder: which ports this relay process listens on."""
        data_dir = self.config.server.data_dir
        # a relay on its own machine shares what `init` made (database, certificates, secret);
        # its own folder holds only this file
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_path = data_dir / f"relay-{os.getpid()}.json"
        tmp = self.state_path.with_suffix(".tmp")
        # "sessions": what this relay carries, so a server restarting after a crash leaves them
        # alone (server.session_recovery); refreshed every revocation poll
        tmp.write_text(json.dumps({"pid": os.getpid(), "interface": self.config.listen.interface,
                                   "ports": ports, "sessions": self.relay.live_session_ids()}))
        os.replace(tmp, self.state_path)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        for port in self.listening:
            yield port.stopListening()
        self.listening = []
        if self.guard is not None:
            self.guard.stop()
        self.relay.close_all("the relay is shutting down")
        if self._pending:
            yield defer.DeferredList(list(self._pending))
        if self.registry is not None:
            yield self.registry.stopService()
        if self.state_path is not None:
            self.state_path.unlink(missing_ok=True)
        self.db.dispose()


def run_relay(config: Config, reactor: Any, ports: list[int] | None = None,
              **relay_options: Any) -> int:
    """Run a relay process until SIGTERM/SIGINT (the reactor is installed and logging started)."""
    from protocol.runtime import tune_gc

    from .. import egress

    relay_service = RelayService(config, reactor, ports, **relay_options)
    relay_service.startService()
    egress.configure(config, own_ports=relay_service.ports,
                     refusals_path=config.server.data_dir / "egress-refusals.jsonl")
    print(f"Relay listening on {config.listen.interface} port(s) "
          f"{', '.join(map(str, relay_service.ports))}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", relay_service.stopService)
    log.info("garbage collector: {gc}", gc=tune_gc())
    reactor.run()
    return 0


__all__ = ["RelayLegProtocol", "RelayFactory", "RelayService", "listen_relay",
           "record_session_end", "run_relay", "MAX_COMMAND_BYTES"]
