"""The unattended host's service, for ``host run`` and the host's window alike: stay online
(``HostPresence``), decide on session offers by the policy, serve one session at a time with
``SessionRunner``.  Front-ends watch it through ``on_change`` and a delegate per session."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..common.session.channel import Credentials, SessionChannel
from ..common.link.connection import addresses_of
from ..common.session.consent import ConsentState
from ..common.link.folder import ModuleFolder
from ..common.session.session_runner import SessionDelegate, SessionRunner, open_session
from . import settings
from .presence import HostPresence

log = Logger()


class HostService:
    """``make_ui()`` gives the consent UI for a session (questions the policy leaves to the
    logged-in user); ``make_delegate(offer)`` the session's delegate; ``screen`` the display
    offer (``stream_cli.screen_offer``) or None; ``on_change()`` is called whenever the online
    state or the session changes."""

    def __init__(self, reactor, folder: ModuleFolder, *, make_ui: Callable[[], Any],
                 make_delegate: Callable[[dict], SessionDelegate] | None = None,
                 screen: Any = None, pipe: bool = False, options: dict | None = None,
                 max_backoff: float = 60.0, on_change: Callable[[], None] | None = None,
                 tell: Callable[[str], None] | None = None) -> None:
        self.reactor = reactor
        self.folder = folder
        self.make_ui = make_ui
        self.make_delegate = make_delegate or (lambda offer: None)
        self.screen = screen
        self.pipe = pipe
        self.options = options or {}
        self.on_change = on_change or (lambda: None)
        self.tell = tell or (lambda text: None)   # lines for the person at the host
        self.salt, self.secret = settings.load_secret(folder)
        self.policy = settings.load_policy(folder)
        self.ca_pem = folder.ca_path.read_bytes()
        self.credentials = Credentials.from_pem(folder.cert_path.read_bytes(),
                                                folder.key_path.read_bytes())
        self.runner: SessionRunner | None = None
        self.offer: dict | None = None
        self.busy = False
        self._stopped: defer.Deferred | None = None
        self.sessions: defer.Deferred = defer.Deferred()  # first session's end (for --pipe)
        self.presence = HostPresence(reactor, folder, addresses_of(folder), self.on_offer,
                                     max_backoff=max_backoff,
                                     on_state=lambda: self.on_change())

    @property
    def online(self) -> bool:
        return self.presence.state in ("registered", "heartbeating")

    @property
    def server(self) -> str:
        return self.folder.settings().get("server", "")

    def start(self) -> defer.Deferred:
        self.presence.start()
        self.presence.registered.addBoth(lambda r: (self.on_change(), r)[1])
        return self.presence.registered

    def stop(self) -> defer.Deferred:
        """Stop a running session (emergency stop), then go offline; once."""
        if self._stopped is None:
            if self.runner is not None and not self.runner.done.called:
                self.runner.emergency_stop()
            self._stopped = self.presence.stop()
            self._stopped.addBoth(lambda r: (self.on_change(), r)[1])
        d = defer.Deferred()
        self._stopped.addBoth(lambda r: (d.called or d.callback(None), r)[1])
        return d

    def reload_secret(self) -> None:
        self.salt, self.secret = settings.load_secret(self.folder)

    def admit(self, confirmed) -> str | None:
        supporter = (confirmed.peer_identity or "").rsplit(":", 1)[-1]
        if not self.policy.admits(supporter):
            return f"supporter {supporter} is not on this host's allow-list"
        return None

    def on_offer(self, offer: dict) -> bool:
        if not self.policy.admits(offer["supporter"]):
            log.warn("declined session {session_id}: supporter {supporter} is not on this "
                     "host's allow-list", **offer)
            return False
        if not self.pipe and self.screen is None:
            log.warn("declined session {session_id} from {supporter}: nothing to share "
                     "(run with --screen DISPLAY or --pipe)", **offer)
            return False
        if self.busy:
            log.warn("declined session {session_id} from {supporter}: already in a session",
                     **offer)
            return False
        self.busy = True
        self.offer = offer
        self.tell(f"supporter {offer['supporter']} connects: session {offer['session_id']}")
        self.reactor.callLater(0, self._serve, offer)  # answer the offer, then open the leg
        self.on_change()
        return True

    def _serve(self, offer: dict) -> None:
        def channel(session_id: str) -> SessionChannel:
            return SessionChannel("peer", self.secret, session_id, mode="host",
                                  host_salt=self.salt, credentials=self.credentials,
                                  ca_certificate=self.folder.ca_certificate(),
                                  expected_peer=f"hausmeister:supporter:{offer['supporter']}",
                                  peer_fingerprint=offer["supporter_fingerprint"] or None)

        async def serve():
            consent = ConsentState("host", policy={"view": self.policy.view,
                                                   "control": self.policy.control,
                                                   "files": self.policy.files})
            self.runner = await open_session(
                self.reactor, self.presence.connection, offer, self.ca_pem, self.folder,
                channel, consent, self.make_ui(), delegate=self.make_delegate(offer),
                admit=self.admit, screen=self.screen, pipe=self.pipe, **self.options)
            self.on_change()
            self.tell(f"session {self.runner.leg.session_id} connected through the relay; "
                      f"securing it ...")
            leg = self.runner.leg
            reason = await self.runner.run()
            self.tell(f"session ended: {reason.text()} ({leg.bytes_out} bytes sent, "
                      f"{leg.bytes_in} received, encrypted)")
            return reason

        def finished(result):
            self.busy = False
            self.runner = None
            self.offer = None
            self.on_change()
            if isinstance(result, Failure):
                # e.g. a wrong password: the host stays online for the right one
                self.tell(f"session {offer['session_id']} failed: {result.getErrorMessage()}")
            elif not self.sessions.called:
                self.sessions.callback(result)
            return None
        defer.ensureDeferred(serve()).addBoth(finished)
