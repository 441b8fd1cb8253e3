"""A minimal, independent RFB client decoder for tests and benchmarks.

Written from RFC 6143 / the rfbproto document, not from ``modules.common.screen.rfb_server``: it keeps a
framebuffer (numpy RGB) and decodes Raw, CopyRect, ZRLE, Tight (zlib, palette, fill, JPEG via
Pillow), RichCursor, DesktopSize and ExtendedDesktopSize for 32bpp little-endian RGB888 and any
other true-colour pixel format.  ``BlockingRFBClient`` speaks it over a socket (no reactor).
"""

from __future__ import annotations

import io
import socket
import struct
import zlib
from typing import Callable

import numpy as np

RAW, COPYRECT, TIGHT, ZRLE = 0, 1, 7, 16
RICH_CURSOR, DESKTOP_SIZE, EXT_DESKTOP_SIZE = -239, -223, -308


class PF:
    def __init__(self, bpp=32, depth=24, big=False, rmax=255, gmax=255, bmax=255,
                 rs=16, gs=8, bs=0):
        self.bpp, self.depth, self.big = bpp, depth, big
        self.max = (rmax, gmax, bmax)
        self.shift = (rs, gs, bs)

    def pack(self) -> bytes:
        return struct.pack(">BBBBHHHBBB3x", self.bpp, self.depth, self.big, 1, *self.max,
                           *self.shift)

    @property
    def cpixel_bytes(self) -> int:
        """ZRLE CPIXEL size: 3 if 32bpp, depth<=24 and all colours in 3 bytes."""
        if self.bpp == 32 and self.depth <= 24 and (self._bits < 1 << 24 or self._bits & 0xFF == 0):
            return 3
        return self.bpp // 8

    @property
    def _bits(self) -> int:
        return sum(m << s for m, s in zip(self.max, self.shift))

    def cpixel_to_rgb(self, raw: bytes, n: int) -> np.ndarray:
        size = self.cpixel_bytes
        arr = np.frombuffer(raw, np.uint8).reshape(n, size)
        if size == 3 and self.bpp == 32:
            low = self._bits < 1 << 24
            full = np.zeros((n, 4), np.uint8)
            if low != self.big:       # value's low bytes are first in memory (LE) → bytes 0..2
                full[:, :3] = arr
            else:
                full[:, 1:] = arr
            arr = full
        return self.pixels_to_rgb(arr.tobytes(), n)

    def pixels_to_rgb(self, raw: bytes, n: int) -> np.ndarray:
        dt = {8: "u1", 16: "u2", 32: "u4"}[self.bpp]
        vals = np.frombuffer(raw, (">" if self.big else "<") + dt, count=n).astype(np.uint32)
        out = np.zeros((n, 3), np.uint8)
        for c in range(3):
            v = (vals >> self.shift[c]) & self.max[c]
            out[:, c] = (v * 255 + self.max[c] // 2) // self.max[c]
        return out

    def tpixel_to_rgb(self, raw: bytes, n: int) -> np.ndarray:
        if self.bpp == 32 and self.depth == 24 and self.max == (255, 255, 255):
            return np.frombuffer(raw, np.uint8).reshape(n, 3).copy()
        return self.pixels_to_rgb(raw, n)

    @property
    def tpixel_bytes(self) -> int:
        if self.bpp == 32 and self.depth == 24 and self.max == (255, 255, 255):
            return 3
        return self.bpp // 8


class Decoder:
    """Applies FramebufferUpdates to ``fb`` (H×W×3 RGB)."""

    def __init__(self, width: int, height: int, pf: PF | None = None):
        self.fb = np.zeros((height, width, 3), np.uint8)
        self.pf = pf or PF()
        self.zrle = zlib.decompressobj()
        self.tight = [zlib.decompressobj() for _ in range(4)]
        self.cursor: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self.rects: list[tuple[int, int, int, int, int]] = []

    def update(self, read: Callable[[int], bytes]) -> None:
        kind = read(1)[0]
        while kind in (2, 3):           # Bell, ServerCutText: not updates, skip them
            if kind == 3:
                (length,) = struct.unpack(">3xI", read(7))
                read(length)
            kind = read(1)[0]
        assert kind == 0, f"message type {kind}"
        (n,) = struct.unpack(">xH", read(3))
        self.rects = []
        for _ in range(n):
            x, y, w, h, enc = struct.unpack(">HHHHi", read(12))
            self.rects.append((x, y, w, h, enc))
            if enc in (DESKTOP_SIZE, EXT_DESKTOP_SIZE):
                if enc == EXT_DESKTOP_SIZE:
                    (ns,) = struct.unpack(">B3x", read(4))
                    read(16 * ns)
                    if x == 1:          # reply to our own request: no size change
                        continue
                new = np.zeros((h, w, 3), np.uint8)
                self.fb = new
                continue
            if enc == RICH_CURSOR:
                pix = self.pf.pixels_to_rgb(read(w * h * self.pf.bpp // 8), w * h)
                mask = read(((w + 7) // 8) * h)
                self.cursor = (x, y, pix.reshape(h, w, 3), np.frombuffer(mask, np.uint8))
                continue
            H, W = self.fb.shape[:2]
            assert x + w <= W and y + h <= H, f"rect {x},{y} {w}x{h} outside {W}x{H}"
            if enc == RAW:
                pix = self.pf.pixels_to_rgb(read(w * h * self.pf.bpp // 8), w * h)
                self.fb[y:y + h, x:x + w] = pix.reshape(h, w, 3)
            elif enc == COPYRECT:
                sx, sy = struct.unpack(">HH", read(4))
                assert sx + w <= W and sy + h <= H
                self.fb[y:y + h, x:x + w] = self.fb[sy:sy + h, sx:sx + w].copy()
            elif enc == ZRLE:
                (length,) = struct.unpack(">I", read(4))
                data = self.zrle.decompress(read(length))
                self._zrle(io.BytesIO(data).read, x, y, w, h)
            elif enc == TIGHT:
                self._tight(read, x, y, w, h)
            else:
                raise AssertionError(f"unexpected encoding {enc}")

    def _zrle(self, read, x, y, w, h) -> None:
        cb = self.pf.cpixel_bytes
        for ty in range(y, y + h, 64):
            for tx in range(x, x + w, 64):
                tw, th = min(64, x + w - tx), min(64, y + h - ty)
                sub = read(1)[0]
                if sub == 0:
                    pix = self.pf.cpixel_to_rgb(read(tw * th * cb), tw * th).reshape(th, tw, 3)
                elif sub == 1:
                    pix = np.broadcast_to(self.pf.cpixel_to_rgb(read(cb), 1), (th, tw, 3))
                elif 2 <= sub <= 16:
                    pal = self.pf.cpixel_to_rgb(read(sub * cb), sub)
                    bits = 1 if sub == 2 else 2 if sub <= 4 else 4
                    row_bytes = (tw * bits + 7) // 8
                    packed = np.frombuffer(read(row_bytes * th), np.uint8).reshape(th, row_bytes)
                    idx = np.zeros((th, row_bytes * 8 // bits), np.uint8)
                    per = 8 // bits
                    for i in range(per):
                        idx[:, i::per] = (packed >> (8 - bits * (i + 1))) & ((1 << bits) - 1)
                    pix = pal[idx[:, :tw]]
                elif sub == 128 or sub >= 130:
                    pal = self.pf.cpixel_to_rgb(read((sub - 128) * cb), sub - 128) if sub >= 130 \
                        else None
                    flat = np.zeros((tw * th, 3), np.uint8)
                    i = 0
                    while i < tw * th:
                        if pal is None:
                            colour = self.pf.cpixel_to_rgb(read(cb), 1)[0]
                            run = True
                        else:
                            b = read(1)[0]
                            colour, run = pal[b & 0x7F], bool(b & 0x80)
                        length = 1
                        if run:
                            while True:
                                b = read(1)[0]
                                length += b
                                if b != 255:
                                    break
                        flat[i:i + length] = colour
                        i += length
                    pix = flat.reshape(th, tw, 3)
                else:
                    raise AssertionError(f"bad ZRLE subencoding {sub}")
                self.fb[ty:ty + th, tx:tx + tw] = pix

    def _compact(self, read) -> int:
        n = 0
        for i in range(3):
            b = read(1)[0]
            n |= (b & (0x7F if i < 2 else 0xFF)) << (7 * i)
            if i < 2 and not b & 0x80:
                break
        return n

    def _tight(self, read, x, y, w, h) -> None:
        ctl = read(1)[0]
        for i in range(4):
            if ctl & (1 << i):
                self.tight[i] = zlib.decompressobj()
        kind = ctl >> 4
        tb = self.pf.tpixel_bytes
        if kind == 8:
            self.fb[y:y + h, x:x + w] = self.pf.tpixel_to_rgb(read(tb), 1)[0]
            return
        if kind == 9:
            from PIL import Image
            data = read(self._compact(read))
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert img.shape[:2] == (h, w)
            self.fb[y:y + h, x:x + w] = img
            return
        assert kind < 8, f"bad tight control {ctl:#x}"
        stream = kind & 3
        filt = read(1)[0] if kind & 4 else 0
        if filt == 1:
            n = read(1)[0] + 1
            pal = self.pf.tpixel_to_rgb(read(n * tb), n)
            size = ((w + 7) // 8) * h if n == 2 else w * h
        elif filt == 0:
            size = w * h * tb
        else:
            raise AssertionError(f"unsupported tight filter {filt}")
        if size < 12:
            data = read(size)
        else:
            data = self.tight[stream].decompress(read(self._compact(read)))
        assert len(data) == size, (len(data), size)
        if filt == 0:
            self.fb[y:y + h, x:x + w] = self.pf.tpixel_to_rgb(data, w * h).reshape(h, w, 3)
        elif n == 2:
            bits = np.unpackbits(np.frombuffer(data, np.uint8).reshape(h, -1), axis=1)[:, :w]
            self.fb[y:y + h, x:x + w] = pal[bits]
        else:
            self.fb[y:y + h, x:x + w] = pal[np.frombuffer(data, np.uint8).reshape(h, w)]


class BlockingRFBClient:
    """RFB 3.8 client over a blocking socket: handshake, encodings, requests, updates."""

    def __init__(self, host: str, port: int, encodings: list[int], pf: PF | None = None,
                 timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.received = 0
        assert self.read(12) == b"RFB 003.008\n"
        self.sock.sendall(b"RFB 003.008\n")
        n = self.read(1)[0]
        types = self.read(n)
        assert 1 in types
        self.sock.sendall(b"\x01")
        assert self.read(4) == b"\0\0\0\0"
        self.sock.sendall(b"\x01")
        w, h = struct.unpack(">HH", self.read(4))
        self.read(16)
        (nl,) = struct.unpack(">I", self.read(4))
        self.name = self.read(nl).decode()
        self.decoder = Decoder(w, h, pf)
        if pf is not None:
            self.sock.sendall(b"\0\0\0\0" + pf.pack())
        self.sock.sendall(struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings))

    def read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        self.received += n
        return bytes(buf)

    def request(self, incremental: bool = True) -> None:
        h, w = self.decoder.fb.shape[:2]
        self.sock.sendall(struct.pack(">BBHHHH", 3, incremental, 0, 0, w, h))

    def next_update(self) -> None:
        self.decoder.update(self.read)

    def key(self, keysym: int, down: bool) -> None:
        self.sock.sendall(struct.pack(">BBxxI", 4, down, keysym))

    def pointer(self, mask: int, x: int, y: int) -> None:
        self.sock.sendall(struct.pack(">BBHH", 5, mask, x, y))

    def close(self) -> None:
        self.sock.close()
