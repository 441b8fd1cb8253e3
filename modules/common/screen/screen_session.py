"""The screen inside a session: RFB over the mux's SCREEN channel, both ends.

The presenter runs the RFB server (``rfb_twisted.RFBServerProtocol``) on its X display, started
once the viewer may see it; key and pointer events reach the display only while *control* is
granted (the injector asks the consent driver, which reports refusals).  The viewer runs the
RFB client (``modules.common.screen.rfb_client_twisted.RFBClientProtocol``) and keeps the framebuffer; with
``--vnc-listen`` it also serves that framebuffer on a loopback port, so a standard VNC viewer
can watch and type — its input goes back through the session like the viewer's own.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.logger import Logger

from modules.common.screen.rfb_twisted import RFBServerProtocol, listen_vnc
from modules.common.screen.capture_x11 import Capture, DamageTracker

log = Logger()


class ChannelTransport:
    """Just enough of a Twisted transport to run a protocol over one session channel."""

    def __init__(self, send: Callable[[bytes], None], close: Callable[[], None]) -> None:
        self._send = send
        self._close = close
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        if data and not self.disconnecting:
            self._send(data)

    def writeSequence(self, chunks) -> None:
        self.write(b"".join(chunks))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._close()

    abortConnection = loseConnection

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 0)

    getHost = getPeer


class FramebufferSource:
    """The viewer's copy of the remote screen as a capture source for a local RFB server."""

    paused = False
    hide_background = False

    def __init__(self, framebuffer: Callable[[], np.ndarray], framebuffer_lock: Any = None) -> None:
        """``framebuffer``: the viewer's picture, ``H x W x 4`` B G R X (the RFB client's
        ``pixels``; a capture is a copy of it); ``framebuffer_lock``: held while the picture is
        copied (the viewer's decoder thread publishes whole updates under it)."""
        self._framebuffer = framebuffer
        self._framebuffer_lock = framebuffer_lock or threading.Lock()
        self._tracker = DamageTracker(detect_scroll=False)
        self._lock = threading.Lock()

    def size(self) -> tuple[int, int]:
        h, w = self._framebuffer().shape[:2]
        return w, h

    def capture(self, tracker: DamageTracker | None = None) -> Capture:
        with self._lock:
            with self._framebuffer_lock:
                frame = self._framebuffer().copy()
            damage, moves = (tracker or self._tracker).update(frame)
            return Capture(frame, damage, moves, None)

    def close(self) -> None:
        pass


class RemoteInjector:
    """Input from a local VNC viewer, sent to the presenter through the session (thread-safe:
    the RFB server adapter calls injectors from the blocking pool)."""

    def __init__(self, reactor, client) -> None:
        self.reactor = reactor
        self.client = client
        self.refused = 0

    def key(self, down: bool, keysym: int) -> None:
        self.reactor.callFromThread(self.client.key, down, keysym)

    def pointer(self, mask: int, x: int, y: int) -> None:
        self.reactor.callFromThread(self.client.pointer, mask, x, y)

    def release_all(self) -> None:
        pass


class PresenterScreen:
    """Serves ``source`` to the viewer once ``start`` is called (when view is allowed)."""

    def __init__(self, source: Any, injector: Any, send: Callable[[bytes], None],
                 close: Callable[[], None], max_fps: float = 30.0,
                 on_cut_text: Callable[[str], None] | None = None) -> None:
        self.protocol = RFBServerProtocol(source, injector, max_fps=max_fps,
                                          on_cut_text=on_cut_text, owns_injector=True)
        self.transport = ChannelTransport(send, close)
        self.started = False
        self.stopped = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.protocol.makeConnection(self.transport)

    def received(self, data: bytes) -> None:
        if self.started and not self.stopped:
            self.protocol.dataReceived(data)

    def pause(self) -> None:
        self.protocol.pause()

    def resume(self) -> None:
        self.protocol.resume()

    def stop(self) -> None:
        self.transport.disconnecting = True   # nothing of this screen leaves any more
        if self.started and not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(None)


class ViewerScreen:
    """Keeps the remote framebuffer; optional local VNC port, snapshot and typed text."""

    def __init__(self, reactor, send: Callable[[bytes], None], close: Callable[[], None],
                 on_event: Callable[[Any], None] | None = None, screen_limit: Any = None,
                 decode_thread: bool = True) -> None:
        """``screen_limit``: the largest remote screen accepted (``ScreenLimit``; 8K if None);
        ``decode_thread``: decode off the reactor thread, so input and the GUI stay responsive
        while a large update decodes (every viewer does; False only for tests that want one
        thread).  Whoever reads ``protocol.framebuffer`` holds ``protocol.framebuffer_lock``."""
        from modules.common.screen.rfb_client_twisted import RFBClientProtocol
        self.reactor = reactor
        self.protocol = RFBClientProtocol(on_event=on_event, screen_limit=screen_limit,
                                          decode_thread=decode_thread, request_early=True,
                                          call_in_reactor=reactor.callFromThread
                                          if decode_thread else None)
        self.transport = ChannelTransport(send, close)
        self.started = False
        self.vnc_port = None

    @property
    def first_frame(self) -> defer.Deferred:
        return self.protocol.first_frame

    def received(self, data: bytes) -> None:
        if not self.started:
            self.started = True
            self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(data)

    def serve_vnc(self, where: str) -> Any:
        """A local RFB server on ``where`` (``127.0.0.1:5901``) showing the remote screen."""
        source = FramebufferSource(lambda: self.protocol.pixels,
                                   self.protocol.framebuffer_lock)
        self.vnc_port = listen_vnc(self.reactor, where, source,
                                   RemoteInjector(self.reactor, self.protocol))
        return self.vnc_port

    def type_text(self, text: str) -> None:
        """Type ``text`` as key presses (a newline is Return)."""
        for char in text:
            keysym = 0xFF0D if char == "\n" else ord(char)
            self.protocol.press(keysym)

    def snapshot(self, path: str) -> None:
        from PIL import Image
        with self.protocol.framebuffer_lock:
            picture = self.protocol.framebuffer.copy()
        Image.fromarray(picture).save(path)

    def stop(self) -> None:
        self.transport.disconnecting = True   # input of a local VNC viewer goes nowhere now
        if self.vnc_port is not None:
            self.vnc_port.stopListening()
        if self.started:
            self.protocol.connectionLost(None)
