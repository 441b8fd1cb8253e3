"""The showing side's screen from an RFB server on its own machine (``--screen vnc://127.0.0.1:5900``).

Wayland desktops, and systems without an X display, already have well-kept VNC servers (wayvnc for
wlroots compositors such as sway, gnome-remote-desktop, x11vnc, TigerVNC's ``x0vncserver``).
``VncSource`` bridges to one instead of capturing the screen itself: it is an RFB client of the
local server (``protocol.rfb_client`` through ``rfb_client_twisted``), keeps the decoded
framebuffer, and is a capture backend like ``capture_x11.ScreenSource`` — our own ``RFBServer``
serves it inside the session's encrypted channel.  So the module keeps every check:

* the local server is asked for nothing before *view*: the session connects when its screen
  starts and disconnects when it stops (view withdrawn, emergency stop, end) — at once;
* the viewer speaks RFB with our server only: its SetEncodings, SetPixelFormat and SetDesktopSize
  stay there; what is asked of the local server is ours (``LOCAL_ENCODINGS``: lossless and cheap on
  loopback, decoded and checked by the same client the supporter uses);
* pointer and key events are made anew (never the viewer's bytes) and reach the local server only
  while *control* is granted (``VncInjector``); keys and buttons the viewer holds are released when
  control goes or the connection ends.

Only loopback addresses are accepted: the RFB stream between the module and the local server is
not encrypted, so it must not leave the machine.  A loopback port belongs to whoever listens on it
first, so before connecting the module checks who owns the listening socket (Linux: the uid in
/proc/net/tcp): this module's user, root, or the user named by ``--screen-owner`` (the desktop's
user, when the host module runs as root); anyone else's listener is refused.  Security types: None and VNC password (from a
file, first line).  Not here: choosing a window (the local server decides what it shows), hiding
the background.  The clipboard is the local server's (``VncClipboard``): what it announces goes
to the viewer with the rights of the screen, like the X clipboard does.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from modules.common.screen.capture_x11 import Capture, DamageTracker
from modules.common.screen.control_gate import ControlGate
from modules.common.screen.rfb_client_twisted import RFBClientProtocol
from modules.common.screen.rfb_server import Cursor, Rect
from protocol.rfb_client import (COPY_RECT, DESKTOP_SIZE, EXTENDED_CLIPBOARD, LAST_RECT, RAW,
                                 RICH_CURSOR, CursorShape, DesktopResized, FramebufferUpdated,
                                 RFBClientError, ScreenLimit, ServerCutText)

__all__ = ["VncAddress", "VncSource", "VncInjector", "VncSourceError", "is_vnc_url",
           "parse_vnc_url", "read_password_file", "vnc_screen_offer", "LOCAL_ENCODINGS"]

log = Logger()

DEFAULT_PORT = 5900
CONNECT_SECONDS = 15.0      # to reach the local server and have its first full frame
CLOSE_SECONDS = 2.0         # a closing connection that has not gone by then is aborted
MAX_PASSWORD_FILE = 4096

# Raw first: on loopback it costs neither side any compression, and its decoding is one array
# copy; CopyRect for moves; the cursor as a shape; size changes; LastRect for servers that use it;
# the clipboard in UTF-8 where the server offers it.
LOCAL_ENCODINGS = (RAW, COPY_RECT, RICH_CURSOR, DESKTOP_SIZE, LAST_RECT, EXTENDED_CLIPBOARD)
MAX_CLIPBOARD_CHARS = 256 * 1024
DAMAGE_HISTORY = 256        # updates remembered for a viewer's damage; older: the whole screen
MAX_DAMAGE_RECTS = 64       # more rects than this go out as their bounding box


class VncSourceError(Exception):
    """The local RFB server cannot be used; the message is one line for people."""

    exit_code = 2   # as a command-line error: a usage problem (address, password file)


def is_vnc_url(text: str | None) -> bool:
    return bool(text) and text.lower().startswith("vnc://")


@dataclass(frozen=True)
class VncAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"vnc://{host}:{self.port}"


def parse_vnc_url(text: str) -> VncAddress:
    """``vnc://127.0.0.1:5900`` (port 5900 if left out; ``localhost`` is 127.0.0.1) → address.
    Anything but a loopback address is refused: the local RFB stream is not encrypted."""
    shown = text if "@" not in text else "vnc://USER:PASSWORD@" + text.rsplit("@", 1)[1]
    if not shown.isprintable() or len(shown) > 200:   # one line, whatever was typed
        shown = repr(shown[:200])
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise VncSourceError(f"--screen {shown}: not a VNC address ({exc}); "
                             "use vnc://127.0.0.1:5900") from None
    if parts.scheme.lower() != "vnc" or not host or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username or parts.password:
        raise VncSourceError(f"--screen {shown}: not a VNC address; use vnc://127.0.0.1:5900 "
                             "(a password goes in --screen-password-file)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise VncSourceError(f"--screen {shown}: the VNC server must run on this machine; give a "
                             "loopback address such as vnc://127.0.0.1:5900 (its stream is not "
                             "encrypted, so it never leaves the machine)")
    return VncAddress(host, DEFAULT_PORT if port is None else port)


def read_password_file(path: str | Path) -> str:
    """The VNC password: the file's first line (RFB's VNC authentication uses 8 characters)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PASSWORD_FILE)
    except OSError as exc:
        raise VncSourceError(f"--screen-password-file {path}: {exc.strerror}") from None
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not line:
        raise VncSourceError(f"--screen-password-file {path}: the first line is empty; "
                             "write the VNC server's password there")
    return line.decode("latin-1")


def _proc_address(hexed: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hexed)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    address = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return address.ipv4_mapped or address


def listener_uids(address: VncAddress) -> set[int] | None:
    """The uids owning TCP sockets that listen for ``address`` (its own address or all
    addresses, that port); None where /proc/net is not there to tell."""
    target = ipaddress.ip_address(address.host)
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] != "0A":          # LISTEN
                continue
            local, _, port = fields[1].rpartition(":")
            if int(port, 16) != address.port:
                continue
            listening = _proc_address(local)
            if listening == target or listening.is_unspecified:
                found.add(int(fields[7]))
    return found if readable else None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def owner_uid(owner: str | int) -> int:
    """``--screen-owner``: a user name or a numeric uid."""
    if isinstance(owner, int) or str(owner).isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise VncSourceError(f"--screen-owner {owner}: no such user on this machine") from None


class _LocalClient(RFBClientProtocol):
    """The RFB client towards the local server; decoding holds the source's lock, so a capture
    (in the blocking pool) never sees a half-written framebuffer."""

    def __init__(self, source: "VncSource", password: str | None,
                 screen_limit: ScreenLimit | None) -> None:
        super().__init__(encodings=LOCAL_ENCODINGS, password=password,
                         on_event=source._event, screen_limit=screen_limit)
        self.source = source
        self.updates_wanted = lambda: not source.paused

    def dataReceived(self, data: bytes) -> None:
        if self.source._protocol is not self:
            return   # disconnected: nothing more is decoded
        with self.source._lock:
            super().dataReceived(data)


class VncSource:
    """A local RFB server as the screen (see the module docstring).  ``connect()`` once view is
    granted (fires when the first full frame is here), ``disconnect()`` when the screen stops;
    ``on_lost(reason)`` is called if the local server goes away or breaks the protocol while
    connected.  ``size``/``capture`` are the capture backend (called from the blocking pool)."""

    display_name = None          # no X display: no X clipboard
    hide_background = False
    detect_scroll = False        # the damage is what the local server said changed

    def __init__(self, address: VncAddress, password: str | None = None, *, reactor: Any = None,
                 connect_seconds: float = CONNECT_SECONDS,
                 screen_limit: ScreenLimit | None = None, owner: str | int | None = None) -> None:
        """``owner``: the user whose VNC server this is, besides this module's user and root."""
        self.address = address
        self.password = password
        self.owners = {os.getuid(), 0} | ({owner_uid(owner)} if owner is not None else set())
        self.connect_seconds = connect_seconds
        self.screen_limit = screen_limit
        self.on_lost: Callable[[str], None] | None = None
        self._reactor = reactor
        self._lock = threading.RLock()
        self._protocol: _LocalClient | None = None
        self._connecting: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []
        self._version = 0
        # (version, rects changed by that update, or None: everything) for each update
        self._history: deque[tuple[int, tuple[Rect, ...] | None]] = deque(maxlen=DAMAGE_HISTORY)
        self._seen: "weakref.WeakKeyDictionary[DamageTracker, int]" = weakref.WeakKeyDictionary()
        self._tracker = DamageTracker(self.detect_scroll)
        self._cursor: Cursor | None = None
        self._paused = False
        self._keys: set[int] = set()
        self._mask = 0
        self._pointer = (0, 0)
        self.connections = 0     # how often the local server was connected (for tests and logs)
        self.clipboard = VncClipboard(self)

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def describe(self) -> str:
        return str(self.address)

    # ------------------------------------------------------------------------- connection
    @property
    def connected(self) -> bool:
        p = self._protocol
        return p is not None and p.first_frame.called and self._connecting is None

    def connect(self) -> defer.Deferred:
        """Connect to the local server; fires (None) once its first full frame is decoded,
        fails with ``VncSourceError`` (one line) otherwise, or with ``CancelledError`` if
        ``disconnect()`` came first."""
        if self.connected:
            return defer.succeed(None)
        if self._connecting is None:
            refusal = self._foreign_listener()
            if refusal:
                return defer.fail(VncSourceError(refusal))
        waiter: defer.Deferred = defer.Deferred()
        self._waiters.append(waiter)
        if self._connecting is not None:
            return waiter
        from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
        endpoint_type = TCP6ClientEndpoint if ":" in self.address.host else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, self.address.host, self.address.port,
                                 timeout=int(self.connect_seconds))
        protocol = _LocalClient(self, self.password, self.screen_limit)
        self._protocol = protocol
        self._cursor = None
        self._changed(None)
        d = connectProtocol(endpoint, protocol)
        d.addCallback(lambda _: protocol.first_frame)
        d.addTimeout(self.connect_seconds, self.reactor)
        self._connecting = d

        def connected(_):
            self._connecting = None
            if self._protocol is not protocol:
                raise defer.CancelledError("disconnected while connecting")
            self.connections += 1
            protocol.ended.addCallback(lambda error: self._ended(protocol, error))
            log.info("screen: connected to the local VNC server {address} "
                     "({w}x{h}, {name!r})", address=str(self.address),
                     w=protocol.client.width, h=protocol.client.height,
                     name=protocol.client.name)
            return None

        def failed(failure):
            self._connecting = None
            if self._protocol is not protocol:   # disconnect() while connecting: not an error
                raise defer.CancelledError("disconnected while connecting")
            self._protocol = None
            if protocol.transport is not None:
                protocol.transport.abortConnection()
            raise VncSourceError(self._reason(failure.value, protocol))

        def settle(result):
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                (w.errback if isinstance(result, Failure) else w.callback)(result)
            return None
        d.addCallbacks(connected, failed)
        d.addBoth(settle)
        return waiter

    def _foreign_listener(self) -> str | None:
        """Why the socket listening on our address is not trusted, or None."""
        uids = listener_uids(self.address)
        foreign = sorted((uids or set()) - self.owners)
        if not foreign:
            return None
        names = ", ".join(f"{user_name(uid)} (uid {uid})" for uid in foreign)
        trusted = " and ".join(sorted(user_name(uid) for uid in self.owners))
        return (f"the local VNC server {self.address} is run by {names}, not by {trusted}: "
                f"if it is the desktop's VNC server, add --screen-owner "
                f"{user_name(foreign[0])}; nothing was sent to it")

    def _reason(self, exc: BaseException, protocol: _LocalClient) -> str:
        where = f"the local VNC server {self.address}"
        if isinstance(exc, VncSourceError):
            return str(exc)
        if isinstance(exc, RFBClientError) or protocol.error:
            why = protocol.error or getattr(exc, "reason", str(exc))
            if why.startswith("security handshake failed"):
                return (f"{where} refused the password ({why}); check --screen-password-file")
            if why.startswith("no supported security type"):
                return (f"{where} asks for a security type this module does not speak ({why}); "
                        "configure it for no authentication or a VNC password")
            return f"{where} broke the RFB protocol: {why}"
        from twisted.internet import error
        if isinstance(exc, error.ConnectionRefusedError):
            return f"{where} is not running (connection refused); start it, or fix --screen"
        if isinstance(exc, (defer.TimeoutError, error.TimeoutError)):
            return (f"{where} sent no complete screen within {self.connect_seconds:g} s")
        return f"{where} cannot be used: {exc}"

    def _ended(self, protocol: _LocalClient, error: str | None) -> None:
        if self._protocol is not protocol:
            return   # our own disconnect
        self._protocol = None
        reason = (f"the local VNC server {self.address} broke the RFB protocol: {error}" if error
                  else f"the local VNC server {self.address} closed the connection")
        log.warn("screen: {reason}", reason=reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def disconnect(self) -> None:
        """Release what the viewer holds, then close the connection: nothing more is decoded
        or forwarded from this moment on (emergency stop, view withdrawn, session over)."""
        protocol, self._protocol = self._protocol, None
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        if protocol is None or protocol.transport is None:
            return
        transport = protocol.transport
        if protocol.client.initialised:
            transport.write(self._release_bytes(protocol))
        transport.loseConnection()
        timer = self.reactor.callLater(CLOSE_SECONDS, transport.abortConnection)
        protocol.ended.addBoth(lambda _: timer.active() and timer.cancel())
        log.info("screen: disconnected from the local VNC server {address}",
                 address=str(self.address))

    def close(self) -> None:
        self.disconnect()

    # ------------------------------------------------------------------------- input (reactor)
    def send_key(self, down: bool, keysym: int) -> None:
        protocol = self._protocol
        if protocol is None or not self.connected:
            return
        (self._keys.add if down else self._keys.discard)(keysym)
        protocol.key(down, keysym)

    def send_pointer(self, mask: int, x: int, y: int) -> None:
        protocol = self._protocol
        if protocol is None or not self.connected:
            return
        w, h = protocol.client.width, protocol.client.height
        x, y = min(max(x, 0), max(w - 1, 0)), min(max(y, 0), max(h - 1, 0))
        self._mask, self._pointer = mask & 0xFF, (x, y)
        protocol.pointer(mask & 0xFF, x, y)

    def send_cut_text(self, text: str) -> None:
        protocol = self._protocol
        if protocol is not None and self.connected:
            self.clipboard.text = text    # the server may echo it: not news for the viewer
            protocol.cut_text(text)

    def release_input(self) -> None:
        """Key-ups for every held key, buttons up: nothing stays pressed on the local server."""
        protocol = self._protocol
        if protocol is not None and protocol.client.initialised:
            protocol._send(self._release_bytes(protocol))

    def _release_bytes(self, protocol: _LocalClient) -> bytes:
        out = b"".join(protocol.client.key(False, k) for k in sorted(self._keys))
        if self._mask:
            out += protocol.client.pointer(0, *self._pointer)
        self._keys.clear()
        self._mask = 0
        return out

    # ------------------------------------------------------------------------- frames
    @property
    def paused(self) -> bool:
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        """While paused the local server is asked for no updates (nothing is captured)."""
        self._paused = bool(value)
        protocol = self._protocol
        if not value and protocol is not None:
            self.reactor.callFromThread(protocol.resume_updates)

    def _event(self, event: Any) -> None:
        """Reactor thread, under the lock (inside ``dataReceived``)."""
        if isinstance(event, FramebufferUpdated):
            self._changed(tuple(Rect(r.x, r.y, r.width, r.height) for r in event.rects
                                if r.encoding >= 0 and r.width and r.height))
        elif isinstance(event, DesktopResized):
            self._changed(None)
        elif isinstance(event, ServerCutText):
            self.clipboard.text = event.text[:MAX_CLIPBOARD_CHARS]
        elif isinstance(event, CursorShape):
            if event.width and event.height:
                rgba = np.frombuffer(event.rgba, np.uint8).reshape(event.height, event.width, 4)
            else:
                rgba = np.zeros((1, 1, 4), np.uint8)   # an empty cursor: nothing to draw
            self._cursor = Cursor(event.hotspot_x, event.hotspot_y, rgba.copy())

    def _changed(self, rects: tuple[Rect, ...] | None) -> None:
        self._version += 1
        self._history.append((self._version, rects))

    def _damage_since(self, seen: int | None) -> list[Rect] | None:
        """What changed after version ``seen`` (None: everything, or too long ago)."""
        if seen is None or not self._history or self._history[0][0] > seen + 1:
            return None
        damage: list[Rect] = []
        for version, rects in self._history:
            if version <= seen:
                continue
            if rects is None:
                return None
            damage.extend(rects)
        if len(damage) > MAX_DAMAGE_RECTS:
            x0, y0 = min(r.x for r in damage), min(r.y for r in damage)
            x1 = max(r.x + r.w for r in damage)
            y1 = max(r.y + r.h for r in damage)
            damage = [Rect(x0, y0, x1 - x0, y1 - y0)]
        return damage

    def size(self) -> tuple[int, int]:
        with self._lock:
            protocol = self._protocol
            if protocol is None or not protocol.client.initialised:
                raise VncSourceError(f"the local VNC server {self.address} is not connected")
            return protocol.client.width, protocol.client.height

    def capture(self, tracker: DamageTracker | None = None) -> Capture:
        """The current framebuffer (a copy, BGRX as the client keeps it and as X11 delivers
        it) and what changed since ``tracker`` saw it:
        the rects the local server updated meanwhile (no comparison of frames, which for
        1920x1080 RGB costs about 20 times the copy)."""
        tracker = tracker or self._tracker
        with self._lock:
            protocol = self._protocol
            if protocol is None or not protocol.client.initialised:
                if tracker.prev is not None:   # disconnected meanwhile: the last frame, still
                    return Capture(tracker.prev, [], [], None)
                raise VncSourceError(f"the local VNC server {self.address} is not connected")
            fb = protocol.client.pixels
            version, cursor = self._version, self._cursor
            prev = tracker.prev
            if prev is not None and prev.shape == fb.shape and \
                    (self._seen.get(tracker) == version or self._paused):
                return Capture(prev, [], [], cursor)
            frame = fb.copy()
            same_size = prev is not None and prev.shape == fb.shape
            damage = self._damage_since(self._seen.get(tracker)) if same_size else None
        self._seen[tracker] = version
        tracker.prev = frame
        h, w = frame.shape[:2]
        return Capture(frame, [Rect(0, 0, w, h)] if damage is None else damage, [], cursor)


class VncClipboard:
    """The local server's clipboard with the X clipboard's interface (``get``/``set``, called
    from the blocking pool): ``get`` is the last text the server announced (ServerCutText),
    ``set`` sends ours (ClientCutText; the session calls it only while control is granted)."""

    def __init__(self, source: VncSource) -> None:
        self.source = source
        self.text = ""

    def get(self) -> str:
        return self.text

    def set(self, text: str) -> None:
        self.source.reactor.callFromThread(self.source.send_cut_text,
                                           text[:MAX_CLIPBOARD_CHARS])


class VncInjector(ControlGate):
    """Pointer and key events for the local server, only while control is granted.  Called from
    the blocking pool (``allowed`` may wait for the reactor); the events are sent from the
    reactor thread, in order.  A refused event releases whatever the viewer still holds."""

    def __init__(self, source: VncSource, allowed: Callable[[], bool]) -> None:
        super().__init__(allowed)
        self.source = source

    def pointer(self, mask: int, x: int, y: int) -> bool:
        if not self._check("pointer event"):
            return False
        self.source.reactor.callFromThread(self.source.send_pointer, mask, x, y)
        return True

    def key(self, down: bool, keysym: int) -> bool:
        if not self._check("key event"):
            return False
        self.source.reactor.callFromThread(self.source.send_key, down, keysym)
        return True

    def release_all(self) -> None:
        self.source.reactor.callFromThread(self.source.release_input)


def vnc_screen_offer(url: str, password_file: str | None = None, *, window: Any = None,
                     hide_background: bool = False, owner: str | None = None,
                     reactor: Any = None):
    """(source, injector factory) for ``--screen vnc://...``; ``VncSourceError`` (one line) for
    an address off this machine, an unreadable password file or options a VNC source lacks."""
    address = parse_vnc_url(url)
    if window:
        raise VncSourceError(f"--window does not apply to --screen {url}: the VNC server "
                             "decides what it shows")
    if hide_background:
        raise VncSourceError(f"--hide-background does not apply to --screen {url}: the VNC "
                             "server's picture is shared as it is")
    password = read_password_file(password_file) if password_file else None
    source = VncSource(address, password, reactor=reactor, owner=owner)
    return source, lambda allowed: VncInjector(source, allowed)
