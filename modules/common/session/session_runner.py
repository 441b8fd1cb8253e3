"""One session from a module's side: relay leg → encrypted channel → mux → consent → stream.

The runner wires the sans-I/O parts together and owns nothing of their logic:
``SessionChannel`` (keys, records), ``SessionMux`` (channels, priorities), ``ConsentState``
(terms, rights, direction, emergency stop).  Until the screen exists, the DATA channel carries
the CLI's ``--pipe`` stream with the rights of a screen: the presenter's bytes go out only while
the viewer holds *view*; the viewer's bytes are input, sent once it holds *control* and applied
by the presenter only while control is granted (enforced on the presenter's side as well:
input without the right is dropped and reported as ``right_refused``).
Every consent event and the key confirmation are reported to the server's session protocol.

How a session ends: whoever ends it decides one ``EndReason`` (who and why), reports it as the
event ``ending`` and waits (at most ``REPORT_WAIT_SECONDS``) until the server took its reports,
then closes the channel; the peer learns the reason from the ``bye`` (or the emergency stop) and
reports the same.  A leg that closes without a reason waits ``NOTICE_WAIT_SECONDS`` for the
server's ``SessionEnded`` notice; a lost control connection ends the session as "lost the
connection to the server" (nothing more could be recorded).  ``done`` fires with the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter
from typing import Any, Callable

from twisted.internet import defer, stdio, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from protocol import control
from protocol.runtime import run_blocking
from protocol.session_end import MAX_DETAIL_CHARS, BadEndReason, EndCause, EndReason

from modules.common.session.channel import MAX_PAYLOAD, SessionChannel
from modules.common.errors import ModuleError
from modules.common.session.channel_events import Closed, FailureKind, KeyConfirmed
from modules.common.session.channel_twisted import ChannelFailure, ChannelOverPipe
from modules.common.session.consent import MAX_REASON_CHARS, ConsentDriver, ConsentState, Right
from modules.common.session.mux import Channel, SessionMux
from modules.common.link.session_stream import RelayLeg

log = Logger()

STDIN_HIGH_WATER = 512 * 1024
FILE_CHUNKS_PER_TURN = 8
CLIPBOARD_POLL_SECONDS = 1.0
REPORT_WAIT_SECONDS = 2.0    # how long the end waits for the server to take our reports
NOTICE_WAIT_SECONDS = 2.0    # how long a cut leg waits for the server's SessionEnded notice
PEER_CLOSE_SECONDS = 3.0     # the side that ended closes the channel; the other waits this long
KEEPALIVE_SECONDS = 25.0     # at most this long without a record of ours (relay idle ≥ 30 s)


def keepalive_interval(relay_idle_seconds: float | None) -> float:
    """How often a quiet session sends a keep-alive: a third of the relay's idle timeout (the
    server says it in the ticket), at most ``KEEPALIVE_SECONDS``."""
    if not relay_idle_seconds or relay_idle_seconds <= 0:
        return KEEPALIVE_SECONDS
    return max(0.05, min(KEEPALIVE_SECONDS, relay_idle_seconds / 3))


def say(message: str) -> None:
    """Status lines go to stderr: with --pipe, stdout is the session stream."""
    print(message, file=sys.stderr, flush=True)


class SessionDelegate:
    """What a session tells its front-end.  The CLI prints (``CliDelegate``); the apps show it in
    windows.  Consent events and questions go to the consent UI (``IConsentUI``) instead; every
    method here may be left as it is."""

    def status(self, text: str) -> None:
        """A line about what the session is doing, for people."""

    def secured(self, verification_code: str, peer: str | None) -> None:
        """The keys are agreed: the code both sides compare by phone."""

    def remote_screen(self, screen) -> None:
        """The viewer's first full frame arrived (``screen.protocol.framebuffer``)."""

    def screen_updated(self, rects) -> None:
        """Remote pixels changed: ``rects`` are (x, y, w, h) areas of the framebuffer."""

    def sharing(self, active: bool) -> None:
        """This side's screen is (no longer) being shown to the peer."""

    def screen_paused(self, paused: bool) -> None:
        """The presenter paused (resumed) the screen: a viewer keeps the last picture and marks
        it paused; the presenter shows that nothing is being sent."""

    def remote_screen_closed(self) -> None:
        """The remote screen is gone (the direction changed): stop showing it."""

    def remote_clipboard(self, text: str) -> None:
        """The peer's clipboard text arrived."""

    def file_event(self, event) -> None:
        """A file transfer changed (``modules.common.session.file_transfer`` events, progress too)."""

    def file_offer(self, offer) -> None:
        """An incoming file waits for this side's answer (only in a session set up with
        ``ask_files``; otherwise offers that pass the checks are accepted at once): answer
        with the runner's ``accept_file`` or ``reject_file``.  ``offer`` is the
        ``FileOffered`` event; a later ``file_event`` for its id (rejected, failed: e.g. the
        sender cancelled, the session ended) means the question is moot."""

    def ended(self, reason) -> None:
        """The session is over, for ``reason`` (``EndReason``)."""


class CliDelegate(SessionDelegate):
    """The command line's front-end: status lines on stderr."""

    def status(self, text: str) -> None:
        say(text)


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


class EventIds:
    """Names each reported event so that both parties' reports of one event carry the same
    ``event_id`` (the server writes one protocol line for them): the n-th occurrence of the
    same kind with the same shared fields is the same event on both sides, because both apply
    the control messages in the same order.  File events are named by their transfer's fields
    only (``saved_as`` or a failure's wording may differ between the sides)."""

    FILE_FIELDS = ("id", "name", "size", "sha256", "direction")

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def stamp(self, kind: str, detail: dict) -> dict:
        shared = ({k: detail.get(k) for k in self.FILE_FIELDS} if kind.startswith("file_")
                  else detail)
        key = kind + json.dumps(shared, sort_keys=True, default=str)
        self._seen[key] += 1
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        return {**detail, "event_id": f"{digest}-{self._seen[key]}"}


_BYE = re.compile(r"(?P<cause>[a-z_]+) by (?P<by>[a-z]+)(?:: (?P<detail>.*))?\Z", re.S)


def bye_text(reason: EndReason) -> str:
    """What the ``bye`` message carries, so the peer names the same reason."""
    line = f"{reason.cause.value} by {reason.by}"
    detail = " ".join("".join(c for c in reason.detail
                              if unicodedata.category(c) != "Cc").split())
    return f"{line}: {detail}"[:MAX_REASON_CHARS] if detail else line


def reason_of_consent_end(event) -> EndReason:
    """The end reason a consent ``SessionEnded`` event stands for (ours or the peer's bye)."""
    by, text = event.by.value, event.reason
    if text == "emergency stop":
        return EndReason(EndCause.EMERGENCY_STOP, by)
    if text in ("terms declined", "terms not accepted in time"):
        return EndReason(EndCause.DECLINED, by, text)
    if text.startswith("bad control message"):
        return EndReason(EndCause.ERROR, by, text)
    match = _BYE.match(text)
    if match:
        try:
            return EndReason.from_fields({"cause": match["cause"], "by": match["by"],
                                          "detail": match["detail"] or ""})
        except BadEndReason:
            pass
    return EndReason(EndCause.ENDED, by, "" if text == "ended" else text)


def reason_of_channel_failure(failed, me: str, peer: str) -> EndReason:
    if failed.kind is FailureKind.KEY_CONFIRMATION:
        return EndReason(EndCause.KEY_FAILED, me, failed.reason)
    if failed.kind is FailureKind.ABORTED:
        return EndReason(EndCause.DECLINED, peer, failed.reason)
    if failed.kind is FailureKind.TRUNCATED:
        return EndReason(EndCause.CONNECTION_LOST, peer, failed.reason)
    return EndReason(EndCause.ERROR, me, failed.reason)


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
                 send_files: tuple[str, ...] = (), receive_dir: str | None = None,
                 ask_files: bool = False, keepalive_seconds: float = KEEPALIVE_SECONDS,
                 delegate: SessionDelegate | None = None) -> None:
        """``screen``: (source, make_injector(allowed)) when this side can show its display;
        ``viewer``: options for showing the remote screen (vnc_listen, snapshot, type);
        ``ask_files``: each incoming file waits for the delegate's answer (``file_offer``)
        instead of being accepted into ``receive_dir`` at once."""
        self.reactor = reactor
        self.delegate = delegate or CliDelegate()
        self.leg = leg
        self.channel = channel
        self.consent = consent
        self.ui = ui
        self.report = report
        self.pipe = pipe
        self.request_rights = request_rights
        self.show_my_screen_first = show_my_screen   # (the method is show_my_screen)
        self.admit = admit
        self.chat_lines = chat
        self.comment_lines = comments
        self.screen_offer = screen
        self.viewer_options = viewer or {}
        self.presenter_screen = None
        self.viewer_screen = None
        self.recorder = None  # modules.common.session.recorder.SessionRecorder, when this side records
        self.send_files = list(send_files)
        self.receive_dir = receive_dir
        self.ask_files = ask_files
        self.files = None  # FileTransfers, once the session is set up
        self._prepared: list = []   # files ready to offer once the files right allows
        self._paused = False
        self._pump_scheduled = False
        self.mux = SessionMux()
        self.over = ChannelOverPipe(leg, channel, self._record, host_password=host_password)
        self.driver: ConsentDriver | None = None
        self.stdio: stdio.StandardIO | None = None
        self._held = bytearray()   # presenter output waiting for the view right
        self._requested = False
        self._finished = False
        self._closing = False
        self._screen_stopped = False
        self._source_connecting = False
        self._typed = False
        self.end_reason: EndReason | None = None
        self._ending_reported = False
        self._control_gone = False
        self._reason_known: defer.Deferred = defer.Deferred()
        self._pending: set[defer.Deferred] = set()
        self.event_ids = EventIds()
        self.done: defer.Deferred = defer.Deferred()  # fires with the EndReason
        self.keepalive_seconds = keepalive_seconds
        self._keepalive: task.LoopingCall | None = None
        self._sent_since_tick = False
        self._window_before: tuple[Any] | None = None   # (window,) shared before share_window

    # --- reports and the end reason ----------------------------------------------------------

    def _report(self, kind: str, detail: dict) -> defer.Deferred | None:
        """Report one event (kept in ``_pending`` until the server answered)."""
        if self.recorder is not None:
            self.recorder.event(kind, detail)  # the recording holds the session's events too
        if self._control_gone:
            return None
        d = self.report(kind, detail)
        if isinstance(d, defer.Deferred) and not d.called:
            self._pending.add(d)

            def settled(result, d=d):
                self._pending.discard(d)
                return result
            d.addBoth(settled)
        return d

    def _reports_taken(self, timeout: float = REPORT_WAIT_SECONDS) -> defer.Deferred:
        """Fires once every report so far was answered, or after ``timeout`` seconds."""
        pending = [d for d in self._pending if not d.called]
        done = defer.Deferred()
        if not pending:
            done.callback(None)
            return done
        timer = self.reactor.callLater(timeout, lambda: done.called or done.callback(None))

        def all_in(_):
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)
        defer.DeferredList([_chain(d) for d in pending], consumeErrors=True).addCallback(all_in)
        return done

    def _decide(self, reason: EndReason) -> None:
        """The first reason wins (a later one is the same end seen from elsewhere)."""
        if self.end_reason is None:
            self.end_reason = reason
            if not self._reason_known.called:
                self._reason_known.callback(reason)

    def _report_ending(self) -> None:
        if (not self._ending_reported and self.end_reason is not None
                and self.end_reason.by in ("supporter", "customer", "host")):  # not the server's
            self._ending_reported = True
            self._report("ending", self.end_reason.fields())

    def server_ended(self, reason: EndReason) -> None:
        """The server ended this session (``SessionEnded``): end it here with its reason."""
        self._decide(reason)
        self._end_here()

    def control_lost(self, _why=None) -> None:
        """The control connection to the server is gone: nothing more can be recorded."""
        self._control_gone = True
        self._decide(EndReason(EndCause.SERVER_LOST, "server"))
        self._end_here()

    def recording_failed(self, why: str) -> None:
        """The policy requires a recording and it cannot be made: the session ends."""
        self.end(EndReason(EndCause.RECORDING_FAILED, self.consent.role.value, why[:160]))

    def end(self, reason: EndReason) -> None:
        """This side ends the session: report why, tell the peer (``bye``), then close."""
        self._decide(reason)
        self._end_here()

    def _end_here(self) -> None:
        if self._finished:
            return  # closing already, or the channel is gone and waited for this reason
        if self.driver is None:   # keys not agreed yet: run() ends with the reason
            self.over.close()
        elif not self.consent.ended:
            self.driver.end(bye_text(self.end_reason))  # → driver.ended → _close
        else:
            self._close()

    # --- start ------------------------------------------------------------------------------------

    async def _secure(self) -> None:
        """Until the keys are confirmed and the peer admitted; raises ``SessionError`` with the
        reason the session never started (reported first)."""
        try:
            confirmed: KeyConfirmed = await self.over.confirmed
        except ChannelFailure as exc:
            if self.end_reason is not None:   # the server ended it, or we lost the server
                self._report_ending()
                await self._reports_taken()
                raise SessionError(f"session ended: {self.end_reason.text()}")
            self._decide(reason_of_channel_failure(exc.failed, self.consent.role.value,
                                                   self.consent.peer.value))
            self._report("key_confirmation_failed", {"reason": exc.failed.reason,
                                                     "kind": exc.failed.kind.value})
            self._report_ending()
            await self._reports_taken()
            raise SessionError(f"the session could not be secured: {exc.failed.reason}") from exc
        if self.end_reason is not None:   # the server ended it while the keys were agreed
            self.over.close()
            raise SessionError(f"session ended: {self.end_reason.text()}")
        self.delegate.status(f"end-to-end encrypted; verification code "
                             f"{confirmed.verification_code} (compare it with the other side by "
                             f"phone)")
        self.delegate.secured(confirmed.verification_code, confirmed.peer_identity)
        self._report("key_confirmed", {"verification_code": confirmed.verification_code,
                                       "peer": confirmed.peer_identity})
        if self.admit is not None:
            refusal = self.admit(confirmed)
            if refusal:
                self._decide(EndReason(EndCause.DECLINED, self.consent.role.value, refusal))
                self._report("refused", {"reason": refusal})
                self._report_ending()
                await self._reports_taken()
                self.channel.abort(refusal)
                self.leg.send(self.channel.data_to_send())  # the peer learns why, authenticated
                self.leg.close()
                raise SessionError(refusal)

    async def run(self) -> str:
        try:
            await self._secure()
        except BaseException:
            self._disconnect_screen_source()   # never shown: the offered screen is let go now
            raise
        self.driver = ConsentDriver(self.consent, self.ui, self.reactor,
                                    send=lambda data: self._send(Channel.CONTROL, data),
                                    report=self._consent_event)
        self.driver.ended.addCallback(self._consent_ended)
        self.over.ended.addCallback(self._channel_ended)
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._interrupted)
        if self.pipe:
            self.stdio = stdio.StandardIO(_Stdio(self), reactor=self.reactor)
            self.stdio.registerProducer(self.leg.transport, True)  # stdout slow: stop reading
        # We produce what goes into the relay leg (stdin bytes, file chunks): when its buffer
        # fills up, Twisted pauses us and we pause both.
        self.leg.transport.registerProducer(self, True)
        self._setup_files()
        self.driver.start()
        self._keepalive = task.LoopingCall(self._keep_alive)
        self._keepalive.clock = self.reactor
        self._keepalive.start(self.keepalive_seconds, now=False)
        self._maybe_request()
        self._maybe_start_screen()
        return await self.done

    # --- commands: what a front-end (CLI or app) asks of the session ------------------------

    def _command(self, action: Callable[[], None]) -> bool:
        """Run a consent command; a refusal of this side's own usage becomes a status line."""
        from modules.common.session.consent import ConsentUsageError
        if self.driver is None or self.consent.ended:
            return False
        try:
            action()
        except ConsentUsageError as exc:
            self.delegate.status(str(exc))
            return False
        return True

    def request(self, right: str) -> bool:
        """Viewer: ask the presenter for ``right`` (view, control, files)."""
        return self._command(lambda: self.driver.request(right))

    def revoke(self, right: str) -> bool:
        """Presenter: take ``right`` back at once."""
        return self._command(lambda: self.driver.revoke(right))

    def show_my_screen(self) -> bool:
        """Ask that the direction swap (this side would show its screen)."""
        return self._command(self.driver.request_direction if self.driver else lambda: None)

    def pause(self) -> bool:
        """Presenter: stop capturing and sending the screen; the viewer keeps the last picture."""
        return self._command(lambda: self.driver.pause())

    def resume(self) -> bool:
        return self._command(lambda: self.driver.resume())

    def toggle_pause(self) -> bool:
        """The CLI's key (Ctrl+Z) and the apps' button: pause, or resume a paused screen."""
        return self.resume() if self.consent.paused else self.pause()

    def chat(self, text: str) -> bool:
        return self._command(lambda: self.driver.chat(text))

    def comment(self, text: str) -> bool:
        """Supporter: a note for the session protocol only."""
        return self._command(lambda: self.driver.comment(text))

    def end_session(self) -> None:
        """This side's person ends the session normally."""
        self.end(EndReason(EndCause.ENDED, self.consent.role.value))

    def send_file(self, path: str) -> defer.Deferred:
        """Offer the file at ``path`` (sent once the files right allows it)."""
        from modules.common.session.file_transfer import prepare
        d = run_blocking(prepare, path)
        d.addCallback(self._prepared.append)
        d.addCallback(lambda _: self._offer_files())
        d.addErrback(lambda f: self.delegate.status(f"cannot send {path}: {f.getErrorMessage()}"))
        return d

    def receive_files_into(self, folder: str | None) -> None:
        """Where files from the peer go (None: every offer is refused)."""
        from pathlib import Path
        self.receive_dir = folder
        if self.files is not None:
            self.files.download_dir = Path(folder).resolve() if folder else None

    def accept_file(self, transfer_id: str, folder: str | None = None) -> bool:
        """Take an incoming file (asked through ``file_offer``), stored in ``folder`` (default:
        ``receive_dir``).  False if it no longer waits (cancelled by the sender, session over)."""
        return self._file_command(lambda: self.files.accept(transfer_id, folder))

    def reject_file(self, transfer_id: str, reason: str = "declined") -> bool:
        """Refuse an incoming file; the sender learns ``reason``."""
        return self._file_command(lambda: self.files.reject(transfer_id, reason))

    def cancel_file(self, transfer_id: str, reason: str = "cancelled") -> bool:
        """Stop a transfer under way, in either direction."""
        return self._file_command(lambda: self.files.cancel(transfer_id, reason))

    def _file_command(self, action: Callable[[], Any]) -> bool:
        if self.files is None or self._finished:
            return False
        try:
            outcome = action()
        except ValueError:      # no longer waiting or under way: the events said so already
            return False
        self._apply_files(outcome)
        return True

    def pointer(self, mask: int, x: int, y: int) -> None:
        """Viewer: a pointer event on the remote screen (sent only while control is held and
        the screen is not paused)."""
        if self.viewer_screen is not None and self.consent.holds(Right.CONTROL):
            self.viewer_screen.protocol.pointer(mask, x, y)

    def key(self, down: bool, keysym: int) -> None:
        if self.viewer_screen is not None and self.consent.holds(Right.CONTROL):
            self.viewer_screen.protocol.key(down, keysym)

    def windows(self) -> defer.Deferred:
        """The top-level windows this side could share (``WindowInfo`` list; empty when it
        shows no X display)."""
        source = self.screen_offer[0] if self.screen_offer else None
        if source is None or not hasattr(source, "windows"):
            return defer.succeed([])
        return run_blocking(source.windows)

    def share_window(self, window: int | str | None) -> defer.Deferred:
        """Share only ``window`` (an id from ``windows()``, or a title) or, with None, the whole
        screen again; the change is logged.  Fires with the chosen ``WindowInfo`` (None: the
        whole screen); a window that is gone fails with ``LookupError``."""
        source = self.screen_offer[0] if self.screen_offer else None
        if source is None or not hasattr(source, "select_window"):
            return defer.fail(LookupError("this side shows no screen it could narrow to a window"))

        def choose():
            if self._window_before is None:   # what the next session starts with
                self._window_before = (getattr(source, "selected_window", None),)
            if window is None:
                source.select_window(None)
                return None
            listed = source.windows()
            info = next((w for w in listed if window in (w.id, w.title)), None) or next(
                (w for w in listed if isinstance(window, str) and window in w.title), None)
            if info is None:
                raise LookupError(f"no window {window!r} to share: it is closed or not mapped")
            source.select_window(info.id)
            return info

        def chosen(info):
            detail = ({"window": f"0x{info.id:08x}", "title": info.title[:200]} if info
                      else {"window": "screen"})
            self._report("window_shared", self.event_ids.stamp("window_shared", detail))
            self.delegate.status("sharing the whole screen" if info is None
                                 else f"sharing only the window {info.title!r}")
            return info
        return run_blocking(choose).addCallback(chosen)

    def _restore_window(self) -> None:
        """A window chosen during the session is this session's choice: the source (which a
        host keeps for its next session) shares again what it shared before."""
        if self._window_before is None or not self.screen_offer:
            return
        (before,), self._window_before = self._window_before, None
        run_blocking(self.screen_offer[0].select_window, before).addErrback(
            lambda f: log.warn("screen: could not restore the shared area: {why}",
                               why=f.getErrorMessage()))

    def send_clipboard(self, text: str) -> None:
        if self.viewer_screen is not None and self.consent.holds(Right.CONTROL):
            self.viewer_screen.protocol.cut_text(text)

    # --- files -----------------------------------------------------------------------------------

    def _setup_files(self) -> None:
        from pathlib import Path

        from modules.common.session.file_transfer import FileTransfers
        consent = self.consent

        def allowed(attempt: str) -> bool:
            # the presenter decides (and reports refusals); the viewer relies on the presenter
            if consent.is_presenter:
                return self.driver.enforce(Right.FILES, attempt)
            return True
        self.files = FileTransfers(Path(self.receive_dir) if self.receive_dir else None,
                                   role=consent.role, allowed=allowed,
                                   auto_accept=not self.ask_files)
        for path in self.send_files:
            from modules.common.session.file_transfer import prepare
            d = run_blocking(prepare, path)
            d.addCallback(self._prepared.append)
            d.addCallback(lambda _: self._offer_files())
            d.addErrback(lambda f, path=path: self.delegate.status(f"cannot send {path}: {f.getErrorMessage()}"))

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
        from modules.common.session.file_transfer import FileTransferError
        try:
            outcome = self.files.receive(payload, end)
        except FileTransferError as exc:
            if exc.outcome is not None:
                self._apply_files(exc.outcome)
            self._report("file_protocol_error", {"reason": exc.reason})
            if exc.fatal:
                self.end(EndReason(EndCause.ERROR, self.consent.peer.value,
                                   f"file transfer protocol error: {exc.reason}"))
            return
        self._apply_files(outcome)

    def _apply_files(self, outcome) -> None:
        from modules.common.session.file_transfer import FileOffered, FileProgress
        for message in outcome.messages:
            self._send(Channel.FILE, message)
        waiting = {offer.id for offer in self.files.pending_offers()} if self.ask_files else ()
        for event in outcome.events:
            self.delegate.file_event(event)
            if isinstance(event, FileOffered) and event.id in waiting:
                self.delegate.file_offer(event)
            line = event.protocol_event()
            if line is not None:
                self._report(line["kind"], self.event_ids.stamp(line["kind"], line["detail"]))
                reason = line["detail"].get("reason")
                self.delegate.status(f"{line['kind'].replace('_', ' ')}: {event.name} "
                                     f"({event.size} bytes)" + (f": {reason}" if reason else ""))
            elif isinstance(event, FileProgress) and event.size:
                step = max(1, event.size // 4)
                if event.transferred // step != (event.transferred - 16 * 1024) // step:
                    self.delegate.status(f"file {event.name}: "
                                         f"{100 * event.transferred // event.size} %")
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
        if self.recorder is not None:  # the side that shows records: ask as the presenter
            self.recorder.starts_presenting()  # (a supporter after a direction change)
        if self.recorder is not None and not self.recorder.may_show():
            # under a 'required' policy no screen runs before its recording does
            if self.recorder.may_show() is None:
                self.recorder.when_ready().addCallback(lambda _: self._maybe_start_screen())
            return
        from modules.common.screen.screen_session import PresenterScreen
        source, make_injector = self.screen_offer
        if not getattr(source, "connected", True):
            self._connect_screen_source(source)  # a local VNC server: only now that view is on
            return
        if self.recorder is not None:
            self.recorder.restart_rfb()  # a new RFB stream (also after a direction change)
        injector = make_injector(lambda: self._control_allowed())
        if hasattr(injector, "on_unfocused"):
            injector.on_unfocused = lambda count: self.reactor.callFromThread(
                self._keys_went_nowhere, count)
        def send_screen(data: bytes) -> None:
            # nothing of the screen leaves once view is withdrawn (the RFB stream stays cut)
            if self.consent.allows(Right.VIEW):
                self._send(Channel.SCREEN, data)
                if self.recorder is not None:
                    self.recorder.rfb_out(data)  # exactly the bytes the viewer gets
        self.presenter_screen = PresenterScreen(
            source, injector, send=send_screen,
            close=lambda: None, on_cut_text=self._clipboard_from_viewer)
        self.presenter_screen.start()
        if self.consent.paused:
            self.presenter_screen.pause()
        self.delegate.status("sharing the screen")
        self.delegate.sharing(True)
        self._start_clipboard(getattr(source, "display_name", None),
                              getattr(source, "clipboard", None))

    def _connect_screen_source(self, source) -> None:
        """A screen from a local RFB server (``capture_vnc.VncSource``): connected once view is
        granted, never before; if it fails, or later breaks, the session ends with its reason."""
        if self._source_connecting:
            return
        self._source_connecting = True
        self.delegate.status(f"connecting to the local screen {source.describe()} ...")
        source.on_lost = self._screen_source_failed

        def connected(_):
            self._source_connecting = False
            if self._finished or not self.consent.allows(Right.VIEW):
                source.disconnect()
                return
            self._maybe_start_screen()

        def failed(failure):
            self._source_connecting = False
            if failure.check(defer.CancelledError):
                return   # we disconnected it meanwhile (view withdrawn, direction changed)
            if not self._finished and self.consent.allows(Right.VIEW):
                self._screen_source_failed(failure.getErrorMessage())
        source.connect().addCallbacks(connected, failed)

    def _screen_source_failed(self, reason: str) -> None:
        if self.presenter_screen is not None and not self._screen_stopped:
            self._screen_stopped = True
            self.presenter_screen.stop()
            self.delegate.sharing(False)
        self.end(EndReason(EndCause.ERROR, self.consent.role.value, reason[:MAX_DETAIL_CHARS]))

    def _disconnect_screen_source(self) -> None:
        """Nothing more from the local screen server (view withdrawn, emergency stop, the end)."""
        if self.screen_offer is not None:
            disconnect = getattr(self.screen_offer[0], "disconnect", None)
            if disconnect is not None:
                disconnect()
    def _close_screens(self) -> None:
        """A direction change: the old RFB stream ends on both sides; what the old side still
        sends is dropped (``ConsentState.screen_in_step``) and a new stream starts."""
        if self.presenter_screen is not None:
            self.presenter_screen.stop()
            self.presenter_screen = None
            self._screen_stopped = False
            self._disconnect_screen_source()   # a local VNC server: reconnected when shown again
            self.delegate.sharing(False)
        if self.screen_offer is not None and hasattr(self.screen_offer[0], "paused"):
            self.screen_offer[0].paused = False   # a change ends a pause
        if self.viewer_screen is not None:
            self.viewer_screen.stop()
            self.viewer_screen = None
            self.delegate.remote_screen_closed()

    def _screen_paused(self, paused: bool) -> None:
        if self.consent.is_presenter and self.screen_offer is not None \
                and hasattr(self.screen_offer[0], "paused"):
            self.screen_offer[0].paused = paused   # a local VNC server is asked for nothing
        if self.presenter_screen is not None:
            (self.presenter_screen.pause if paused else self.presenter_screen.resume)()
        if self.viewer_screen is not None:
            self.viewer_screen.protocol.input_paused = paused
        self.delegate.screen_paused(paused)

    def _keys_went_nowhere(self, count: int) -> None:
        """Typed keys arrived while no window here had the input focus: say so, here and in
        the protocol, instead of letting everyone believe they were typed somewhere."""
        self.delegate.status(f"keys from the {self.consent.peer.value} arrived while no window had the input "
            f"focus: they reached no application (click into a window first)")
        self._report("input_without_focus", {"keys_so_far": count})

    # --- the clipboard (text, both ways, with the rights of the screen) ---------------------------

    def _start_clipboard(self, display: str | None, clipboard: Any = None) -> None:
        """The clipboard of the shown screen: the source's own (a local VNC server's), else
        the X display's (xclip); polled either way, with the rights of the screen."""

        from modules.common.screen.clipboard_x11 import ClipboardError, XClipboard
        if getattr(self, "_clipboard_loop", None) is not None:
            return   # polled already (the screen restarted after a change)
        if clipboard is not None:
            self.clipboard = clipboard
        elif display is None:
            return
        else:
            try:
                self.clipboard = XClipboard(display)
            except ClipboardError as exc:
                self.delegate.status(str(exc))
                return
        self._clipboard_seen: str | None = None
        self._clipboard_loop = task.LoopingCall(self._poll_clipboard)
        self._clipboard_loop.clock = self.reactor
        self._clipboard_loop.start(CLIPBOARD_POLL_SECONDS, now=True)

    def _poll_clipboard(self):
        def got(text: str) -> None:
            first = self._clipboard_seen is None
            if text == self._clipboard_seen or self._finished or self.consent.paused:
                return   # while paused nothing is sent; the change goes out after the resume
            self._clipboard_seen = text
            if (first or not text or not self.consent.allows(Right.VIEW)
                    or self.presenter_screen is None):
                return  # what was there before the session is not the supporter's business
            self.presenter_screen.protocol.send_cut_text(text)
            self._report("clipboard_sent", {"chars": len(text)})
        return run_blocking(self.clipboard.get).addCallbacks(
            got, lambda f: log.warn("clipboard: {why}", why=f.getErrorMessage()))

    def _clipboard_from_viewer(self, text: str) -> None:
        if getattr(self, "clipboard", None) is None:
            return
        if not self.driver.enforce(Right.CONTROL, "clipboard"):
            return
        self._clipboard_seen = text  # not an echo back to the viewer
        run_blocking(self.clipboard.set, text).addCallbacks(
            lambda _: self._report("clipboard_received", {"chars": len(text)}),
            lambda f: log.warn("clipboard: {why}", why=f.getErrorMessage()))

    def _viewer_screen_event(self, event) -> None:
        from modules.supporter.rfb_client import FramebufferUpdated, ServerCutText
        if isinstance(event, FramebufferUpdated):
            self.delegate.screen_updated([(r.x, r.y, r.width, r.height) for r in event.rects])
        elif isinstance(event, ServerCutText):
            self.delegate.remote_clipboard(event.text)
            self.delegate.status(f"remote clipboard: {len(event.text)} characters")
            target = self.viewer_options.get("clipboard_file")
            if target:
                with open(target, "w", encoding="utf-8") as fh:
                    fh.write(event.text)

    def _control_allowed(self) -> bool:
        # called from the blocking pool by the input injector: ask on the reactor thread
        from twisted.internet.threads import blockingCallFromThread
        return blockingCallFromThread(self.reactor, self.driver.enforce, Right.CONTROL, "input")

    def _screen_data(self, data: bytes) -> None:
        if not self.consent.screen_in_step:
            return   # the old screen's bytes, sent before the peer saw the direction change
        if self.consent.is_presenter:
            if self.presenter_screen is not None:
                self.presenter_screen.received(data)  # RFB client messages; input is gated
                if self.recorder is not None:
                    self.recorder.rfb_in(data)
            return
        if not self.consent.holds(Right.VIEW):
            return
        if self.viewer_screen is None:
            from modules.common.screen.screen_session import ViewerScreen
            if self.recorder is not None:
                self.recorder.restart_rfb()
            screen = self.viewer_screen = ViewerScreen(
                self.reactor, send=self._send_viewer_screen, close=lambda: None,
                on_event=self._viewer_screen_event,
                screen_limit=self.viewer_options.get("max_screen"),
                decode_thread=bool(self.viewer_options.get("decode_thread", True)))
            screen.first_frame.addCallbacks(
                lambda _fb: self._first_frame(screen),
                lambda f: None if screen is not self.viewer_screen else self.delegate.status(
                    f"the remote screen could not be shown: {f.getErrorMessage()}"))
        self.viewer_screen.received(data)
        if self.recorder is not None:
            self.recorder.rfb_out(data)  # the viewer records the same bytes it was sent

    def _send_viewer_screen(self, out: bytes) -> None:
        self._send(Channel.SCREEN, out)
        if self.recorder is not None:
            self.recorder.rfb_in(out)

    def _first_frame(self, screen) -> None:
        if screen is not self.viewer_screen:
            return   # the direction changed meanwhile
        options = self.viewer_options
        height, width = screen.protocol.framebuffer.shape[:2]
        self.delegate.status(f"remote screen {width}x{height} received")
        self.delegate.remote_screen(screen)
        if options.get("snapshot"):
            screen.snapshot(options["snapshot"])
            self.delegate.status(f"snapshot saved to {options['snapshot']}")
        if options.get("vnc_listen"):
            try:
                port = screen.serve_vnc(options["vnc_listen"])
            except Exception as exc:  # e.g. the port of the screen before a direction change
                self.delegate.status(f"cannot serve the remote screen to VNC viewers at "
                                     f"{options['vnc_listen']}: {exc}")
            else:
                self.delegate.status(f"VNC viewers can attach at 127.0.0.1:{port.getHost().port}")
        if options.get("type"):
            self._type_when_allowed()
        if options.get("clipboard"):
            screen.protocol.cut_text(options["clipboard"])
            self.delegate.status("sent clipboard text to the remote screen")

    def _type_when_allowed(self) -> None:
        """--type: once the remote screen is here and control is granted (not before)."""
        text = self.viewer_options.get("type")
        screen = self.viewer_screen
        if (not text or self._typed or screen is None or not screen.first_frame.called
                or not self.consent.holds(Right.CONTROL)):
            return
        self._typed = True
        screen.type_text(text)
        self.delegate.status(f"sent {len(text)} key strokes to the remote screen; they reach the window that "
            f"has the input focus there (when none has it, the other side is told and the "
            f"protocol records it)")

    def _maybe_request(self) -> None:
        """Once the terms are accepted: ask to show our screen, or for the rights we want."""
        if self._requested or not self.consent.terms_accepted:
            return
        self._requested = True
        for text in self.chat_lines:
            self.driver.chat(text)
        for text in self.comment_lines:
            self.driver.comment(text)  # goes to the protocol only, never to the peer
        if self.show_my_screen_first:
            self.driver.request_direction()
            return
        for right in self.request_rights:
            self.driver.request(right)

    # --- events ------------------------------------------------------------------------------------

    def _consent_event(self, event: dict) -> None:
        kind = event["kind"]
        if kind != "ended":   # the end is reported once, as ``ending`` with its reason
            self._report(kind, self.event_ids.stamp(kind, event["detail"]))
        if kind == "terms_accepted":
            self._maybe_request()
        if kind in ("right_revoked", "emergency_stop") and not self.consent.allows(Right.VIEW):
            self._disconnect_screen_source()  # at once, before anything is reported or closed
        if kind in ("right_revoked", "emergency_stop") and self.presenter_screen is not None \
                and not self.consent.allows(Right.VIEW) and not self._screen_stopped:
            self._screen_stopped = True
            self.presenter_screen.stop()
            self.delegate.status("screen sharing stopped")
            self.delegate.sharing(False)
        if kind == "direction_changed":
            self._close_screens()   # the new presenter starts its screen with the view right
        if kind in ("screen_paused", "screen_resumed"):
            self._screen_paused(kind == "screen_paused")
        if kind in ("right_granted", "direction_changed"):
            self._release_held()
            self._maybe_start_screen()
            self._type_when_allowed()
            self._offer_files()
        if kind == "right_refused":   # the UI tells people about the rest, in sentences
            detail = event["detail"]
            self.delegate.status(f"refused {detail['attempt']} from the {self.consent.peer.value}: it does not "
                f"hold the {detail['right']} right")

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
        self._sent_since_tick = True
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

    def _keep_alive(self) -> None:
        """Once per interval: a keep-alive if nothing of ours went out since the last tick
        (a screen that does not change and people who only talk on the phone send nothing)."""
        if not self._sent_since_tick and self.driver is not None and not self._finished:
            self.driver.keepalive()
        self._sent_since_tick = False
        self._window_before: tuple[Any] | None = None   # (window,) shared before share_window

    # --- ending ------------------------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """Our side is done (stdin ended): the session ends normally, by us."""
        if not self._finished and not self._closing:
            self.end(EndReason(EndCause.ENDED, self.consent.role.value))

    def emergency_stop(self) -> None:
        """Revoke every right and end the session at once (the events are reported first)."""
        if self.driver is not None and not self.consent.ended:
            self.delegate.status("EMERGENCY STOP: every right revoked, ending the session")
            self.driver.emergency_stop()
        elif self.driver is None and not self._finished:
            self.end(EndReason(EndCause.EMERGENCY_STOP, self.consent.role.value))

    def _interrupted(self):
        """The reactor stops (a second Ctrl+C, or a signal): stop the session on the way out."""
        if self._finished or self.done.called:
            return None
        self.emergency_stop()
        return self._reports_taken()

    def _consent_ended(self, event) -> None:
        self._decide(reason_of_consent_end(event))
        peer_ended = event.by is self.consent.peer
        if peer_ended and self.end_reason.by == self.consent.peer.value:
            # the peer ended it and reports ``ending`` itself before it closes; a second report
            # of the same end would only race with the first one at the server
            self._ending_reported = True
        self._close(peer_ended=peer_ended)

    def _close(self, peer_ended: bool = False) -> None:
        """Report the end, wait (bounded) until the server took our reports, then close.
        When the peer ended the session, its close comes once the server took *its* report:
        we answer that close and close ourselves only if it does not come in time."""
        if self._closing:
            return
        self._closing = True
        self._finished = True
        self._report_ending()

        def close(_=None):
            if not self.over.ended.called:
                self.over.close()
        d = self._reports_taken()
        if peer_ended:
            d.addCallback(lambda _: self.reactor.callLater(PEER_CLOSE_SECONDS, close))
        else:
            d.addCallback(close)

    def _channel_ended(self, event) -> None:
        self._finished = True
        if self.end_reason is None and isinstance(event, Closed):
            # an authenticated close without a bye: the peer ended it
            self._decide(EndReason(EndCause.ENDED, self.consent.peer.value))
        if self.end_reason is None:
            # the leg was cut: the server may be ending the session and tell us why
            timer = self.reactor.callLater(NOTICE_WAIT_SECONDS, lambda: self._decide(
                EndReason(EndCause.CONNECTION_LOST, self.consent.peer.value,
                          getattr(event, "reason", ""))))
            self._reason_known.addCallback(lambda r: timer.active() and timer.cancel())
        self._reason_known.addCallback(lambda _: self._tear_down())

    def _tear_down(self) -> None:
        if self.recorder is not None:  # the FINAL record goes up before the end is reported
            closing = self.recorder.close()
            self._pending.add(closing)
            closing.addBoth(lambda r: self._pending.discard(closing) or r)
        if self.files is not None:
            for event in self.files.close().events:
                self.delegate.file_event(event)   # e.g. a question about a file is moot now
        for screen in (self.presenter_screen, self.viewer_screen):
            if screen is not None:
                screen.stop()
        self._disconnect_screen_source()
        self._restore_window()
        for loop in (getattr(self, "_clipboard_loop", None), self._keepalive):
            if loop is not None and loop.running:
                loop.stop()
        try:
            self.leg.transport.unregisterProducer()
        except Exception:
            pass
        if self.stdio is not None:
            self.stdio.unregisterProducer()
            self.stdio.loseConnection()
        self._report_ending()
        self._reports_taken().addCallback(lambda _: self._done())

    def _done(self) -> None:
        trigger = getattr(self, "_shutdown_trigger", None)
        if trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass
            self._shutdown_trigger = None
        if not self.done.called:
            self.delegate.ended(self.end_reason)
            self.done.callback(self.end_reason)


def _chain(d: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires (with None) when ``d`` fires, leaving ``d``'s result alone."""
    out: defer.Deferred = defer.Deferred()

    def fire(result):
        if not out.called:
            out.callback(None)
        return result
    d.addBoth(fire)
    return out


def release_screen_offer(screen) -> None:
    """A screen offered to a session that never started: its X connections and shared memory
    go now, not when the failure is forgotten.  The apps open their screen for every session
    they start (an X server serves a limited number of clients; mss maps a full-screen buffer);
    a session that runs releases it at its end (``SessionRunner._tear_down``)."""
    disconnect = getattr(screen[0], "disconnect", None) if screen else None
    if disconnect is not None:
        disconnect()


async def open_session(reactor, conn, ticket: dict, ca_pem: bytes, folder,
                       make_channel: Callable[[str], SessionChannel], consent: ConsentState,
                       ui: Any, *, delegate: SessionDelegate | None = None,
                       wrap_report: Callable[[Callable, str], Callable] | None = None,
                       **options: Any) -> SessionRunner:
    """Open the relay leg of ``ticket`` and set up the session on it; the caller awaits
    ``runner.run()``.  The control connection ``conn`` carries the reports, the server's
    ``SessionEnded`` for this session and, when it is lost, the session's end."""
    from modules.common.link.connection import tls_session
    from modules.common.link.session_stream import open_leg
    try:
        leg = await open_leg(reactor, ticket["relay_host"], int(ticket["relay_port"]),
                             ticket["relay_token"], ca_pem, folder, resume=tls_session(conn))
        report = reporter(conn, leg.session_id, reactor)
        if wrap_report is not None:
            report = wrap_report(report, leg.session_id)
        options.setdefault("keepalive_seconds",
                           keepalive_interval(ticket.get("relay_idle_seconds")))
        runner = SessionRunner(reactor, leg, make_channel(leg.session_id), consent, ui, report,
                               delegate=delegate, **options)
    except BaseException:
        release_screen_offer(options.get("screen"))
        raise
    conn.session_end_handlers[leg.session_id] = runner.server_ended
    from modules.common.session.recorder import attach as attach_recorder
    attach_recorder(runner, conn, reactor, leg.session_id)  # the server says whether to record

    def forget(result):
        conn.session_end_handlers.pop(leg.session_id, None)
        return result
    runner.done.addBoth(forget)

    def lost(result):
        runner.control_lost(result)
        return result
    conn.lost.addBoth(lost)
    return runner
