"""Runs an ``RFBClient`` over any Twisted transport.

``dataReceived`` feeds the sans-I/O client; after ServerInit the adapter asks for one full update
and then keeps one incremental request outstanding.  ``first_frame`` fires with the framebuffer
once every pixel has been painted at least once; ``ended`` fires (with ``None`` or the failure
reason) when the connection goes away.  Used by the viewer (the remote screen inside a session)
and by the presenter's VNC source (``capture_vnc``: a local RFB server as the screen).

``updates_wanted``: when set and it returns False after an update, no new request goes out until
``resume_updates()`` (a paused source asks its server for nothing).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from protocol.rfb_client import (DEFAULT_ENCODINGS, Event, FramebufferUpdated, RFBClient, RFBClientError,
                         ScreenLimit, ServerInit, DesktopResized)


class RFBClientProtocol(Protocol):
    def __init__(self, encodings=DEFAULT_ENCODINGS, password: str | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 screen_limit: ScreenLimit | None = None) -> None:
        self.client = RFBClient(encodings=encodings, password=password, screen_limit=screen_limit)
        self.on_event = on_event
        self.first_frame: Deferred = Deferred()
        self.ended: Deferred = Deferred()
        self.error: str | None = None
        self.updates = 0
        self.input_paused = False   # the presenter paused its screen: no input goes out
        self._painted: np.ndarray | None = None
        self.updates_wanted: Callable[[], bool] | None = None
        self._request_owed = False

    @property
    def framebuffer(self) -> np.ndarray:
        return self.client.framebuffer

    # --- Twisted ---------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        try:
            events = self.client.receive(data)
        except RFBClientError as exc:
            self.error = exc.reason
            self._send(self.client.data_to_send())
            self.transport.loseConnection()
            if not self.first_frame.called:
                self.first_frame.errback(Failure(exc))
            return
        self._send(self.client.data_to_send())
        for event in events:
            self._handle(event)

    def connectionLost(self, reason: Failure = None) -> None:
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
                    self.first_frame.callback(self.client.framebuffer)
            if self.updates_wanted is not None and not self.updates_wanted():
                self._request_owed = True
            else:
                self._send(self.client.request_update(True))
        if self.on_event is not None:
            self.on_event(event)
