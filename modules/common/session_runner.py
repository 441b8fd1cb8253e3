"""One session from a module's side: relay leg → encrypted channel → mux → consent → stream.

The runner wires the sans-I/O parts together and owns nothing of their logic:
``SessionChannel`` (keys, records), ``SessionMux`` (channels, priorities), ``ConsentState``
(terms, rights, direction, emergency stop).  Until the screen exists, the DATA channel carries
the CLI's ``--pipe`` stream with the rights of a screen: the presenter's bytes go out only while
the viewer holds *view*; the viewer's bytes are input, sent once it holds *control* and applied
by the presenter only while control is granted (enforced on the presenter's side as well:
input without the right is dropped and reported as ``right_refused``).
Every consent event and the key confirmation are reported to the server's session protocol.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

from twisted.internet import defer, stdio
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from protocol import control
from protocol.runtime import run_blocking

from .channel import MAX_PAYLOAD, SessionChannel
from .cli import ModuleError
from .channel_events import KeyConfirmed
from .channel_twisted import ChannelFailure, ChannelOverPipe
from .consent import ConsentDriver, ConsentState, Right
from .mux import Channel, SessionMux
from .session_stream import RelayLeg

log = Logger()

STDIN_HIGH_WATER = 512 * 1024
FILE_CHUNKS_PER_TURN = 8
CLIPBOARD_POLL_SECONDS = 1.0


def say(message: str) -> None:
    """Status lines go to stderr: with --pipe, stdout is the session stream."""
    print(message, file=sys.stderr, flush=True)


class SessionError(ModuleError):
    """The session could not be set up or was refused; one line for the user."""


def reporter(conn, session_id: str, reactor=None) -> Callable[[str, dict], defer.Deferred]:
    """Send one event for the session protocol over the control connection (never fails)."""
    if reactor is None:
        from twisted.internet import reactor

    def report(kind: str, detail: dict) -> defer.Deferred:
        d = conn.callRemote(control.SessionEvent, session_id=session_id, kind=kind,
                            detail=json.dumps(detail, default=str))
        d.addTimeout(10, reactor)
        d.addErrback(lambda f: log.warn("could not report {kind} to the server: {why}",
                                        kind=kind, why=f.getErrorMessage()))
        return d
    return report


@implementer(IHalfCloseableProtocol)
class _Stdio(Protocol):
    def __init__(self, runner: "SessionRunner") -> None:
        self.runner = runner

    def dataReceived(self, data: bytes) -> None:
        self.runner.local_data(data)

    def readConnectionLost(self) -> None:
        self.runner.finish("stdin closed")

    def writeConnectionLost(self) -> None:
        self.runner.finish("stdout closed")

    def connectionLost(self, reason) -> None:
        self.runner.finish("stdio closed")


class SessionRunner:
    def __init__(self, reactor, leg: RelayLeg, channel: SessionChannel, consent: ConsentState,
                 ui: Any, report: Callable[[str, dict], Any], *, pipe: bool,
                 request_rights: tuple[str, ...] = (), show_my_screen: bool = False,
                 host_password: str | None = None,
                 admit: Callable[[KeyConfirmed], str | None] | None = None,
                 chat: tuple[str, ...] = (), comments: tuple[str, ...] = (),
                 screen: Any = None, viewer: dict | None = None,
                 send_files: tuple[str, ...] = (), receive_dir: str | None = None) -> None:
        """``screen``: (source, make_injector(allowed)) when this side can show its display;
        ``viewer``: options for showing the remote screen (vnc_listen, snapshot, type)."""
        self.reactor = reactor
        self.leg = leg
        self.channel = channel
        self.consent = consent
        self.ui = ui
        self.report = report
        self.pipe = pipe
        self.request_rights = request_rights
        self.show_my_screen = show_my_screen
        self.admit = admit
        self.chat_lines = chat
        self.comment_lines = comments
        self.screen_offer = screen
        self.viewer_options = viewer or {}
        self.presenter_screen = None
        self.viewer_screen = None
        self.send_files = list(send_files)
        self.receive_dir = receive_dir
        self.files = None  # FileTransfers, once the session is set up
        self._paused = False
        self._pump_scheduled = False
        self.mux = SessionMux()
        self.over = ChannelOverPipe(leg, channel, self._record, host_password=host_password)
        self.driver: ConsentDriver | None = None
        self.stdio: stdio.StandardIO | None = None
        self._held = bytearray()   # presenter output waiting for the view right
        self._requested = False
        self._finished = False
        self.done: defer.Deferred = defer.Deferred()

    # --- start ------------------------------------------------------------------------------------

    async def run(self) -> str:
        try:
            confirmed: KeyConfirmed = await self.over.confirmed
        except ChannelFailure as exc:
            await self.report("key_confirmation_failed", {"reason": exc.failed.reason,
                                                          "kind": exc.failed.kind.value})
            raise SessionError(f"the session could not be secured: {exc.failed.reason}")
        say(f"end-to-end encrypted; verification code {confirmed.verification_code} "
            f"(compare it with the other side by phone)")
        self.report("key_confirmed", {"verification_code": confirmed.verification_code,
                                      "peer": confirmed.peer_identity})
        if self.admit is not None:
            refusal = self.admit(confirmed)
            if refusal:
                await self.report("refused", {"reason": refusal})
                self.channel.abort(refusal)
                self.leg.send(self.channel.data_to_send())  # the peer learns why, authenticated
                self.leg.close()
                raise SessionError(refusal)
        self.driver = ConsentDriver(self.consent, self.ui, self.reactor,
                                    send=lambda data: self._send(Channel.CONTROL, data),
                                    report=self._consent_event)
        self.driver.ended.addCallback(lambda event: self._close(f"{event.by.value}: {event.reason}"))
        self.over.ended.addCallback(self._channel_ended)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._interrupted)
        if self.pipe:
            self.stdio = stdio.StandardIO(_Stdio(self), reactor=self.reactor)
            self.stdio.registerProducer(self.leg.transport, True)  # stdout slow: stop reading
        # We produce what goes into the relay leg (stdin bytes, file chunks): when its buffer
        # fills up, Twisted pauses us and we pause both.
        self.leg.transport.registerProducer(self, True)
        self._setup_files()
        self.driver.start()
        self._maybe_request()
        self._maybe_start_screen()
        return await self.done

    # --- files -----------------------------------------------------------------------------------

    def _setup_files(self) -> None:
        from pathlib import Path

        from .file_transfer import FileTransfers
        consent = self.consent

        def allowed(attempt: str) -> bool:
            # the presenter decides (and reports refusals); the viewer relies on the presenter
            if consent.is_presenter:
                return self.driver.enforce(Right.FILES, attempt)
            return True
        self.files = FileTransfers(Path(self.receive_dir) if self.receive_dir else None,
                                   role=consent.role, allowed=allowed, auto_accept=True)
        self._prepared: list = []
        for path in self.send_files:
            from .file_transfer import prepare
            d = run_blocking(prepare, path)
            d.addCallback(self._prepared.append)
            d.addCallback(lambda _: self._offer_files())
            d.addErrback(lambda f, path=path: say(f"cannot send {path}: {f.getErrorMessage()}"))

    def _files_right(self) -> bool:
        if self.consent.is_presenter:
            return self.consent.allows(Right.FILES)
        return self.consent.holds(Right.FILES)

    def _offer_files(self) -> None:
        if self.files is None or self._finished or not self._files_right():
            return
        while self._prepared:
            self._apply_files(self.files.offer(self._prepared.pop(0)))

    def _file_data(self, payload: bytes, end: bool) -> None:
        from .file_transfer import FileTransferError
        try:
            outcome = self.files.receive(payload, end)
        except FileTransferError as exc:
            if exc.outcome is not None:
                self._apply_files(exc.outcome)
            self.report("file_protocol_error", {"reason": exc.reason})
            if exc.fatal:
                self.driver.end(f"file transfer protocol error: {exc.reason}")
            return
        self._apply_files(outcome)

    def _apply_files(self, outcome) -> None:
        from .file_transfer import FileProgress
        for message in outcome.messages:
            self._send(Channel.FILE, message)
        for event in outcome.events:
            line = event.protocol_event()
            if line is not None:
                self.report(line["kind"], line["detail"])
                say(f"{line['kind'].replace('_', ' ')}: {event.name} ({event.size} bytes)"
                    + (f": {line['detail'].get('reason')}" if line["detail"].get("reason") else ""))
            elif isinstance(event, FileProgress) and event.size:
                step = max(1, event.size // 4)
                if event.transferred // step != (event.transferred - 16 * 1024) // step:
                    say(f"file {event.name}: {100 * event.transferred // event.size} %")
        self._pump_files()

    # IPushProducer for the relay leg's transport
    def pauseProducing(self) -> None:
        self._paused = True
        if self.stdio is not None:
            self.stdio.pauseProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.stdio is not None and len(self._held) <= STDIN_HIGH_WATER:
            self.stdio.resumeProducing()
        self._pump_files()

    def stopProducing(self) -> None:
        self._paused = True

    def _pump_files(self) -> None:
        """Some file chunks per reactor turn while the leg takes them; screen and control
        go first anyway (the mux's priorities) and get their turn between pumps."""
        if self.files is None or self._finished or self._paused or self._pump_scheduled:
            return
        for _ in range(FILE_CHUNKS_PER_TURN):
            if self._paused:
                return
            outcome = self.files.next_chunk()
            if outcome is None:
                return
            for message in outcome.messages:
                self._send(Channel.FILE, message)
            if outcome.events:
                self._apply_files(type(outcome)([], outcome.events))
        self._pump_scheduled = True
        self.reactor.callLater(0, self._pump_again)

    def _pump_again(self) -> None:
        self._pump_scheduled = False
        self._pump_files()

    # --- the screen ------------------------------------------------------------------------------

    def _maybe_start_screen(self) -> None:
        """The presenter starts its RFB server once the viewer may see the screen."""
        if (self.screen_offer is None or self.presenter_screen is not None
                or not self.consent.is_presenter or not self.consent.allows(Right.VIEW)):
            return
        from .screen_session import PresenterScreen
        source, make_injector = self.screen_offer
        injector = make_injector(lambda: self._control_allowed())
        def send_screen(data: bytes) -> None:
            # nothing of the screen leaves once view is withdrawn (the RFB stream stays cut)
            if self.consent.allows(Right.VIEW):
                self._send(Channel.SCREEN, data)
        self.presenter_screen = PresenterScreen(
            source, injector, send=send_screen,
            close=lambda: None, on_cut_text=self._clipboard_from_viewer)
        self.presenter_screen.start()
        say("sharing the screen")
        self._start_clipboard(getattr(source, "display_name", None))

    # --- the clipboard (text, both ways, with the rights of the screen) ---------------------------

    def _start_clipboard(self, display: str | None) -> None:
        from twisted.internet import task

        from .clipboard_x11 import ClipboardError, XClipboard
        if display is None:
            return
        try:
            self.clipboard = XClipboard(display)
        except ClipboardError as exc:
            say(str(exc))
            return
        self._clipboard_seen: str | None = None
        self._clipboard_loop = task.LoopingCall(self._poll_clipboard)
        self._clipboard_loop.clock = self.reactor
        self._clipboard_loop.start(CLIPBOARD_POLL_SECONDS, now=True)

    def _poll_clipboard(self):
        def got(text: str) -> None:
            first = self._clipboard_seen is None
            if text == self._clipboard_seen or self._finished:
                return
            self._clipboard_seen = text
            if first or not text or not self.consent.allows(Right.VIEW):
                return  # what was there before the session is not the supporter's business
            self.presenter_screen.protocol.send_cut_text(text)
            self.report("clipboard_sent", {"chars": len(text)})
        return run_blocking(self.clipboard.get).addCallbacks(
            got, lambda f: log.warn("clipboard: {why}", why=f.getErrorMessage()))

    def _clipboard_from_viewer(self, text: str) -> None:
        if getattr(self, "clipboard", None) is None:
            return
        if not self.driver.enforce(Right.CONTROL, "clipboard"):
            return
        self._clipboard_seen = text  # not an echo back to the viewer
        run_blocking(self.clipboard.set, text).addCallbacks(
            lambda _: self.report("clipboard_received", {"chars": len(text)}),
            lambda f: log.warn("clipboard: {why}", why=f.getErrorMessage()))

    def _viewer_screen_event(self, event) -> None:
        from modules.supporter.rfb_client import ServerCutText
        if isinstance(event, ServerCutText):
            say(f"remote clipboard: {len(event.text)} characters")
            target = self.viewer_options.get("clipboard_file")
            if target:
                with open(target, "w", encoding="utf-8") as fh:
                    fh.write(event.text)

    def _control_allowed(self) -> bool:
        # called from the blocking pool by the input injector: ask on the reactor thread
        from twisted.internet.threads import blockingCallFromThread
        return blockingCallFromThread(self.reactor, self.driver.enforce, Right.CONTROL, "input")

    def _screen_data(self, data: bytes) -> None:
        if self.consent.is_presenter:
            if self.presenter_screen is not None:
                self.presenter_screen.received(data)  # RFB client messages; input is gated
            return
        if not self.consent.holds(Right.VIEW):
            return
        if self.viewer_screen is None:
            from .screen_session import ViewerScreen
            self.viewer_screen = ViewerScreen(
                self.reactor, send=lambda out: self._send(Channel.SCREEN, out), close=lambda: None,
                on_event=self._viewer_screen_event,
                screen_limit=self.viewer_options.get("max_screen"))
            self.viewer_screen.first_frame.addCallbacks(self._first_frame, lambda f: say(
                f"the remote screen could not be shown: {f.getErrorMessage()}"))
        self.viewer_screen.received(data)

    def _first_frame(self, _framebuffer) -> None:
        options, screen = self.viewer_options, self.viewer_screen
        height, width = screen.protocol.framebuffer.shape[:2]
        say(f"remote screen {width}x{height} received")
        if options.get("snapshot"):
            screen.snapshot(options["snapshot"])
            say(f"snapshot saved to {options['snapshot']}")
        if options.get("vnc_listen"):
            port = screen.serve_vnc(options["vnc_listen"])
            say(f"VNC viewers can attach at 127.0.0.1:{port.getHost().port}")
        if options.get("type"):
            screen.type_text(options["type"])
            say("typed the text into the remote screen")
        if options.get("clipboard"):
            screen.protocol.cut_text(options["clipboard"])
            say("sent clipboard text to the remote screen")

    def _maybe_request(self) -> None:
        """Once the terms are accepted: ask to show our screen, or for the rights we want."""
        if self._requested or not self.consent.terms_accepted:
            return
        self._requested = True
        for text in self.chat_lines:
            self.driver.chat(text)
        for text in self.comment_lines:
            self.driver.comment(text)  # goes to the protocol only, never to the peer
        if self.show_my_screen:
            self.driver.request_direction()
            return
        for right in self.request_rights:
            self.driver.request(right)

    # --- events ------------------------------------------------------------------------------------

    def _consent_event(self, event: dict) -> None:
        self.report(event["kind"], event["detail"])
        kind = event["kind"]
        if kind == "terms_accepted":
            self._maybe_request()
        if kind in ("right_revoked", "emergency_stop") and self.presenter_screen is not None \
                and not self.consent.allows(Right.VIEW):
            self.presenter_screen.stop()
            say("screen sharing stopped")
        if kind in ("right_granted", "direction_changed"):
            self._release_held()
            self._maybe_start_screen()
            self._offer_files()
        if kind in ("right_granted", "right_denied", "right_revoked", "direction_changed",
                    "emergency_stop", "terms_accepted", "right_refused"):
            say(f"{kind.replace('_', ' ')}: {json.dumps(event['detail'])}")
        elif kind == "chat":
            say(f"chat from the {event['detail']['by']}: {event['detail']['text']}")

    def _record(self, payload: bytes) -> None:
        for item in self.mux.receive(payload):
            if item.channel == Channel.CONTROL:
                if self.driver is not None:
                    self.driver.received(item.payload)
            elif item.channel == Channel.DATA:
                self._peer_data(item.payload)
            elif item.channel == Channel.SCREEN:
                self._screen_data(item.payload)
            elif item.channel == Channel.FILE and self.files is not None:
                self._file_data(item.payload, item.end)
            else:
                log.warn("dropped {n} bytes on channel {channel}: nothing serves it yet",
                         n=len(item.payload), channel=item.channel)

    def _peer_data(self, data: bytes) -> None:
        if self.consent.is_presenter:
            # input from the viewer: applied only while control is granted
            if not self.driver.enforce(Right.CONTROL, "input"):
                return
        elif not self.consent.holds(Right.VIEW):
            return  # a presenter that shows without our view right is out of step: ignore it
        if self.stdio is not None:
            self.stdio.write(data)

    # --- sending -----------------------------------------------------------------------------------

    def _may_send_data(self) -> bool:
        if self.consent.is_presenter:
            return self.consent.allows(Right.VIEW)     # our screen, once they may see it
        return self.consent.holds(Right.CONTROL)       # our input, once we may control

    def local_data(self, data: bytes) -> None:
        if not self._may_send_data():
            self._held += data  # goes out once the right is granted
            if len(self._held) > STDIN_HIGH_WATER and self.stdio is not None:
                self.stdio.pauseProducing()
            return
        self._send(Channel.DATA, data)

    def _release_held(self) -> None:
        if self._held and self._may_send_data():
            held, self._held = bytes(self._held), bytearray()
            self._send(Channel.DATA, held)
            if self.stdio is not None and not self._paused:
                self.stdio.resumeProducing()

    def _send(self, channel: Channel, data: bytes) -> None:
        if self._finished and channel != Channel.CONTROL:
            return
        self.mux.send(channel, data)
        while True:
            record = self.mux.next_record(MAX_PAYLOAD)
            if record is None:
                break
            try:
                self.over.send_record(record)
            except Exception as exc:  # channel already closed or failed
                log.info("record not sent: {why}", why=str(exc))
                break

    # --- ending ------------------------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """Our side is done (stdin ended): say bye, then close the channel."""
        if self.driver is not None and not self.consent.ended:
            self.driver.end(reason)

    def emergency_stop(self) -> None:
        if self.driver is not None and not self.consent.ended:
            say("EMERGENCY STOP: control revoked, session ended")
            self.driver.emergency_stop()

    def _interrupted(self):
        """Ctrl+C is the CLI's emergency stop: revoke everything and end at once."""
        if self._finished:
            return None
        self.emergency_stop()
        d = defer.Deferred()
        self.reactor.callLater(0.5, d.callback, None)  # let the stop and its report go out
        return d

    def _close(self, reason: str) -> None:
        if self._finished:
            return
        self._finished = True
        self._end_reason = reason
        self.over.close()

    def _channel_ended(self, event) -> None:
        self._finished = True
        if self.files is not None:
            self.files.close("session ended")
        for screen in (self.presenter_screen, self.viewer_screen):
            if screen is not None:
                screen.stop()
        loop = getattr(self, "_clipboard_loop", None)
        if loop is not None and loop.running:
            loop.stop()
        reason = getattr(self, "_end_reason", None) or getattr(event, "reason", "closed by the peer")
        try:
            self.leg.transport.unregisterProducer()
        except Exception:
            pass
        if self.stdio is not None:
            self.stdio.unregisterProducer()
            self.stdio.loseConnection()
        if not self.done.called:
            self.done.callback(reason)
