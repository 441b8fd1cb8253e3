"""Runs an ``RFBClient`` over any Twisted transport.

``dataReceived`` feeds the sans-I/O client; after ServerInit the adapter asks for one full update
and then keeps one incremental request outstanding.  ``first_frame`` fires with the framebuffer
once every pixel has been painted at least once; ``ended`` fires (with ``None`` or the failure
reason) when the connection goes away.  Used by the viewer (the remote screen inside a session)
and by the presenter's VNC source (``capture_vnc``: a local RFB server as the screen).

``updates_wanted``: when set and it returns False after an update, no new request goes out until
``resume_updates()`` (a paused source asks its server for nothing).

``request_early=True`` (the viewers): the next incremental request goes out as soon as an
update's header arrived, not after its last rect was decoded (as TigerVNC's viewer does), so the
server finds and encodes the next change while this one decodes; at most two updates are in
flight.

``decode_thread=True`` (the supporter's viewer): the bytes are decoded in a thread of their own
(``FrameDecoder``) so the GUI loop that runs the reactor keeps handling input while a large
update decodes.  The decoder writes the client's back buffer; ``pixels`` (and its RGB view
``framebuffer``) is then a front buffer that only ever holds whole FramebufferUpdates: at the end
of each update the decoder swaps the two while holding ``framebuffer_lock`` (the new back buffer
catches up with what the front has and it lacks, less what the next update overwrites anyway);
whoever draws the front buffer holds that lock too (it waits for a swap, never for a decode).  Events and the handshake's answers are
handed to the reactor thread in the order they arose, an update's as soon as it is whole.
"""

from __future__ import annotations

import queue
import sys
import threading
from typing import Callable

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from protocol.rfb_client import DESKTOP_SIZE as DESKTOP_SIZE_ENCODING
from protocol.rfb_client import (DEFAULT_ENCODINGS, Event, FramebufferUpdated, Rect, RFBClient,
                                 RFBClientError, ScreenLimit, ServerInit, DesktopResized)


class RFBClientProtocol(Protocol):
    def __init__(self, encodings=DEFAULT_ENCODINGS, password: str | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 screen_limit: ScreenLimit | None = None, decode_thread: bool = False,
                 call_in_reactor: Callable[..., None] | None = None,
                 request_early: bool = False) -> None:
        """``call_in_reactor(f, *args)`` runs ``f`` on the reactor thread (default: the global
        reactor's ``callFromThread``); only used with ``decode_thread``."""
        self.client = RFBClient(encodings=encodings, password=password, screen_limit=screen_limit)
        self.framebuffer_lock = threading.Lock()
        self._decoder: FrameDecoder | None = None
        if decode_thread:
            if call_in_reactor is None:
                from twisted.internet import reactor
                call_in_reactor = reactor.callFromThread
            self._decoder = FrameDecoder(self, call_in_reactor)
        self.on_event = on_event
        self.first_frame: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.error: str | None = None
        self.updates = 0
        self.input_paused = False   # the presenter paused its screen: no input goes out
        self._painted: np.ndarray | None = None
        self.updates_wanted: Callable[[], bool] | None = None
        self._request_owed = False
        self.request_early = request_early
        if request_early:
            self.client.update_started = self._update_started

    @property
    def pixels(self) -> np.ndarray:
        """The picture to show, ``H x W x 4`` B G R 255 (``QImage.Format_RGB32``): whole updates
        only (with ``decode_thread``, the front buffer)."""
        if self._decoder is not None:
            return self._decoder.front
        return self.client.pixels

    @property
    def framebuffer(self) -> np.ndarray:
        """``pixels`` as an ``H x W x 3`` RGB view."""
        return self.pixels[..., 2::-1]

    # --- Twisted ---------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._decoder is not None:
            self._decoder.feed(data)
            return
        try:
            events = self.client.receive(data)
        except RFBClientError as exc:
            self._failed(exc, self.client.data_to_send())
            return
        self._decoded(self.client.data_to_send(), events)

    def _failed(self, exc: RFBClientError, out: bytes) -> None:
        self.error = exc.reason
        self._send(out)
        if self.transport is not None:
            self.transport.loseConnection()
        if not self.first_frame.called:
            self.first_frame.errback(Failure(exc))

    def _decoded(self, out: bytes, events: list[Event]) -> None:
        self._send(out)
        for event in events:
            self._handle(event)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._decoder is not None and self._decoder.running:
            self._decoder.finish(lambda: self._lost())   # after the bytes already received
            return
        self._lost()

    def _lost(self) -> None:
        if not self.first_frame.called:
            self.first_frame.errback(Failure(RFBClientError(
                self.error or "connection closed before the first full frame")))
        if not self.ended.called:
            self.ended.callback(self.error)

    # --- sending ---------------------------------------------------------------------------
    def key(self, down: bool, keysym: int) -> None:
        if not self.input_paused:
            self._send(self.client.key(down, keysym))

    def press(self, keysym: int) -> None:
        if not self.input_paused:
            self._send(self.client.key(True, keysym) + self.client.key(False, keysym))

    def pointer(self, mask: int, x: int, y: int) -> None:
        if not self.input_paused:
            self._send(self.client.pointer(mask, x, y))

    def cut_text(self, text: str) -> None:
        if not self.input_paused:
            self._send(self.client.cut_text(text))

    def close(self) -> None:
        self.transport.loseConnection()

    def resume_updates(self) -> None:
        """Send the incremental request held back while ``updates_wanted`` said no."""
        if self._request_owed:
            self._request_owed = False
            self._send(self.client.request_update(True))

    # --- internals -------------------------------------------------------------------------
    def _update_started(self) -> None:
        """An update's header arrived (on the thread that decodes): ask for the next one."""
        if self._decoder is not None:
            self._decoder.call_in_reactor(self._request_next)
        else:
            self._request_next()

    def _request_next(self) -> None:
        if self.updates_wanted is not None and not self.updates_wanted():
            self._request_owed = True
        elif self.transport is not None and self.client.failure is None:
            self._send(self.client.request_update(True))

    def _send(self, data: bytes) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _handle(self, event: Event) -> None:
        if isinstance(event, (ServerInit, DesktopResized)):
            self._painted = np.zeros((event.height, event.width), bool)
            self._send(self.client.request_update(False))
        elif isinstance(event, FramebufferUpdated):
            self.updates += 1
            if self._painted is not None and not self.first_frame.called:
                for r in event.rects:
                    if r.encoding >= 0:
                        self._painted[r.y:r.y + r.height, r.x:r.x + r.width] = True
                if self._painted.all():
                    self._painted = None
                    self.first_frame.callback(self.framebuffer)
            if not self.request_early:
                self._request_next()
        if self.on_event is not None:
            self.on_event(event)

SWITCH_INTERVAL = 0.0005   # seconds; see FrameDecoder
MAX_BEHIND = 64            # pieces of the back buffer's lag kept before they are copied at once


def subtract(areas: list[tuple[int, int, int, int]],
             cut: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """``areas`` (disjoint ``(x0, y0, x1, y1)``) less ``cut``: each area it overlaps becomes
    the up to four pieces above, below, left and right of it."""
    cx0, cy0, cx1, cy1 = cut
    out = []
    for area in areas:
        x0, y0, x1, y1 = area
        if cx0 >= x1 or cx1 <= x0 or cy0 >= y1 or cy1 <= y0:
            out.append(area)
            continue
        if y0 < cy0:
            out.append((x0, y0, x1, cy0))
        if cy1 < y1:
            out.append((x0, cy1, x1, y1))
        top, bottom = max(y0, cy0), min(y1, cy1)
        if x0 < cx0:
            out.append((x0, top, cx0, bottom))
        if cx1 < x1:
            out.append((cx1, top, x1, bottom))
    return out



class FrameDecoder:
    """Decodes an ``RFBClientProtocol``'s bytes in a daemon thread (see the module docstring).

    Bytes that queued up while a chunk was decoded are decoded together (fewer steps); the
    client's answers and events go to the reactor thread with ``call_in_reactor``."""

    def __init__(self, protocol: RFBClientProtocol, call_in_reactor: Callable[..., None]) -> None:
        self.protocol = protocol
        self.client = protocol.client
        self.call_in_reactor = call_in_reactor
        self.front = np.zeros((0, 0, 4), np.uint8)
        self.running = True
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._behind: list[tuple[int, int, int, int]] = []   # (x0, y0, x1, y1) areas
        self.client.update_applied = self._publish
        self.client.rect_written = self._written
        self.client.pixels_read = self._catch_up
        # The GIL passes between a busy thread and a waiting one every switch interval (5 ms by
        # default); the reactor thread gives it up at every socket read and Qt call, so with
        # 5 ms it could wait that long each time while a large update decodes.
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._run, name="rfb-decoder", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        self._queue.put(data)

    def finish(self, then: Callable[[], None]) -> None:
        """Decode what was fed, stop, then run ``then`` on the reactor thread."""
        self._queue.put(then)

    def _publish(self, rects) -> None:
        """Decoder thread, at the end of a FramebufferUpdate: the back buffer becomes the front
        (a swap under the lock, no copy) and the update's events go to the reactor at once (not
        after the rest of the bytes at hand are decoded).

        The new back buffer then lacks what this update changed (``_behind``); the next
        update's rects shrink that as they overwrite it, and what is left is copied from the
        front just before the next swap (or before a CopyRect reads it).  So a stream of
        full-screen changes costs no copy at all."""
        back = self.client.pixels
        areas = [r for r in rects if r.encoding >= 0 or r.encoding == DESKTOP_SIZE_ENCODING]
        if self.front.shape == back.shape:
            self._catch_up()
        with self.protocol.framebuffer_lock:
            if self.front.shape != back.shape:
                self.front = back.copy()
                self._behind = []
                areas = []
            elif areas:
                spare, self.front = self.front, back
                self.client.use_pixels(spare)
        self.call_in_reactor(self.protocol._decoded, self.client.data_to_send(),
                             self.client.take_events())
        if len(areas) > 8:
            areas = [Rect(min(r.x for r in areas), min(r.y for r in areas),
                          max(r.x + r.width for r in areas) - min(r.x for r in areas),
                          max(r.y + r.height for r in areas) - min(r.y for r in areas), 0)]
        self._behind = [(r.x, r.y, r.x + r.width, r.y + r.height) for r in areas
                        if r.width and r.height]

    def _written(self, x: int, y: int, w: int, h: int) -> None:
        """A rect of the back buffer was overwritten: it is no longer behind."""
        if self._behind:
            self._behind = subtract(self._behind, (x, y, x + w, y + h))
            if len(self._behind) > MAX_BEHIND:
                self._catch_up()

    def _catch_up(self) -> None:
        """Copy from the front what the back buffer lacks (none of it was written since)."""
        front, back = self.front, self.client.pixels
        for x0, y0, x1, y1 in self._behind:
            back[y0:y1, x0:x1] = front[y0:y1, x0:x1]
        self._behind = []

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            chunks = []
            while isinstance(item, bytes):
                chunks.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
                    break
            if chunks and self.client.failure is None:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                try:
                    events = self.client.receive(data)
                except RFBClientError as exc:
                    self.call_in_reactor(self.protocol._failed, exc, self.client.data_to_send())
                else:
                    if events or self.client._out:
                        self.call_in_reactor(self.protocol._decoded, self.client.data_to_send(),
                                             events)
            if callable(item):                     # finish(): the connection went away
                self.running = False
                self.call_in_reactor(item)
                return
