"""An ad-hoc ID kept on offer until a customer joins, for the CLI and the app alike.

The ID a supporter reads out is only good while its control connection lives and its nameplate
has not expired (the server drops an unused nameplate after ``[adhoc] nameplate_ttl`` without a
word to the supporter, and releases every nameplate of a connection that goes).  Before, a lost
connection left the app's tab with an error and ``adhoc`` with an exit, and an expired ID was
still shown as if it worked.  The offer keeps one ID valid instead: when the connection is lost
it says so, waits by the modules' ``ReconnectSchedule`` (a clean shutdown's notice honoured, at
most ``MAX_WAIT`` seconds between attempts: a person is waiting), connects again and draws a new
nameplate with a new secret; when the nameplate expires it draws a new one on the same
connection.  A connection that goes silent (a pulled cable, a wedged server: no reset arrives,
and the server drops the ID after its TCP keep-alive) is found by a heartbeat while waiting
(the server's ``heartbeat_seconds``, at most ``MAX_HEARTBEAT``; unanswered for twice that: the
connection is given up).  Every change is a typed event to the delegate
(``adhoc_event(event)``), so the front-ends only say it.

Once the customer joined, the connection is the session's (``joined`` fires with the
invitation and the server's ticket): a cut from then on ends the session as before, the offer
does nothing more.  ``stop()`` (a closed tab, Ctrl+C) ends the offer and its connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from twisted.internet import defer, error as net_error, task
from twisted.logger import Logger

from protocol import control

from ..common.link.reconnect import ReconnectSchedule
from .sessions import AdhocInvitation

log = Logger()

#: the longest the offer waits between two connection attempts (a person is waiting)
MAX_WAIT = 5.0

#: how long one attempt (connect, Hello, a new nameplate) may take before it is given up
ATTEMPT_SECONDS = 30.0

#: the longest between two heartbeats of a waiting offer; one unanswered for twice that
#: ends the connection (the server's default heartbeat is for idle hosts: 60 s)
MAX_HEARTBEAT = 10.0


class ReplaceReason(enum.Enum):
    CONNECTION_LOST = "connection lost"
    EXPIRED = "expired"


@dataclass(frozen=True)
class IdOffered:
    """The first ID is on offer (valid for ``expires_in`` seconds)."""
    adhoc_id: str
    expires_in: float


@dataclass(frozen=True)
class Offline:
    """The connection is gone and with it ``old_id``; the next attempt in ``retry_in`` seconds.
    ``why``: the sentence the connection ended with, or the exception an attempt failed with."""
    old_id: str
    why: "str | BaseException"
    retry_in: float


@dataclass(frozen=True)
class IdReplaced:
    """``old_id`` is no longer valid (``reason``); ``adhoc_id`` is on offer instead."""
    old_id: str
    adhoc_id: str
    reason: ReplaceReason
    expires_in: float


@dataclass(frozen=True)
class CustomerJoined:
    adhoc_id: str
    peer_address: str


class AdhocOffer:
    """``start()`` connects and draws the first ID (its errors are the caller's: a server that
    refuses ad-hoc sessions is said at once); then the offer keeps an ID valid until a customer
    joins (``joined`` fires with ``(invitation, ticket)``) or ``stop()``."""

    def __init__(self, reactor, connect: Callable[[], Awaitable[Any]], delegate: Any,
                 schedule: ReconnectSchedule | None = None) -> None:
        self.reactor = reactor
        self.connect = connect           # () -> a greeted ControlClient
        self.delegate = delegate
        self.schedule = schedule or ReconnectSchedule(reactor.seconds, cap=MAX_WAIT)
        self.conn = None                 # the current control connection (None while offline)
        self.invitation: AdhocInvitation | None = None   # the ID on offer (or the one that went)
        self.joined: defer.Deferred = defer.Deferred(canceller=lambda _d: self.stop())
        self.stopped = False
        #: the ID on offer and the one before it on the same connection, by nameplate (a
        #: customer who typed the previous one just before it expired gets its own secret)
        self._drawn: dict[str, AdhocInvitation] = {}
        #: why the ID on offer went, until a new one replaces it
        self._gone: ReplaceReason | None = None
        self._retry = None               # the pending reconnect (IDelayedCall)
        self._expiry = None              # the pending nameplate expiry (IDelayedCall)
        self._heartbeat: task.LoopingCall | None = None
        self._beats: set[defer.Deferred] = set()   # heartbeats not answered yet
        self._silent_for = 0.0           # > 0: the connection was given up after that silence

    @property
    def adhoc_id(self) -> str:
        return self.invitation.adhoc_id if self.invitation is not None else ""

    async def start(self) -> AdhocInvitation:
        async def first() -> tuple[Any, AdhocInvitation]:
            conn = await self.connect()
            try:
                return conn, await self._draw(conn)
            except BaseException:
                conn.transport.abortConnection()
                raise
        attempt = defer.ensureDeferred(first())
        conn, invitation = await attempt.addTimeout(ATTEMPT_SECONDS, self.reactor)
        self._attach(conn, invitation)
        return invitation

    def stop(self) -> None:
        """No more IDs: the pending attempt and expiry are cancelled, the connection closed
        (the server releases its nameplate).  After the customer joined: nothing (the
        connection is the session's)."""
        if self.stopped or self.joined.called:
            return
        self.stopped = True
        for call in (self._retry, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._stop_heartbeat()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.transport.loseConnection()
        if not self.joined.called:
            self.joined.errback(defer.CancelledError("the ad-hoc ID was withdrawn"))

    @property
    def _done(self) -> bool:
        return self.stopped or self.joined.called

    # --- drawing IDs ------------------------------------------------------------------------
    async def _draw(self, conn) -> AdhocInvitation:
        """A new nameplate on ``conn`` and a new secret (never the one just shown)."""
        conn.on_session_ready = lambda ticket: self._customer_joined(conn, ticket)
        conn.on_going_away = self.schedule.going_away
        before = self.invitation.secret if self.invitation is not None else None
        invitation = await AdhocInvitation(conn, avoid_secret=before).allocate()
        return invitation

    def _attach(self, conn, invitation: AdhocInvitation) -> None:
        """``invitation`` on offer on a new connection (the first, or after one was lost)."""
        self.conn = conn
        self._drawn = {}
        if self.invitation is None:
            self._on_offer(invitation)
            self.delegate.adhoc_event(IdOffered(invitation.adhoc_id, invitation.expires_in))
        else:
            self._replaced(invitation)
        self._start_heartbeat(conn)
        conn.lost.addCallback(self._lost, conn)   # last: a connection already gone comes next

    def _on_offer(self, invitation: AdhocInvitation) -> None:
        previous = self._drawn.get(self.invitation.nameplate) if self.invitation else None
        self.invitation = invitation
        self._drawn = {invitation.nameplate: invitation}
        if previous is not None and previous.nameplate != invitation.nameplate:
            self._drawn[previous.nameplate] = previous
        self._gone = None
        # the server counted from before its answer was sent: when this fires it refuses the
        # nameplate already
        self._expiry = self.reactor.callLater(invitation.expires_in, self._expired)

    def _replaced(self, invitation: AdhocInvitation) -> None:
        old, reason = self.adhoc_id, self._gone
        self._on_offer(invitation)
        self.delegate.adhoc_event(IdReplaced(old, invitation.adhoc_id, reason,
                                             invitation.expires_in))

    def _expired(self) -> None:
        conn = self.conn
        if self._done or conn is None:
            return
        self._gone = ReplaceReason.EXPIRED
        log.info("ad-hoc nameplate {nameplate} expired unused: drawing a new one",
                 nameplate=self.invitation.nameplate)

        async def again():
            try:
                invitation = await self._draw(conn)
            except net_error.ConnectionClosed:
                return      # the connection ended under it: ``_lost`` says why
            except Exception as exc:
                if conn is self.conn and not self._done:   # the server refused: start afresh
                    self.conn = None
                    self._stop_heartbeat()
                    conn.transport.loseConnection()
                    self._wait(exc)
                return
            if conn is self.conn and not self._done:
                self._replaced(invitation)
        defer.ensureDeferred(again())

    # --- the customer -----------------------------------------------------------------------
    def _customer_joined(self, conn, ticket: dict) -> None:
        invitation = self._drawn.get(ticket.get("nameplate", ""))
        if self._done or conn is not self.conn or invitation is None:
            raise control.WrongState("this ad-hoc ID is no longer on offer")
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._stop_heartbeat()       # the session keeps its own connection alive
        self.invitation = invitation
        self.delegate.adhoc_event(CustomerJoined(invitation.adhoc_id, ticket["peer_address"]))
        self.joined.callback((invitation, ticket))

    # --- the connection ---------------------------------------------------------------------
    def _lost(self, why: str, conn) -> str:
        if conn is self.conn and not self._done:
            self.conn = None
            self._stop_heartbeat()
            if self._expiry is not None and self._expiry.active():
                self._expiry.cancel()
            self._gone = self._gone or ReplaceReason.CONNECTION_LOST
            if self.schedule.notice is not None:
                why = "the server is restarting"
            elif self._silent_for:
                why = f"the server did not answer for {self._silent_for:.0f} s"
            self._silent_for = 0.0
            self._wait(why)
        return why

    def _start_heartbeat(self, conn) -> None:
        """Ask the server every few seconds whether it is still there; no answer in twice
        that: the connection is aborted (and so replaced)."""
        self._stop_heartbeat()
        every = min(MAX_HEARTBEAT, float(getattr(conn, "greeting", {}).get(
            "heartbeat_seconds") or MAX_HEARTBEAT))

        def beat() -> None:
            answer = conn.callRemote(control.Heartbeat)
            answer.addTimeout(every * 2, self.reactor)
            self._beats.add(answer)
            answer.addBoth(lambda result: (self._beats.discard(answer), result)[1])

            def unanswered(failure) -> None:
                if not failure.check(defer.TimeoutError):
                    return None          # the connection ended: ``_lost`` says so
                if conn is self.conn and not self._done and not self._silent_for:
                    log.warn("the server did not answer a heartbeat in {s} s: reconnecting",
                             s=every * 2)
                    self._silent_for = every * 2
                    conn.transport.abortConnection()
            answer.addErrback(unanswered)
        self._heartbeat = task.LoopingCall(beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(every, now=False)

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None
        for answer in list(self._beats):   # no timer left behind (a late answer is dropped)
            answer.cancel()

    def _wait(self, why: "str | BaseException") -> None:
        delay = self.schedule.delay()
        self.schedule.failed()   # until an ID is on offer again
        self._gone = self._gone or ReplaceReason.CONNECTION_LOST
        self.delegate.adhoc_event(Offline(self.adhoc_id, why, delay))
        self._retry = self.reactor.callLater(delay, self._try_again)

    def _try_again(self) -> None:
        def failed(exc: Exception) -> None:
            if isinstance(exc, defer.CancelledError):    # only the deadline cancels it
                exc = defer.TimeoutError(f"no ID within {ATTEMPT_SECONDS:.0f} s")
            if not self._done:
                self._wait(exc)

        async def attempt():
            try:
                conn = await self.connect()
            except Exception as exc:
                failed(exc)
                return
            if self._done:
                conn.transport.loseConnection()
                return
            try:
                invitation = await self._draw(conn)
            except Exception as exc:
                conn.transport.abortConnection()
                failed(exc)
                return
            if self._done:
                conn.transport.loseConnection()
                return
            self.schedule.registered()
            self._attach(conn, invitation)
        # a server that takes the connection and never answers (stopped, wedged) does not
        # hold the offer: the attempt is given up and the next one scheduled
        defer.ensureDeferred(attempt()).addTimeout(ATTEMPT_SECONDS, self.reactor)
