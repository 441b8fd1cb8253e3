"""RFB server: sans-I/O unit tests with an independent decoder, hypothesis on the parser, and
end-to-end runs on Xvfb against real VNC clients (vncsnapshot, TigerVNC's viewer) and XTest."""

from __future__ import annotations

import io
import os
import struct
import time

import numpy as np
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from twisted.internet import threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import globalLogPublisher

from modules.common.screen.rfb_server import (
    COPYRECT, DESKTOP_SIZE, EXTENDED_DESKTOP_SIZE, RAW, RICH_CURSOR, TIGHT, ZRLE, ClientCutText,
    ClientInit, Cursor, FramebufferUpdateRequest, KeyEvent, Move, PointerEvent, Rect, RFBError,
    RFBServer, SetEncodings, SetPixelFormat, as_rgb,
)
from modules.common.screen.capture_x11 import DamageTracker, ScreenSource, find_scroll, tile_damage
from modules.common.terminal.stream_cli import window_choice
from tests.fixtures_server import run_cli
from tests.fixtures_x11 import mss_grab_buffers, require, wait_for_window, xvfb, xvfb_factory  # noqa: F401
from tests.rfb_decoder import PF, BlockingRFBClient, Decoder

W, H = 300, 200


def handshake(server: RFBServer, encodings: list[int] | None, pf: PF | None = None) -> None:
    assert server.initial() == b"RFB 003.008\n"
    server.receive(b"RFB 003.008\n")
    assert server.data_to_send() == b"\x01\x01"
    server.receive(b"\x01")
    assert server.data_to_send() == b"\0\0\0\0"
    assert server.receive(b"\x01") == [ClientInit(True)]
    init = server.data_to_send()
    assert struct.unpack(">HH", init[:4]) == (server.width, server.height)
    msg = b""
    if pf is not None:
        msg += b"\0\0\0\0" + pf.pack()
    if encodings is not None:
        msg += struct.pack(f">BxH{len(encodings)}i", 2, len(encodings), *encodings)
    server.receive(msg)


def request(server: RFBServer, incremental=False, x=0, y=0, w=W, h=H) -> None:
    server.receive(struct.pack(">BBHHHH", 3, incremental, x, y, w, h))


def test_image() -> np.ndarray:
    """Flat areas (fill/palette tiles), text-like two-colour tiles, a gradient, noise."""
    rng = np.random.default_rng(3)
    img = np.zeros((H, W, 3), np.uint8)
    img[:40] = (200, 30, 40)
    img[40:80] = (255, 255, 255)
    img[40:80, ::3] = (0, 0, 0)
    yy, xx = np.mgrid[0:60, 0:W]
    img[80:140, :, 0] = xx % 256
    img[80:140, :, 1] = yy * 4
    img[80:140, :, 2] = 128
    img[140:] = rng.integers(0, 256, (60, W, 3))
    img[150:170, 10:70] = (0, 255, 0)
    return img


test_image.__test__ = False  # a helper, not a test

PIXEL_FORMATS = {
    "rgb888": PF(),
    "bgr888-be": PF(big=True, rs=0, gs=8, bs=16),
    "rgb888-high": PF(rs=24, gs=16, bs=8),
    "rgb888-split": PF(rs=0, gs=8, bs=24),
    "rgb565": PF(bpp=16, depth=16, rmax=31, gmax=63, bmax=31, rs=11, gs=5, bs=0),
    "rgb565-be": PF(bpp=16, depth=16, big=True, rmax=31, gmax=63, bmax=31, rs=11, gs=5, bs=0),
    "bgr233": PF(bpp=8, depth=8, rmax=7, gmax=7, bmax=3, rs=0, gs=3, bs=6),
}


def quantised(img: np.ndarray, pf: PF) -> np.ndarray:
    """What a lossless encoding must deliver: the image through the client's colour depth."""
    out = np.empty_like(img)
    for c in range(3):
        m = pf.max[c]
        v = (img[..., c].astype(np.uint32) * m + 127) // 255
        out[..., c] = (v * 255 + m // 2) // m
    return out


# ------------------------------------------------------------------------- encodings
def bgrx(img: np.ndarray) -> np.ndarray:
    out = np.full(img.shape[:2] + (4,), 255, np.uint8)
    out[..., :3] = img[..., ::-1]
    return out


@pytest.mark.parametrize("layout", ["rgb", "bgrx"])
@pytest.mark.parametrize("pf_name", sorted(PIXEL_FORMATS))
@pytest.mark.parametrize("encodings", [[RAW], [ZRLE], [TIGHT], [TIGHT, ZRLE, RAW]])
def test_lossless_encodings_decode_to_the_frame(pf_name, encodings, layout):
    pf = PIXEL_FORMATS[pf_name]
    server = RFBServer((W, H), name="t")
    handshake(server, encodings, pf)
    request(server)
    img = test_image()
    data = server.update(img if layout == "rgb" else bgrx(img), None)
    dec = Decoder(W, H, pf)
    dec.update(io.BytesIO(data).read)
    assert {r[4] for r in dec.rects} == {encodings[0]}
    assert np.array_equal(dec.fb, quantised(img, pf))
    if encodings[0] != RAW:
        assert len(data) < W * H * pf.bpp // 8          # it compresses


def test_tight_jpeg_for_photo_like_tiles_with_quality_level():
    server = RFBServer((W, H), name="t")
    handshake(server, [TIGHT, -23])                    # quality level 9
    request(server)
    img = test_image()
    img[140:] = np.clip(img[80:140] + 7, 0, 255)       # smooth "photo" instead of noise
    data = server.update(img, None)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(data).read)
    controls = _tight_controls(data)
    assert 0x90 in controls and controls - {0x90}     # JPEG tiles and lossless (palette) ones
    diff = np.abs(dec.fb.astype(int) - img.astype(int))
    assert diff.mean() < 2.0
    assert np.array_equal(dec.fb[:40], img[:40])       # flat area stays exact
    # without a quality level there is no JPEG, and the result is exact
    server = RFBServer((W, H), name="t")
    handshake(server, [TIGHT, -250])                    # compression level only
    request(server)
    data = server.update(img, None)
    assert 0x90 not in _tight_controls(data)


def _tight_controls(data: bytes) -> set[int]:
    """The Tight compression-control bytes of an update (walks rect headers with a decoder)."""
    controls = set()
    rd = io.BytesIO(data)
    dec = Decoder(W, H)
    orig = dec._tight

    def spy(read, x, y, w, h):
        pos = rd.tell()
        controls.add(data[pos])
        orig(read, x, y, w, h)
    dec._tight = spy
    dec.update(rd.read)
    return controls


def test_copyrect_for_a_scroll_and_damage_only_after():
    img = test_image()
    scrolled = img.copy()
    scrolled[0:150] = img[30:180]                      # scrolled up by 30 rows
    scrolled[150:] = (9, 9, 9)
    tracker = DamageTracker()
    tracker.update(img)
    damage, moves = tracker.update(scrolled)
    assert moves and moves[0].src_y - moves[0].y == 30
    server = RFBServer((W, H), name="t")
    handshake(server, [ZRLE, COPYRECT])
    request(server)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(server.update(img, None)).read)
    request(server, incremental=True)
    data = server.update(scrolled, damage, moves=moves)
    dec.update(io.BytesIO(data).read)
    assert dec.rects[0][4] == COPYRECT
    assert np.array_equal(dec.fb, scrolled)
    # a client without CopyRect gets the same area as pixels
    server = RFBServer((W, H), name="t")
    handshake(server, [ZRLE])
    request(server)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(server.update(img, None)).read)
    request(server, incremental=True)
    dec.update(io.BytesIO(server.update(scrolled, damage, moves=moves)).read)
    assert COPYRECT not in {r[4] for r in dec.rects}
    assert np.array_equal(dec.fb, scrolled)


def test_find_scroll_and_tile_damage():
    img = test_image()
    assert find_scroll(img, img, Rect(0, 0, W, H)) is None
    a, b = bgrx(img), bgrx(img)
    b[10, 10, 0] ^= 1
    assert tile_damage(a, b) == [Rect(0, 0, 64, 64)]
    assert tile_damage(img, img) == []
    changed = img.copy()
    changed[70, 130] = (1, 2, 3)
    assert tile_damage(img, changed) == [Rect(128, 64, 64, 64)]
    changed[199, 299] = (1, 2, 3)
    assert Rect(256, 192, 44, 8) in tile_damage(img, changed)     # clipped at the edge


@pytest.mark.parametrize("encodings", [None, [], [1234, -5, 99]])
def test_no_or_unknown_encodings_get_raw(encodings):
    server = RFBServer((W, H), name="t")
    handshake(server, encodings)
    request(server)
    data = server.update(test_image(), None)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(data).read)
    assert [r[4] for r in dec.rects] == [RAW]
    assert np.array_equal(dec.fb, test_image())


def test_request_larger_than_screen_is_clipped():
    server = RFBServer((W, H), name="t")
    handshake(server, [ZRLE])
    request(server, x=250, y=150, w=65535, h=65535)
    data = server.update(test_image(), [Rect(-100, -100, 10000, 10000)])
    dec = Decoder(W, H)
    dec.update(io.BytesIO(data).read)                  # asserts every rect is inside
    assert [r[:4] for r in dec.rects] == [(250, 150, 50, 50)]
    request(server, x=5000, y=5000, w=10, h=10)        # entirely outside: nothing to draw
    assert server.update(test_image(), None) == b""


def test_incremental_update_sends_only_damage_and_waits_for_changes():
    server = RFBServer((W, H), name="t")
    handshake(server, [RAW])
    img = test_image()
    request(server)
    server.update(img, None)
    assert not server.update_pending
    request(server, incremental=True)
    assert server.update(img, []) == b""               # nothing changed: keep waiting
    assert server.update_pending
    dec = Decoder(W, H)
    dec.update(io.BytesIO(server.update(img, [Rect(10, 10, 5, 5)])).read)
    assert [r[:4] for r in dec.rects] == [(10, 10, 5, 5)]
    # damage outside a partial request is sent with a later request
    request(server, incremental=True, x=0, y=0, w=50, h=50)
    assert server.update(img, [Rect(100, 100, 10, 10)]) == b""
    request(server, incremental=True)
    dec.update(io.BytesIO(server.update(img, [])).read)
    assert (100, 100, 10, 10) in [r[:4] for r in dec.rects]


def test_desktop_size_change_and_cursor():
    server = RFBServer((W, H), name="t")
    handshake(server, [ZRLE, DESKTOP_SIZE, RICH_CURSOR])
    request(server)
    dec = Decoder(W, H)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[2:6, 2:6, 3] = 255
    cursor = Cursor(1, 2, rgba)
    dec.update(io.BytesIO(server.update(test_image(), None, cursor=cursor)).read)
    hx, hy, pix, mask = dec.cursor
    assert (hx, hy) == (1, 2) and (pix[..., 0] == 255).all()
    assert list(mask) == [0, 0, 0x3C, 0x3C, 0x3C, 0x3C, 0, 0]
    bigger = np.full((H + 40, W + 60, 3), 77, np.uint8)
    request(server, incremental=True)
    data = server.update(bigger, [], cursor=Cursor(1, 2, rgba.copy()))   # same cursor: not resent
    dec.update(io.BytesIO(data).read)
    assert [r[4] for r in dec.rects][0] == DESKTOP_SIZE
    assert RICH_CURSOR not in [r[4] for r in dec.rects]
    assert dec.fb.shape == bigger.shape and np.array_equal(dec.fb, bigger)
    # a client that cannot be told gets the old size (cropped), never a rect outside it
    server = RFBServer((W, H), name="t")
    handshake(server, [RAW])
    request(server)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(server.update(bigger, None)).read)
    assert dec.fb.shape == (H, W, 3) and (dec.fb == 77).all()


def test_extended_desktop_size_initial_layout_and_refused_resize():
    server = RFBServer((W, H), name="t")
    handshake(server, [RAW, EXTENDED_DESKTOP_SIZE])
    request(server)
    dec = Decoder(W, H)
    dec.update(io.BytesIO(server.update(test_image(), None)).read)
    assert dec.rects[0] == (0, 0, W, H, EXTENDED_DESKTOP_SIZE)
    events = server.receive(struct.pack(">BxHHBx", 251, 800, 600, 1)
                            + struct.pack(">IHHHHI", 0, 0, 0, 800, 600, 0))
    assert [type(e).__name__ for e in events] == ["SetDesktopSize"]
    request(server, incremental=True)
    dec.update(io.BytesIO(server.update(test_image(), [])).read)
    assert dec.rects[0] == (1, 1, W, H, EXTENDED_DESKTOP_SIZE)   # client request, prohibited


# --------------------------------------------------------------------------- parsing
def test_client_messages_parse_to_events():
    server = RFBServer((W, H), name="t")
    handshake(server, None)
    msgs = (b"\0\0\0\0" + PF(bpp=16, depth=16, rmax=31, gmax=63, bmax=31, rs=11, gs=5).pack()
            + struct.pack(">BxH2i", 2, 2, ZRLE, -239)
            + struct.pack(">BBHHHH", 3, 1, 1, 2, 3, 4)
            + struct.pack(">BBxxI", 4, 1, 0x61)
            + struct.pack(">BBHH", 5, 9, 10, 20)
            + struct.pack(">BxxxI", 6, 3) + b"h\xe9y")
    events = server.receive(msgs)
    assert [type(e) for e in events] == [SetPixelFormat, SetEncodings, FramebufferUpdateRequest,
                                         KeyEvent, PointerEvent, ClientCutText]
    assert events[1].encodings == [ZRLE, -239]
    assert events[2] == FramebufferUpdateRequest(True, 1, 2, 3, 4)
    assert events[3] == KeyEvent(True, 0x61) and events[4] == PointerEvent(9, 10, 20)
    assert events[5].text == "hé" + "y"


def test_protocol_3_3_handshake():
    server = RFBServer((W, H), name="name")
    server.initial()
    server.receive(b"RFB 003.003\n")
    assert server.data_to_send() == b"\0\0\0\x01"
    assert server.receive(b"\x00") == [ClientInit(False)]
    assert server.data_to_send().endswith(b"\0\0\0\x04name")


@pytest.mark.parametrize("data, reason", [
    (b"HTTP/1.1 200", "bad protocol version"),
    (b"RFB 002.000\n", "not supported"),
    (b"RFB 003.008\n\x02", "security type"),
    (b"RFB 003.008\n\x01\x01\x07", "unknown client message"),
    (b"RFB 003.008\n\x01\x01\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 0, 255, 255, 255,
                                                  16, 8, 0), "colour-map"),
    (b"RFB 003.008\n\x01\x01\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 24, 24, 0, 1, 255, 255, 255,
                                                  16, 8, 0), "bits-per-pixel"),
    (b"RFB 003.008\n\x01\x01\0\0\0\0" + struct.pack(">BBBBHHHBBB3x", 16, 16, 0, 1, 255, 63, 31,
                                                  11, 5, 0), "does not fit"),
    (b"RFB 003.008\n\x01\x01\x06\0\0\0\xff\xff\xff\xff", "cut text length"),
    (b"RFB 003.008\n\x01\x01\x02\0\xff\xff", "encodings announced"),
])
def test_malformed_input_raises_rfb_error(data, reason):
    server = RFBServer((W, H), name="t")
    server.initial()
    with pytest.raises(RFBError) as err:
        server.receive(data)
    assert reason in err.value.reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(prefix=st.booleans(), data=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_rfb_error(prefix, data):
    server = RFBServer((W, H), name="t")
    server.initial()
    if prefix:
        server.receive(b"RFB 003.008\n\x01\x01")
    try:
        for _ in server.receive(data):
            pass
        server.data_to_send()
        request(server)
        server.update(test_image(), None)
    except RFBError:
        pass


client_message = st.one_of(
    st.builds(lambda e: struct.pack(f">BxH{len(e)}i", 2, len(e), *e),
              st.lists(st.integers(-2**31, 2**31 - 1), max_size=20)),
    st.builds(lambda i, x, y, w, h: struct.pack(">BBHHHH", 3, i, x, y, w, h), st.booleans(),
              *[st.integers(0, 65535)] * 4),
    st.builds(lambda d, k: struct.pack(">BBxxI", 4, d, k), st.booleans(),
              st.integers(0, 2**32 - 1)),
    st.builds(lambda m, x, y: struct.pack(">BBHH", 5, m, x, y), st.integers(0, 255),
              st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda t: struct.pack(">BxxxI", 6, len(t)) + t, st.binary(max_size=50)),
    st.just(b"\0\0\0\0" + PF(bpp=8, depth=8, rmax=7, gmax=7, bmax=3, rs=0, gs=3, bs=6).pack()),
)


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(client_message, max_size=12), cuts=st.lists(st.integers(0, 2000)))
def test_chunking_does_not_change_events(msgs, cuts):
    stream = b"RFB 003.008\n\x01\x01" + b"".join(msgs)
    whole = RFBServer((W, H), name="t")
    whole.initial()
    expected = whole.receive(stream)
    pieces = RFBServer((W, H), name="t")
    pieces.initial()
    got = []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(points, points[1:]):
        got.extend(pieces.receive(stream[a:b]))
    assert got == expected
    assert len(expected) == len(msgs) + 1               # ClientInit + one event per message


# -------------------------------------------------------------------- on a real display
def mss_rgb(display: str) -> np.ndarray:
    import mss
    with mss.MSS(display=display) as sct:
        return np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1].copy()


def test_screen_source_window_background_pause(xvfb):
    term = xvfb.xterm("shown", geometry="40x10+100+50", bg="#3050f0")
    src = ScreenSource(xvfb.name)
    try:
        cap = src.capture()
        assert cap.frame.shape == (768, 1024, 4)
        assert np.array_equal(as_rgb(cap.frame), mss_rgb(xvfb.name))
        assert cap.cursor is not None and cap.cursor.rgba.ndim == 3
        src.hide_background = True
        hidden = as_rgb(src.grab())
        assert (hidden[700, 1000] == src.background_colour).all()
        assert (hidden[60, 110] == (0x30, 0x50, 0xF0)).all()       # inside the xterm
        src.select_window("shown")
        w, h = src.size()
        assert 200 < w < 400 and 100 < h < 250
        framed = as_rgb(src.grab())
        assert framed.shape == (h, w, 3)
        assert (np.abs(framed.astype(int) - (0x30, 0x50, 0xF0)).sum(axis=2) == 0).mean() > 0.8
        src.select_window(term.window)
        assert src.size() == (w, h)
        src.select_window(None)
        src.paused = True
        first = src.capture()
        xvfb.xterm("later", geometry="20x5+600+400", bg="#ff0000")
        paused = src.capture()
        assert paused.damage == [] and paused.frame is first.frame
        src.paused = False
        assert src.capture().damage
        # Window choice (issue 16 §5): the two xterms are listed with their ids, and the
        # command line prints the same list (`--list-windows`), ids that `--window` takes.
        listed = {w.title: w for w in src.windows()}
        assert listed["shown"].id == term.window and listed["later"].id != term.window
        assert listed["shown"].rect.x == 100 and listed["shown"].rect.y == 50
        printed = run_cli("host", "run", "--screen", xvfb.name, "--list-windows")
        assert printed.returncode == 0, printed.stderr
        assert f"0x{term.window:08x}  " in printed.stdout
        assert {line.rsplit("  ", 1)[-1] for line in printed.stdout.splitlines()} >= {
            "shown", "later"}
        src.select_window(window_choice(f"0x{listed['later'].id:08x}"))
        assert 100 < src.size()[0] < 250      # 20 columns, not the screen
        unusable = run_cli("customer", "join", "--list-windows")
        assert unusable.returncode == 2 and "--screen DISPLAY" in unusable.stderr
    finally:
        src.close()


@pytest_twisted.ensureDeferred
async def test_rfb_connections_send_without_waiting_for_delayed_acks():
    """TCP_NODELAY on the server's socket: an update's last, short segment goes out at once
    instead of waiting for the viewer's delayed ACK (~40 ms; bench/README.md, Nagle)."""
    import socket

    from twisted.internet import reactor

    from modules.common.screen.rfb_twisted import listen_vnc
    from modules.common.screen.screen_session import FramebufferSource
    port = listen_vnc(reactor, "127.0.0.1:0", FramebufferSource(lambda: np.zeros((48, 64, 3),
                                                                                 np.uint8)))
    viewer = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
    try:
        deadline = time.monotonic() + 10
        while not port.factory.connections and time.monotonic() < deadline:
            await _sleep(reactor, 0.02)
        handle = port.factory.connections[0].transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        viewer.close()
        await port.stopListening()


def x_clients(display) -> int:
    """How many clients the X server has (X-Resource), this query's own included."""
    return len(display.res_query_clients().clients)


@pytest_twisted.ensureDeferred
async def test_a_stopped_screen_releases_the_display_and_a_new_one_connects_again(xvfb):
    """What a session does when its screen stops (end, view withdrawn, direction change):
    ``PresenterScreen.stop`` and ``source.disconnect()``.  Afterwards the X server has none of
    the presenter's connections (capture, shared memory, change watch, input) and the process
    maps no grab buffer; the next session's screen connects again."""
    from Xlib import display as xdisplay
    from twisted.internet import reactor

    from modules.common.screen.input_x11 import XTestInjector
    from modules.common.screen.screen_session import PresenterScreen
    from protocol.rfb_client import FramebufferUpdated, RFBClient
    xvfb.xterm("released", geometry="30x8+40+30", bg="#c04020")
    probe = xdisplay.Display(xvfb.name)
    src = ScreenSource(xvfb.name)
    try:
        src.disconnect()
        before, mapped = x_clients(probe), mss_grab_buffers()
        assert not src.holds_display and mapped == 0
        for _session in range(2):
            client, updates = RFBClient(), []
            screen = PresenterScreen(src, XTestInjector(xvfb.name, lambda: True),
                                     send=lambda data: updates.extend(
                                         e for e in client.receive(data)
                                         if isinstance(e, FramebufferUpdated)),
                                     close=lambda: None)
            screen.start()
            for _ in range(4):
                screen.received(client.data_to_send())
            screen.received(client.request_update(False))
            deadline = time.monotonic() + 20
            while not updates and time.monotonic() < deadline:
                await _sleep(reactor, 0.05)
            assert np.array_equal(client.framebuffer, mss_rgb(xvfb.name))
            assert src.holds_display and mss_grab_buffers() == 1
            assert x_clients(probe) >= before + 3      # capture (2), watch, input
            screen.stop()
            src.disconnect()
            deadline = time.monotonic() + 10          # the watch's thread ends within 0.25 s
            while x_clients(probe) > before and time.monotonic() < deadline:
                await _sleep(reactor, 0.05)
            assert x_clients(probe) == before and mss_grab_buffers() == 0
    finally:
        probe.close()
        src.close()


async def run_tool(*args: str, env: dict | None = None, timeout: int = 20) -> tuple[bytes, int]:
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/timeout", (str(timeout), *args), env=env or os.environ)
    return out + err, code


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("encodings", [None, "zrle", "tight", "raw copyrect"])
async def test_vncsnapshot_matches_the_screen(xvfb, tmp_path, encodings):
    from twisted.internet import reactor

    from modules.common.screen.rfb_twisted import listen_vnc
    require("vncsnapshot")
    xvfb.xterm("snap", geometry="60x20+30+40", bg="#208040",
               extra=("-e", "sh", "-c", "ls -la /usr/bin | head -40; sleep 60"))
    src = ScreenSource(xvfb.name)
    port = listen_vnc(reactor, "127.0.0.1:0", src)
    try:
        snap = tmp_path / "snap.jpg"
        args = ["vncsnapshot", "-quality", "95"]
        if encodings:
            args += ["-encodings", encodings]
        out, code = await run_tool(*args, f"127.0.0.1::{port.getHost().port}", str(snap))
        assert code == 0, out
        got = np.asarray(Image.open(snap).convert("RGB")).astype(int)
        want = mss_rgb(xvfb.name).astype(int)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 2.5, np.abs(got - want).mean()
        conn = port.factory.connections[0]
        assert conn.bytes_sent > 0
        assert conn.rfb.encoding == {None: RAW, "zrle": ZRLE, "tight": TIGHT,
                                     "raw copyrect": RAW}[encodings]
    finally:
        await port.stopListening()
        src.close()


@pytest_twisted.ensureDeferred
async def test_tigervnc_viewer_shows_our_screen(xvfb, xvfb_factory):
    from twisted.internet import reactor

    from modules.common.screen.rfb_twisted import listen_vnc
    viewer_display = xvfb_factory("1280x1024")
    xvfb.xterm("magenta", geometry="50x15+200+200", bg="#ff00ff")
    src = ScreenSource(xvfb.name)
    port = listen_vnc(reactor, "127.0.0.1:0", src)
    try:
        viewer_display.spawn([require("xtigervncviewer"), "-ViewOnly", "-Shared",
                              f"127.0.0.1::{port.getHost().port}"])
        magenta = 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            shot = await threads.deferToThread(mss_rgb, viewer_display.name)
            magenta = int((np.abs(shot.astype(int) - (255, 0, 255)).sum(axis=2) < 40).sum())
            if magenta > 0.8 * 300 * 200:
                break
            await _sleep(reactor, 0.2)
        own = int((np.abs(mss_rgb(xvfb.name).astype(int) - (255, 0, 255)).sum(axis=2) < 40).sum())
        assert own > 0.8 * 300 * 200
        assert magenta > 0.8 * own, (magenta, own)
        conn = port.factory.connections[0]
        assert conn.rfb.encoding == TIGHT                 # TigerVNC prefers Tight
    finally:
        await port.stopListening()
        for conn in port.factory.connections:
            conn.transport.loseConnection()
        src.close()


def _sleep(reactor, seconds: float):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


KEYSYMS = {" ": 0x20, "/": 0x2F, ".": 0x2E, "_": 0x5F, "\n": 0xFF0D, "-": 0x2D}


def type_text(client: BlockingRFBClient, text: str) -> None:
    for ch in text:
        keysym = KEYSYMS.get(ch, ord(ch))
        client.key(keysym, True)
        client.key(keysym, False)


@pytest_twisted.ensureDeferred
async def test_keys_typed_through_rfb_run_a_command_only_with_control(xvfb, tmp_path):
    from twisted.internet import reactor

    from modules.common.screen.input_x11 import XTestInjector
    from modules.common.screen.rfb_twisted import listen_vnc
    xvfb.xterm("typing", geometry="80x24+0+0")
    granted = {"control": False}
    injector = XTestInjector(xvfb.name, lambda: granted["control"])
    src = ScreenSource(xvfb.name)
    port = listen_vnc(reactor, "127.0.0.1:0", src, injector)
    logged = []
    observer = lambda event: logged.append(event)  # noqa: E731
    globalLogPublisher.addObserver(observer)
    denied, marker = tmp_path / "denied", tmp_path / "marker_Ok"

    def session(path):
        client = BlockingRFBClient("127.0.0.1", port.getHost().port, [ZRLE])
        try:
            client.pointer(0, 100, 100)                   # pointer over the xterm: focus
            type_text(client, f"touch {path}\n")
            client.request(False)
            client.next_update()                          # all typed events were processed
        finally:
            client.close()

    try:
        await threads.deferToThread(session, denied)
        await _sleep(reactor, 0.5)
        assert not denied.exists()
        assert injector.refused > 10
        assert any("remote control is not granted" in str(e.get("log_format", ""))
                   for e in logged)
        granted["control"] = True
        await threads.deferToThread(session, marker)
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            await _sleep(reactor, 0.1)
        assert marker.exists()
        assert not denied.exists()
    finally:
        globalLogPublisher.removeObserver(observer)
        await port.stopListening()
        injector.close()
        src.close()
