"""The host's presence: stay connected to the server, heartbeat, come back after any loss.

States, top to bottom: *connecting* (ClientService dials the module port) → *registered* (Hello
answered; the server lists us online) → *heartbeating* (a Heartbeat every ``heartbeat_seconds``;
one that is not answered in time aborts the connection) → on any loss *backing off*: the next
attempt waits a random time in [0, min(cap, base·2^attempt)] ("full jitter"), so thousands of
hosts coming back after a server restart do not arrive in the same second.
"""

from __future__ import annotations

import random
from typing import Callable

from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from protocol import control

from ..common.link.connection import ControlClient, ServerAddress, endpoint_for, hello
from ..common.link.folder import ModuleFolder
from ..common.session.recorder import resume_waiting as resume_recordings

log = Logger()


def full_jitter(base: float = 1.0, cap: float = 60.0,
                rand: Callable[[float, float], float] = random.uniform) -> Callable[[int], float]:
    def delay(attempt: int) -> float:
        return rand(0.0, min(cap, base * 2 ** min(attempt, 32)))
    return delay


class HostPresence:
    """Keeps one registered control connection; ``on_offer`` decides on session offers."""

    def __init__(self, reactor, folder: ModuleFolder,
                 address: "ServerAddress | list[ServerAddress]",
                 on_offer: Callable[[dict], object], max_backoff: float = 60.0) -> None:
        self.reactor = reactor
        self.folder = folder
        self.on_offer = on_offer
        self.state = "stopped"
        self.registered_count = 0
        self.connection: ControlClient | None = None
        self.registered: defer.Deferred = defer.Deferred()
        ca_pem = folder.ca_path.read_bytes()
        endpoint = endpoint_for(reactor, address, ca_pem, folder)
        factory = Factory()
        # ClientService hands prepareConnection a proxy: attributes set on it would not reach
        # the protocol, so the offer handler goes in at construction.
        factory.protocol = lambda: ControlClient(on_offer=self.on_offer)
        self.service = ClientService(endpoint, factory,
                                     retryPolicy=full_jitter(cap=max_backoff),
                                     clock=reactor, prepareConnection=self._register)
        self._heartbeat: task.LoopingCall | None = None

    def start(self) -> None:
        self.state = "connecting"
        self.service.startService()

    def stop(self) -> defer.Deferred:
        self.state = "stopped"
        self._stop_heartbeat()
        return self.service.stopService()

    @defer.inlineCallbacks
    def _register(self, conn: ControlClient):
        try:
            answer = yield hello(conn, "host")
        except Exception as exc:
            log.warn("the server refused this host: {why}", why=str(exc))
            raise
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

    def _start_heartbeat(self, conn: ControlClient, every: float) -> None:
        self._stop_heartbeat()

        def beat():
            d = conn.callRemote(control.Heartbeat)
            d.addTimeout(every * 2, self.reactor)

            def missed(failure):
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
            log.warn("lost the server ({why}); reconnecting with back-off", why=why)
