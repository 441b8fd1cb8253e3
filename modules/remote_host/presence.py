"""The host's presence: stay connected to the server, heartbeat, come back after any loss.

States, top to bottom: *connecting* (ClientService dials the module port) → *registered* (Hello
answered; the server lists us online) → *heartbeating* (a Heartbeat every ``heartbeat_seconds``;
one that is not answered in time aborts the connection) → on any loss *backing off*: the next
attempt waits a random time in [0, min(cap, base·2^attempt)] ("full jitter"), so thousands of
hosts coming back after a server failure do not arrive in the same second.  A server that shuts
down cleanly says so first (``ServerGoingAway``): then the first attempt waits until it should
listen again plus a random part of the spread it asks for, and the back-off starts afresh —
a planned restart does not grow every host's back-off towards the cap (``ReconnectSchedule``).

A connection that is refused or lost before ``Hello`` is answered counts as a failed attempt
(its back-off grows) and logs one line; ``ClientService`` is told of it only as a connection
that ended, the one loss its state machine handles at every point.
"""

from __future__ import annotations

from typing import Callable

from OpenSSL import SSL
from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from protocol import control

from ..common.link.connection import ControlClient, ServerAddress, endpoint_for, hello
from ..common.link.reconnect import ReconnectSchedule
from ..common.link.folder import ModuleFolder
from ..common.session.recorder import resume_waiting as resume_recordings

log = Logger()


class HostPresence:
    """Keeps one registered control connection; ``on_offer`` decides on session offers;
    ``on_state()`` is called whenever the host goes online (each registration) or offline (each
    loss), so a window never shows a state that is over."""

    def __init__(self, reactor, folder: ModuleFolder,
                 address: "ServerAddress | list[ServerAddress]",
                 on_offer: Callable[[dict], object], max_backoff: float = 60.0,
                 on_state: Callable[[], None] = lambda: None) -> None:
        self.reactor = reactor
        self.folder = folder
        self.on_offer = on_offer
        self.on_state = on_state
        self.state = "stopped"
        self.registered_count = 0
        self.connection: ControlClient | None = None
        self.registered: defer.Deferred = defer.Deferred()
        self.schedule = ReconnectSchedule(reactor.seconds, cap=max_backoff)
        ca_pem = folder.ca_path.read_bytes()
        endpoint = endpoint_for(reactor, address, ca_pem, folder)
        factory = Factory()
        # ClientService hands prepareConnection a proxy: attributes set on it would not reach
        # the protocol, so the handlers go in at construction.
        factory.protocol = lambda: ControlClient(on_offer=self.on_offer,
                                                 on_going_away=self._going_away)
        # ClientService counts its own attempts, but resets them whenever a connection is made,
        # also one whose Hello then fails: the schedule keeps the host's own count.
        self.service = ClientService(endpoint, factory,
                                     retryPolicy=lambda _attempt: self._next_delay(),
                                     clock=reactor, prepareConnection=self._register)
        self._heartbeat: task.LoopingCall | None = None

    def start(self) -> None:
        self.state = "connecting"
        self.service.startService()

    def stop(self) -> defer.Deferred:
        self.state = "stopped"
        self._stop_heartbeat()
        return self.service.stopService()

    def _next_delay(self) -> float:
        delay = self.schedule.delay()
        self.schedule.failed()  # until a registration says otherwise
        return delay

    def _going_away(self, back_in: float, spread: float) -> None:
        if self.schedule.going_away(back_in, spread):
            log.info("the server is shutting down cleanly: trying again in about {back_in:.0f} "
                     "s, spread over {spread:.0f} s", back_in=back_in, spread=spread)

    @defer.inlineCallbacks
    def _register(self, conn: ControlClient):
        try:
            answer = yield hello(conn, "host")
        except Exception as exc:
            # Not re-raised: ClientService's state machine has no transition for a connection
            # that ends while (or after) prepareConnection failed — it logged an "Unhandled
            # Error" per refused host.  As a made connection that ends, it is retried normally;
            # the schedule's failure count (not ClientService's) sets the wait.
            if conn._lost is None:
                log.warn("the server refused this host: {why}", why=str(exc))
                conn.transport.abortConnection()
            elif conn._lost.check(SSL.Error):
                # a TLS alert in the handshake: the server refused the certificate (revoked,
                # expired, another CA) — not a busy server, so no busy back-off either
                log.warn("the server refused this host: TLS failed ({why}); the certificate may "
                         "be revoked, expired or from another CA: enroll again",
                         why=conn._lost.getErrorMessage())
            else:
                log.warn("lost the server before it answered Hello ({why}): reconnecting with "
                         "back-off", why=conn._lost.getErrorMessage())
                self.schedule.busy()
            return
        self.schedule.registered()
        self.state = "registered"
        self.registered_count += 1
        self.connection = conn
        log.info("registered with the server as {identity}; heartbeat every {every} s",
                 identity=answer["identity"], every=answer["heartbeat_seconds"])
        conn.lost.addCallback(self._lost)
        self._start_heartbeat(conn, answer["heartbeat_seconds"])
        resume_recordings(conn)  # uploads cut off by a connection loss or a server restart
        if not self.registered.called:
            self.registered.callback(answer)
        self.on_state()

    def _start_heartbeat(self, conn: ControlClient, every: float) -> None:
        self._stop_heartbeat()

        def beat():
            d = conn.callRemote(control.Heartbeat)
            d.addTimeout(every * 2, self.reactor)

            def missed(failure):
                if conn._lost is not None:  # the connection ended: _lost says so, once
                    return None
                log.warn("heartbeat not answered ({why}): reconnecting", why=failure.getErrorMessage())
                conn.transport.abortConnection()
            return d.addErrback(missed)
        self._heartbeat = task.LoopingCall(beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(every, now=False)
        self.state = "heartbeating"

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self._heartbeat = None

    def _lost(self, why: str) -> None:
        self._stop_heartbeat()
        if self.state != "stopped":
            self.state = "backing off"
            if self.schedule.notice is not None:  # announced: nothing went wrong
                log.info("the server closed the connection for its shutdown; reconnecting later")
            else:
                log.warn("lost the server ({why}); reconnecting with back-off", why=why)
            self.on_state()
