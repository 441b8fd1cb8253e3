"""RFB 3.8 (RFC 6143) server side as a sans-I/O object.

``RFBServer`` never touches a socket or the screen: the caller sends ``initial()``, feeds what the
client sent to ``receive()`` (typed events back; malformed input raises ``RFBError``), sends what
``data_to_send()`` returns (handshake replies), and, whenever the client has a pending
``FramebufferUpdateRequest`` (``update_pending``), turns a frame into a FramebufferUpdate with
``update(frame, damage)``.  ``prepare_update`` + ``PreparedUpdate.encode`` split that in two: the
decision (cheap, with the state the client's messages change) and the encoding (the expensive
part, which only touches encoder state, so the caller may run it in a worker thread).

Frames are ``numpy`` uint8 arrays H×W×3 (RGB) or H×W×4 (BGRX, what mss/X11 deliver: passed
through untouched to clients using the matching 32bpp format).  The server converts them to the client's pixel
format (true colour, 8/16/32 bpp, any shifts, either byte order) and encodes them with the best
encoding the client announced: Tight (7, zlib + JPEG for photo-like tiles when the client sent a
quality level), ZRLE (16), Raw (0); CopyRect (1) for moves the caller reports.  A client that
announced no encodings or only unknown ones gets Raw.  A client that also announced Open H.264
(50) gets full-screen and moving-picture changes as H.264 frames of the whole screen (one
context; ``_VideoMode`` decides, ``h264_encoder`` encodes) and, a few quiet updates after the
last of them, the whole screen once more in its lossless encoding.  Pseudo-encodings: RichCursor (-239),
DesktopSize (-223), ExtendedDesktopSize (-308), Tight quality (-32..-23) and compression
(-256..-247) levels, Extended Clipboard (0xC0A1E5CE: clipboard text in UTF-8 both ways, see
``protocol.rfb_ext_clipboard``; clients without it get Latin-1 as RFC 6143 says).  Rectangles are always clipped to the framebuffer.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from protocol import rfb_ext_clipboard as ext_clipboard
from protocol import rfb_h264
from protocol.rfb_ext_clipboard import EXTENDED_CLIPBOARD, ExtClipboardError

__all__ = [
    "RFBServer", "RFBError", "PreparedUpdate", "H264", "PixelFormat", "Rect", "Move", "Cursor",
    "ClientInit", "SetPixelFormat", "SetEncodings", "FramebufferUpdateRequest", "KeyEvent",
    "PointerEvent", "ClientCutText", "SetDesktopSize",
    "RAW", "COPYRECT", "TIGHT", "ZRLE", "RICH_CURSOR", "DESKTOP_SIZE", "EXTENDED_DESKTOP_SIZE",
    "PIXEL_FORMAT_RGB888", "as_rgb",
]

RAW, COPYRECT, TIGHT, ZRLE = 0, 1, 7, 16
H264 = rfb_h264.H264
RICH_CURSOR = -239
DESKTOP_SIZE = -223
EXTENDED_DESKTOP_SIZE = -308
LAST_RECT = -224
QUALITY_LEVELS = range(-32, -22)      # -32 = level 0 ... -23 = level 9
COMPRESS_LEVELS = range(-256, -246)   # -256 = level 0 ... -247 = level 9

MAX_CUT_TEXT = 1 << 20                # a client's clipboard text larger than this is refused
MAX_ENCODINGS = 1024
TILE = 64                             # ZRLE tiles are 64x64 by the spec; Tight uses the same


class RFBError(Exception):
    """The client broke the protocol; ``reason`` says how.  The connection must be closed."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class ClientInit:
    shared: bool


@dataclass(frozen=True)
class PixelFormat:
    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int

    def pack(self) -> bytes:
        return struct.pack(">BBBBHHHBBB3x", self.bits_per_pixel, self.depth, self.big_endian,
                           self.true_colour, self.red_max, self.green_max, self.blue_max,
                           self.red_shift, self.green_shift, self.blue_shift)

    @classmethod
    def unpack(cls, data: bytes) -> "PixelFormat":
        bpp, depth, be, tc, rm, gm, bm, rs, gs, bs = struct.unpack(">BBBBHHHBBB3x", data)
        return cls(bpp, depth, bool(be), bool(tc), rm, gm, bm, rs, gs, bs)

    def check(self) -> None:
        if self.bits_per_pixel not in (8, 16, 32):
            raise RFBError(f"unsupported bits-per-pixel {self.bits_per_pixel}")
        if not self.true_colour:
            raise RFBError("colour-map pixel formats are not supported")
        for mx, sh in ((self.red_max, self.red_shift), (self.green_max, self.green_shift),
                       (self.blue_max, self.blue_shift)):
            if mx == 0 or mx & (mx + 1):
                raise RFBError(f"colour max {mx} is not 2^n-1")
            if mx.bit_length() + sh > self.bits_per_pixel:
                raise RFBError("colour channel does not fit in the pixel")

    @property
    def bytes_per_pixel(self) -> int:
        return self.bits_per_pixel // 8

    def _colour_bits(self) -> int:
        return ((self.red_max << self.red_shift) | (self.green_max << self.green_shift)
                | (self.blue_max << self.blue_shift))

    def compact_rgb(self) -> bool:
        """True if ZRLE's CPIXEL is 3 bytes: 32bpp, depth <= 24, all colour bits in either the
        least or the most significant three bytes."""
        bits = self._colour_bits()
        return (self.bits_per_pixel == 32 and self.depth <= 24 and self.true_colour
                and (bits < 1 << 24 or bits & 0xFF == 0))

    def compact_low(self) -> bool:
        return self._colour_bits() < 1 << 24

    def byte_aligned(self) -> bool:
        """32bpp with one whole byte per channel (the fast conversion path)."""
        return (self.bits_per_pixel == 32
                and self.red_max == self.green_max == self.blue_max == 255
                and len({self.red_shift, self.green_shift, self.blue_shift}) == 3
                and {self.red_shift, self.green_shift, self.blue_shift} <= {0, 8, 16, 24})

    def tight_rgb(self) -> bool:
        """True if Tight's TPIXEL is 3 bytes R, G, B for this format."""
        return (self.bits_per_pixel == 32 and self.depth == 24
                and self.red_max == self.green_max == self.blue_max == 255)


PIXEL_FORMAT_RGB888 = PixelFormat(32, 24, False, True, 255, 255, 255, 16, 8, 0)


@dataclass(frozen=True)
class SetPixelFormat:
    pixel_format: PixelFormat


@dataclass(frozen=True)
class SetEncodings:
    encodings: list[int]


@dataclass(frozen=True)
class FramebufferUpdateRequest:
    incremental: bool
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class KeyEvent:
    down: bool
    keysym: int


@dataclass(frozen=True)
class PointerEvent:
    mask: int
    x: int
    y: int


@dataclass(frozen=True)
class ClientCutText:
    text: str


@dataclass(frozen=True)
class SetDesktopSize:
    """The client asked to resize the desktop (we refuse; the showing side decides)."""
    w: int
    h: int


# ---------------------------------------------------------------------------- update input
@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    def clip(self, w: int, h: int) -> "Rect | None":
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.w, w), min(self.y + self.h, h)
        if x1 <= x0 or y1 <= y0:
            return None
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def intersect(self, other: "Rect") -> "Rect | None":
        x0, y0 = max(self.x, other.x), max(self.y, other.y)
        x1 = min(self.x + self.w, other.x + other.w)
        y1 = min(self.y + self.h, other.y + other.h)
        if x1 <= x0 or y1 <= y0:
            return None
        return Rect(x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class Move:
    """The pixels of ``src_x, src_y`` (size w×h) moved to ``x, y`` (a scroll): CopyRect."""
    src_x: int
    src_y: int
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, eq=False)
class Cursor:
    """Cursor image: ``rgba`` H×W×4 uint8 and its hotspot."""
    hot_x: int
    hot_y: int
    rgba: Any = field(repr=False)

    def same(self, other: "Cursor | None") -> bool:
        return (other is not None and (self.hot_x, self.hot_y) == (other.hot_x, other.hot_y)
                and self.rgba.shape == other.rgba.shape
                and bool(np.array_equal(self.rgba, other.rgba)))


class FramebufferSource(Protocol):
    def size(self) -> tuple[int, int]: ...


# --------------------------------------------------------------------------- pixel helpers
def as_rgb(frame: np.ndarray) -> np.ndarray:
    """An RGB view of a frame: H×W×3 RGB as is, H×W×4 BGRX (mss/X11 native) reversed."""
    return frame[..., :3] if frame.shape[2] == 3 else frame[..., 2::-1]


def _is_native(frame: np.ndarray, pf: "PixelFormat") -> bool:
    """BGRX frame bytes already are the client's pixels (32bpp little-endian, r16 g8 b0)."""
    return (frame.shape[2] == 4 and pf.byte_aligned() and not pf.big_endian
            and (pf.red_shift, pf.green_shift, pf.blue_shift) == (16, 8, 0))


def to_client_pixels(rgb: np.ndarray, pf: PixelFormat) -> np.ndarray:
    """RGB uint8 (h, w, 3) → client pixels as uint8 (h, w, bytes_per_pixel)."""
    h, w = rgb.shape[:2]
    bpp = pf.bytes_per_pixel
    if pf.byte_aligned():
        out = np.zeros((h, w, 4), np.uint8)
        for ch, shift in enumerate((pf.red_shift, pf.green_shift, pf.blue_shift)):
            byte = shift // 8
            out[..., (3 - byte) if pf.big_endian else byte] = rgb[..., ch]
        return out
    value = np.zeros((h, w), np.uint32)
    for ch, mx, shift in ((0, pf.red_max, pf.red_shift), (1, pf.green_max, pf.green_shift),
                          (2, pf.blue_max, pf.blue_shift)):
        c = (rgb[..., ch].astype(np.uint32) * mx + 127) // 255
        value |= c << shift
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32}[bpp]
    typed = value.astype(np.dtype(dtype).newbyteorder(">" if pf.big_endian else "<"))
    return typed.view(np.uint8).reshape(h, w, bpp)


def compact_pixels(pixels: np.ndarray, pf: PixelFormat) -> np.ndarray:
    """ZRLE CPIXELs: drop the unused byte of 32-bit pixels where the spec says so."""
    if not pf.compact_rgb():
        return pixels
    if pf.compact_low():
        return pixels[..., 1:] if pf.big_endian else pixels[..., :3]
    return pixels[..., :3] if pf.big_endian else pixels[..., 1:]


def _compact_len(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append((n >> 14) & 0xFF)
    return bytes(out)


def _pack_indices(idx: np.ndarray, bits: int) -> bytes:
    """Pack palette indices row by row, ``bits`` per pixel, MSB first, rows padded to a byte."""
    h, w = idx.shape
    if bits == 8:
        return idx.astype(np.uint8).tobytes()
    per = 8 // bits
    padded_w = -(-w // per) * per
    buf = np.zeros((h, padded_w), np.uint8)
    buf[:, :w] = idx
    buf = buf.reshape(h, padded_w // per, per)
    packed = np.zeros((h, padded_w // per), np.uint8)
    for i in range(per):
        packed |= buf[..., i] << (8 - bits * (i + 1))
    return packed.tobytes()


def _palette(tile: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Unique pixels of a (h, w, n) uint8 tile if at most ``limit``: (palette, indices)."""
    h, w, n = tile.shape
    flat = np.zeros((h * w,), np.uint32)
    t = tile.reshape(-1, n)
    for i in range(n):
        flat |= t[:, i].astype(np.uint32) << (8 * i)
    first = flat[0]
    if (flat == first).all():
        return t[:1], np.zeros((h, w), np.uint8)
    values, inverse = np.unique(flat, return_inverse=True)
    if len(values) > limit:
        return None
    pal = np.stack([(values >> (8 * i)) & 0xFF for i in range(n)], axis=1).astype(np.uint8)
    return pal, inverse.reshape(h, w).astype(np.uint8)


# ------------------------------------------------------------------------------- the server
_STATE_VERSION, _STATE_SECURITY, _STATE_INIT, _STATE_NORMAL = range(4)
_MSG_SIZES = {0: 20, 2: 4, 3: 10, 4: 8, 5: 6, 6: 8, 251: 8}


class RFBServer:
    def __init__(self, framebuffer_source: FramebufferSource | tuple[int, int], *, name: str,
                 security: str = "none"):
        if security != "none":
            raise ValueError(f"security type {security!r} is not supported (the session is "
                             "already end-to-end encrypted and authenticated)")
        self._source = framebuffer_source
        self.name = name
        self.width, self.height = self._source_size()
        self.pixel_format = PIXEL_FORMAT_RGB888
        self.encodings: list[int] = []
        self.minor = 8
        self._state = _STATE_VERSION
        self._buf = bytearray()
        self._out = bytearray()
        self._pending: Rect | None = None
        self._pending_full: Rect | None = None     # non-incremental part
        self._sent_cursor: Cursor | None = None
        self._size_announced = False
        self._owed: list[Rect] = []
        self._ext_size_reply: bytes | None = None
        self._zrle = zlib.compressobj(6)
        self._video = _VideoMode()
        self._h264_encoder: Any = None       # created by the first H.264 frame (encode side)
        self._tight = [zlib.compressobj(6) for _ in range(4)]
        self._tight_level = 6
        self.clipboard = ext_clipboard.ClipboardPeer(ext_clipboard.SERVER)
        self._clipboard_announced = False

    def _source_size(self) -> tuple[int, int]:
        src = self._source
        w, h = src if isinstance(src, tuple) else src.size()
        return int(w), int(h)

    # ------------------------------------------------------------------------- handshake
    def initial(self) -> bytes:
        return b"RFB 003.008\n"

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    @property
    def ready(self) -> bool:
        return self._state == _STATE_NORMAL

    @property
    def update_pending(self) -> bool:
        return self._pending is not None

    def receive(self, data: bytes) -> list[Any]:
        self._buf += data
        events: list[Any] = []
        while True:
            ev = self._next()
            if ev is None:
                return events
            if ev is not True:
                events.append(ev)

    def _next(self) -> Any:
        buf = self._buf
        if self._state == _STATE_VERSION:
            if len(buf) < 12:
                return None
            version = bytes(buf[:12])
            del buf[:12]
            if not (version[:4] == b"RFB " and version[4:7].isdigit() and version[7:8] == b"."
                    and version[8:11].isdigit() and version[11:] == b"\n"):
                raise RFBError(f"bad protocol version {version!r}")
            major, minor = int(version[4:7]), int(version[8:11])
            if major != 3 or minor < 3:
                raise RFBError(f"protocol version {major}.{minor} is not supported")
            self.minor = 3 if minor < 7 else (7 if minor == 7 else 8)
            if self.minor == 3:
                self._out += struct.pack(">I", 1)
                self._state = _STATE_INIT
            else:
                self._out += b"\x01\x01"
                self._state = _STATE_SECURITY
            return True
        if self._state == _STATE_SECURITY:
            if len(buf) < 1:
                return None
            choice = buf[0]
            del buf[:1]
            if choice != 1:
                if self.minor == 8:
                    reason = b"security type not offered"
                    self._out += struct.pack(">II", 1, len(reason)) + reason
                raise RFBError(f"client chose security type {choice}, offered only None (1)")
            if self.minor == 8:
                self._out += struct.pack(">I", 0)
            self._state = _STATE_INIT
            return True
        if self._state == _STATE_INIT:
            if len(buf) < 1:
                return None
            shared = bool(buf[0])
            del buf[:1]
            name = self.name.encode("utf-8")
            self._out += (struct.pack(">HH", self.width, self.height) + self.pixel_format.pack()
                          + struct.pack(">I", len(name)) + name)
            self._state = _STATE_NORMAL
            return ClientInit(shared)
        return self._message()

    def _message(self) -> Any:
        buf = self._buf
        if not buf:
            return None
        kind = buf[0]
        if kind not in _MSG_SIZES:
            raise RFBError(f"unknown client message type {kind}")
        size = _MSG_SIZES[kind]
        if len(buf) < size:
            return None
        if kind == 0:
            pf = PixelFormat.unpack(bytes(buf[4:20]))
            pf.check()
            del buf[:20]
            self.pixel_format = pf
            return SetPixelFormat(pf)
        if kind == 2:
            (count,) = struct.unpack(">H", buf[2:4])
            if count > MAX_ENCODINGS:
                raise RFBError(f"{count} encodings announced")
            if len(buf) < 4 + 4 * count:
                return None
            encs = list(struct.unpack(f">{count}i", buf[4:4 + 4 * count]))
            del buf[:4 + 4 * count]
            self._set_encodings(encs)
            return SetEncodings(encs)
        if kind == 3:
            inc, x, y, w, h = struct.unpack(">BHHHH", buf[1:10])
            del buf[:10]
            self._request(bool(inc), Rect(x, y, w, h))
            return FramebufferUpdateRequest(bool(inc), x, y, w, h)
        if kind == 4:
            down, keysym = struct.unpack(">B2xI", buf[1:8])
            del buf[:8]
            return KeyEvent(bool(down), keysym)
        if kind == 5:
            mask, x, y = struct.unpack(">BHH", buf[1:6])
            del buf[:6]
            return PointerEvent(mask, x, y)
        if kind == 6:
            (length,) = struct.unpack(">i", buf[4:8])
            if length < 0:
                return self._extended_cut_text(-length)
            if length > MAX_CUT_TEXT:
                raise RFBError(f"cut text length {length} refused")
            if len(buf) < 8 + length:
                return None
            text = bytes(buf[8:8 + length]).decode("latin-1")
            del buf[:8 + length]
            return ClientCutText(text)
        # 251 SetDesktopSize: u8 pad, u16 w, u16 h, u8 n-screens, pad, then 16 bytes per screen
        w, h, n = struct.unpack(">HHB", buf[2:7])
        if len(buf) < 8 + 16 * n:
            return None
        del buf[:8 + 16 * n]
        if EXTENDED_DESKTOP_SIZE in self.encodings:
            # reason 1 (client request), status 1 (resize is administratively prohibited)
            self._ext_size_reply = self._ext_desktop_size(1, 1)
        return SetDesktopSize(w, h)

    def _extended_cut_text(self, length: int) -> Any:
        """ClientCutText with a negative length: an Extended Clipboard message."""
        if not self._clipboard_announced:
            raise RFBError(f"cut text length -{length} (an extended clipboard message) from a "
                           f"client that did not announce the extended clipboard")
        if length > ext_clipboard.MAX_MESSAGE_BYTES:
            raise RFBError(f"extended clipboard message of {length} bytes refused")
        if len(self._buf) < 8 + length:
            return None
        payload = bytes(self._buf[8:8 + length])
        del self._buf[:8 + length]
        try:
            reply, text = self.clipboard.handle(ext_clipboard.parse(payload))
        except ExtClipboardError as exc:
            raise RFBError(f"extended clipboard: {exc}") from None
        self._out += reply
        return True if text is None else ClientCutText(text)

    def _set_encodings(self, encs: list[int]) -> None:
        self.encodings = encs
        if EXTENDED_CLIPBOARD in encs and not self._clipboard_announced:
            self._clipboard_announced = True
            self._out += ext_clipboard.caps(ext_clipboard.SERVER)
        self._tight_level = 6
        for e in encs:
            if e in COMPRESS_LEVELS:
                self._tight_level = e - COMPRESS_LEVELS.start
        if EXTENDED_DESKTOP_SIZE in encs:
            self._size_announced = False       # answer with the initial screen layout
        self._sent_cursor = None

    def _request(self, incremental: bool, rect: Rect) -> None:
        clipped = rect.clip(self.width, self.height)
        region = clipped or Rect(0, 0, 0, 0)
        if self._pending is None:
            self._pending = region
        elif clipped is not None:
            self._pending = _union(self._pending, clipped)
        if not incremental and clipped is not None:
            self._pending_full = clipped if self._pending_full is None else _union(
                self._pending_full, clipped)

    # -------------------------------------------------------------------------- encodings
    @property
    def encoding(self) -> int:
        """The pixel encoding chosen for this client: the first one it named that we support."""
        for e in self.encodings:
            if e in (RAW, ZRLE, TIGHT):
                return e
        return RAW

    @property
    def jpeg_quality(self) -> int | None:
        """JPEG quality for Tight, or None if the client sent no quality level (no JPEG)."""
        for e in self.encodings:
            if e in QUALITY_LEVELS:
                return (5, 10, 15, 25, 37, 50, 60, 70, 75, 80, 95)[e - QUALITY_LEVELS.start]
        return None

    # ----------------------------------------------------------------------------- update
    def cut_text(self, text: str) -> bytes:
        """ServerCutText: the presenter's clipboard text, in UTF-8 to a client with the extended
        clipboard, else Latin-1 (as RFC 6143 says; other characters become "?")."""
        if not self.ready:
            return b""
        extended = self.clipboard.send_text(text)
        if extended is not None:
            return extended
        data = text.encode("latin-1", "replace")
        return struct.pack("!B3xI", 3, len(data)) + data

    def update(self, frame: np.ndarray, damage: Iterable[Rect | tuple] | None = None, *,
               moves: Sequence[Move] = (), cursor: Cursor | None = None) -> bytes:
        """A FramebufferUpdate answering the pending request, or b"" if there is nothing to
        send yet (no request, or an incremental one and nothing changed in its region).

        ``damage``: rects changed since the previous ``update`` (None: everything).  ``moves``:
        areas that moved (sent as CopyRect when the client supports it, as pixels otherwise).
        ``cursor``: the current cursor image (sent when it changed, if the client asked)."""
        prepared = self.prepare_update(frame, damage, moves=moves, cursor=cursor)
        return b"" if prepared is None else prepared.encode()

    def prepare_update(self, frame: np.ndarray, damage: Iterable[Rect | tuple] | None = None,
                       *, moves: Sequence[Move] = (),
                       cursor: Cursor | None = None) -> "PreparedUpdate | None":
        """What ``update`` would send, decided but not yet encoded (None: nothing to send).
        The pending request counts as answered; the caller must send ``encode()``'s bytes (the
        encoders' streams have moved on), updates in the order they were prepared."""
        if self._state != _STATE_NORMAL or self._pending is None:
            return None
        rects: list[bytes] = []
        if self._ext_size_reply is not None:
            rects.append(self._ext_size_reply)
            self._ext_size_reply = None
        fh, fw = frame.shape[:2]
        resized = (fw, fh) != (self.width, self.height)
        if resized and (DESKTOP_SIZE in self.encodings or EXTENDED_DESKTOP_SIZE in self.encodings):
            self.width, self.height = fw, fh
            if EXTENDED_DESKTOP_SIZE in self.encodings:
                rects.append(self._ext_desktop_size(0, 0))
            else:
                rects.append(struct.pack(">HHHHi", 0, 0, fw, fh, DESKTOP_SIZE))
            self._size_announced = True
            self._pending = self._pending_full = Rect(0, 0, fw, fh)
            self._owed = []
            moves = ()
            damage = None
        elif resized:
            frame = _fit(frame, self.width, self.height)
        if not self._size_announced and EXTENDED_DESKTOP_SIZE in self.encodings:
            rects.append(self._ext_desktop_size(0, 0))
            self._size_announced = True
        region = self._pending
        screen = Rect(0, 0, self.width, self.height)
        if damage is None:
            dirty = [screen]
        else:
            dirty = [r if isinstance(r, Rect) else Rect(*r) for r in damage]
        # damage outside the requested region is owed to the client for a later update
        owed_before = bool(self._owed)
        dirty = self._owed + dirty
        self._owed = []
        parts: list[Rect] = []
        for d in dirty:
            c = d.clip(self.width, self.height)
            if c is None:
                continue
            inside = c.intersect(region)
            if inside is not None:
                parts.append(inside)
            if inside != c:
                self._owed.append(c)
        copy_rects: list[bytes] = []
        for m in moves:
            dst = Rect(m.x, m.y, m.w, m.h).clip(self.width, self.height)
            src = Rect(m.src_x, m.src_y, m.w, m.h).clip(self.width, self.height)
            if dst is None:
                continue
            inside = dst.intersect(region)
            if inside != dst:
                self._owed.append(dst)
            if src != Rect(m.src_x, m.src_y, m.w, m.h) or dst != Rect(m.x, m.y, m.w, m.h):
                if inside is not None:      # not a valid move: send the pixels
                    parts.append(inside)
                continue
            if (COPYRECT in self.encodings and inside == dst and self._pending_full is None
                    and not owed_before):
                copy_rects.append(struct.pack(">HHHHiHH", dst.x, dst.y, dst.w, dst.h, COPYRECT,
                                              m.src_x, m.src_y))
            elif inside is not None:
                parts.append(inside)
        if len(self._owed) > 32:
            owed = self._owed[0]
            for r in self._owed[1:]:
                owed = _union(owed, r)
            self._owed = [owed]
        if self._pending_full is not None:
            parts.append(self._pending_full)
        parts = _merge(parts)
        cursor_rect = b""
        if cursor is not None and RICH_CURSOR in self.encodings and not cursor.same(self._sent_cursor):
            cursor_rect = self._rich_cursor(cursor)
            self._sent_cursor = cursor
        h264 = False
        if H264 in self.encodings and _h264_encoder_available():
            full = (self._pending_full is None and region == screen and not owed_before)
            changed = sum(r.w * r.h for r in parts) / max(screen.w * screen.h, 1)
            photo = (_photo_share(frame, parts)
                     if full and (changed >= _VideoMode.MOTION or self._video.active)
                     and self._video.needs_photo(changed) else 0.0)
            choice = self._video.choose(changed, full, photo)
            if choice == _VideoMode.VIDEO:
                h264, parts, copy_rects = True, [], []
            elif choice == _VideoMode.REFRESH:
                parts, copy_rects = [screen], []
        if not h264 and not parts and not copy_rects and not cursor_rect and not rects:
            return None
        self._pending = self._pending_full = None
        rects.extend(copy_rects)
        if cursor_rect:
            rects.append(cursor_rect)
        return PreparedUpdate(self, frame, rects, parts, h264, self.encoding, self.pixel_format,
                              self.jpeg_quality)

    def _encode_prepared(self, p: "PreparedUpdate") -> bytes:
        rects = list(p.head)
        if p.h264:
            rects.append(self._encode_h264(p.frame))
        for r in p.parts:
            rects.extend(self._encode(p.frame, r, p.encoding, p.pixel_format, p.jpeg_quality))
        return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)

    def _encode_h264(self, frame: np.ndarray) -> bytes:
        """The whole frame as one H.264 rect (the screen's context); a new encoder (first
        frame, new size) starts with a key frame and tells the client to drop old contexts."""
        from modules.common.screen.h264_encoder import H264Encoder
        h, w = frame.shape[:2]
        enc = self._h264_encoder
        flags = 0
        if enc is None or (enc.width, enc.height) != (w, h):
            enc = self._h264_encoder = H264Encoder(w, h)
            flags = rfb_h264.RESET_ALL_CONTEXTS
        data = enc.encode(frame)
        return (struct.pack(">HHHHi", 0, 0, w, h, H264) + rfb_h264.header(len(data), flags)
                + data)

    def _ext_desktop_size(self, reason: int, status: int) -> bytes:
        return (struct.pack(">HHHHi", reason, status, self.width, self.height,
                            EXTENDED_DESKTOP_SIZE)
                + struct.pack(">B3xIHHHHI", 1, 0, 0, 0, self.width, self.height, 0))

    def _rich_cursor(self, cursor: Cursor) -> bytes:
        rgba = cursor.rgba
        h, w = rgba.shape[:2]
        pixels = to_client_pixels(np.ascontiguousarray(rgba[..., :3]), self.pixel_format)
        mask = np.packbits(rgba[..., 3] >= 128, axis=1)
        return (struct.pack(">HHHHi", min(cursor.hot_x, max(w - 1, 0)),
                            min(cursor.hot_y, max(h - 1, 0)), w, h, RICH_CURSOR)
                + pixels.tobytes() + mask.tobytes())

    def _encode(self, frame: np.ndarray, r: Rect, enc: int, pf: PixelFormat,
                quality: int | None) -> list[bytes]:
        region = frame[r.y:r.y + r.h, r.x:r.x + r.w]
        if enc == TIGHT:
            return self._encode_tight(as_rgb(region), r, pf, quality)
        if _is_native(frame, pf):
            pixels = region
        else:
            pixels = to_client_pixels(as_rgb(region), pf)
        if enc == ZRLE:
            return [self._encode_zrle(pixels, r, pf)]
        return [struct.pack(">HHHHi", r.x, r.y, r.w, r.h, RAW)
                + np.ascontiguousarray(pixels).tobytes()]

    def _encode_zrle(self, pixels: np.ndarray, r: Rect, pf: PixelFormat) -> bytes:
        cpix = compact_pixels(pixels, pf)
        out = io.BytesIO()
        for ty in range(0, r.h, TILE):
            for tx in range(0, r.w, TILE):
                tile = cpix[ty:ty + TILE, tx:tx + TILE]
                pal = _palette(tile, 16)
                if pal is None:
                    out.write(b"\x00")
                    out.write(np.ascontiguousarray(tile).tobytes())
                    continue
                colours, idx = pal
                n = len(colours)
                out.write(bytes([n]))
                out.write(colours.tobytes())
                if n > 1:
                    out.write(_pack_indices(idx, 1 if n == 2 else 2 if n <= 4 else 4))
        data = self._zrle.compress(out.getvalue()) + self._zrle.flush(zlib.Z_SYNC_FLUSH)
        return struct.pack(">HHHHiI", r.x, r.y, r.w, r.h, ZRLE, len(data)) + data

    def _tight_zlib(self, stream: int, raw: bytes) -> bytes:
        if len(raw) < 12:
            return raw
        z = self._tight[stream]
        data = z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)
        return _compact_len(len(data)) + data

    def _encode_tight(self, rgb: np.ndarray, r: Rect, pf: PixelFormat,
                      quality: int | None) -> list[bytes]:
        if pf.bits_per_pixel != 32:
            quality = None
        packed_rgb = pf.tight_rgb()
        out = []
        for ty in range(0, r.h, TILE):
            for tx in range(0, r.w, TILE):
                t_rgb = rgb[ty:ty + TILE, tx:tx + TILE]
                th, tw = t_rgb.shape[:2]
                head = struct.pack(">HHHHi", r.x + tx, r.y + ty, tw, th, TIGHT)
                tpix = (np.ascontiguousarray(t_rgb) if packed_rgb
                        else to_client_pixels(t_rgb, pf))
                pal = _palette(tpix, 256 if quality is None else 24)
                if pal is not None and len(pal[0]) == 1:
                    out.append(head + b"\x80" + pal[0].tobytes())
                    continue
                if pal is None and quality is not None:
                    buf = io.BytesIO()
                    from PIL import Image
                    Image.fromarray(np.ascontiguousarray(t_rgb)).save(
                        buf, "JPEG", quality=quality)
                    data = buf.getvalue()
                    out.append(head + b"\x90" + _compact_len(len(data)) + data)
                    continue
                if pal is None:
                    pal = _palette(tpix, 256)
                if pal is not None:
                    colours, idx = pal
                    n = len(colours)
                    stream = 1 if n == 2 else 2
                    bits = 1 if n == 2 else 8
                    body = _pack_indices(idx, bits)
                    out.append(head + bytes([(stream << 4) | 0x40, 1, n - 1]) + colours.tobytes()
                               + self._tight_zlib(stream, body))
                    continue
                out.append(head + b"\x00" + self._tight_zlib(0, tpix.tobytes()))
        return out


@dataclass(eq=False)
class PreparedUpdate:
    """A FramebufferUpdate decided by ``RFBServer.prepare_update``, not yet encoded.  It holds
    the client's pixel format and encodings as they were when it was decided, so messages the
    client sends meanwhile do not change it half-way."""
    server: RFBServer = field(repr=False)
    frame: np.ndarray = field(repr=False)
    head: list[bytes] = field(repr=False)       # pseudo-rects and CopyRects, already encoded
    parts: list[Rect]
    h264: bool
    encoding: int
    pixel_format: PixelFormat
    jpeg_quality: int | None

    @property
    def pixels(self) -> int:
        """How many pixels encoding it touches (a hint for where to run it)."""
        if self.h264:
            return int(self.frame.shape[0] * self.frame.shape[1])
        return sum(r.w * r.h for r in self.parts)

    def encode(self) -> bytes:
        return self.server._encode_prepared(self)


class _VideoMode:
    """Whether an update goes out as H.264 (to a client that announced it).

    VIDEO for a change that is full-screen (``ENTER`` of the screen at once) and photo-like
    (``PHOTO`` of its sampled tiles hold many colours), for the second full-screen change in a
    row whatever it shows (a series: scrolling, switching, a slide show), and for a photo-like
    change of ``MOTION`` of the screen in ``STREAK`` updates in a row (a video in a window);
    once sending video, it stays while at least ``STAY`` changes.  A single text-like
    full-screen change (a window switch, a new page) and small changes stay in the client's
    lossless encoding: for sharp edges on flat colour that is smaller and exact; H.264 is the
    cheaper one to encode and decode by far (``bench/screen_frame_cost.py``), which is what a
    series needs.  H.264 is lossy, so after ``REFRESH_AFTER`` updates that were not video
    (nothing changed, or only a little) the whole screen is sent once more losslessly.  All of
    this only for incremental requests of the whole screen (``full``); a non-incremental
    request is answered in the lossless encoding anyway.  An update in which nothing changed
    does not break a series (the capture may just have come between two changes)."""

    NORMAL, VIDEO, REFRESH = "normal", "video", "refresh"
    PHOTO = 0.5
    ENTER = 0.30
    MOTION = 0.04
    STREAK = 4
    STAY = 0.01
    REFRESH_AFTER = 3

    def __init__(self) -> None:
        self.active = False       # the last update that changed something went out as H.264
        self.lossy = False        # the client shows H.264 pixels not yet repainted losslessly
        self.full_streak = 0      # full-screen changes in a row
        self.motion_streak = 0    # photo-like changes of MOTION or more in a row
        self.quiet = 0

    def needs_photo(self, changed: float) -> bool:
        """False when ``choose`` goes VIDEO whatever ``photo`` says: a series continues (video
        active, or a second big change in a row).  The streak it would have counted matters
        only once video stops, and stopping resets it; so sampling tiles (1.3 ms a 1080p frame)
        is skipped for every frame of a series but its first."""
        return not (changed >= self.STAY
                    and (self.active or (changed >= self.ENTER and self.full_streak >= 1)))

    def choose(self, changed: float, full: bool, photo: float = 1.0) -> str:
        """``changed``: share of the screen this update repaints (0..1); ``photo``: share of
        its sampled tiles that look like a photo or video."""
        if not full:
            return self.NORMAL
        if changed > 0:
            big = changed >= self.ENTER
            self.full_streak = self.full_streak + 1 if big else 0
            moving = changed >= self.MOTION and photo >= self.PHOTO
            self.motion_streak = self.motion_streak + 1 if moving else 0
            if ((big and (photo >= self.PHOTO or self.full_streak >= 2))
                    or self.motion_streak >= self.STREAK
                    or (self.active and changed >= self.STAY)):
                self.active = self.lossy = True
                self.quiet = 0
                return self.VIDEO
            self.active = False
        if not self.lossy:
            return self.NORMAL
        self.quiet += 1
        if self.quiet < self.REFRESH_AFTER:
            return self.NORMAL
        self.lossy = self.active = False
        self.quiet = self.full_streak = self.motion_streak = 0
        return self.REFRESH


PHOTO_COLOURS = 24      # a 64x64 tile with more colours is photo-like (Tight's JPEG rule)
PHOTO_SAMPLES = 24


def _photo_share(frame: np.ndarray, parts: list[Rect]) -> float:
    """Share of up to ``PHOTO_SAMPLES`` tiles, spread evenly over ``parts``, with more than
    ``PHOTO_COLOURS`` colours (text and UI: a few colours per tile; photos and video: many)."""
    tiles = [(y, x) for r in parts for y in range(r.y, r.y + r.h, TILE)
             for x in range(r.x, r.x + r.w, TILE)]
    if not tiles:
        return 0.0
    step = max(1, len(tiles) // PHOTO_SAMPLES)
    chosen = tiles[step // 2::step][:PHOTO_SAMPLES]
    photo = 0
    for y, x in chosen:
        if frame.shape[2] == 4 and frame.flags.c_contiguous:      # BGRX: one uint32 a pixel
            values = frame.view(np.uint32)[y:y + TILE, x:x + TILE, 0]
        else:
            rgb = frame[y:y + TILE, x:x + TILE, :3].astype(np.uint32)
            values = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
        if len(np.unique(values)) > PHOTO_COLOURS:
            photo += 1
    return photo / len(chosen)


_h264_ok: bool | None = None


def _h264_encoder_available() -> bool:
    global _h264_ok
    if _h264_ok is None:
        from modules.common.screen.h264_encoder import available
        _h264_ok = available()
    return _h264_ok


def _union(a: Rect, b: Rect) -> Rect:
    if a.w == 0 or a.h == 0:
        return b
    x0, y0 = min(a.x, b.x), min(a.y, b.y)
    x1, y1 = max(a.x + a.w, b.x + b.w), max(a.y + a.h, b.y + b.h)
    return Rect(x0, y0, x1 - x0, y1 - y0)


def _merge(rects: list[Rect]) -> list[Rect]:
    """Drop duplicates and rects contained in others; overlapping rects are kept (sending a
    pixel twice is correct, just wasteful)."""
    out: list[Rect] = []
    for r in sorted(set(rects), key=lambda r: -(r.w * r.h)):
        if any(o.intersect(r) == r for o in out):
            continue
        out.append(r)
    return out


def _fit(frame: np.ndarray, w: int, h: int) -> np.ndarray:
    """Crop or pad (black) ``frame`` to w×h for a client that cannot be told the new size."""
    out = np.zeros((h, w, 3), np.uint8)
    fh, fw = frame.shape[:2]
    out[:min(h, fh), :min(w, fw)] = as_rgb(frame)[:h, :w]
    return out
