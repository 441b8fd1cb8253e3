"""Deadlines and caps for connections that have not proved themselves yet (Twisted side).

``GuardedTLSFactory`` is what a listener hands to ``listenTCP`` instead of ``listenSSL``: it is
Twisted's TLS wrapper plus admission.  Every accepted connection is *pending* in the process's
``ConnectionGuard`` until the protocol inside calls ``settle(transport)`` (the module port after
Hello/OpenRelayLeg/JoinAdhoc, the relay after OpenRelayLeg, the HTTPS plane after the first
request headers).  Until then it has ``[limits] tls_handshake_seconds`` for TLS and then the
listener's own deadline for its first command; past a deadline, over the per-address cap, or
displaced by a newer one when the total is full, it is aborted at once with a reason that goes
to the rate-limited refusal log (``admission.RefusalLog``).

The guard also raises the soft open-file limit at start-up (so the caps, not ``EMFILE``, decide)
and gives freed heap back to the system once a flood has drained (``gc.collect`` then
``malloc_trim``: OpenSSL's per-connection buffers come from glibc's malloc, which otherwise keeps
the pages; bench/README.md has the figures).  A closed connection leaves no reference cycle
behind (the TLS failure is cleaned here, the module port drops AMP's self-references), so the
collection finds next to nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import time
from typing import Any

from OpenSSL.SSL import Error as TLSError, WantReadError, ZeroReturnError
from twisted.internet import task
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from . import tls
from .admission import HANDSHAKE, PendingConnections, RefusalLog, address_key
from .config import LimitsSection

log = Logger(namespace="hausmeister.limits")

#: ``pending_total = 0``: a quarter of the open-file limit, at most this many.
AUTO_TOTAL_MAX = 4096
AUTO_TOTAL_MIN = 64
#: A drained flood of at least this many pending connections triggers ``malloc_trim``.
TRIM_AFTER_PEAK = 256
#: ... once the pending count has stayed below a tenth of that peak this long (a flood that
#: comes in waves must not cause a collection pause per wave).
CALM_SECONDS = 5.0
RELEASE_ENV = "HAUSMEISTER_FLOOD_RELEASE"


def raise_open_file_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard_cap = 1 << 20
    else:
        hard_cap = hard
    if soft != resource.RLIM_INFINITY and soft < hard_cap:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard_cap, hard))
        except (ValueError, OSError) as exc:
            log.warn("could not raise the open-file limit from {soft} to {hard}: {why}",
                     soft=soft, hard=hard_cap, why=str(exc))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def auto_total(open_files: int) -> int:
    return max(AUTO_TOTAL_MIN, min(AUTO_TOTAL_MAX, open_files // 4))


def rss_kib() -> int:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_libc = None


def trim_heap() -> bool:
    """Give free heap pages back to the system (glibc ``malloc_trim(0)``); False if unavailable."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if not _libc or not hasattr(_libc, "malloc_trim"):
        return False
    _libc.malloc_trim(0)
    return True


class ConnectionGuard:
    """The process's pending connections: admission, deadlines, refusal log, memory after floods.

    One guard per process, shared by its listeners, so the caps hold for the process as a whole.
    """

    def __init__(self, limits: LimitsSection, reactor: Any, total: int | None = None) -> None:
        self.limits = limits
        self.reactor = reactor
        if total is None:
            total = limits.pending_total or auto_total(
                resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.pending = PendingConnections(limits.pending_per_address, total)
        self.refusals = RefusalLog(limits.refusal_log_seconds)
        self.closed_count = 0       # connections this guard closed (deadline, cap, eviction)
        self.peak = 0               # most pending at once since the last trim
        self._calm_since: float | None = None
        self.trims: list[tuple[int, int]] = []  # (RSS before, RSS after) in KiB, for the benchmark
        self._sweep: task.LoopingCall | None = None
        shortest = min(limits.tls_handshake_seconds, limits.first_command_seconds,
                       limits.http_header_seconds)
        self.tick = max(0.02, min(1.0, shortest / 4))

    @classmethod
    def from_config(cls, limits: LimitsSection, reactor: Any) -> "ConnectionGuard":
        """Raise the open-file limit if configured, size the total cap from it, start sweeping."""
        soft, hard = (raise_open_file_limit() if limits.raise_open_file_limit
                      else resource.getrlimit(resource.RLIMIT_NOFILE))
        guard = cls(limits, reactor)
        log.info("connection limits: open files {soft} (hard {hard}); pending connections at most "
                 "{per_address} per address and {total} in all; TLS handshake within {tls:g} s",
                 soft=soft, hard=hard, per_address=limits.pending_per_address,
                 total=guard.pending.total, tls=limits.tls_handshake_seconds)
        guard.start()
        return guard

    def start(self) -> None:
        if self._sweep is None:
            self._sweep = task.LoopingCall(self.sweep)
            self._sweep.clock = self.reactor
            self._sweep.start(self.tick, now=False)

    def stop(self) -> None:
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None

    # --- what the TLS wrapper reports ------------------------------------------------------------

    def admit(self, conn: "_Guarded") -> bool:
        now = self.reactor.seconds()
        decision = self.pending.admit(conn, conn.address, self.limits.tls_handshake_seconds, now)
        if not decision.admitted:
            self.refuse(conn, "over the per-address cap", f"refused: {decision.reason}")
            return False
        if decision.evicted is not None:
            self.refuse(decision.evicted, "displaced",
                        f"closed to make room: {self.pending.total} connections are waiting for "
                        f"their handshake, this was the oldest")
        self.peak = max(self.peak, len(self.pending))
        return True

    def handshake_done(self, conn: "_Guarded") -> None:
        label, seconds = conn.factory.after_handshake
        self.pending.advance(conn, label, seconds, self.reactor.seconds())

    def settle(self, conn: "_Guarded") -> None:
        self.pending.settle(conn)

    def lost(self, conn: "_Guarded") -> None:
        stage = self.pending.stage_of(conn)
        if self.pending.settle(conn) and not conn.closed_by_guard:
            what = ("closed by the client during the TLS handshake" if stage == HANDSHAKE
                    else f"closed by the client before it sent {conn.factory.after_handshake[0]}")
            self.note(conn, what, what)

    # --- closing -----------------------------------------------------------------------------

    def refuse(self, conn: "_Guarded", kind: str, reason: str) -> None:
        self.pending.settle(conn)
        conn.closed_by_guard = True
        self.closed_count += 1
        self.note(conn, kind, reason)
        conn.abortConnection()

    def note(self, conn: "_Guarded", kind: str, reason: str) -> None:
        self.note_address(conn.factory.listener, conn.address, kind, reason)

    def note_address(self, listener: str, address: str, kind: str, reason: str) -> None:
        if self.refusals.note(f"{listener}: {kind}", address, self.reactor.seconds()):
            log.warn("{listener}: connection from {address} {reason}", listener=listener,
                     address=address, reason=reason)

    def refuse_early(self, listener: str, address: str) -> bool:
        """True (and logged) if ``address`` is over its cap: the listener then builds nothing
        for the connection and closes it at once, the cheapest answer to a flood."""
        count = self.pending.count_of(address)
        if count < self.pending.per_address:
            return False
        self.closed_count += 1
        self.note_address(listener, address, "over the per-address cap",
                          f"refused: {count} connections from {address_key(address)} are already "
                          "waiting for their handshake")
        return True

    def sweep(self) -> None:
        now = self.reactor.seconds()
        for conn, stage, seconds, _ in self.pending.expired(now):
            if stage == HANDSHAKE:
                kind, reason = "no TLS handshake", f"closed: no TLS handshake within {seconds:g} s"
            else:
                kind, reason = f"no {stage}", f"closed: no {stage} within {seconds:g} s"
            # expired() already removed it from the pending set
            conn.closed_by_guard = True
            self.closed_count += 1
            self.note(conn, kind, reason)
            conn.abortConnection()
        for summary in self.refusals.due(now):
            log.warn("{kind}: {count} more connections in the last {seconds:.0f} s (most from "
                     "{address}: {top})", kind=summary.kind, count=summary.suppressed,
                     seconds=summary.seconds, address=summary.top_address, top=summary.top_count)
        if self.peak >= TRIM_AFTER_PEAK and len(self.pending) <= self.peak // 10:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= CALM_SECONDS:
                self._trim()
                self._calm_since = None
        else:
            self._calm_since = None

    def _trim(self) -> None:
        """A flood has drained: free its connections' reference cycles now (the tuned collector
        would leave them for a rare full collection) and hand the freed heap back to the system.
        ``HAUSMEISTER_FLOOD_RELEASE=nothing|collect|trim`` switches steps off for the benchmark."""
        how = os.environ.get(RELEASE_ENV, "collect+trim")
        before = rss_kib()
        started = time.perf_counter()
        collected = gc.collect() if how in ("collect", "collect+trim") else 0
        trimmed = how in ("trim", "collect+trim") and trim_heap()
        pause_ms = (time.perf_counter() - started) * 1000
        after = rss_kib()
        self.trims.append((before, after))
        log.info("a flood of {peak} pending connections has drained; RSS {before} -> {after} MiB "
                 "({what}, {objects} objects collected, {pause:.0f} ms)", peak=self.peak,
                 before=before // 1024, after=after // 1024, objects=collected, pause=pause_ms,
                 what=(("gc.collect + malloc_trim" if collected else "malloc_trim") if trimmed
                       else "gc.collect" if how == "collect" else "nothing released"))
        self.peak = len(self.pending)


class _Guarded:
    """What both TLS wrappers add: report accept, handshake and loss to the factory's guard."""

    address = "?"
    closed_by_guard = False
    #: the memory BIOs still have the capacity of the handshake flight and may be swapped for
    #: fresh ones (tls.release_handshake_buffers); False once done, or once something keeps
    #: pointers to them (a relay leg on the record splice sets it when it attaches)
    handshake_buffers_kept = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Every attribute a connection sets later is set here first.  CPython 3.11 shares one
        # key table among a class's instances and lets a new key in only while few instances
        # have been made since; a key first set after a burst of accepts (the verify
        # callback's facts, the handshake's flag) gave every connection a dict of its own:
        # 464 bytes per idle host (bench/README.md, issue 14).
        self.address = "?"
        self.closed_by_guard = False
        self.handshake_buffers_kept = True
        self.peer_facts = None  # server.tls's verify callback; the module connection takes it
        self._handshakeDone = False

    def makeConnection(self, transport) -> None:
        self.address = transport.getPeer().host
        super().makeConnection(transport)
        self.factory.guard.admit(self)  # a refused connection is aborted by the guard

    def _checkHandshakeStatus(self) -> None:
        was_done = self._handshakeDone
        super()._checkHandshakeStatus()
        if self._handshakeDone and not was_done:
            self.factory.guard.handshake_done(self)

    def dataReceived(self, data: bytes) -> None:
        # TLSMemoryBIOProtocol.dataReceived, reading with _read_application_bytes
        connection = self._tlsConnection
        if getattr(connection, "_into_ssl", None) is None:  # not a memory BIO: Twisted's way
            super().dataReceived(data)
        else:
            connection.bio_write(data)
            if not self._handshakeDone:
                self._checkHandshakeStatus()
                if not self._handshakeDone:
                    return
            if self._appSendBuffer:
                self._unbufferPendingWrites()
            self._read_application_bytes()
        # once the handshake's bytes have passed through, the BIOs give back their capacity
        # (~5 KB per idle host); tried after each read until both are empty at the same time
        if self.handshake_buffers_kept and self._handshakeDone and self._tlsConnection is not None:
            if tls.release_handshake_buffers(self._tlsConnection):
                self.handshake_buffers_kept = False

    # --- the read path, without two WantReadErrors per read (issue 14, heartbeats) ------------
    # Twisted's TLS layer reads application bytes until pyOpenSSL raises WantReadError, each
    # read into a 32 KB buffer allocated for the call, and then reads the send BIO until it
    # raises WantReadError too: two exceptions raised and caught for every heartbeat an idle
    # host sends.  Here a read stops when nothing is left to read, and an empty send BIO is
    # not read.  Only the path of received bytes: at the connection's loss Twisted's own loop
    # reads to the end of the shut-down BIO (where the last read reports the EOF).

    def _read_application_bytes(self) -> None:
        """``TLSMemoryBIOProtocol._flushReceiveBIO`` (the same handling of every outcome of a
        read), ending when ``tls.nothing_to_read`` instead of on a raised ``WantReadError``."""
        connection = self._tlsConnection
        while not self._lostTLSConnection:
            waiting = tls.bio_pending(connection._into_ssl)
            try:
                data = connection.recv(waiting if 0 < waiting < 32768 else 32768)
            except WantReadError:
                break
            except ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except TLSError:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                if tls.nothing_to_read(connection):
                    break
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        """``TLSMemoryBIOProtocol._flushSendBIO``, not run on an empty send BIO."""
        out = getattr(self._tlsConnection, "_from_ssl", None)
        if out is None or tls.bio_pending(out):
            super()._flushSendBIO()

    def settle(self) -> None:
        """The protocol inside has proved itself: no longer pending."""
        self.factory.guard.settle(self)

    def _tlsShutdownFinished(self, reason) -> None:
        # The failure of a TLS layer that ends (e.g. EOF where OpenSSL wanted a close_notify)
        # holds its traceback, whose frames hold the failure: a reference cycle per closed
        # connection that only a full collection frees.  Its text is all anyone reads.
        if reason is not None:
            reason.cleanFailure()
        super()._tlsShutdownFinished(reason)

    def connectionLost(self, reason) -> None:
        self.factory.guard.lost(self)
        super().connectionLost(reason)


class GuardedTLSProtocol(_Guarded, TLSMemoryBIOProtocol):
    """Guarded TLS without write aggregation (the relay forwards whole TLS records)."""

    #: none: found here, not through ``ProtocolWrapper.__getattr__`` — which asks the protocol
    #: inside and raises AttributeError — at every ``getattr(tls, "_aggregator", None)`` (the
    #: module port's answer to each heartbeat, ``module_port._write_now``)
    _aggregator = None


class GuardedBufferingTLS(_Guarded, BufferingTLSTransport):
    """Guarded TLS with Twisted's small-write aggregation (``listenSSL``'s default)."""


class GuardedTLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` for a listener whose connections the guard watches.

    ``after_handshake`` is (what the connection must send next, seconds it has), e.g.
    ``("Hello or OpenRelayLeg", 10.0)``; ``listener`` names the port in log lines.
    """

    protocol = GuardedBufferingTLS
    noisy = False

    def __init__(self, guard: ConnectionGuard, listener: str, after_handshake: tuple[str, float],
                 context_factory, wrapped_factory, clock=None) -> None:
        super().__init__(context_factory, False, wrapped_factory, clock=clock)
        self.guard = guard
        self.listener = listener
        self.after_handshake = after_handshake

    def logPrefix(self) -> str:
        return self.listener

    # ``WrappingFactory`` keeps every connection in a dict of its own (``protocols``) that
    # nothing here reads: the module registry and the guard know their connections (~40 bytes
    # per idle host, and a dict that never shrinks after a storm).
    def registerProtocol(self, p) -> None:
        pass

    def unregisterProtocol(self, p) -> None:
        pass

    def buildProtocol(self, addr):
        if self.guard.refuse_early(self.listener, getattr(addr, "host", "?")):
            return None  # Twisted closes the accepted socket at once
        return super().buildProtocol(addr)


def settle(transport: Any) -> None:
    """Tell the guard (if any) that the connection behind ``transport`` has proved itself.
    A module's connection inside a WebSocket tunnel (``ws_tunnel``) has a deadline of its own."""
    if isinstance(transport, _Guarded) or getattr(transport, "tunnel_deadline", None) is not None:
        transport.settle()


def listen_guarded(reactor: Any, port: int, guard: ConnectionGuard, listener: str,
                   after_handshake: tuple[str, float], context_factory, factory,
                   interface: str, backlog: int, write_aggregation: bool = True,
                   eager_writes: bool = False):
    """``reactor.listenSSL`` with the guard in front; returns the IListeningPort.
    ``eager_writes``: a write on an idle socket is sent at once (``server.eager_tcp``)."""
    tls_factory = GuardedTLSFactory(guard, listener, after_handshake, context_factory, factory,
                                    clock=reactor)
    if not write_aggregation:
        tls_factory.protocol = GuardedTLSProtocol
    if eager_writes:
        from .eager_tcp import listen_eager
        listening = listen_eager(reactor, port, tls_factory, backlog, interface)
    else:
        listening = reactor.listenTCP(port, tls_factory, backlog=backlog, interface=interface)
    listening._type = "TLS"
    return listening


def note_refusal(transport: Any, kind: str, reason: str) -> None:
    """Log why a connection is refused or closed, through the guard's rate-limited log if the
    connection has one."""
    if isinstance(transport, _Guarded):
        transport.factory.guard.note(transport, kind, reason)
    else:
        log.warn("connection from {address} {reason}", address=transport.getPeer().host,
                 reason=reason)
