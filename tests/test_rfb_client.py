"""The supporter's RFB client: decoders against a small test encoder, hostile server bytes
(hypothesis), and x11vnc serving an Xvfb display with an xterm as the real peer."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from modules.supporter.rfb_client import (COPY_RECT, DESKTOP_SIZE, LAST_RECT, RAW, RICH_CURSOR,
                                          TIGHT, ZRLE, Bell, CursorShape, DesktopResized,
                                          FramebufferUpdated, Rect, RFBClient, RFBClientError,
                                          ScreenLimit, ServerCutText, ServerInit,
                                          compress_level,
                                          quality_level, vnc_auth_response)
from tests.fixtures_x11 import require, start_xvfb, stop_process, wait_for_window

# =============================================================================================
# a minimal RFB *server-side* encoder, just enough to produce test streams
# =============================================================================================


def server_init(w: int, h: int, name: bytes = b"test") -> bytes:
    fmt = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    return struct.pack(">HH", w, h) + fmt + struct.pack(">I", len(name)) + name


def handshake(w: int = 64, h: int = 48, name: bytes = b"test") -> bytes:
    return b"RFB 003.008\n" + b"\x01\x01" + struct.pack(">I", 0) + server_init(w, h, name)


def update(*rects: bytes, count: int | None = None) -> bytes:
    return struct.pack(">BxH", 0, len(rects) if count is None else count) + b"".join(rects)


def header(x: int, y: int, w: int, h: int, enc: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, enc)


def raw_rect(x: int, y: int, img: np.ndarray) -> bytes:
    h, w, _ = img.shape
    px = np.zeros((h, w, 4), np.uint8)
    px[..., :3] = img[..., ::-1]                     # B G R X
    return header(x, y, w, h, RAW) + px.tobytes()


def copy_rect(x: int, y: int, w: int, h: int, sx: int, sy: int) -> bytes:
    return header(x, y, w, h, COPY_RECT) + struct.pack(">HH", sx, sy)


def cpixel(rgb) -> bytes:
    return bytes((int(rgb[2]), int(rgb[1]), int(rgb[0])))


def run_bytes(n: int) -> bytes:
    n -= 1
    return b"\xff" * (n // 255) + bytes((n % 255,))


class ZrleEncoder:
    """Encodes tiles with the subencoding ``mode`` asks for ('auto' picks by colour count)."""

    def __init__(self) -> None:
        self.z = zlib.compressobj()

    def tile(self, t: np.ndarray, mode: str) -> bytes:
        th, tw, _ = t.shape
        flat = [tuple(p) for p in t.reshape(-1, 3)]
        colours = list(dict.fromkeys(flat))
        if mode == "auto":
            mode = "solid" if len(colours) == 1 else "packed" if len(colours) <= 16 else "raw"
        if mode == "raw":
            return b"\x00" + t[..., ::-1].tobytes()
        if mode == "solid":
            assert len(colours) == 1
            return b"\x01" + cpixel(colours[0])
        index = {c: i for i, c in enumerate(colours)}
        if mode == "packed":
            n = len(colours)
            assert 2 <= n <= 16
            bits = 1 if n == 2 else 2 if n <= 4 else 4
            out = bytearray([n]) + b"".join(cpixel(c) for c in colours)
            for row in t:
                acc = nbits = 0
                for p in row:
                    acc = (acc << bits) | index[tuple(p)]
                    nbits += bits
                    if nbits == 8:
                        out.append(acc)
                        acc = nbits = 0
                if nbits:
                    out.append(acc << (8 - nbits))
            return bytes(out)
        runs: list[tuple[tuple, int]] = []
        for p in flat:
            if runs and runs[-1][0] == p:
                runs[-1] = (p, runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        if mode == "rle":
            return b"\x80" + b"".join(cpixel(c) + run_bytes(n) for c, n in runs)
        assert mode == "prle" and 2 <= len(colours) <= 127
        out = bytearray([128 + len(colours)]) + b"".join(cpixel(c) for c in colours)
        for c, n in runs:
            if n == 1:
                out.append(index[c])
            else:
                out += bytes((index[c] | 0x80,)) + run_bytes(n)
        return bytes(out)

    def rect(self, x: int, y: int, img: np.ndarray, mode: str = "auto") -> bytes:
        h, w, _ = img.shape
        data = b"".join(self.tile(img[ty:ty + 64, tx:tx + 64], mode)
                        for ty in range(0, h, 64) for tx in range(0, w, 64))
        comp = self.z.compress(data) + self.z.flush(zlib.Z_SYNC_FLUSH)
        return header(x, y, w, h, ZRLE) + struct.pack(">I", len(comp)) + comp


def compact(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append(n >> 14)
    return bytes(out)


class TightEncoder:
    def __init__(self) -> None:
        self.z = [zlib.compressobj() for _ in range(4)]

    def _data(self, stream: int, data: bytes) -> bytes:
        if len(data) < 12:
            return data
        comp = self.z[stream].compress(data) + self.z[stream].flush(zlib.Z_SYNC_FLUSH)
        return compact(len(comp)) + comp

    def fill(self, x, y, w, h, rgb) -> bytes:
        return header(x, y, w, h, TIGHT) + b"\x80" + bytes(rgb)

    def copy(self, x, y, img, stream=0, reset=0, explicit_filter=False) -> bytes:
        h, w, _ = img.shape
        if reset:
            for i in range(4):
                if reset & (1 << i):
                    self.z[i] = zlib.compressobj()
        control = reset | (stream << 4) | (0x40 if explicit_filter else 0)
        return (header(x, y, w, h, TIGHT) + bytes((control,))
                + (b"\x00" if explicit_filter else b"") + self._data(stream, img.tobytes()))

    def palette(self, x, y, img, stream=1) -> bytes:
        h, w, _ = img.shape
        colours = list(dict.fromkeys(tuple(p) for p in img.reshape(-1, 3)))
        index = {c: i for i, c in enumerate(colours)}
        idx = np.array([index[tuple(p)] for p in img.reshape(-1, 3)], np.uint8).reshape(h, w)
        data = (np.packbits(idx, axis=1).tobytes() if len(colours) == 2 else idx.tobytes())
        return (header(x, y, w, h, TIGHT) + bytes(((stream << 4) | 0x40, 1, len(colours) - 1))
                + b"".join(bytes(c) for c in colours) + self._data(stream, data))

    def gradient(self, x, y, img, stream=2) -> bytes:
        h, w, _ = img.shape
        v = np.zeros((h + 1, w + 1, 3), np.int32)
        v[1:, 1:] = img
        pred = np.clip(v[1:, :-1] + v[:-1, 1:] - v[:-1, :-1], 0, 255)
        diff = ((v[1:, 1:] - pred) & 0xFF).astype(np.uint8)
        return (header(x, y, w, h, TIGHT) + bytes(((stream << 4) | 0x40, 2))
                + self._data(stream, diff.tobytes()))

    def jpeg(self, x, y, img, quality=90) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        data = buf.getvalue()
        h, w, _ = img.shape
        return header(x, y, w, h, TIGHT) + b"\x90" + compact(len(data)) + data


def connected(w: int = 64, h: int = 48, **kw) -> RFBClient:
    client = RFBClient(**kw)
    events = client.receive(handshake(w, h))
    assert events == [ServerInit(w, h, "test")]
    return client


def random_image(rng: np.random.Generator, h: int, w: int, colours: int | None = None):
    if colours is None:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    return palette[rng.integers(0, colours, (h, w))]


# =============================================================================================
# handshake and client messages
# =============================================================================================


def test_handshake_answers_and_queues_pixel_format_and_encodings():
    client = RFBClient(encodings=(ZRLE, RAW, LAST_RECT))
    assert client.receive(b"RFB 003.008\n") == []
    assert client.data_to_send() == b"RFB 003.008\n"
    assert client.receive(b"\x02\x01\x10") == []            # offers None and type 16: picks None
    assert client.data_to_send() == b"\x01"
    client.receive(struct.pack(">I", 0))
    assert client.data_to_send() == b"\x01"                  # ClientInit, shared
    assert client.receive(server_init(800, 600, b"desk")) == [ServerInit(800, 600, "desk")]
    out = client.data_to_send()
    assert out[:4] == b"\x00\x00\x00\x00" and len(out) == 20 + 4 + 12
    assert out[4:20] == struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    assert out[20:] == struct.pack(">BxHiii", 2, 3, ZRLE, RAW, LAST_RECT)
    assert client.framebuffer.shape == (600, 800, 3)
    assert client.request_update(True) == struct.pack(">BBHHHH", 3, 1, 0, 0, 800, 600)
    assert client.request_update(False, 10, 20, 30, 40) == struct.pack(">BBHHHH", 3, 0, 10, 20,
                                                                        30, 40)
    assert client.key(True, 0xFF0D) == b"\x04\x01\x00\x00\x00\x00\xff\x0d"
    assert client.pointer(5, 300, 2) == b"\x05\x05\x01\x2c\x00\x02"
    assert client.cut_text("hé") == b"\x06\x00\x00\x00\x00\x00\x00\x02h\xe9"


def test_rfb_3_3_server_and_vnc_authentication():
    client = RFBClient(password="secret")
    client.receive(b"RFB 003.003\n" + struct.pack(">I", 2))
    assert client.data_to_send() == b"RFB 003.003\n"
    challenge = bytes(range(16))
    client.receive(challenge)
    response = client.data_to_send()
    assert response == vnc_auth_response("secret", challenge) and len(response) == 16
    assert response != challenge
    events = client.receive(struct.pack(">I", 0) + server_init(10, 10))
    assert client.data_to_send()[:1] == b"\x01"
    assert events == [ServerInit(10, 10, "test")]


@pytest.mark.parametrize("data, reason", [
    (b"HTTP/1.1 200\n", "not an RFB server"),
    (b"RFB 004.000\n", "unsupported RFB version"),
    (b"RFB 003.008\n\x00" + struct.pack(">I", 7) + b"go away", "server refused: go away"),
    (b"RFB 003.008\n\x01\x02", "no supported security type"),
    (b"RFB 003.008\n\x01\x01" + struct.pack(">I", 1) + struct.pack(">I", 4) + b"nope",
     "security handshake failed: nope"),
    (b"RFB 003.008\n\x01\x01" + struct.pack(">I", 0) + server_init(0, 10), "desktop size 0x10"),
    (b"RFB 003.008\n\x01\x01" + struct.pack(">I", 0) + server_init(10, 10)[:20]
     + struct.pack(">I", 1 << 30), "desktop name of"),
])
def test_bad_handshakes(data, reason):
    client = RFBClient()
    with pytest.raises(RFBClientError, match=reason):
        client.receive(data)
    with pytest.raises(RFBClientError, match="already failed"):
        client.receive(b"x")


def test_bell_cut_text_and_colour_map_are_read():
    client = connected()
    events = client.receive(b"\x02" + b"\x03\x00\x00\x00" + struct.pack(">I", 5) + b"hall\xf6"
                            + b"\x01\x00" + struct.pack(">HH", 0, 2) + bytes(12) + b"\x02")
    assert events == [Bell(), ServerCutText("hallö"), Bell()]


# =============================================================================================
# decoders
# =============================================================================================


def test_raw_and_copyrect():
    rng = np.random.default_rng(1)
    client = connected(64, 48)
    img = random_image(rng, 48, 64)
    events = client.receive(update(raw_rect(0, 0, img)))
    assert events == [FramebufferUpdated((Rect(0, 0, 64, 48, RAW),))]
    assert np.array_equal(client.framebuffer, img)
    # overlapping copy: source and destination overlap, must behave like a copy from the old fb
    client.receive(update(copy_rect(5, 3, 40, 30, 0, 0), copy_rect(0, 40, 10, 8, 50, 0)))
    expected = img.copy()
    expected[3:33, 5:45] = img[0:30, 0:40]
    expected[40:48, 0:10] = expected[0:8, 50:60]
    assert np.array_equal(client.framebuffer, expected)


@pytest.mark.parametrize("mode, colours", [("raw", None), ("solid", 1), ("packed", 2),
                                           ("packed", 4), ("packed", 16), ("rle", 3),
                                           ("prle", 5), ("prle", 127), ("auto", 9)])
def test_zrle_subencodings(mode, colours):
    rng = np.random.default_rng(2)
    client = connected(150, 100)
    enc = ZrleEncoder()
    img = random_image(rng, 100, 150, colours)
    if mode in ("rle", "prle"):                      # give runs something to do, incl. >255 long
        img[:, :] = img[:, :1] if colours != 127 else img
        img[10:20] = img[0, 0]
    stream = update(enc.rect(0, 0, img, mode))
    # a second rect on the same zlib stream, small and unaligned
    small = random_image(rng, 7, 13, 2)
    stream += update(enc.rect(130, 90, small, "packed" if mode != "solid" else "packed"))
    events = client.receive(stream)
    assert len(events) == 2
    expected = img.copy()
    expected[90:97, 130:143] = small
    assert np.array_equal(client.framebuffer, expected)


def test_tight_fill_copy_palette_gradient_with_stream_resets():
    rng = np.random.default_rng(3)
    client = connected(120, 90)
    enc = TightEncoder()
    expected = np.zeros((90, 120, 3), np.uint8)
    rects = []
    rects.append(enc.fill(0, 0, 120, 90, (10, 200, 30)))
    expected[:, :] = (10, 200, 30)
    a = random_image(rng, 20, 30)
    rects.append(enc.copy(0, 0, a, stream=0))
    expected[0:20, 0:30] = a
    b = random_image(rng, 2, 1)                      # 6 bytes: sent uncompressed (< 12)
    rects.append(enc.copy(40, 0, b, stream=0, explicit_filter=True))
    expected[0:2, 40:41] = b
    c = random_image(rng, 25, 33, 2)                 # 1-bit palette, rows padded
    rects.append(enc.palette(50, 10, c, stream=1))
    expected[10:35, 50:83] = c
    d = random_image(rng, 30, 40, 200)               # 8-bit palette
    rects.append(enc.palette(0, 40, d, stream=1))
    expected[40:70, 0:40] = d
    yy, xx = np.mgrid[0:20, 0:25]
    e = np.stack([xx * 9, yy * 11, (xx + yy) * 5], axis=2).astype(np.uint8)
    e[5, 5] = (255, 0, 255)                          # make the prediction clamp somewhere
    rects.append(enc.gradient(60, 50, e, stream=2))
    expected[50:70, 60:85] = e
    f = random_image(rng, 10, 10)
    rects.append(enc.copy(100, 70, f, stream=3, reset=0b1111))   # all four streams restarted
    expected[70:80, 100:110] = f
    g = random_image(rng, 8, 9, 3)
    rects.append(enc.palette(100, 0, g, stream=1))   # stream 1 after its reset
    expected[0:8, 100:109] = g
    events = client.receive(update(*rects))
    assert len(events) == 1 and len(events[0].rects) == len(rects)
    assert np.array_equal(client.framebuffer, expected)


def test_tight_jpeg_within_tolerance():
    client = connected(96, 64)
    yy, xx = np.mgrid[0:64, 0:96]
    img = np.stack([xx * 2, yy * 3, 128 + 0 * xx], axis=2).astype(np.uint8)
    client.receive(update(TightEncoder().jpeg(0, 0, img)))
    diff = np.abs(client.framebuffer.astype(int) - img.astype(int))
    assert diff.mean() < 2.0 and diff.max() < 24


_KINDS = ("raw", "copyrect", "fill", "tight-copy", "palette-2", "palette-3", "palette-4",
          "palette-5", "palette-16", "palette-17", "gradient", "zrle")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 32 - 1),
       st.lists(st.tuples(st.sampled_from(_KINDS), st.integers(0, 36), st.integers(0, 20),
                          st.integers(1, 37), st.integers(1, 21), st.booleans()),
                min_size=1, max_size=8))
def test_random_rects_give_bgrx_words_of_the_reference_picture(seed, specs):
    """Any mix of rects, full-width or not, at any place: the client's ``pixels`` are B G R 255
    of the picture the rects describe (kept here as RGB with numpy slicing), and
    ``framebuffer`` is that picture."""
    rng = np.random.default_rng(seed)
    W, H = 37, 21
    client = connected(W, H)
    tight, zrle = TightEncoder(), ZrleEncoder()
    expected = np.zeros((H, W, 3), np.uint8)
    rects = []
    for kind, x, y, w, h, full_width in specs:
        if full_width:
            x, w = 0, W
        x, y = min(x, W - 1), min(y, H - 1)
        w, h = min(w, W - x), min(h, H - y)
        colours = int(kind.split("-")[1]) if kind.startswith("palette") else None
        img = random_image(rng, h, w, colours)
        if kind == "raw":
            rects.append(raw_rect(x, y, img))
        elif kind == "copyrect":
            sx, sy = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            rects.append(copy_rect(x, y, w, h, sx, sy))
            img = expected[sy:sy + h, sx:sx + w].copy()
        elif kind == "fill":
            img[:] = img[0, 0]
            rects.append(tight.fill(x, y, w, h, tuple(int(v) for v in img[0, 0])))
        elif kind == "tight-copy":
            rects.append(tight.copy(x, y, img))
        elif colours is not None:
            rects.append(tight.palette(x, y, img))
        elif kind == "gradient":
            rects.append(tight.gradient(x, y, img))
        else:
            rects.append(zrle.rect(x, y, img))
        expected[y:y + h, x:x + w] = img
    stream = b"".join(update(r) for r in rects)     # one update per rect: CopyRect sees the last
    client.receive(stream)
    assert np.array_equal(client.pixels[..., 2::-1], expected)
    assert (client.pixels[..., 3] == 255).all()
    assert np.array_equal(client.framebuffer, expected)


def test_pseudo_encodings_desktop_size_last_rect_cursor():
    client = connected(32, 32)
    cursor_px = np.zeros((3, 10, 4), np.uint8)
    cursor_px[..., 2] = 255                           # red in B G R X
    mask = bytes([0b10000000, 0b01000000]) * 3        # 10 wide: 2 bytes per row
    new = np.full((20, 40, 3), 7, np.uint8)
    events = client.receive(update(
        header(2, 1, 10, 3, RICH_CURSOR) + cursor_px.tobytes() + mask,
        header(0, 0, 40, 20, DESKTOP_SIZE),
        raw_rect(0, 0, new),
        header(0, 0, 0, 0, LAST_RECT),
        count=0xFFFF))
    shape = events[0]
    assert isinstance(shape, CursorShape)
    assert (shape.hotspot_x, shape.hotspot_y, shape.width, shape.height) == (2, 1, 10, 3)
    rgba = np.frombuffer(shape.rgba, np.uint8).reshape(3, 10, 4)
    assert (rgba[..., 0] == 255).all() and rgba[0, 0, 3] == 255 and rgba[0, 1, 3] == 0
    assert rgba[0, 9, 3] == 255 and rgba[0, 8, 3] == 0
    assert events[1] == DesktopResized(40, 20)
    assert isinstance(events[2], FramebufferUpdated) and len(events[2].rects) == 3
    assert client.framebuffer.shape == (20, 40, 3) and (client.framebuffer == 7).all()
    # LastRect ended the update: the next byte is a new message (Bell)
    assert client.receive(b"\x02") == [Bell()]


# =============================================================================================
# bad input
# =============================================================================================


def test_rect_larger_than_the_screen_is_refused_before_buffering():
    client = connected(1024, 768)
    with pytest.raises(RFBClientError,
                       match="rect 0,0 5000x5000 is outside the 1024x768 framebuffer"):
        client.receive(update(header(0, 0, 5000, 5000, RAW)))    # no pixel bytes needed


@pytest.mark.parametrize("rect, reason", [
    (header(1000, 700, 25, 1, RAW), "rect 1000,700 25x1 is outside"),
    (header(0, 768, 1, 1, ZRLE), "outside"),
    (copy_rect(0, 0, 10, 10, 1020, 0), "CopyRect source 1020,0 10x10 is outside"),
    (header(0, 0, 10, 10, 5), "encoding 5 that was not asked for"),
    (header(0, 0, 64, 64, ZRLE) + struct.pack(">I", 1 << 31), "declares"),
    (header(0, 0, 64, 64, TIGHT) + b"\x00" + compact(1 << 21), "declares"),
    (header(0, 0, 64, 64, TIGHT) + b"\xa0", "compression control"),
    (header(0, 0, 64, 64, TIGHT) + b"\x40\x07", "unknown Tight filter 7"),
    (header(0, 0, 64, 64, TIGHT) + b"\x90" + compact(3) + b"abc", "JPEG cannot be decoded"),
    (header(0, 0, 300, 300, RICH_CURSOR), "cursor of 300x300"),
    (header(0, 0, 0, 5, DESKTOP_SIZE), "desktop size 0x5"),
])
def test_bad_rects(rect, reason):
    client = connected(1024, 768)
    with pytest.raises(RFBClientError, match=reason):
        client.receive(update(rect))
    assert client.buffered == 0


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.lists(st.integers(1, 300), max_size=12))
def test_tight_inflater_equals_zlib_however_the_stream_is_cut(data, cuts):
    """Raw inflating after the checked 2-byte header gives zlib's bytes, for any split of the
    compressed stream (the header itself may come one byte at a time); a bad header is
    refused as zlib refuses it."""
    from protocol.rfb_client import TightInflater
    z = zlib.compressobj()
    comp = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    inflater, out, pos = TightInflater(), b"", 0
    for n in cuts + [len(comp)]:
        out += inflater.decompress(comp[pos:pos + n], 1 << 20)
        pos += n
    assert out == data
    for bad in (b"\x78\x9d", b"\x79\x9c", b"\x78\xbb"):    # check bits, method, FDICT
        with pytest.raises(zlib.error):
            TightInflater().decompress(bad + comp[2:], 1 << 20)
    client = connected(64, 48)
    rect = TightEncoder().copy(0, 0, np.zeros((8, 8, 3), np.uint8))
    at = rect.index(b"\x78")                       # the stream's zlib header (CMF 0x78)
    with pytest.raises(RFBClientError, match="zlib stream 0 is corrupt"):
        client.receive(update(rect[:at] + b"\x78\x00" + rect[at + 2:]))


def test_zrle_garbage_and_overflowing_runs():
    client = connected(64, 64)
    with pytest.raises(RFBClientError, match="zlib stream is corrupt"):
        client.receive(update(header(0, 0, 8, 8, ZRLE) + struct.pack(">I", 4) + b"junk"))
    client = connected(8, 8)
    z = zlib.compressobj()
    tile = b"\x80" + cpixel((1, 2, 3)) + run_bytes(65)          # 65 pixels in an 8x8 tile
    comp = z.compress(tile) + z.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(RFBClientError, match="overflows"):
        client.receive(update(header(0, 0, 8, 8, ZRLE) + struct.pack(">I", len(comp)) + comp))
    client = connected(8, 8)
    z = zlib.compressobj()
    tile = b"\x03" + cpixel((1, 1, 1)) * 3 + b"\xff" * 16      # index 3 with 3 colours
    comp = z.compress(tile) + z.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(RFBClientError, match="palette index 3"):
        client.receive(update(header(0, 0, 8, 8, ZRLE) + struct.pack(">I", len(comp)) + comp))


def test_unknown_message_type():
    client = connected()
    with pytest.raises(RFBClientError, match="unknown server message type 77"):
        client.receive(b"\x4d")


# =============================================================================================
# hypothesis
# =============================================================================================

_messages = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda enc, hdr, tail: b"\x00\x00\x00\x01" + hdr[:8] + struct.pack(">i", enc)
              + tail,
              st.sampled_from([RAW, COPY_RECT, ZRLE, TIGHT, DESKTOP_SIZE, LAST_RECT, RICH_CURSOR,
                               5, -1]),
              st.binary(min_size=8, max_size=8), st.binary(max_size=600)),
    st.builds(lambda x, y, w, h, ctl, tail: update(header(x, y, w, h, TIGHT) + bytes([ctl])
                                                   + tail),
              st.integers(0, 70), st.integers(0, 50), st.integers(0, 70), st.integers(0, 50),
              st.integers(0, 255), st.binary(max_size=400)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages, min_size=1, max_size=4))
def test_arbitrary_server_bytes_raise_only_rfb_client_error(chunks):
    client = connected(64, 48)
    for chunk in chunks:
        try:
            client.receive(chunk)
        except RFBClientError as exc:
            assert exc.reason
            break
        h, w, _ = client.framebuffer.shape
        assert (w, h) == (client.width, client.height)
        assert client.buffered <= 64 * 48 * 4 + 1200


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 90), st.integers(0, 70),
       st.lists(st.one_of(st.integers(0, 255), st.sampled_from([0, 1, 2, 5, 16, 17, 128, 129,
                                                                 130, 255])), max_size=400),
       st.booleans(), st.integers(0, 255))
def test_valid_zlib_with_arbitrary_tile_data_raises_only_rfb_client_error(x, y, w, h, payload,
                                                                          tight, control):
    """The bytes inside the zlib stream are hostile too: reach the ZRLE tile and Tight filter
    parsers with well-formed compression around arbitrary content."""
    client = connected(100, 80)
    z = zlib.compressobj()
    comp = z.compress(bytes(payload)) + z.flush(zlib.Z_SYNC_FLUSH)
    if tight:
        kind = control & 0x7F                       # basic compression, any filter bits/streams
        body = bytes((kind,)) + (bytes(payload[:1] or [0]) if kind & 0x40 else b"")
        rect = header(x, y, w, h, TIGHT) + body + compact(len(comp)) + comp
    else:
        rect = header(x, y, w, h, ZRLE) + struct.pack(">I", len(comp)) + comp
    try:
        client.receive(update(rect))
    except RFBClientError as exc:
        assert exc.reason
    assert client.framebuffer.shape == (80, 100, 3)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120))
def test_arbitrary_handshake_bytes_raise_only_rfb_client_error(data):
    try:
        RFBClient(password="pw").receive(data)
    except RFBClientError:
        pass


def _valid_stream(seed: int) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    zrle, tight = ZrleEncoder(), TightEncoder()
    w, h = 70, 50
    fb = np.zeros((h, w, 3), np.uint8)
    data = bytearray(handshake(w, h))
    a = random_image(rng, h, w)
    data += update(raw_rect(0, 0, a))
    fb[:] = a
    b = random_image(rng, 40, 66, 5)
    data += update(zrle.rect(2, 3, b))
    fb[3:43, 2:68] = b
    data += update(copy_rect(0, 0, 20, 10, 30, 30))
    fb[0:10, 0:20] = fb[30:40, 30:50].copy()
    c = random_image(rng, 20, 30, 2)
    d = random_image(rng, 10, 70)
    data += update(tight.palette(40, 30, c), tight.copy(0, 40, d),
                   tight.fill(0, 0, 5, 5, (1, 2, 3)))
    fb[30:50, 40:70] = c
    fb[40:50, 0:70] = d
    fb[0:5, 0:5] = (1, 2, 3)
    data += b"\x02" + b"\x03\x00\x00\x00" + struct.pack(">I", 3) + b"abc"
    e = random_image(rng, 50, 70, 3)
    data += update(zrle.rect(0, 0, e, "prle"))
    fb[:] = e
    return bytes(data), fb


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(1, 4000), max_size=30))
def test_chunking_invariance(seed, cuts):
    data, expected = _valid_stream(seed)
    whole = RFBClient()
    whole_events = whole.receive(data)
    assert np.array_equal(whole.framebuffer, expected)
    split = RFBClient()
    events, pos = [], 0
    for cut in cuts:
        events += split.receive(data[pos:pos + cut])
        pos += cut
    events += split.receive(data[pos:])
    assert events == whole_events
    assert whole.data_to_send() == split.data_to_send()
    assert np.array_equal(split.framebuffer, expected)


def test_byte_by_byte_equals_whole():
    data, expected = _valid_stream(7)
    client = RFBClient()
    events = []
    for i in range(len(data)):
        events += client.receive(data[i:i + 1])
        assert client.buffered < 70 * 50 * 4       # never more than one rect's pixels
    assert len([e for e in events if isinstance(e, FramebufferUpdated)]) == 5
    assert np.array_equal(client.framebuffer, expected)


# =============================================================================================
# real peer: x11vnc serving an Xvfb display with an xterm
# =============================================================================================

BG = (0x1E, 0x64, 0x32)          # xterm background, distinctive green
FG = (0xFF, 0xE0, 0x40)
SCREEN = (640, 480)
XTERM_TITLE = "hausmeister-rfb-test"

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grab(display: str) -> np.ndarray:
    import mss
    with mss.MSS(display=display) as sct:
        arr = np.asarray(sct.grab(sct.monitors[0]))
    return np.ascontiguousarray(arr[..., 2::-1])


def _paint_root(display: str) -> None:
    """Root background: a two-colour checker on top (palette/fill material) and a smooth
    gradient below (photo-like, so Tight picks JPEG when a quality level is asked for)."""
    from Xlib import X, display as xdisplay
    w, h = SCREEN
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=2)
    checker = ((xx // 4 + yy // 4) % 2)[..., None] * np.array([200, 40, 160])
    img = np.where((yy < h // 2)[..., None], checker, img).astype(np.uint8)
    bgrx = np.zeros((h, w, 4), np.uint8)
    bgrx[..., :3] = img[..., ::-1]
    d = xdisplay.Display(display)
    try:
        screen = d.screen()
        pixmap = screen.root.create_pixmap(w, h, screen.root_depth)
        gc = pixmap.create_gc()
        for y0 in range(0, h, 32):
            pixmap.put_image(gc, 0, y0, w, 32, X.ZPixmap, 24, 0, bgrx[y0:y0 + 32].tobytes())
        screen.root.change_attributes(background_pixmap=pixmap)
        screen.root.clear_area(0, 0, 0, 0)
        d.sync()
    finally:
        d.close()


@pytest.fixture(scope="module")
def x_display(tmp_path_factory):
    """Xvfb (from tests.fixtures_x11) with a painted root and an xterm whose shell runs in a
    temporary directory."""
    xd = start_xvfb(f"{SCREEN[0]}x{SCREEN[1]}")
    try:
        _paint_root(xd.name)
        home = tmp_path_factory.mktemp("xterm")
        xd.spawn([require("xterm"), "-T", XTERM_TITLE, "-bg", "#%02x%02x%02x" % BG,
                  "-fg", "#%02x%02x%02x" % FG, "-geometry", "60x12+20+10", "-e", "/bin/sh"],
                 cwd=home)
        wait_for_window(xd.name, XTERM_TITLE)
        deadline = time.monotonic() + 10
        while True:                                  # drawn when its colours show
            img = _grab(xd.name)
            if (img == BG).all(axis=2).sum() > 20000 and (img == FG).all(axis=2).any():
                break
            assert time.monotonic() < deadline, "xterm did not appear"
            time.sleep(0.05)
        time.sleep(0.2)
        yield xd.name, home
    finally:
        xd.stop()


def _x11vnc(display: str, log: Path, auth: list[str]):
    for _attempt in range(3):
        port = _free_port()
        proc = subprocess.Popen([require("x11vnc"), "-display", display, "-rfbport", str(port),
                                 "-localhost", "-noipv6", *auth, "-forever", "-shared",
                                 "-noxdamage", "-quiet", "-o", str(log)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    if s.recv(12) == b"RFB 003.008\n":
                        break
            except OSError:
                time.sleep(0.05)
        else:
            proc.kill()
            proc.wait()
            continue
        try:
            yield port
        finally:
            stop_process(proc, timeout=2)
        return
    pytest.fail(f"x11vnc did not start: {log.read_text() if log.exists() else ''}")


@pytest.fixture(scope="module")
def x11vnc(x_display, tmp_path_factory):
    yield from _x11vnc(x_display[0], tmp_path_factory.mktemp("x11vnc") / "x11vnc.log",
                       ["-nopw"])


def _view(port: int, encodings, until, timeout: float = 10.0) -> RFBClient:
    """Blocking loop: connect, keep an update request outstanding until ``until(client)``."""
    client = RFBClient(encodings=encodings)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(1 << 16)
            assert data, "x11vnc closed the connection"
            events = client.receive(data)
            out = client.data_to_send()
            for ev in events:
                if isinstance(ev, ServerInit):
                    out += client.request_update(False)
                elif isinstance(ev, FramebufferUpdated):
                    if until(client):
                        return client
                    out += client.request_update(True)
            if out:
                sock.sendall(out)
    raise AssertionError("the framebuffer did not reach the expected state in time")


def _matches_screen(display: str, tolerance: float | None = None):
    def check(client: RFBClient) -> bool:
        ref = _grab(display)
        if client.framebuffer.shape != ref.shape:
            return False
        if tolerance is None:
            return bool(np.array_equal(client.framebuffer, ref))
        diff = np.abs(client.framebuffer.astype(np.int16) - ref.astype(np.int16))
        return bool(diff.mean() < tolerance)
    return check


@pytest.mark.parametrize("encodings, tolerance, kinds", [
    pytest.param((RAW,), None, {"raw"}, id="raw"),
    pytest.param((ZRLE,), None, {"zrle"}, id="zrle"),
    pytest.param((TIGHT, compress_level(6)), None, {"tight-copy"}, id="tight-lossless"),
    pytest.param((TIGHT, COPY_RECT, compress_level(2), quality_level(5)), 3.0, {"tight-jpeg"},
                 id="tight-jpeg"),
])
def test_framebuffer_matches_the_xvfb_screen(x_display, x11vnc, encodings, tolerance, kinds):
    display, _ = x_display
    client = _view(x11vnc, encodings + (RICH_CURSOR, DESKTOP_SIZE, LAST_RECT),
                   _matches_screen(display, tolerance))
    assert client.framebuffer.shape == (SCREEN[1], SCREEN[0], 3)
    assert (client.framebuffer == BG).all(axis=2).sum() > 20000      # the xterm is in it
    used = {k for k, n in client.decoded.items() if n}
    assert kinds <= used, used                      # x11vnc really sent what we asked for
    if encodings[0] != RAW:
        assert "raw" not in used
    if tolerance is not None:                       # the lossy region is close, the xterm exact
        fb, ref = client.framebuffer.astype(int), _grab(display).astype(int)
        assert np.abs(fb - ref)[SCREEN[1] // 2:].mean() < tolerance


def test_incremental_updates_follow_a_moving_window(x_display, x11vnc):
    """CopyRect + ZRLE offered; the xterm is moved around and back: every incremental update
    lands where it should.  (x11vnc without a window manager answers with ZRLE, not CopyRect;
    CopyRect decoding is covered by the test encoder above.)"""
    from Xlib import display as xdisplay
    display, _ = x_display
    d = xdisplay.Display(display)
    try:
        win = next(c for c in d.screen().root.query_tree().children
                   if c.get_wm_name() == XTERM_TITLE)
        moves = iter([(60 + 15 * i, 30 + 12 * i) for i in range(10)] + [(20, 10)])
        target = [None]

        def until(client: RFBClient) -> bool:
            if target[0] is None or _matches_screen(display)(client):
                nxt = next(moves, None)
                if nxt is None:
                    return True
                target[0] = nxt
                win.configure(x=nxt[0], y=nxt[1])
                d.sync()
            return False

        client = _view(x11vnc, (COPY_RECT, ZRLE, RICH_CURSOR, LAST_RECT), until)
    finally:
        d.close()
    assert np.array_equal(client.framebuffer, _grab(display))
    assert client.decoded["zrle"] > 10


@pytest_twisted.inlineCallbacks
def test_keys_typed_through_x11vnc_run_a_command(x_display, x11vnc):
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory
    from twisted.internet.task import deferLater
    from modules.common.screen.rfb_client_twisted import RFBClientProtocol

    display, home = x_display
    proto = RFBClientProtocol(encodings=(ZRLE, RICH_CURSOR, DESKTOP_SIZE, LAST_RECT))
    factory = ClientFactory.forProtocol(lambda: proto)
    reactor.connectTCP("127.0.0.1", x11vnc, factory)
    fb = yield proto.first_frame
    assert fb.shape == (SCREEN[1], SCREEN[0], 3)
    assert (fb == BG).all(axis=2).sum() > 20000
    target = home / "typed.txt"
    proto.pointer(0, 100, 60)                         # pointer over the xterm: it gets the keys
    yield deferLater(reactor, 0.2, lambda: None)
    for ch in "echo hausmeister >typed.txt":
        proto.press(ord(ch))
    proto.press(0xFF0D)                               # Return
    deadline = time.monotonic() + 10
    while not (target.exists() and target.read_text() == "hausmeister\n"):
        assert time.monotonic() < deadline, "the typed command did not run"
        yield deferLater(reactor, 0.05, lambda: None)
    # the echo is visible on the screen our client sees: the framebuffer catches up
    deadline = time.monotonic() + 10
    while not np.array_equal(proto.framebuffer, _grab(display)):
        assert time.monotonic() < deadline, "framebuffer did not follow the xterm"
        yield deferLater(reactor, 0.05, lambda: None)
    assert proto.updates > 1 and proto.client.failure is None
    proto.close()
    yield proto.ended


def test_vnc_authentication_against_x11vnc(x_display, tmp_path):
    display, _ = x_display
    server = _x11vnc(display, tmp_path / "x11vnc.log", ["-passwd", "s3cret!x"])
    port = next(server)
    try:
        def connect(password: str | None) -> RFBClient:
            client = RFBClient(encodings=(RAW, RICH_CURSOR), password=password)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                while not client.initialised:
                    data = sock.recv(1 << 16)
                    assert data, "x11vnc closed the connection"
                    client.receive(data)
                    sock.sendall(client.data_to_send())
            return client

        assert connect("s3cret!x").width == SCREEN[0]
        with pytest.raises(RFBClientError, match="security handshake failed"):
            connect("wrong")
        with pytest.raises(RFBClientError, match="no supported security type"):
            connect(None)
    finally:
        server.close()


@pytest_twisted.inlineCallbacks
def test_twisted_adapter_fails_first_frame_on_an_oversized_rect():
    """A hostile server on loopback: the adapter reports the reason and drops the connection."""
    from twisted.internet import reactor
    from twisted.internet.protocol import ClientFactory, Factory, Protocol
    from modules.common.screen.rfb_client_twisted import RFBClientProtocol

    received = bytearray()

    class Hostile(Protocol):
        def connectionMade(self):
            self.transport.write(handshake(1024, 768)[:12])

        def dataReceived(self, data):
            received.extend(data)
            if received == b"RFB 003.008\n":
                self.transport.write(handshake(1024, 768)[12:])
            elif len(received) > 12 + 1 + 1 and b"\x03\x00" in received[14:]:
                self.transport.write(update(header(0, 0, 5000, 5000, RAW)))

    port = reactor.listenTCP(0, Factory.forProtocol(Hostile), interface="127.0.0.1")
    try:
        proto = RFBClientProtocol(encodings=(RAW,))
        reactor.connectTCP("127.0.0.1", port.getHost().port,
                           ClientFactory.forProtocol(lambda: proto))
        with pytest.raises(RFBClientError, match="rect 0,0 5000x5000 is outside the 1024x768"):
            yield proto.first_frame
        reason = yield proto.ended
        assert "5000x5000" in reason
    finally:
        yield port.stopListening()


# =============================================================================================
# the screen limit (checked before the framebuffer is allocated) and CPU per byte received
# =============================================================================================


def test_default_limit_is_8k_in_either_orientation():
    limit = ScreenLimit()
    assert (limit.width, limit.height, limit.pixels) == (7680, 4320, 33_177_600)
    assert limit.refusal("desktop size", 7680, 4320) is None
    assert limit.refusal("desktop size", 4320, 7680) is None      # a portrait 8K screen
    assert limit.refusal("desktop size", 7681, 1) is not None      # no side beyond 7680
    assert limit.refusal("desktop size", 7680, 4321) is not None   # no more pixels than 8K
    assert ScreenLimit.parse(" 1920 x 1080 ") == ScreenLimit(1920, 1080)
    for bad in ("1920", "0x5", "20000x10", "axb", "1920x1080x2"):
        with pytest.raises(ValueError):
            ScreenLimit.parse(bad)


def test_server_init_beyond_the_limit_is_refused_before_allocating():
    """Issue 10, finding 9: a 46-byte ServerInit declaring 16384x16384 allocated 805 MB."""
    import tracemalloc
    client = RFBClient()
    tracemalloc.start()
    try:
        with pytest.raises(RFBClientError) as err:
            client.receive(handshake(16384, 16384))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.value.reason == (
        "server desktop size 16384x16384 (268,435,456 pixels) is larger than this supporter "
        "accepts: at most 7680x4320 (33,177,600 pixels, either orientation); a larger screen "
        "needs --max-screen WxH")
    assert peak < 1 << 20 and client.framebuffer.size == 0


def test_configured_limit_is_kept_on_server_init_and_desktop_size():
    limit = ScreenLimit(640, 480)
    assert connected(480, 640, screen_limit=limit).framebuffer.shape == (640, 480, 3)
    with pytest.raises(RFBClientError, match=r"server desktop size 700x300 \(210,000 pixels\) "
                                             r"is larger .* at most 640x480"):
        RFBClient(screen_limit=limit).receive(handshake(700, 300))
    client = connected(64, 48, screen_limit=limit)
    with pytest.raises(RFBClientError, match="desktop size 641x480 .* at most 640x480"):
        client.receive(update(header(0, 0, 641, 480, DESKTOP_SIZE)))
    assert client.framebuffer.shape == (48, 64, 3)  # the old one was kept, nothing allocated
    client = connected(64, 48, screen_limit=limit)
    assert client.receive(update(header(0, 0, 640, 480, DESKTOP_SIZE))) == [
        DesktopResized(640, 480), FramebufferUpdated((Rect(0, 0, 640, 480, DESKTOP_SIZE),))]


def cpu_seconds(client: RFBClient, data: bytes) -> float:
    start = time.thread_time()
    client.receive(data)
    return time.thread_time() - start


def zrle_rect(w: int, h: int, tile) -> bytes:
    z = zlib.compressobj(9)
    body = b"".join(tile(min(64, w - tx), min(64, h - ty))
                    for ty in range(0, h, 64) for tx in range(0, w, 64))
    comp = z.compress(body) + z.flush(zlib.Z_SYNC_FLUSH)
    return header(0, 0, w, h, ZRLE) + struct.pack(">I", len(comp)) + comp


def test_tight_gradient_costs_little_cpu_per_byte():
    """Issue 10, finding 9: 512x512 gradient from 851 bytes took 1.7 s in a per-pixel loop."""
    z = zlib.compressobj(9)
    comp = z.compress(bytes(512 * 512 * 3)) + z.flush(zlib.Z_SYNC_FLUSH)
    data = update(header(0, 0, 512, 512, TIGHT) + b"\x40\x02" + compact(len(comp)) + comp)
    assert len(data) < 1024
    client = connected(512, 512)
    assert cpu_seconds(client, data) < 0.25          # measured 0.02-0.03 s; was 1.9 s
    assert (client.framebuffer == 0).all()


def test_zrle_run_length_tiles_cost_little_cpu_per_byte():
    """Issue 10, finding 9: palette-RLE 2048x2048 from 5.7 KB took 2.1 s (a loop per pixel);
    plain RLE with one-pixel runs was worse (4 s from 26 KB)."""
    palette_rle = zrle_rect(2048, 2048, lambda tw, th: b"\x82\x00\x00\x00\xff\xff\xff"
                            + bytes(i & 1 for i in range(tw * th)))
    plain_rle = zrle_rect(2048, 2048, lambda tw, th: b"\x80" + b"".join(
        (b"\x00\x00\x00\x00", b"\xff\xff\xff\x00")[i & 1] for i in range(tw * th)))
    for data, budget in ((update(palette_rle), 0.6), (update(plain_rle), 0.8)):
        client = connected(2048, 2048)
        assert cpu_seconds(client, data) < budget    # measured 0.06-0.2 s; was 2.4 s and 4 s
        assert (client.framebuffer[0, :4] == [[0, 0, 0], [255, 255, 255]] * 2).all()
