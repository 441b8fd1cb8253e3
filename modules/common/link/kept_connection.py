"""A control connection a supporter's front-end keeps up while a person looks at it: the host
list and an ad-hoc ID on offer both stand on one.

What it does, for whatever it carries (``_set_up`` on every fresh connection: list the hosts,
draw an ID):

- an attempt (connect, ``Hello``, the set-up) that the server accepts but never answers is given
  up after ``ATTEMPT_SECONDS`` and the next one scheduled (a stopped or wedged server does not
  hold the front-end);
- a lost connection is said (``_offline(why, retry_in)``) and retried by the modules'
  ``ReconnectSchedule`` (a clean shutdown's notice honoured; the caller caps the wait, a person
  is waiting);
- a connection that goes silent without a reset (a pulled cable, a stopped server: the kernel
  keeps the socket for many minutes) is found by a heartbeat every few seconds (the server's
  ``heartbeat_seconds``, at most ``MAX_HEARTBEAT``); one unanswered for twice that aborts the
  connection, and the front-end hears "the server did not answer for N s".

Before, ``AdhocOffer`` had all of this and ``HostDirectory`` only the reconnect: the host list
froze silently on a connection that died without a reset.  Sans-I/O in time: the reactor passed
in is only asked for ``callLater``/``seconds``, so tests run it on a ``task.Clock``.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from protocol import control

from .reconnect import ReconnectSchedule

log = Logger()

#: how long one attempt (connect, Hello, the set-up) may take before it is given up
ATTEMPT_SECONDS = 30.0

#: the longest between two heartbeats; one unanswered for twice that ends the connection (the
#: server's default heartbeat is for idle hosts: 60 s, too long for a person watching)
MAX_HEARTBEAT = 10.0
#: the shortest silence that ends a connection, whatever the server's heartbeat: a server
#: configured with a 1 s heartbeat may still stall for a second or two under load (a
#: collection, a busy machine), and a needless reconnect draws a new ad-hoc ID
MIN_UNANSWERED = 6.0


class KeptConnection:
    """The connection, its heartbeat and its reconnecting; a subclass says what a connection is
    for (``_set_up``, ``_attached``) and how the loss is shown (``_offline``).

    ``conn`` is the current control connection (None while reconnecting).  ``stop()`` ends it
    all; ``_done`` (overridable: an offer a customer took is done too) stops the keeping."""

    def __init__(self, reactor, connect: Callable[[], Awaitable[Any]], max_wait: float,
                 schedule: ReconnectSchedule | None = None) -> None:
        self.reactor = reactor
        self.connect = connect           # () -> a greeted ControlClient
        self.schedule = schedule or ReconnectSchedule(reactor.seconds, cap=max_wait)
        self.conn = None
        self.stopped = False
        self._retry = None               # the pending reconnect (IDelayedCall)
        self._heartbeat: task.LoopingCall | None = None
        self._beats: set[defer.Deferred] = set()   # heartbeats not answered yet
        self._silent_for = 0.0           # > 0: the connection was given up after that silence

    # --- what a subclass says -----------------------------------------------------------------
    async def _set_up(self, conn) -> Any:
        """On a fresh connection, inside the attempt's deadline: what it is kept for."""
        raise NotImplementedError

    def _attached(self, conn, value: Any, again: bool) -> None:
        """``conn`` is current (``self.conn``) and ``value`` is what ``_set_up`` returned;
        ``again``: after a loss (not the first connection)."""

    def _offline(self, why: "str | BaseException", retry_in: float) -> None:
        """The connection is gone (``why``: its sentence) or an attempt failed (the exception);
        the next attempt in ``retry_in`` seconds."""

    def _connection_gone(self) -> None:
        """The current connection ended (before ``_offline``): what hung on it goes."""

    @property
    def _done(self) -> bool:
        return self.stopped

    # --- start and stop -----------------------------------------------------------------------
    async def _first_attempt(self) -> Any:
        """The first connection and its set-up, under the same deadline; the errors are the
        caller's (a wrong address or a refusal is said at once, nothing retried)."""
        attempt = defer.ensureDeferred(self._connect_and_set_up())
        conn, value = await attempt.addTimeout(ATTEMPT_SECONDS, self.reactor)
        self._attach(conn, value, again=False)
        return value

    async def _connect_and_set_up(self) -> tuple[Any, Any]:
        conn = await self.connect()
        conn.on_going_away = self.schedule.going_away
        try:
            return conn, await self._set_up(conn)
        except BaseException:
            conn.transport.abortConnection()
            raise

    def stop(self) -> None:
        """No more keeping: the pending attempt is cancelled, the heartbeat stopped, the
        connection closed."""
        if self._done:
            return
        self.stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._stop_heartbeat()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.transport.loseConnection()

    # --- the connection ------------------------------------------------------------------------
    def _attach(self, conn, value: Any, again: bool) -> None:
        self.conn = conn
        self.schedule.registered()
        self._attached(conn, value, again)
        self._start_heartbeat(conn)
        conn.lost.addCallback(self._lost, conn)   # last: a connection already gone comes next

    def _lost(self, why: str, conn) -> str:
        if conn is self.conn and not self._done:
            self.conn = None
            self._stop_heartbeat()
            if self.schedule.notice is not None:
                why = "the server is restarting"
            elif self._silent_for:
                why = f"the server did not answer for {self._silent_for:.0f} s"
            self._silent_for = 0.0
            self._connection_gone()
            self._wait(why)
        return why   # the sessions on this connection hear of it too

    def _drop(self, conn, why: BaseException) -> None:
        """Give ``conn`` up although it lives (the server refused what it is kept for) and
        connect afresh."""
        if conn is self.conn and not self._done:
            self.conn = None
            self._stop_heartbeat()
            conn.transport.loseConnection()
            self._connection_gone()
            self._wait(why)

    def _start_heartbeat(self, conn) -> None:
        """Ask the server every few seconds whether it is still there; no answer in twice
        that (at least ``MIN_UNANSWERED``): the connection is aborted (and so replaced)."""
        self._stop_heartbeat()
        every = min(MAX_HEARTBEAT, float(getattr(conn, "greeting", {}).get(
            "heartbeat_seconds") or MAX_HEARTBEAT))

        limit = max(every * 2, MIN_UNANSWERED)

        def beat() -> None:
            answer = conn.callRemote(control.Heartbeat)
            answer.addTimeout(limit, self.reactor)
            self._beats.add(answer)
            answer.addBoth(lambda result: (self._beats.discard(answer), result)[1])

            def unanswered(failure) -> None:
                if not failure.check(defer.TimeoutError):
                    return None          # the connection ended: ``_lost`` says so
                if conn is self.conn and not self._done and not self._silent_for:
                    log.warn("the server did not answer a heartbeat in {s} s: reconnecting",
                             s=limit)
                    self._silent_for = limit
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
        self.schedule.failed()   # until an attempt succeeds again
        self._offline(why, delay)
        self._retry = self.reactor.callLater(delay, self._try_again)

    def _try_again(self) -> None:
        def failed(exc: Exception) -> None:
            if isinstance(exc, defer.CancelledError):    # only the deadline cancels it
                exc = defer.TimeoutError(f"no answer within {ATTEMPT_SECONDS:.0f} s")
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
            conn.on_going_away = self.schedule.going_away
            try:
                value = await self._set_up(conn)
            except Exception as exc:
                conn.transport.abortConnection()
                failed(exc)
                return
            if self._done:
                conn.transport.loseConnection()
                return
            self._attach(conn, value, again=True)
        # a server that takes the connection and never answers (stopped, wedged) does not
        # hold the front-end: the attempt is given up and the next one scheduled
        defer.ensureDeferred(attempt()).addTimeout(ATTEMPT_SECONDS, self.reactor)
