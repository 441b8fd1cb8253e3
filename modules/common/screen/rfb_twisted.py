"""Twisted adapter: an ``RFBServer`` over any transport, fed by a screen source.

``RFBServerProtocol`` feeds received bytes to the sans-I/O ``RFBServer``, hands key/pointer events
to the injector (which checks the CONTROL right itself), and while the client has a pending
FramebufferUpdateRequest pulls frames from the source at most ``max_fps`` times a second.
Capture and input block on X round trips, so they run through ``protocol.runtime.run_blocking``;
input events stay in order (one chain per connection).  So does encoding an update larger than
``INLINE_PIXELS`` (a full-screen Tight or H.264 frame takes tens of milliseconds; zlib, JPEG,
swscale and x264 release the GIL): the update is decided on the reactor thread, encoded in the
pool, written when done; the next capture waits for it, so updates go out in order.

A source that can tell when its screen changed (``watch_changes``: X DAMAGE, not where a
compositing manager runs) is not polled while
it is still: a pending request is answered by a capture as soon as a change is reported (still at
most ``max_fps`` captures a second), with one capture every ``STILL_POLL`` seconds as a safety net
for what the X server might not report.  Without it, the source is captured ``max_fps`` times a
second while a request is pending, as before.

``listen_vnc(reactor, "127.0.0.1:5901", source, injector)`` serves the source on a local TCP
port so a standard VNC viewer can attach.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from modules.common.screen.rfb_server import (
    ClientCutText, FramebufferUpdateRequest, KeyEvent, PointerEvent, RFBError, RFBServer,
)
from modules.common.screen.capture_x11 import DamageTracker
from protocol.runtime import run_blocking

__all__ = ["RFBServerProtocol", "RFBServerFactory", "listen_vnc", "INLINE_PIXELS"]

log = Logger()

INLINE_PIXELS = 256 * 256    # smaller updates are encoded on the reactor (no thread hop)
STILL_POLL = 0.5             # seconds between captures of a screen that reports no change


class RFBServerProtocol(Protocol):
    def __init__(self, source: Any, injector: Any = None, *, name: str = "Hausmeister",
                 max_fps: float = 30.0, clock: Any = None,
                 on_cut_text: Callable[[str], None] | None = None, owns_injector: bool = False):
        """``owns_injector``: the injector was made for this connection alone and is closed
        (its X connection released) when the connection ends; a shared one only releases the
        keys and buttons this viewer held."""
        self.source = source
        self.injector = injector
        self.owns_injector = owns_injector
        self.name = name
        self.interval = 1.0 / max_fps
        self.on_cut_text = on_cut_text
        self._clock = clock
        self.rfb: RFBServer | None = None
        self.tracker = DamageTracker(getattr(source, "detect_scroll", True))
        self.bytes_sent = 0
        self._capturing = False
        self._timer: Any = None
        self._last_capture = 0.0
        self._input: defer.Deferred = defer.succeed(None)
        self._closed = False
        self.paused = False
        self._watch: Any = None          # the source's ChangeWatch, if it has one
        self._changed = True             # a change was reported since the last capture
        self._waiting_for_change = False
        self.captures = 0

    @property
    def clock(self) -> Any:
        if self._clock is None:
            from twisted.internet import reactor
            self._clock = reactor
        return self._clock

    def _write(self, data: bytes) -> None:
        if data and not self._closed:
            self.bytes_sent += len(data)
            self.transport.write(data)

    def pause(self) -> None:
        """Capture and send nothing until ``resume`` (a frame being captured is dropped)."""
        self.paused = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def resume(self) -> None:
        """Show the screen again: the next update repaints everything (what changed during the
        pause is not known to the tracker)."""
        if self.paused:
            self.paused = False
            self.tracker = DamageTracker(getattr(self.source, "detect_scroll", True))
            self._changed = True
            self._schedule()

    def send_cut_text(self, text: str) -> None:
        if self.rfb is not None and not self.paused:
            self._write(self.rfb.cut_text(text))

    def connectionMade(self) -> None:
        self.rfb = RFBServer(self.source, name=self.name)
        if hasattr(self.transport, "setTcpNoDelay"):
            # an update's last segment must not wait for the viewer's delayed ACK (Nagle):
            # that held 11-22 % of full-screen H.264 frames back by ~40 ms (bench/README.md)
            self.transport.setTcpNoDelay(True)
        self._write(self.rfb.initial())
        watch = getattr(self.source, "watch_changes", None)
        if callable(watch) and self._clock is None:     # a test's fake clock means: poll
            from twisted.internet import reactor
            self._watch = watch(lambda: reactor.callFromThread(self._change_reported))

    def _change_reported(self) -> None:
        """Reactor thread: the source's screen changed (or its watch failed: poll again)."""
        if self._watch is not None and self._watch.failed:
            self._watch = None
        self._changed = True
        if self._waiting_for_change and self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._waiting_for_change = False
        self._schedule()

    def _still_poll(self) -> None:
        self._waiting_for_change = False
        self._changed = True
        self._schedule()

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.injector is not None:
            close = getattr(self.injector, "close", None) if self.owns_injector else None
            end = close or self.injector.release_all
            self._input.addCallback(lambda _: run_blocking(end))
            self._input.addErrback(lambda f: log.failure("input: release failed", f))

    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.rfb.receive(data)
        except RFBError as e:
            log.warn("rfb: closing connection, client broke the protocol: {reason}",
                     reason=e.reason)
            self._write(self.rfb.data_to_send())
            self.transport.loseConnection()
            self._closed = True
            return
        self._write(self.rfb.data_to_send())
        for ev in events:
            if isinstance(ev, KeyEvent):
                self._apply("key", ev.down, ev.keysym)
            elif isinstance(ev, PointerEvent):
                self._apply("pointer", ev.mask, ev.x, ev.y)
            elif isinstance(ev, ClientCutText) and self.on_cut_text is not None:
                self.on_cut_text(ev.text)
            elif isinstance(ev, FramebufferUpdateRequest):
                self._schedule()
        self._schedule()

    def _apply(self, method: str, *args: Any) -> None:
        if self.injector is None:
            return
        fn = getattr(self.injector, method)
        self._input.addCallback(lambda _: run_blocking(fn, *args))
        self._input.addErrback(lambda f: log.failure("input: {method} failed", f, method=method))

    # ------------------------------------------------------------------------------ frames
    def _schedule(self) -> None:
        if (self._closed or self.paused or self._capturing or self.rfb is None
                or not self.rfb.ready
                or (self._timer is not None and self._timer.active())):
            return
        if not self.rfb.update_pending:
            return
        if self._watch is not None and not self._changed:
            self._waiting_for_change = True
            self._timer = self.clock.callLater(STILL_POLL, self._still_poll)
            return
        wait = self._last_capture + self.interval - time.monotonic()
        if wait > 0:
            self._timer = self.clock.callLater(wait, self._schedule)
            return
        self._capture()

    def _capture(self) -> None:
        self._capturing = True
        self._changed = False          # a change reported from now on means another capture
        self.captures += 1
        self._last_capture = time.monotonic()
        d = run_blocking(self.source.capture, self.tracker)
        d.addCallback(self._captured)
        d.addErrback(lambda f: log.failure("screen: capture failed", f))
        d.addBoth(self._capture_done)

    def _captured(self, cap: Any) -> Any:
        if self._closed or self.paused:
            return None
        prepared = self.rfb.prepare_update(cap.frame, cap.damage, moves=cap.moves,
                                           cursor=cap.cursor)
        if prepared is None:
            return None
        # once prepared, it goes out even if a pause comes meanwhile: the encoders' zlib and
        # H.264 streams already count it
        if prepared.pixels <= INLINE_PIXELS:
            d = defer.maybeDeferred(prepared.encode)
        else:
            d = run_blocking(prepared.encode)
        d.addCallbacks(self._write, self._encode_failed)
        return d

    def _encode_failed(self, failure: Any) -> None:
        """The client's decoder state can no longer be trusted: end the connection."""
        log.failure("rfb: encoding an update failed, closing the connection", failure)
        if not self._closed:
            self._closed = True
            self.transport.loseConnection()

    def _capture_done(self, _: Any) -> None:
        self._capturing = False
        self._schedule()


class RFBServerFactory(Factory):
    def __init__(self, source: Any, injector: Any = None, **kwargs: Any):
        self.source = source
        self.injector = injector
        self.kwargs = kwargs
        self.connections: list[RFBServerProtocol] = []

    def buildProtocol(self, addr: Any) -> RFBServerProtocol:
        p = RFBServerProtocol(self.source, self.injector, **self.kwargs)
        p.factory = self
        self.connections.append(p)
        return p


def listen_vnc(reactor: Any, where: str, source: Any, injector: Any = None, **kwargs: Any) -> Any:
    """Serve ``source`` over RFB on ``"HOST:PORT"`` (loopback; port 0 for any free one).
    Returns the listening port (``getHost().port``); its ``factory`` holds the connections."""
    host, _, port = where.rpartition(":")
    factory = RFBServerFactory(source, injector, **kwargs)
    listening = reactor.listenTCP(int(port), factory, interface=host or "127.0.0.1")
    listening.factory = factory
    return listening
