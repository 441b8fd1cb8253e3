"""RFB 3.8 client (RFC 6143) as a sans-I/O object.

``RFBClient`` never touches a socket.  The caller feeds it the server's bytes with
``receive(data)`` and gets typed events back; whatever the handshake needs to answer is collected
in ``data_to_send()``; messages the caller wants to send (``request_update``, ``key``, ``pointer``,
``cut_text``, ``set_encodings``) are returned as bytes.

The picture is ``pixels``, ``H x W x 4`` ``uint8`` in the order B G R 255 — 32-bit words
0xFFRRGGBB (``words``, ``H x W`` ``uint32``), the layout ``QImage.Format_RGB32`` paints without a
conversion and the decoders write with 4-byte copies; ``framebuffer`` is an ``H x W x 3`` RGB
view of the same memory for whoever reads pixels.  The client always asks the server for 32 bpp
little-endian true colour (red shift 16, green 8, blue 0), so a pixel on the wire is ``B G R X``,
a ZRLE CPIXEL is ``B G R`` and a Tight TPIXEL is ``R G B``.

Decoded encodings: Raw, CopyRect, ZRLE (all subencodings), Tight (basic compression with four
zlib streams, copy / palette / gradient filters, fill, JPEG via Pillow), Open H.264 (PyAV,
``rfb_h264``: announced where PyAV is installed); pseudo-encodings
DesktopSize, LastRect, RichCursor and Extended Clipboard (UTF-8 clipboard text both ways with a
server that offers it, ``rfb_ext_clipboard``; Latin-1 otherwise).  Security types None and VNC
authentication.

Everything the server declares is checked before it is buffered or written: the desktop size
against the supporter's ``ScreenLimit`` before the framebuffer is allocated (ServerInit and
DesktopSize), a rect must lie inside the framebuffer, lengths are bounded, zlib output is bounded
by what the rect can hold.  The decoders whose work is not proportional to the bytes received
(Tight gradient, ZRLE run-length tiles) are array operations in ``rfb_decode``, never a Python
step per pixel.  Any violation raises ``RFBClientError`` with a reason; after that the client
stays failed.
"""

from __future__ import annotations

import importlib.util
import io
import re
import struct
from collections import Counter
import zlib
from dataclasses import dataclass
from typing import Callable, Generator, Iterable

import numpy as np

from . import rfb_ext_clipboard as ext_clipboard
from . import rfb_h264
from .rfb_decode import (OPAQUE, ZRLE_TILE, DecodeError, gradient, rgb_array_into, rgb_into,
                         tight_palette, word_of, zrle_tile_words)
from .rfb_ext_clipboard import EXTENDED_CLIPBOARD, ExtClipboardError

# --- encodings -------------------------------------------------------------------------------
RAW = 0
COPY_RECT = 1
TIGHT = 7
ZRLE = 16
H264 = rfb_h264.H264
DESKTOP_SIZE = -223
LAST_RECT = -224
RICH_CURSOR = -239


def compress_level(level: int) -> int:
    """Tight pseudo-encoding for zlib compression level 0..9."""
    if not 0 <= level <= 9:
        raise ValueError("compression level is 0..9")
    return -256 + level


def quality_level(level: int) -> int:
    """Tight pseudo-encoding for JPEG quality level 0..9 (without it Tight never uses JPEG)."""
    if not 0 <= level <= 9:
        raise ValueError("quality level is 0..9")
    return -32 + level


# H.264 (Open H.264, decoded with PyAV) only where PyAV is installed; a server sends it for
# video-like changes only, Tight stays its encoding for the rest
DEFAULT_ENCODINGS = ((TIGHT,) + ((H264,) if importlib.util.find_spec("av") else ())
                     + (ZRLE, COPY_RECT, RAW, RICH_CURSOR, DESKTOP_SIZE, LAST_RECT,
                        EXTENDED_CLIPBOARD, compress_level(6), quality_level(8)))

# --- security --------------------------------------------------------------------------------
SEC_NONE = 1
SEC_VNC_AUTH = 2

# --- bounds ----------------------------------------------------------------------------------
MAX_DIMENSION = 16384          # the largest --max-screen side one may configure
MAX_NAME = 4096                # desktop name, failure reasons
MAX_CUT_TEXT = 1 << 20         # server clipboard text
MAX_CURSOR = 256               # cursor width/height
MAX_JPEG = 1 << 22             # Tight compact length maximum is 4 MiB anyway

# 32 bpp, depth 24, little-endian, true colour, 255/255/255, shifts 16/8/0
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class RFBClientError(Exception):
    """The server sent something this client does not accept; ``reason`` says what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ScreenLimit:
    """The largest remote screen the supporter accepts: ``width x height`` pixels, in either
    orientation (a portrait 4320x7680 fits 7680x4320).  Checked before the framebuffer
    (4 bytes per pixel) is allocated; the default is 8K UHD, the largest screen in real use."""

    width: int = 7680
    height: int = 4320

    def __post_init__(self) -> None:
        if not (0 < self.width <= MAX_DIMENSION and 0 < self.height <= MAX_DIMENSION):
            raise ValueError(f"a screen limit is 1x1 to {MAX_DIMENSION}x{MAX_DIMENSION}, "
                             f"not {self.width}x{self.height}")

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @classmethod
    def parse(cls, text: str) -> "ScreenLimit":
        """``7680x4320`` → ScreenLimit; ``ValueError`` with a reason otherwise."""
        match = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", text)
        if not match:
            raise ValueError(f"{text!r} is not a screen size such as 7680x4320")
        return cls(int(match[1]), int(match[2]))

    def refusal(self, what: str, w: int, h: int) -> str | None:
        """Why a desktop of ``w x h`` is not accepted, or None."""
        if w <= 0 or h <= 0:
            return f"{what} {w}x{h} is not acceptable: it is empty"
        if max(w, h) > max(self.width, self.height) or w * h > self.pixels:
            return (f"{what} {w}x{h} ({w * h:,} pixels) is larger than this supporter accepts: "
                    f"at most {self.width}x{self.height} ({self.pixels:,} pixels, either "
                    f"orientation); a larger screen needs --max-screen WxH")
        return None


# --- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int
    encoding: int


@dataclass(frozen=True)
class ServerInit:
    width: int
    height: int
    name: str


@dataclass(frozen=True)
class FramebufferUpdated:
    """One complete FramebufferUpdate message has been applied to the framebuffer."""
    rects: tuple[Rect, ...]


@dataclass(frozen=True)
class DesktopResized:
    width: int
    height: int


@dataclass(frozen=True)
class Bell:
    pass


@dataclass(frozen=True)
class ServerCutText:
    text: str


@dataclass(frozen=True)
class CursorShape:
    """``rgba`` is ``height * width * 4`` bytes, alpha 255 where the cursor's mask is set."""
    hotspot_x: int
    hotspot_y: int
    width: int
    height: int
    rgba: bytes


Event = ServerInit | FramebufferUpdated | DesktopResized | Bell | ServerCutText | CursorShape

_Reader = Generator[int, bytes, None]


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """DES-encrypt the 16-byte challenge with the password (first 8 bytes, bits mirrored)."""
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
    from cryptography.hazmat.primitives.ciphers import Cipher, modes
    raw = password.encode("latin-1", "replace")[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in raw)
    enc = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return enc.update(challenge) + enc.finalize()


class RFBClient:
    def __init__(self, encodings: Iterable[int] = DEFAULT_ENCODINGS, password: str | None = None,
                 shared: bool = True, screen_limit: ScreenLimit | None = None) -> None:
        self.encodings = tuple(encodings)
        self.password = password
        self.shared = shared
        self.screen_limit = screen_limit or ScreenLimit()
        self.width = 0
        self.height = 0
        self.name = ""
        self.pixels = np.zeros((0, 0, 4), np.uint8)
        self.words = np.zeros((0, 0), np.uint32)
        self.version: tuple[int, int] | None = None
        self.initialised = False
        self.failure: str | None = None
        # rects decoded so far by kind: "raw", "copyrect", "zrle", "tight-fill", "tight-jpeg",
        # "tight-copy", "tight-palette", "tight-gradient", "cursor", "desktop-size"
        self.decoded: Counter[str] = Counter()
        self._out = bytearray()
        self._buf = bytearray()
        self._events: list[Event] = []
        self._zrle = zlib.decompressobj()
        self._tight = [TightInflater() for _ in range(4)]
        self._h264: rfb_h264.H264Contexts | None = None     # created with the first H.264 rect
        self.clipboard = ext_clipboard.ClipboardPeer(ext_clipboard.CLIENT)
        # called with the rects right after a FramebufferUpdate is complete (its event is the
        # last of ``take_events()``), before any later byte is decoded: a decoder thread
        # publishes a consistent picture from here
        self.update_applied: Callable[[tuple[Rect, ...]], None] | None = None
        # called after every pixel of a rect was written (x, y, w, h), and before pixels are
        # read that this update may not have written (CopyRect's source): a decoder thread that
        # swaps buffers knows from these what its back buffer still lacks
        self.rect_written: Callable[[int, int, int, int], None] | None = None
        self.pixels_read: Callable[[], None] | None = None
        # called when a FramebufferUpdate's header has arrived, before its rects are decoded: a
        # viewer asks for the next update here, so the server prepares it while this one decodes
        self.update_started: Callable[[], None] | None = None
        self._gen = self._run()
        self._need = next(self._gen)

    # --- feeding -----------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        if self.failure is not None:
            raise RFBClientError(f"client already failed: {self.failure}")
        self._buf += data
        pos = 0
        view = memoryview(self._buf)
        try:
            while len(self._buf) - pos >= self._need:
                chunk = bytes(view[pos:pos + self._need])
                pos += self._need
                self._need = self._gen.send(chunk)
        except RFBClientError as exc:
            self.failure = exc.reason
            view.release()
            self._buf.clear()
            raise
        except StopIteration:               # the reader never returns; defensive
            self.failure = "protocol reader ended"
            raise RFBClientError(self.failure) from None
        finally:
            view.release()
        del self._buf[:pos]
        events, self._events = self._events, []
        return events

    def take_events(self) -> list[Event]:
        """The events so far of the ``receive`` call under way (``update_applied`` hands an
        update on before the rest of the bytes are decoded); ``receive`` returns the others."""
        events, self._events = self._events, []
        return events

    def use_pixels(self, pixels: np.ndarray) -> None:
        """Decode from now on into ``pixels`` (C-contiguous, the shape of ``self.pixels``),
        which must hold the same picture: a decoder thread swaps its front and back buffers."""
        if pixels.shape != self.pixels.shape or not pixels.flags.c_contiguous:
            raise ValueError("use_pixels needs a contiguous picture of the same size")
        self.pixels = pixels
        self.words = pixels.view(np.uint32).reshape(self.height, self.width)

    def data_to_send(self) -> bytes:
        """Handshake answers and the initial SetPixelFormat/SetEncodings, once queued."""
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # --- client messages ---------------------------------------------------------------------
    def set_pixel_format(self) -> bytes:
        return b"\x00\x00\x00\x00" + PIXEL_FORMAT

    def set_encodings(self, encodings: Iterable[int] | None = None) -> bytes:
        if encodings is not None:
            self.encodings = tuple(encodings)
        return struct.pack(f">BxH{len(self.encodings)}i", 2, len(self.encodings), *self.encodings)

    def request_update(self, incremental: bool, x: int = 0, y: int = 0,
                       w: int | None = None, h: int | None = None) -> bytes:
        w = self.width - x if w is None else w
        h = self.height - y if h is None else h
        return struct.pack(">BBHHHH", 3, 1 if incremental else 0, x, y, w, h)

    def key(self, down: bool, keysym: int) -> bytes:
        return struct.pack(">BBxxI", 4, 1 if down else 0, keysym)

    def pointer(self, mask: int, x: int, y: int) -> bytes:
        return struct.pack(">BBHH", 5, mask, max(0, x), max(0, y))

    def cut_text(self, text: str) -> bytes:
        """Our clipboard text for the server: UTF-8 if it offered the extended clipboard."""
        extended = self.clipboard.send_text(text)
        if extended is not None:
            return extended
        data = text.encode("latin-1", "replace")
        return struct.pack(">BxxxI", 6, len(data)) + data

    # --- the reader --------------------------------------------------------------------------
    def _run(self) -> _Reader:
        yield from self._handshake()
        while True:
            (kind,) = yield 1
            if kind == 0:
                yield from self._framebuffer_update()
            elif kind == 1:
                _pad, _first, count = struct.unpack(">BHH", (yield 5))
                if count:
                    yield count * 6          # colour map entries: we use true colour
            elif kind == 2:
                self._events.append(Bell())
            elif kind == 3:
                (length,) = struct.unpack(">3xi", (yield 7))
                if length < 0:
                    yield from self._extended_cut_text(-length)
                    continue
                if length > MAX_CUT_TEXT:
                    raise RFBClientError(f"server cut text of {length} bytes is too long")
                text = (yield length) if length else b""
                self._events.append(ServerCutText(text.decode("latin-1")))
            else:
                raise RFBClientError(f"unknown server message type {kind}")

    def _extended_cut_text(self, length: int) -> _Reader:
        """ServerCutText with a negative length: an Extended Clipboard message."""
        if EXTENDED_CLIPBOARD not in self.encodings:
            raise RFBClientError("extended clipboard message, which this client did not ask for")
        if length > ext_clipboard.MAX_MESSAGE_BYTES:
            raise RFBClientError(f"extended clipboard message of {length} bytes is too long")
        payload = yield length
        try:
            reply, text = self.clipboard.handle(ext_clipboard.parse(payload))
        except ExtClipboardError as exc:
            raise RFBClientError(f"extended clipboard: {exc}") from None
        self._out += reply
        if text is not None:
            self._events.append(ServerCutText(text))

    def _reason(self) -> _Reader:
        (length,) = struct.unpack(">I", (yield 4))
        if length > MAX_NAME:
            raise RFBClientError(f"failure reason of {length} bytes is too long")
        return ((yield length) if length else b"").decode("utf-8", "replace")

    def _handshake(self) -> _Reader:
        banner = yield 12
        if banner[:4] != b"RFB " or banner[7:8] != b"." or banner[11:] != b"\n" \
                or not banner[4:7].isdigit() or not banner[8:11].isdigit():
            raise RFBClientError(f"not an RFB server: {banner!r}")
        major, minor = int(banner[4:7]), int(banner[8:11])
        if major != 3 or minor < 3:
            raise RFBClientError(f"unsupported RFB version {major}.{minor}")
        minor = 8 if minor >= 8 else 7 if minor >= 7 else 3
        self.version = (3, minor)
        self._out += b"RFB 003.%03d\n" % minor
        if minor == 3:
            (sec,) = struct.unpack(">I", (yield 4))
            if sec == 0:
                raise RFBClientError("server refused: " + (yield from self._reason()))
            if sec not in (SEC_NONE, SEC_VNC_AUTH) or (sec == SEC_VNC_AUTH and not self.password):
                raise RFBClientError(f"server demands security type {sec}")
        else:
            (count,) = yield 1
            if count == 0:
                raise RFBClientError("server refused: " + (yield from self._reason()))
            offered = yield count
            if SEC_NONE in offered:
                sec = SEC_NONE
            elif SEC_VNC_AUTH in offered and self.password:
                sec = SEC_VNC_AUTH
            else:
                raise RFBClientError(f"no supported security type among {list(offered)}")
            self._out.append(sec)
        if sec == SEC_VNC_AUTH:
            assert self.password is not None
            challenge = yield 16              # read before touching self._out (see data_to_send)
            self._out += vnc_auth_response(self.password, challenge)
        if sec == SEC_VNC_AUTH or minor == 8:
            (result,) = struct.unpack(">I", (yield 4))
            if result != 0:
                reason = (yield from self._reason()) if minor == 8 else "authentication failed"
                raise RFBClientError("security handshake failed: " + reason)
        self._out.append(1 if self.shared else 0)
        w, h, bpp, _depth, _be, true_colour, *_ = struct.unpack(">HHBBBBHHHBBB3x", (yield 20))
        refusal = self.screen_limit.refusal("server desktop size", w, h)
        if refusal:
            raise RFBClientError(refusal)
        (name_len,) = struct.unpack(">I", (yield 4))
        if name_len > MAX_NAME:
            raise RFBClientError(f"desktop name of {name_len} bytes is too long")
        name = ((yield name_len) if name_len else b"").decode("utf-8", "replace")
        self._resize(w, h)
        self.name = name
        self.initialised = True
        self._out += self.set_pixel_format() + self.set_encodings()
        self._events.append(ServerInit(w, h, name))

    @property
    def framebuffer(self) -> np.ndarray:
        """The picture as ``H x W x 3`` RGB: a view of ``pixels`` (writable, not contiguous)."""
        return self.pixels[..., 2::-1]

    def _resize(self, w: int, h: int) -> None:
        self.width, self.height = w, h
        self.words = np.full((h, w), OPAQUE, np.uint32)   # black
        self.pixels = self.words.view(np.uint8).reshape(h, w, 4)

    def _framebuffer_update(self) -> _Reader:
        (count,) = struct.unpack(">xH", (yield 3))
        if self.update_started is not None:
            self.update_started()
        rects: list[Rect] = []
        i = 0
        while i < count:
            i += 1
            x, y, w, h, enc = struct.unpack(">HHHHi", (yield 12))
            rect = Rect(x, y, w, h, enc)
            if enc == LAST_RECT:
                break
            if enc == DESKTOP_SIZE:
                refusal = self.screen_limit.refusal("desktop size", w, h)
                if refusal:
                    raise RFBClientError(refusal)
                self._resize(w, h)
                self.decoded["desktop-size"] += 1
                rects.append(rect)
                self._events.append(DesktopResized(w, h))
                continue
            if enc == RICH_CURSOR:
                yield from self._rich_cursor(x, y, w, h)
                self.decoded["cursor"] += 1
                rects.append(rect)
                continue
            if x + w > self.width or y + h > self.height:
                raise RFBClientError(f"rect {x},{y} {w}x{h} is outside the "
                                     f"{self.width}x{self.height} framebuffer")
            if enc == RAW:
                if w and h:
                    data = yield w * h * 4
                    np.bitwise_or(np.frombuffer(data, "<u4").reshape(h, w), OPAQUE,
                                  out=self.words[y:y + h, x:x + w])
                self.decoded["raw"] += 1
            elif enc == COPY_RECT:
                sx, sy = struct.unpack(">HH", (yield 4))
                if sx + w > self.width or sy + h > self.height:
                    raise RFBClientError(f"CopyRect source {sx},{sy} {w}x{h} is outside the "
                                         f"{self.width}x{self.height} framebuffer")
                if self.pixels_read is not None:
                    self.pixels_read()
                self.words[y:y + h, x:x + w] = self.words[sy:sy + h, sx:sx + w].copy()
                self.decoded["copyrect"] += 1
            elif enc == ZRLE:
                yield from self._zrle_rect(x, y, w, h)
                self.decoded["zrle"] += 1
            elif enc == TIGHT:
                yield from self._tight_rect(x, y, w, h)
            elif enc == H264 and H264 in self.encodings:
                yield from self._h264_rect(x, y, w, h)
            else:
                raise RFBClientError(f"rect with encoding {enc} that was not asked for")
            if enc != H264 and self.rect_written is not None:
                self.rect_written(x, y, w, h)
            rects.append(rect)
        done = tuple(rects)
        self._events.append(FramebufferUpdated(done))
        if self.update_applied is not None:
            self.update_applied(done)

    def _rich_cursor(self, hx: int, hy: int, w: int, h: int) -> _Reader:
        if w > MAX_CURSOR or h > MAX_CURSOR:
            raise RFBClientError(f"cursor of {w}x{h} is too large")
        if w == 0 or h == 0:
            self._events.append(CursorShape(hx, hy, w, h, b""))
            return
        pixels = np.frombuffer((yield w * h * 4), np.uint8).reshape(h, w, 4)
        row = (w + 7) // 8
        mask = np.frombuffer((yield row * h), np.uint8).reshape(h, row)
        bits = np.unpackbits(mask, axis=1)[:, :w]
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[..., :3] = pixels[..., 2::-1]
        rgba[..., 3] = bits * 255
        self._events.append(CursorShape(hx, hy, w, h, rgba.tobytes()))

    # --- ZRLE --------------------------------------------------------------------------------
    def _zrle_rect(self, x: int, y: int, w: int, h: int) -> _Reader:
        (length,) = struct.unpack(">I", (yield 4))
        # worst case per tile: subencoding + 127-colour palette + (cpixel + 1 run byte) per pixel;
        # run bytes beyond that cannot describe pixels that exist.
        tiles = -(-w // ZRLE_TILE) * -(-h // ZRLE_TILE)
        limit = tiles * (1 + 127 * 3) + w * h * 4
        if length > limit + 1024 + (limit >> 3):
            raise RFBClientError(f"ZRLE rect {x},{y} {w}x{h} declares {length} bytes")
        data = (yield length) if length else b""
        try:
            raw = self._zrle.decompress(data, limit + 1)
        except zlib.error as exc:
            raise RFBClientError(f"ZRLE zlib stream is corrupt: {exc}") from None
        if len(raw) > limit or self._zrle.unconsumed_tail:
            raise RFBClientError(f"ZRLE rect {x},{y} {w}x{h} decompresses to too much data")
        pos = 0
        array = np.frombuffer(raw, np.uint8)
        try:
            for ty in range(y, y + h, ZRLE_TILE):
                th = min(ZRLE_TILE, y + h - ty)
                for tx in range(x, x + w, ZRLE_TILE):
                    tw = min(ZRLE_TILE, x + w - tx)
                    tile, pos = zrle_tile_words(raw, array, pos, tw, th)
                    self.words[ty:ty + th, tx:tx + tw] = tile
        except DecodeError as exc:
            raise RFBClientError(str(exc)) from None
        if pos != len(raw):
            raise RFBClientError(f"ZRLE rect {x},{y} {w}x{h} has {len(raw) - pos} bytes too many")

    # --- Open H.264 ---------------------------------------------------------------------------
    def _h264_rect(self, x: int, y: int, w: int, h: int) -> _Reader:
        try:
            length, flags = rfb_h264.parse_header((yield 8), w, h)
        except rfb_h264.H264Error as exc:
            raise RFBClientError(str(exc)) from None
        data = (yield length) if length else b""
        if self._h264 is None:
            self._h264 = rfb_h264.H264Contexts(
                lambda fw, fh: self.screen_limit.refusal("H.264 picture", fw, fh),
                framebuffer=lambda: (self.width, self.height))
        try:
            pixels = self._h264.decode(x, y, w, h, flags, data)
        except rfb_h264.H264Error as exc:
            raise RFBClientError(str(exc)) from None
        if pixels is not None:     # RGB (libswscale's "bgra" is the faster but coarser path)
            rgb_array_into(self.words[y:y + h, x:x + w], pixels)
            if self.rect_written is not None:
                self.rect_written(x, y, w, h)
        self.decoded["h264"] += 1

    # --- Tight -------------------------------------------------------------------------------
    def _compact_length(self) -> _Reader:
        (b,) = yield 1
        length = b & 0x7F
        if b & 0x80:
            (b,) = yield 1
            length |= (b & 0x7F) << 7
            if b & 0x80:
                (b,) = yield 1
                length |= b << 14
        return length

    def _tight_rect(self, x: int, y: int, w: int, h: int) -> _Reader:
        (control,) = yield 1
        for i in range(4):
            if control & (1 << i):
                self._tight[i] = TightInflater()
        kind = control >> 4
        if kind == 0x8:                                      # fill
            r, g, b = yield 3
            self.words[y:y + h, x:x + w] = word_of(r, g, b)
            self.decoded["tight-fill"] += 1
            return
        if kind == 0x9:                                      # JPEG
            length = yield from self._compact_length()
            if length > MAX_JPEG:
                raise RFBClientError(f"Tight JPEG of {length} bytes is too long")
            data = (yield length) if length else b""
            rgb_array_into(self.words[y:y + h, x:x + w], _decode_jpeg(data, w, h))
            self.decoded["tight-jpeg"] += 1
            return
        if kind > 0x9:
            raise RFBClientError(f"Tight compression control {control:#04x} is not supported")
        stream = kind & 0x3
        filter_id = (yield 1)[0] if kind & 0x4 else 0
        palette = None
        if filter_id == 0 or filter_id == 2:
            size = w * h * 3
        elif filter_id == 1:
            (n,) = yield 1
            n += 1
            palette = np.frombuffer((yield n * 3), np.uint8).reshape(n, 3)
            size = ((w + 7) // 8) * h if n == 2 else w * h
        else:
            raise RFBClientError(f"unknown Tight filter {filter_id}")
        if size < 12:
            data = (yield size) if size else b""
        else:
            length = yield from self._compact_length()
            if length > size + (size >> 3) + 1024:
                raise RFBClientError(f"Tight rect {x},{y} {w}x{h} declares {length} bytes")
            comp = (yield length) if length else b""
            dec = self._tight[stream]
            try:
                data = dec.decompress(comp, size + 1)
            except zlib.error as exc:
                raise RFBClientError(f"Tight zlib stream {stream} is corrupt: {exc}") from None
            if len(data) != size or dec.unconsumed_tail:
                raise RFBClientError(f"Tight rect {x},{y} {w}x{h} decompresses to {len(data)} "
                                     f"bytes, expected {size}")
        self.decoded[("tight-copy", "tight-palette", "tight-gradient")[filter_id]] += 1
        if w == 0 or h == 0:
            return
        target = self.words[y:y + h, x:x + w]
        if filter_id == 0:
            rgb_into(target, data)
        elif filter_id == 2:
            rgb_array_into(target, gradient(np.frombuffer(data, np.uint8).reshape(h, w, 3)))
        else:
            assert palette is not None
            try:
                words = tight_palette(palette, data, w, h, out=target)
            except DecodeError as exc:
                raise RFBClientError(str(exc)) from None
            if words is not target:             # not decoded in place (not a full-width rect)
                target[...] = words


class TightInflater:
    """One of Tight's four zlib streams, inflated as raw deflate after its 2-byte zlib header
    is checked.  A Tight stream never ends (each rect is a sync flush), so the Adler-32 sum
    zlib keeps of everything inflated is never compared with anything; raw inflating skips it
    (~30 % of the inflate time of text-like full-screen frames).  Same interface as the part
    of ``zlib.Decompress`` used here; a bad header raises ``zlib.error``."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._header: bytes | None = b""

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if self._header is not None:
            need = 2 - len(self._header)
            self._header += data[:need]
            data = data[need:]
            if len(self._header) < 2:
                return b""
            cmf, flg = self._header
            if cmf & 0x0F != 8 or cmf >> 4 > 7 or (cmf << 8 | flg) % 31 or flg & 0x20:
                raise zlib.error("incorrect header check")
            self._header = None
        return self._inflate.decompress(data, max_length)

    @property
    def unconsumed_tail(self) -> bytes:
        return self._inflate.unconsumed_tail


def _decode_jpeg(data: bytes, w: int, h: int) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG":
                raise RFBClientError(f"Tight JPEG rect holds {img.format} data")
            if img.size != (w, h):
                raise RFBClientError(f"Tight JPEG is {img.size[0]}x{img.size[1]}, rect is {w}x{h}")
            return np.asarray(img.convert("RGB"))
    except RFBClientError:
        raise
    except Exception as exc:                      # Pillow raises many kinds for broken data
        raise RFBClientError(f"Tight JPEG cannot be decoded: {exc}") from None
