"""The running server: its parts as one Twisted ``MultiService``, started and stopped in order.

Parts: the HTTPS plane (enrollment, CA download), the module port (mutual TLS), and the
revocation watcher that keeps the in-memory revoked set current and drops revoked modules.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from protocol.identity import Identity, fingerprint
from protocol.session_end import EndCause, EndReason

from . import __version__, accounts, certificates, egress, tls
from .config import Config
from .db import Database
from .broker import Broker, RelayLocator
from .config import split_endpoint
from .connection_guard import ConnectionGuard, listen_guarded
from .module_port import ConnectionRegistry, ModulePort
from .directory.client import Directory
from .directory.signin import SignIn
from .single_port import PlaneSplit
from .relay_tunnel import RelayTunnelResource
from .ws_tunnel import tunnel_resource
from .pki import CertStore
from .relay.core import Relay
from .relay.listener import SessionEnds
from .relay.tokens import RelayTokens, load_or_create_secret
from . import background, cluster, session_recovery, storage_health
from . import alerts as background_alerts
from .pki import utcnow
from .mail import Outbox, OutboxService
from .session_protocol import SessionProtocols
from .state import write_state
from .web import MAX_BODY_BYTES, WebPlane

log = Logger()

MAIL_INTERVAL_SECONDS = 5.0


#: how long a revoked module's control connection stays open after it was told why its
#: sessions ended (``SessionEnded``), so the notice reaches it before the connection drops
REVOKED_NOTICE_SECONDS = 0.5


class RevocationWatcher(service.Service):
    """Polls the database for revoked serials (another process — the CLI, the console — may
    revoke; disabling a user or removing a host revokes their certificates).  A new revocation
    ends every live session of that certificate (in-process relay; separate relay processes
    poll themselves), tells both parties why, then drops the module's connections."""

    def __init__(self, db: Database, registry: ConnectionRegistry, interval: float,
                 broker=None, relay=None, reactor=None) -> None:
        self.db = db
        self.registry = registry
        self.interval = interval
        self.broker = broker
        self.relay = relay
        self.reactor = reactor
        self.revoked: set[str] = set()
        self._loop: task.LoopingCall | None = None

    def load_now(self) -> None:
        self.revoked = self.db.call(certificates.revoked_serials)

    def is_revoked(self, serial: str) -> bool:
        return serial in self.revoked

    @defer.inlineCallbacks
    def poll(self):
        try:
            revoked = yield self.db.run(certificates.revoked_serials)
        except Exception:
            log.failure("could not read the revocation list; keeping the previous one")
            return
        new = revoked - self.revoked
        self.revoked = revoked
        if new:
            yield self.end_sessions_of(new)
            if self.reactor is not None:
                self.reactor.callLater(REVOKED_NOTICE_SECONDS, self.registry.drop_revoked, new)
            else:
                self.registry.drop_revoked(new)

    @defer.inlineCallbacks
    def end_sessions_of(self, serials: set[str]):
        if self.broker is None:
            return
        try:
            details = yield self.db.run(certificates.revocation_details, serials)
        except Exception:
            log.failure("could not read why certificates were revoked")
            details = {}

        def detail(serial: str) -> str:
            return details.get(serial, f"certificate {serial} revoked")
        for live, conn in self.broker.sessions_of_serials(serials):
            end = EndReason(EndCause.REVOKED, "server", detail(conn.serial))
            log.warn("session {session_id}: {reason}", session_id=live.session_id,
                     reason=end.text())
            yield self.broker.end_by_server(live.session_id, end)
        if self.relay is not None:  # legs whose control connection is already gone
            self.relay.end_revoked(serials, detail)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()


def _tenant_of(session, identity: Identity) -> str:
    tenant = accounts.tenant_of_identity(session, identity)
    return tenant.name if tenant else ""


class HausmeisterServer(service.MultiService):
    def __init__(self, config: Config, reactor=None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.db = Database(config.database_url)
        self.db.check_current()
        self.store = CertStore(config.server.cert_dir)
        self.registry = ConnectionRegistry()
        self.revocation = RevocationWatcher(self.db, self.registry,
                                            config.certificates.revocation_poll_seconds,
                                            reactor=reactor)
        self.revocation.load_now()
        self.revocation.setServiceParent(self)
        policy = accounts.LockoutPolicy(config.security.lockout_free_attempts,
                                        config.security.lockout_base_seconds,
                                        config.security.lockout_max_seconds)
        lockouts = accounts.Lockouts(policy)
        self.protocols = SessionProtocols(config.server.protocol_dir)
        self.session_ends = SessionEnds(self.db, self.protocols)
        self.enrollment = certificates.Enrollment(self.store, lockouts,
                                                  config.certificates.module_days)
        # console login and supporter enrollment: local accounts, then the directory if enabled
        self.signin = SignIn(self.db, lockouts, Directory(config.directory)
                             if config.directory.enabled else None)
        self.tokens = RelayTokens(load_or_create_secret(config.relay.secret_file),
                                  ttl=config.relay.pair_timeout_seconds)
        external = [split_endpoint(e) for e in config.relay.external]
        self.relay = None if external else Relay(
            self.tokens, reactor, pair_timeout=config.relay.pair_timeout_seconds,
            idle_timeout=config.relay.idle_timeout_seconds,
            on_ended=self._relay_session_ended)
        locator = RelayLocator((config.server.public_host, self._module_port_number),
                               [(h, p or config.relay.port) for h, p in external],
                               idle_seconds=config.relay.idle_timeout_seconds)
        self.broker = Broker(self.db, lockouts, self.tokens.issue, locator, reactor,
                             nameplate_ttl=config.adhoc.nameplate_ttl_seconds,
                             heartbeat_seconds=config.presence.heartbeat_seconds,
                             missed_heartbeats=config.presence.missed_heartbeats,
                             flush_seconds=config.presence.flush_seconds,
                             terms=config.adhoc.terms,
                             protocols=self.protocols)
        self.revocation.broker, self.revocation.relay = self.broker, self.relay
        from .recordings.receiver import RecordingReceiver
        from .recordings.storage import storage_for
        self.recordings = RecordingReceiver(  # resume tokens stay good across a restart
            self.db, config, storage_for(config), self.broker, reactor,
            resume_secret=load_or_create_secret(config.relay.secret_file))
        self.broker.on_protocol_failure = self._protocol_failure_alert
        if self.relay is not None:
            self.broker.end_relay_session = self.relay.end_session
        # several nodes on one PostgreSQL (server.cluster): None on one node
        self.node_name: str | None = None
        self.nodes = self.bus = None
        if config.cluster.enabled:
            self.node_name = config.cluster.node_name
            # a further node shares what `init` made (database, certificates); its own folder
            # holds only its state file
            config.server.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.nodes = cluster.NodeRegistry(self.db, self.node_name, "server",
                                              config.cluster.node_timeout_seconds, reactor)
            self.nodes.setServiceParent(self)
            self.bus = cluster.NodeBus(self.db, self.node_name, reactor,
                                       config.cluster.call_timeout_seconds)
            self.broker.node = self.node_name
            self.broker.attach_bus(self.bus)
            self.recordings.attach_bus(self.bus)  # recordings of parties on other nodes
            session_recovery.DeadNodeSweeper(
                self.db, self.protocols, self.broker, self.node_name,
                config.cluster.node_timeout_seconds,
                config.relay.pair_timeout_seconds + config.cluster.node_timeout_seconds,
                reactor).setServiceParent(self)
        self.outbox = None
        if config.mail.enabled:  # no relay configured: no mail at all
            self.outbox = Outbox(self.db, config.mail)
            # one node delivers at a time (an advisory lock on PostgreSQL)
            OutboxService(self.outbox, interval=MAIL_INTERVAL_SECONDS, reactor=reactor,
                          runner=cluster.SingleRunner(self.db, cluster.OUTBOX_LOCK)
                          ).setServiceParent(self)
        self.https_port = None
        self.module_port = None
        self.single_port = None
        self.guard: ConnectionGuard | None = None
        self.state: dict = {}
        self._ending: set[defer.Deferred] = set()
        self.recovered: list[str] = []
        self.console = None
        for periodic in background.services(self):
            periodic.setServiceParent(self)

    def _protocol_failure_alert(self, problem: str) -> None:
        """A protocol write failed: the operator's admins get a mail (at most once an hour)."""
        if self.outbox is None:
            log.error("session protocols cannot be written ({problem}); no SMTP relay is "
                      "configured, so no alert mail goes out", problem=problem)
            return
        base_url = background_alerts.base_url_of(self)
        folder = str(self.config.server.protocol_dir)
        self.db.run(background_alerts.protocol_failure, self.outbox, base_url, folder, problem,
                    utcnow()).addErrback(lambda f: log.failure("could not queue the alert", f))

    def warn_about_folders(self) -> list[str]:
        """Start-up: say when the protocol or recordings folder is not writable or nearly full."""
        lines = []
        for what, folder, problem in storage_health.folder_problems(
                storage_health.operator_folders(self.config), self.config.alerts.disk_free_percent):
            lines.append(f"WARNING: {what} folder: {problem}")
            log.error("{what} folder: {problem}", what=what, problem=problem)
        return lines

    def _relay_session_ended(self, stats) -> None:
        # reports still held for their confirmation go into the protocol before its end
        d = self.broker.flush_events(stats.session_id)
        # recordings are finalised (their hashes written) before the protocol's end
        d.addBoth(lambda _: self.recordings.session_ended(stats.session_id))
        d.addBoth(lambda _: self.session_ends.record(stats))
        self._ending.add(d)
        d.addBoth(lambda _: self._ending.discard(d))
        self.broker.session_ended(stats.session_id)

    def _module_port_number(self) -> int:
        if self.config.listen.single_port:  # modules are told the one port that gets through
            return self.config.listen.single_port
        return self.module_port.getHost().port if self.module_port else self.config.listen.module_port

    def startService(self) -> None:
        super().startService()
        c = self.config
        chain, key, ca = self.store.server_chain(), self.store.server_key(), self.store.ca_cert()
        # relay legs resume their control connection's TLS session (tls.Resumption)
        module_ctx = tls.module_context(chain, key, ca, c.certificates.min_tls,
                                        self.revocation.is_revoked, resumption=True)
        if self.nodes is not None:  # known to the others before anything is recovered or heard
            self.nodes.register_now()
            self.bus.start()
        self.recovered = session_recovery.recover(
            self.db, self.protocols, c.server.data_dir, self.node_name,
            c.cluster.node_timeout_seconds if self.nodes is not None else None)
        self.broker.start().addErrback(lambda f: log.failure("could not reset host presence", f))
        factory = ModulePort(self.registry, self.broker, self.relay, self.tokens,
                             lambda ident: self.db.run(_tenant_of, ident))
        factory.recordings = self.recordings
        self.recordings.start()
        # one guard for both ports: deadlines and caps for connections not yet proved
        self.guard = ConnectionGuard.from_config(c.limits, self.reactor)
        self.module_port = listen_guarded(
            self.reactor, c.listen.module_port, self.guard, "module port",
            ("Hello or OpenRelayLeg", c.limits.first_command_seconds),
            tls.ServerContextFactory(module_ctx), factory, c.listen.interface, tls.LISTEN_BACKLOG,
            # control boxes are written whole and the TCP transport sends one iteration's writes
            # in one go: aggregation would only add a timer per answer (every heartbeat) and an
            # object per connection; relay legs turn it off anyway (server.relay.core).  A
            # write on an idle socket goes out at once, without a writer registration
            write_aggregation=False, eager_writes=True)
        web = WebPlane(self.db, self.store, self.enrollment, c.server.public_host,
                       self._module_port_number, c.certificates.renew_before_days,
                       console=self.make_console(), signin=self.signin)
        web.module_tunnel = tunnel_resource(
            tls.ServerContextFactory(module_ctx), factory,
            c.limits.tls_handshake_seconds + c.limits.first_command_seconds, self.reactor)
        # relay legs of WebSocket modules to relay processes of their own pass through here
        web.relay_tunnel = RelayTunnelResource(
            self.broker.relays.external, self.reactor,
            lambda: (c.server.public_host, self._module_port_number()), web.module_tunnel)
        web_ctx = tls.web_context(chain, key, ca, c.certificates.min_tls)
        # a profile picture plus form fields fits; larger bodies are refused unread
        max_body = max(MAX_BODY_BYTES, (c.avatars.max_upload_kib + 64) * 1024)
        site = web.site(max_body, c.limits.http_header_seconds)
        self.https_port = listen_guarded(
            self.reactor, c.listen.https_port, self.guard, "HTTPS port",
            ("complete request headers", c.limits.http_header_seconds),
            tls.ServerContextFactory(web_ctx), site, c.listen.interface, tls.LISTEN_BACKLOG)
        if c.listen.single_port:  # browsers and modules on one port, split by ALPN
            single_ctx = tls.single_port_context(chain, key, ca, c.certificates.min_tls,
                                                 self.revocation.is_revoked)
            self.single_port = listen_guarded(
                self.reactor, c.listen.single_port, self.guard, "single port",
                ("request headers or Hello", max(c.limits.first_command_seconds,
                                                 c.limits.http_header_seconds)),
                tls.ServerContextFactory(single_ctx), PlaneSplit(factory, site),
                c.listen.interface, tls.LISTEN_BACKLOG)
            log.info("single port {host}:{port}: browsers (http/1.1) and modules (hausmeister/1) "
                     "by ALPN", host=c.listen.interface, port=c.listen.single_port)
        https, module = self.https_port.getHost().port, self.module_port.getHost().port
        egress.configure(c, own_ports=[https, module],
                         refusals_path=c.server.data_dir / "egress-refusals.jsonl")
        self.write_state(https, module, fingerprint(ca))
        log.info("Hausmeister {version} listening: https://{host}:{https}/ (console, enrollment), "
                 "module port {host}:{module}", version=__version__, host=c.listen.interface,
                 https=https, module=module)

    def make_console(self):
        from .console import Console
        from .console.pages_avatars import remember_gravatar
        c = self.config
        self.console = Console(self.db, self.enrollment.lockouts, config=c, outbox=self.outbox,
                               store=self.store, broker=self.broker,
                               base_url=lambda: self.state.get("https_url", ""),
                               module_endpoint=lambda: (c.server.public_host,
                                                        self._module_port_number()),
                               idle_seconds=c.console.idle_seconds, signin=self.signin)
        remember_gravatar(self.console, c.avatars.gravatar)  # the stored setting follows at start
        return self.console

    def write_state(self, https: int, module: int, ca_fingerprint: str) -> None:
        self.state = {"pid": os.getpid(), "version": __version__,
                      "interface": self.config.listen.interface, "https_port": https,
                      "module_port": module, "ca_fingerprint": ca_fingerprint,
                      "single_port": self.config.listen.single_port,
                      "https_url": f"https://{self.config.server.public_host}:{https}",
                      "node": self.node_name}
        write_state(self.config.server.data_dir, self.state)

    @defer.inlineCallbacks
    def stopService(self):
        self.recordings.stop()
        for port in (self.https_port, self.module_port, self.single_port):
            if port is not None:
                yield port.stopListening()
        if self.guard is not None:
            self.guard.stop()
        if self.relay is not None:  # each session's end is recorded: "the server shut down"
            self.relay.close_all("the server is shutting down")
            if self._ending:
                yield defer.DeferredList(list(self._ending))
        yield self.broker.stop()
        back_in, spread = self.config.presence.going_away(len(self.broker.hosts))
        told = self.registry.close_for_shutdown(back_in, spread)
        log.info("told {n} modules to come back in {back_in:g} s, spread over {spread:g} s",
                 n=told, back_in=back_in, spread=spread)
        yield super().stopService()
        if self.bus is not None:
            self.bus.stop()
        self.db.dispose()
