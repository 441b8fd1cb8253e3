"""The module port: one mutual-TLS control connection per module, speaking ``protocol.control``.

TLS (``server.tls.module_context``) has already refused foreign, expired and revoked
certificates; here the connection learns who it is talking to, enforces which commands its role
and state allow, and hands the broker what it asks for.  A connection whose first command is
``OpenRelayLeg`` becomes a raw byte pipe of the in-process relay instead.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from typing import Callable

from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOProtocol
from protocol.runtime import Logger  # debug() is free when not logged
from zope.interface import implementer

from protocol import PROTOCOL_VERSION, control
from protocol.amp_adapter import FramedAMP
from protocol.framing import encode_box
from protocol.identity import Identity, fingerprint, identity_of

from . import __version__
from .connection_guard import note_refusal, settle as settle_pending
from .tls import Resumption, ResumptionRefused, bio_pending, resumed

log = Logger()

EVENT_KIND = re.compile(r"^[a-z][a-z_]{0,39}$")
MAX_EVENT_DETAIL = 16 * 1024
SERVER_KINDS = frozenset({"created", "joined"})


#: TCP keep-alive on module connections: after this many idle seconds the kernel probes the
#: peer every KEEPALIVE_INTERVAL s and drops the connection after KEEPALIVE_PROBES unanswered
#: probes — a vanished host is noticed in ~60 s at no CPU cost to the server, so heartbeats
#: can be rare (presence.heartbeat_seconds)
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 3


def _keep_alive(tcp) -> None:
    sock = getattr(tcp, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE),
                              ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                              ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    except OSError:  # not a TCP socket after all
        pass


class _ClosedSender:
    """The box sender of a closed connection: sending fails the way AMP expects."""

    def sendBox(self, box) -> None:
        raise ConnectionLost("the module's connection is closed")


_CLOSED_SENDER = _ClosedSender()

#: the heartbeat's answer box, piece by piece (``ModuleConnection._heartbeat``)
_LENGTH = struct.Struct("!H")
_ANSWER_KEY = _LENGTH.pack(len(b"_answer")) + b"_answer"
_SERVER_TIME_KEY = _LENGTH.pack(len(b"server_time")) + b"server_time"


@implementer(IHandshakeListener)
class ModuleConnection(FramedAMP):
    """One module's control connection; ``identity`` is None for an ad-hoc customer."""

    # Its own state in slots: with them in the instance dict, AMP's, FramedAMP's and these
    # came to 31 attributes, one more than CPython 3.11 shares keys for, and each idle host's
    # dict cost 1,584 bytes instead of ~300 (tracemalloc at 2,000 hosts, bench/README.md).
    __slots__ = ("port", "identity", "serial", "fingerprint", "not_after", "address",
                 "module_version", "greeted", "commands_seen", "joined_adhoc", "relay_leg")

    def __init__(self, port: "ModulePort") -> None:
        super().__init__()
        self.port = port
        self.identity: Identity | None = None
        self.serial: str | None = None
        self.fingerprint: str | None = None
        self.not_after = ""
        self.address = "?"
        self.module_version = ""
        self.greeted = False
        self.commands_seen = 0
        self.joined_adhoc = False
        self.relay_leg = None

    # --- connection events ----------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.address = self.transport.getPeer().host
        tcp = getattr(self.transport, "transport", self.transport)
        if hasattr(tcp, "setTcpNoDelay"):
            tcp.setTcpNoDelay(True)  # control commands are small; no delayed-ACK waits
            _keep_alive(tcp)

    def handshakeCompleted(self) -> None:
        facts = getattr(self.transport, "peer_facts", None)  # server.tls's verify callback
        handle = None
        if facts is not None:
            self.transport.peer_facts = None
            self.identity, self.serial, self.fingerprint, self.not_after = facts
        elif (handle := _resumed_handle(self.transport)) is not None:
            # a resumed session: OpenSSL skipped the verify callback, so judge it again here
            try:
                resumption = handle.get_context().get_app_data()
                if not isinstance(resumption, Resumption):
                    raise ResumptionRefused("resumed session", "a resumed session on a port "
                                            "that resumes none")
                facts = resumption.check(handle)
            except ResumptionRefused as exc:
                note_refusal(self.transport, exc.kind, exc.reason)
                self.transport.abortConnection()  # before its first command is read
                return
            if facts is not None:
                self.identity, self.serial, self.fingerprint, self.not_after = facts
        elif (peer := self.transport.getPeerCertificate()) is not None:
            cert = peer.to_cryptography()
            self.identity = identity_of(cert)
            self.serial = format(cert.serial_number, "x")
            self.fingerprint = fingerprint(cert)
            self.not_after = cert.not_valid_after_utc.isoformat()
        self.port.registry.add(self)
        log.debug("TLS handshake with {identity} from {address} (serial {serial}, resumed "
                  "{resumed})", identity=self.name, address=self.address, serial=self.serial,
                  resumed=handle is not None)

    def connectionLost(self, reason) -> None:
        if self.port.recordings is not None:  # its uploads wait for a RecordingResume
            self.port.recordings.owner_lost(self)
        if self in self.port.registry:
            self.port.registry.discard(self)
            self.port.broker.connection_lost(self)
            if not self.port.registry.closing:  # at shutdown one line says how many closed
                # an ad-hoc customer's connection: its join and its session's end say enough
                (log.info if self.identity is not None else log.debug)(
                    "module disconnected: {identity} from {address}", identity=self.name,
                    address=self.address)
        elif self.relay_leg is None:  # the connection guard logs these, rate-limited
            log.debug("connection from {address} closed before the TLS handshake completed: {why}",
                      address=self.address, why=reason.getErrorMessage())
        super().connectionLost(reason)
        # AMP refers to itself (box receiver and sender, responder locator): without these
        # references a closed connection is freed at once instead of by a full collection.
        # A later callRemote still fails cleanly (AMP checks the recorded loss first), and an
        # answer that is ready only now is dropped as AMP drops it on a lost connection.
        self.boxReceiver = self.locator = None
        self.boxSender = _CLOSED_SENDER

    @property
    def name(self) -> str:
        return self.identity.uri if self.identity else "anonymous"

    def abort(self, reason: str) -> None:
        log.warn("closing {identity} from {address}: {reason}", identity=self.name,
                 address=self.address, reason=reason)
        self.transport.abortConnection()

    # --- guards ---------------------------------------------------------------------------------

    def _require(self, role: str | None) -> None:
        if not self.greeted:
            raise control.WrongState("say Hello first")
        if role is None:
            return
        if self.identity is None:
            raise control.NotEnrolled("this needs an enrolled module (a module certificate)")
        if self.identity.role != role:
            raise control.Forbidden(f"only a {role} module may do this")

    def _refuse(self, exc: control.ControlError) -> None:
        log.warn("refused {identity} from {address}: {reason}", identity=self.name,
                 address=self.address, reason=str(exc))

    def _guarded(self, d: defer.Deferred) -> defer.Deferred:
        def log_refusal(failure):
            if failure.check(control.ControlError):
                self._refuse(failure.value)
            else:
                log.failure("command from {identity} failed", failure, identity=self.name)
            return failure
        return d.addErrback(log_refusal)

    # --- responders -----------------------------------------------------------------------------

    @control.Hello.responder
    def hello(self, protocol_version: int, module_version: str, module_kind: str):
        if self.greeted:
            raise control.WrongState("Hello was already said on this connection")
        if protocol_version != PROTOCOL_VERSION:
            exc = control.ProtocolVersionMismatch(
                f"server speaks protocol {PROTOCOL_VERSION}, module {protocol_version}: "
                "update the module from the server's download page")
            self._refuse(exc)
            raise exc
        self.greeted = True
        self.module_version = self.port.shared_version(module_version[:40])
        identity = self.identity
        if identity is None or identity.role != "host":  # a host's line: "host ... online"
            # a customer at debug: its join says at info who it is and what it joined
            (log.info if identity is not None else log.debug)(
                "module connected: {identity} from {address} ({kind} {version}, serial "
                "{serial})", identity=self.name, address=self.address, kind=module_kind[:20],
                version=self.module_version, serial=self.serial)
        if identity is not None:  # an enrolled module has proved itself; a customer joins first
            settle_pending(self.transport)

        def answer(tenant: str) -> dict:
            return {"server_version": __version__, "identity": self.name,
                    "role": identity.role if identity else "customer", "tenant": tenant,
                    "certificate_not_after": self.not_after,
                    "heartbeat_seconds": self.port.broker.heartbeat_seconds}
        if identity is None:
            return answer("")
        if identity.role == "host":  # one transaction marks it online and names its tenant
            d = self.port.broker.host_online(self, module_version)
        else:
            d = self.port.tenant_of(identity)
        return self._guarded(d.addCallback(answer))

    @control.Heartbeat.responder
    def heartbeat(self):
        self._require(None)
        self.port.broker.heartbeat(self)
        return {"server_time": time.time()}

    @control.AllocateNameplate.responder
    def allocate_nameplate(self):
        try:
            self._require("supporter")
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(self.port.broker.reserve_nameplate(self).addCallback(
            lambda found: {"nameplate": found[0], "expires_in": found[1]}))

    @control.JoinAdhoc.responder
    def join_adhoc(self, nameplate: str):
        try:
            self._require(None)
            if self.joined_adhoc:
                raise control.WrongState("one ad-hoc join per connection: connect again")
            self.joined_adhoc = True  # every attempt, even a malformed one, uses up the connection
            if not (len(nameplate) == 4 and nameplate.isdigit()):
                raise control.UnknownNameplate("an ad-hoc ID starts with 4 digits")
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        def joined(answer):
            settle_pending(self.transport)
            return answer
        return self._guarded(self.port.broker.join_adhoc(self, nameplate).addCallback(joined))

    @control.ListHosts.responder
    def list_hosts(self):
        try:
            self._require("supporter")
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(self.port.broker.list_hosts(self).addCallback(lambda h: {"hosts": h}))

    @control.ConnectHost.responder
    def connect_host(self, host: str):
        try:
            self._require("supporter")
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(self.port.broker.connect_host(self, host))

    @control.SessionEvent.responder
    def session_event(self, session_id: str, kind: str, detail: str):
        try:
            self._require(None)
            if not EVENT_KIND.match(kind):
                raise control.WrongState(f"event kind {kind[:40]!r} is not valid")
            if len(detail) > MAX_EVENT_DETAIL:
                raise control.WrongState(f"event detail is larger than {MAX_EVENT_DETAIL} bytes")
            try:
                parsed = json.loads(detail) if detail else {}
            except ValueError:
                raise control.WrongState("event detail is not JSON")
            if not isinstance(parsed, dict):
                raise control.WrongState("event detail must be a JSON object")
            if kind in SERVER_KINDS:
                raise control.Forbidden(f"only the server records {kind!r} events")
            d = self.port.broker.session_event(self, session_id, kind, parsed)
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(d)

    # --- session recordings (server.recordings.receiver) ---------------------------------------

    def _recordings(self):
        self._require(None)
        if self.port.recordings is None:
            raise control.WrongState("this server takes no recordings")
        return self.port.recordings

    @control.RecordingStart.responder
    def recording_start(self, session_id: str, presenting: bool | None = None):
        try:
            d = self._recordings().start_recording(self, session_id, bool(presenting))
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(d)

    @control.RecordingResume.responder
    def recording_resume(self, recording_id: str, resume_token: str):
        try:
            d = self._recordings().resume(self, recording_id, resume_token)
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(d)

    @control.RecordingChunk.responder
    def recording_chunk(self, recording_id: str, offset: int, data: bytes):
        try:
            d = self._recordings().chunk(self, recording_id, offset, data)
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(d)

    @control.RecordingEnd.responder
    def recording_end(self, recording_id: str, size: int):
        try:
            d = self._recordings().end(self, recording_id, size)
        except control.ControlError as exc:
            self._refuse(exc)
            raise
        return self._guarded(d)

    def _dispatch(self, box) -> None:
        """A greeted module's plain ``Heartbeat`` (``_command`` and ``_ask``, nothing else) is
        answered here, before the checks and the ``AmpBox`` copy every other box goes through:
        of those checks only the ask tag's apply to it (not in use by a command still
        unanswered, and not more than ``max_pending_commands`` of them), and those are made."""
        if len(box) == 2 and self.greeted and box.get(b"_command") == b"Heartbeat":
            tag = box.get(b"_ask")
            answers_due = self._answers_due
            if (tag is not None and tag not in answers_due and
                    len(answers_due) + self._one_way_running < self.max_pending_commands):
                self.commands_seen += 1
                self._heartbeat(tag)
                return
        super()._dispatch(box)

    def ampBoxReceived(self, box) -> None:
        """``OpenRelayLeg`` is handled here, not by a responder: the answer must be on the wire
        before the relay may write the partner's first bytes to this transport."""
        if b"_command" in box:
            self.commands_seen += 1
            command = box[b"_command"]
            if command == b"Heartbeat" and self.greeted and b"_ask" in box:
                self._heartbeat(box[b"_ask"])
                return
            if command == b"OpenRelayLeg":
                self._open_relay_leg(box)
                return
        super().ampBoxReceived(box)

    def _heartbeat(self, tag: bytes) -> None:
        """``Heartbeat`` answered here, not through AMP's responder machinery (locator,
        argument parsing, a Deferred, answer serialisation): 20,000 idle hosts send 667 a
        second and this is all they ask.  Same answer box as the ``heartbeat`` responder."""
        self.port.broker.heartbeat(self)
        # the time to the microsecond from integers: repr(time.time()) (the shortest repr of a
        # float) cost ~6,000 instructions per heartbeat; amp.Float reads either
        seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
        now = b"%d.%06d" % (seconds, micros)
        # encode_box({b"_answer": tag, b"server_time": now}) without the loop and its checks:
        # the tag came in a box (at most 65,535 bytes), the time is 17 bytes
        _write_now(self.transport, b"".join((_ANSWER_KEY, _LENGTH.pack(len(tag)), tag,
                                             _SERVER_TIME_KEY, _LENGTH.pack(len(now)), now,
                                             b"\x00\x00")))

    def _open_relay_leg(self, box) -> None:
        tag = box.get(b"_ask", b"")
        relay = self.port.relay
        token = box.get(b"relay_token", b"").decode("utf-8", "replace")
        try:
            if self.commands_seen != 1:
                raise control.WrongState("OpenRelayLeg must be the first and only command")
            if relay is None:
                raise control.WrongState("this server uses separate relay processes")
            claims = self.port.tokens.verify(token)
        except control.ControlError as exc:
            self._answer_error(tag, exc.code, str(exc))
            return
        except Exception as exc:  # InvalidToken and the like
            self._answer_error(tag, control.RelayRefused.code, str(exc))
            return
        self.port.registry.discard(self)  # a relay leg is not a module connection
        settle_pending(self.transport)
        self.transport.write(encode_box({b"_answer": tag,
                                         b"session_id": claims.session_id.encode()}))
        try:
            leg = relay.open_leg(token, self.transport, self.address, verified=(
                claims if relay.tokens is self.port.tokens else None),  # one HMAC check per leg
                peer=(self.serial, self.identity.uri if self.identity else None))
        except Exception as exc:
            log.warn("relay leg from {address} refused: {reason}", address=self.address,
                     reason=str(exc))
            self.transport.loseConnection()
            return
        self.relay_leg = leg
        self.switch_to_raw(leg.data_received, leg.connection_lost)

    def _answer_error(self, tag: bytes, code: bytes, message: str) -> None:
        log.warn("refused relay leg from {address}: {reason}", address=self.address, reason=message)
        self.transport.write(encode_box({b"_error": tag, b"_error_code": code,
                                         b"_error_description": message.encode()}))
        self.transport.loseConnection()


class ConnectionRegistry:
    """Live module connections, so revocation and presence can find them."""

    def __init__(self) -> None:
        self._connections: set[ModuleConnection] = set()
        self.closing = False  # set by close_for_shutdown: the server is going away

    def add(self, conn: ModuleConnection) -> None:
        self._connections.add(conn)

    def discard(self, conn: ModuleConnection) -> None:
        self._connections.discard(conn)

    def __contains__(self, conn: object) -> bool:
        return conn in self._connections

    def __len__(self) -> int:
        return len(self._connections)

    def close_for_shutdown(self, back_in: float, spread: float) -> int:
        """Tell every greeted module that the server is going away cleanly (``ServerGoingAway``:
        come back in ``back_in`` s, spread over ``spread`` s) and close its connection.

        The notice is one box, encoded once; each connection encrypts it and sends it with one
        system call, then its socket is closed here and taken off the reactor, so neither
        Twisted's write path nor the reactor's shutdown runs its TLS, AMP and broker teardown
        (~1.4 ms a connection under load: 28 s for 20,000 hosts, during which they would have
        been refused and backed off).  The broker has marked the hosts offline already and the
        process is about to exit."""
        self.closing = True
        notice = encode_box({b"_command": b"ServerGoingAway",
                             b"back_in": repr(float(back_in)).encode(),
                             b"spread": repr(float(spread)).encode()})
        told = 0
        for conn in list(self._connections):
            tls = conn.transport
            if tls is None or conn.relay_leg is not None:
                continue
            if _send_and_close_now(tls, notice if conn.greeted else b""):
                told += conn.greeted
                continue
            if conn.greeted:  # not a TLS-over-TCP transport (a tunnel): the ordinary way
                if getattr(tls, "_aggregator", None) is not None:  # the single port's TLS
                    tls._aggregator.flush()  # past the aggregation: it would write too late
                    TLSMemoryBIOProtocol.write(tls, notice)
                else:
                    tls.write(notice)
                told += 1
            getattr(tls, "transport", tls).loseConnection()
        self._connections.clear()
        return told

    def drop_revoked(self, revoked: set[str]) -> int:
        dropped = 0
        for conn in list(self._connections):
            if conn.serial is not None and conn.serial in revoked:
                conn.abort(f"certificate {conn.serial} was revoked")
                dropped += 1
        return dropped


def _resumed_handle(tls) -> SSL.Connection | None:
    """The connection's OpenSSL object if its handshake resumed an earlier session."""
    handle = getattr(tls, "getHandle", None)
    conn = handle() if handle is not None else None
    return conn if isinstance(conn, SSL.Connection) and resumed(conn) else None


def _write_now(tls, data: bytes) -> None:
    """Write ``data`` on an idle connection with one system call: Twisted's TCP transport would
    buffer it, register the socket for writing, send on the next turn of the loop and
    unregister again (two epoll changes per heartbeat answer).  Anything unusual — something
    already buffered, a closing connection, not TLS over TCP — takes the ordinary way."""
    tcp = getattr(tls, "transport", None)
    sock = getattr(tcp, "socket", None)
    ssl_conn = getattr(tls, "_tlsConnection", None)
    if (sock is None or getattr(ssl_conn, "_from_ssl", None) is None
            or getattr(tls, "_aggregator", None) is not None
            or tls.disconnecting or tls._lostTLSConnection or tls._appSendBuffer
            or tcp.disconnecting or tcp.dataBuffer or tcp._tempDataBuffer):
        tls.write(data)
        return
    ssl_conn.send(data)
    # what the send put in the BIO, no more: bio_read allocates the buffer it is asked for
    out = ssl_conn.bio_read(bio_pending(ssl_conn._from_ssl) or 65536)
    try:
        sent = sock.send(out)
    except OSError:  # would block, or an error the reactor reports when it reads next
        sent = 0
    if sent < len(out):
        tcp.write(out[sent:])


def _send_and_close_now(tls, data: bytes) -> bool:
    """Encrypt ``data`` on the connection's TLS, send it with one system call, close the socket
    and take it off the reactor — no Twisted write buffer, writer registration or
    ``connectionLost``.  False (nothing done) unless ``tls`` is Twisted's TLS over a TCP
    transport with a socket."""
    ssl_conn = getattr(tls, "_tlsConnection", None)
    tcp = getattr(tls, "transport", None)
    sock = getattr(tcp, "socket", None)
    if ssl_conn is None or sock is None or not hasattr(tcp, "doWrite") or tcp.disconnected:
        return False
    if tcp.dataBuffer or tcp._tempDataBuffer:
        tcp.doWrite()  # what is still buffered goes first
    try:
        if data:
            ssl_conn.send(data)
            sock.send(ssl_conn.bio_read(65536))
    except Exception:  # a TLS or socket error: closing is all that is left to do
        pass
    tcp.reactor.removeReader(tcp)
    tcp.reactor.removeWriter(tcp)
    tcp.connected, tcp.disconnected = False, True  # a late write is dropped, not attempted
    try:
        sock.close()  # the kernel sends what it holds, then the FIN
    except OSError:
        pass
    return True


class ModulePort(protocol.Factory):
    """Factory for module connections; holds what every connection needs."""

    def __init__(self, registry: ConnectionRegistry, broker, relay, tokens,
                 tenant_of: Callable[[Identity], defer.Deferred]) -> None:
        self.registry = registry
        self.broker = broker
        self.relay = relay
        self.tokens = tokens
        self.tenant_of = tenant_of
        self.recordings = None  # server.recordings.receiver.RecordingReceiver, set by the server
        self._versions: dict[str, str] = {}

    #: distinct module versions kept as one string each: thousands of hosts run the same few,
    #: and each connection kept its own copy (~54 bytes per idle host)
    MAX_SHARED_VERSIONS = 64

    def shared_version(self, version: str) -> str:
        """``version`` as the one string every connection of that version holds (the first
        ``MAX_SHARED_VERSIONS`` distinct ones; any further one is kept as it came)."""
        shared = self._versions.get(version)
        if shared is not None:
            return shared
        if len(self._versions) < self.MAX_SHARED_VERSIONS:
            self._versions[version] = version
        return version

    def buildProtocol(self, addr) -> ModuleConnection:
        conn = ModuleConnection(self)
        conn.factory = self
        return conn
