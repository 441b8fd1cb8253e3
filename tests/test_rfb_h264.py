"""Open H.264 (RFB encoding 50): the rect framing (hypothesis on hostile headers and payloads),
our server's adaptive choice against our own client (sans-I/O), and end to end on Xvfb: our
client asking for H.264 sees the screen within a tolerance and then exactly, a still screen is
not polled (X DAMAGE), and vncsnapshot on the same server still gets Tight and a correct
picture."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from twisted.internet import threads

from modules.common.screen.h264_encoder import H264Encoder
from modules.common.screen.rfb_server import TIGHT as SERVER_TIGHT
from modules.common.screen.rfb_server import Rect as DamageRect
from modules.common.screen.rfb_server import RFBServer
from protocol import rfb_h264
from protocol.rfb_client import (COPY_RECT, DESKTOP_SIZE, H264, LAST_RECT, RICH_CURSOR, TIGHT,
                                 ZRLE, FramebufferUpdated, RFBClient, RFBClientError, ServerInit)
from tests.fixtures_x11 import require, xvfb  # noqa: F401

pytest.importorskip("av")

W, H = 320, 240
LOSSLESS_WITH_H264 = (TIGHT, H264, ZRLE, COPY_RECT, RICH_CURSOR, DESKTOP_SIZE, LAST_RECT)


def picture(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """Coloured bands with text-like blocks and a smooth gradient: what a desktop shows."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    for b, colour in enumerate(rng.integers(0, 256, (6, 3))):
        img[b * h // 6:(b + 1) * h // 6] = colour
    glyphs = np.kron(rng.random((h // 16 + 1, w // 8 + 1)) < 0.3, np.ones((16, 8), bool))
    img[glyphs[:h, :w]] = (250, 250, 250)
    yy, xx = np.mgrid[0:h // 4, 0:w]
    img[:h // 4, :, 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
    img[:h // 4, :, 1] = (yy * 255 // max(h // 4 - 1, 1)).astype(np.uint8)
    return img


def photo(seed: int, h: int = H, w: int = W) -> np.ndarray:
    """A frame of a smooth colourful picture panning ``seed`` steps: what a video shows."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx += 12 * seed
    return np.stack([128 + 100 * np.sin(xx / 47 + yy / 71), 128 + 100 * np.sin(xx / 31),
                     128 + 100 * np.cos(yy / 43 - xx / 101)], axis=2).astype(np.uint8)


def bgrx(img: np.ndarray) -> np.ndarray:
    out = np.full(img.shape[:2] + (4,), 255, np.uint8)
    out[..., :3] = img[..., ::-1]
    return out


def pair(w: int = W, h: int = H, encodings=LOSSLESS_WITH_H264) -> tuple[RFBServer, RFBClient]:
    """Our server and our client, handshake done, byte for byte through memory."""
    server, client = RFBServer((w, h), name="t"), RFBClient(encodings=encodings)
    events = client.receive(server.initial())
    for _ in range(4):
        server.receive(client.data_to_send())
        events += client.receive(server.data_to_send())
    assert events == [ServerInit(w, h, "t")]
    server.receive(client.data_to_send())               # SetPixelFormat + SetEncodings
    return server, client


def exchange(server: RFBServer, client: RFBClient, frame: np.ndarray, damage=None,
             incremental: bool = True) -> list:
    """One request and its answer; the rects' encodings (None: nothing was sent)."""
    server.receive(client.request_update(incremental))
    data = server.update(frame, damage)
    if not data:
        return None
    (update,) = [e for e in client.receive(data) if isinstance(e, FramebufferUpdated)]
    return [r.encoding for r in update.rects]


def close_to(got: np.ndarray, want: np.ndarray) -> None:
    """What H.264 at our settings delivers for text-like pictures: 4:2:0 and quantisation
    smear the edges of the glyph blocks, flat areas and the gradient stay within a few levels
    (PSNR 28 dB or more; the lossless repaint follows)."""
    err = np.abs(got.astype(int) - want.astype(int))
    psnr = 10 * np.log10(255 ** 2 / max(float((err ** 2).mean()), 1e-9))
    assert psnr >= 28 and err.mean() < 6, (psnr, err.mean())
    assert np.percentile(err, 50) <= 3, np.percentile(err, 50)


# ------------------------------------------------------------------------------ framing
@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=8, max_size=8), st.integers(0, 4000), st.integers(0, 4000))
def test_header_parse_bounds_or_refuses(data, w, h):
    try:
        length, flags = rfb_h264.parse_header(data, w, h)
    except rfb_h264.H264Error as exc:
        assert str(exc)
        return
    assert (length, flags) == struct.unpack(">II", data)
    assert length <= rfb_h264.max_length(w, h)
    assert length == 0 or (w and h)


def test_header_round_trip_and_limits():
    assert rfb_h264.parse_header(rfb_h264.header(1234, 3), 64, 64) == (1234, 3)
    with pytest.raises(rfb_h264.H264Error, match="declares"):
        rfb_h264.parse_header(rfb_h264.header(rfb_h264.max_length(64, 64) + 1), 64, 64)
    with pytest.raises(rfb_h264.H264Error, match="0x64"):
        rfb_h264.parse_header(rfb_h264.header(10), 0, 64)
    with pytest.raises(rfb_h264.H264Error, match="7 bytes"):
        rfb_h264.parse_header(b"\0" * 7, 8, 8)


def _key_frame(w: int = 32, h: int = 32) -> bytes:
    return H264Encoder(w, h).encode(picture(1, h, w))


KEY_32 = None


def key_32() -> bytes:
    global KEY_32
    if KEY_32 is None:
        KEY_32 = _key_frame()
    return KEY_32


def h264_rect(x, y, w, h, data: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return (struct.pack(">HHHHi", x, y, w, h, H264)
            + struct.pack(">II", len(data) if length is None else length, flags) + data)


def connected(w: int = 64, h: int = 48, encodings=LOSSLESS_WITH_H264) -> RFBClient:
    server, client = pair(w, h, encodings)
    return client


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 80), st.integers(0, 60), st.integers(0, 80), st.integers(0, 60),
       st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1),
       st.one_of(st.binary(max_size=300), st.sampled_from(["key", "key-cut", "key-flipped"])))
def test_hostile_h264_rects_raise_only_rfb_client_error(x, y, w, h, length, flags, payload):
    """Any header and payload (random bytes, a real key frame cut short or with a bit flipped,
    a rect outside the screen or smaller than the picture): a clear error or a picture, never
    anything else."""
    client = connected(64, 48)
    if payload == "key":
        data = key_32()
    elif payload == "key-cut":
        data = key_32()[:len(key_32()) // 2]
    elif payload == "key-flipped":
        data = bytearray(key_32())
        data[len(data) // 2] ^= 0x55
        data = bytes(data)
    else:
        data = payload
    if length % 3:                    # mostly the true length; sometimes any number at all
        length = len(data)
    message = struct.pack(">BxH", 0, 1) + h264_rect(x, y, w, h, data, flags, length)
    try:
        client.receive(message)
    except RFBClientError as exc:
        assert exc.reason
        with pytest.raises(RFBClientError, match="already failed"):
            client.receive(b"\0")
    assert client.framebuffer.shape == (48, 64, 3)


def test_h264_rect_errors_are_named():
    client = connected(64, 48)
    with pytest.raises(RFBClientError, match="cannot be decoded|no whole picture"):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(0, 0, 32, 32, b"\x00\x00\x01" + b"\x41" * 40))
    client = connected(64, 48)
    with pytest.raises(RFBClientError, match="smaller than its rect"):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(0, 0, 48, 40, key_32()))
    client = connected(64, 48, encodings=(TIGHT, ZRLE))       # did not ask for H.264
    with pytest.raises(RFBClientError, match="encoding 50 that was not asked for"):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(0, 0, 32, 32, key_32()))


def test_contexts_are_per_rect_reset_by_flags_and_at_most_64():
    client = connected(1024, 64)
    data = key_32()
    for i in range(rfb_h264.MAX_CONTEXTS + 1):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(i * 8, 0, 32, 32, data))
    contexts = client._h264
    assert len(contexts) == rfb_h264.MAX_CONTEXTS and contexts.frames == 65
    assert (0, 0, 32, 32) not in contexts._contexts             # the oldest went first
    client.receive(struct.pack(">BxH", 0, 1)
                   + h264_rect(8, 0, 32, 32, b"", rfb_h264.RESET_CONTEXT))
    assert len(contexts) == rfb_h264.MAX_CONTEXTS - 1
    client.receive(struct.pack(">BxH", 0, 1)
                   + h264_rect(0, 0, 32, 32, b"", rfb_h264.RESET_ALL_CONTEXTS | 0xF0))
    assert len(contexts) == 0
    alone = rfb_h264.H264Contexts().decode(0, 0, 32, 32, 0, data)   # one context by itself
    assert np.array_equal(client.framebuffer[:32, 512:544], alone)


def _ue(value: int) -> str:
    value += 1
    return "0" * (value.bit_length() - 1) + format(value, "b")


def _se(value: int) -> str:
    return _ue(2 * value - 1 if value > 0 else -2 * value)


def _scaling_list(deltas: tuple[int, ...]) -> str:
    """A 4x4 scaling list's deltas as coded: a running value of 0 ends the list early."""
    bits, value = "", 8
    for delta in deltas:
        bits += _se(delta)
        value = (value + delta + 256) % 256
        if value == 0:
            break
    return bits


def crafted_sps(width_mbs: int, height_units: int, *, profile: int = 66, frame_mbs_only: int = 1,
                poc_type: int = 2, poc_offsets: tuple[int, ...] = (),
                scaling: tuple[int, ...] = (), refs: int = 1) -> bytes:
    """An SPS NAL (Annex B, emulation prevention applied) declaring the given size: what a
    hostile server would send.  ``scaling``: delta values of one scaling list (high profiles)."""
    bits = format(profile, "08b") + "11000000" + "00101000" + _ue(0)
    if profile == 100:
        bits += _ue(1) + _ue(0) + _ue(0) + "0" + ("1" + "1" + _scaling_list(scaling) + "0" * 7
                                                  if scaling else "0")
    bits += _ue(0) + _ue(poc_type)
    if poc_type == 0:
        bits += _ue(0)
    elif poc_type == 1:
        bits += "0" + _se(0) + _se(0) + _ue(len(poc_offsets)) + "".join(map(_se, poc_offsets))
    bits += _ue(refs) + "0" + _ue(width_mbs - 1) + _ue(height_units - 1) + str(frame_mbs_only)
    bits += ("" if frame_mbs_only else "0") + "1" + "0" + "0" + "1"
    bits += "0" * (-len(bits) % 8)
    out, zeros = bytearray(), 0
    for byte in (int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)):
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return b"\x00\x00\x00\x01\x67" + bytes(out)


def with_sps(sps: bytes, stream: bytes) -> bytes:
    """``stream`` (our encoder's key frame) with its SPS replaced by ``sps``."""
    nals = stream.split(b"\x00\x00\x00\x01")
    return sps + b"".join(b"\x00\x00\x00\x01" + n for n in nals if n and n[0] & 0x1F != 7)


def test_a_hostile_sps_is_refused_before_ffmpeg_allocates_anything():
    """An SPS declaring 8192x8192 in front of a real 32x32 key frame: FFmpeg alone decodes it
    into an 8192x8192 picture (~150 MB, per context); the client refuses the rect before any
    decoder context exists.  Our own streams, odd sizes and 1080p included, pass."""
    hostile = with_sps(crafted_sps(512, 512), key_32())
    assert rfb_h264.sps_sizes(hostile) == [(8192, 8192, 16, 1)]
    client = connected(64, 48)
    with pytest.raises(RFBClientError, match="declares a 8192x8192 picture for a rect of 32x32"):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(0, 0, 32, 32, hostile))
    assert client._h264 is not None and len(client._h264) == 0      # no decoder was created
    contexts = rfb_h264.H264Contexts()
    with pytest.raises(rfb_h264.H264Error, match="declares a 48x32"):   # one macroblock too wide
        contexts.decode(0, 0, 32, 32, 0, with_sps(crafted_sps(3, 2), key_32()))
    with pytest.raises(rfb_h264.H264Error, match="declares a 32x64"):   # interlaced: pairs
        contexts.decode(0, 0, 32, 32, 0, with_sps(crafted_sps(2, 2, frame_mbs_only=0), key_32()))
    with pytest.raises(rfb_h264.H264Error, match="more than 32 sequence parameter sets"):
        contexts.decode(0, 0, 32, 32, 0, crafted_sps(2, 2) * 33)
    with pytest.raises(rfb_h264.H264Error, match="17 reference frames"):
        contexts.decode(0, 0, 32, 32, 0, with_sps(crafted_sps(2, 2, refs=17), key_32()))
    assert len(contexts) == 0
    for w, h in ((32, 32), (33, 17), (1920, 1080)):
        rfb_h264.check_sps(_key_frame(w, h), w, h)


def test_all_contexts_together_keep_at_most_twenty_screens_of_pictures():
    """Each context may be as large as its rect, but 64 of them as large as the screen with
    16 reference frames each made FFmpeg take 3.9 GB at 1080p: together they may keep at
    most ``PICTURES_PER_SCREEN`` screens (a context keeps its references + 3 pictures).  Our
    own stream (one reference) fits five times over on a 64x48 screen; a sixth context of it,
    or one SPS announcing 16 references beside it, is refused before FFmpeg sees it; dropping a
    context gives its share back."""
    assert rfb_h264.PICTURES_PER_SCREEN == 20
    client = connected(64, 48)
    ours = _key_frame(64, 48)
    assert rfb_h264.sps_sizes(ours)[0].held_pixels == 64 * 48 * 4
    for i in range(5):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(i, 0, 64 - i, 48, ours))
    refs_16 = with_sps(crafted_sps(4, 3, refs=16), ours)
    with pytest.raises(RFBClientError, match=r"would keep 0\.1 megapixels .*at most 20 screens"):
        client.receive(struct.pack(">BxH", 0, 1) + h264_rect(5, 0, 59, 48, ours))
    assert len(client._h264) == 5
    contexts = rfb_h264.H264Contexts(framebuffer=lambda: (64, 48))
    contexts.decode(0, 0, 64, 48, 0, ours)
    with pytest.raises(rfb_h264.H264Error, match="would keep"):
        contexts.decode(1, 0, 63, 48, 0, refs_16)                  # 12,288 + 58,368 > 61,440
    contexts.decode(0, 0, 64, 48, rfb_h264.RESET_CONTEXT, b"")
    try:                               # now it fits (whether FFmpeg makes a picture of it)
        contexts.decode(1, 0, 63, 48, 0, refs_16)
    except rfb_h264.H264Error as exc:
        assert "would keep" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.sampled_from([66, 77, 100]),
       st.integers(0, 1), st.sampled_from([0, 1, 2]),
       st.lists(st.integers(-2 ** 20, 2 ** 20), max_size=8),
       st.lists(st.integers(-128, 127), min_size=16, max_size=16))
def test_sps_sizes_reads_what_was_written(width_mbs, height_units, profile, frame_mbs_only,
                                          poc_type, poc_offsets, scaling):
    """Every SPS layout (baseline, main, high with scaling lists; the three picture order
    types; interlaced) is read to the size it declares."""
    sps = crafted_sps(width_mbs, height_units, profile=profile, frame_mbs_only=frame_mbs_only,
                      poc_type=poc_type, poc_offsets=tuple(poc_offsets), scaling=tuple(scaling))
    unit = 16 * (2 - frame_mbs_only)
    assert rfb_h264.sps_sizes(b"junk" + sps + b"\x00\x00\x01\x68\xce") == [
        (width_mbs * 16, height_units * unit, unit, 1)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_sps_bytes_give_a_size_or_a_named_error(body):
    try:
        sizes = rfb_h264.sps_sizes(b"\x00\x00\x01\x67" + body)
    except rfb_h264.H264Error as exc:
        assert str(exc).startswith("H.264")
        return
    assert len(sizes) >= 1 and all(sps.width >= 16 and sps.height >= 16 and sps.refs <= 16
                                   for sps in sizes)


# ------------------------------------------------------------------ server's adaptive choice
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.005, 0.02, 0.05, 0.3, 0.6, 1.0]),
                          st.booleans(), st.sampled_from([0.0, 0.3, 0.6, 1.0])), max_size=30))
def test_skipping_the_photo_sample_never_changes_a_choice(updates):
    """``needs_photo`` False means the choice does not depend on the photo share: a mode fed
    0.0 then decides every update exactly as one fed the true share."""
    from modules.common.screen.rfb_server import _VideoMode
    sampled, skipped = _VideoMode(), _VideoMode()
    for changed, full, photo in updates:
        lazy = photo if skipped.needs_photo(changed) else 0.0
        assert sampled.choose(changed, full, photo) == skipped.choose(changed, full, lazy)


def test_full_screen_video_goes_as_h264_then_a_lossless_repaint():
    server, client = pair()
    first = picture(0)
    assert exchange(server, client, bgrx(first), incremental=False) == [TIGHT] * 20
    assert np.array_equal(client.framebuffer, first)
    for seed in (1, 2, 3):                                    # full-screen changes: video
        frame = photo(seed)
        assert exchange(server, client, bgrx(frame)) == [H264]
        close_to(client.framebuffer, frame)
    assert not np.array_equal(client.framebuffer, frame)      # lossy, as expected
    small = frame.copy()
    small[100:120, 100:120] = (1, 2, 3)
    damage = [DamageRect(100, 100, 20, 20)]                   # 0.5 % of the screen
    assert exchange(server, client, bgrx(small), damage) == [TIGHT]   # small: Tight
    assert exchange(server, client, bgrx(small), []) is None          # quiet...
    assert exchange(server, client, bgrx(small), []) == [TIGHT] * 20  # ...then the repaint
    assert np.array_equal(client.framebuffer, small)
    assert exchange(server, client, bgrx(small), []) is None          # and only once
    assert client.decoded["h264"] == 3


def test_one_text_like_full_screen_change_stays_tight_a_series_goes_h264():
    """A window switch: sharp edges on flat colours, smaller and exact in Tight.  A series of
    them (scrolling, switching): H.264, far cheaper to encode and decode."""
    server, client = pair()
    exchange(server, client, picture(0), incremental=False)
    assert set(exchange(server, client, bgrx(picture(1)))) == {TIGHT}
    assert np.array_equal(client.framebuffer, picture(1))
    assert exchange(server, client, bgrx(picture(1)), []) is None     # no change: no break
    assert exchange(server, client, bgrx(picture(2))) == [H264]
    close_to(client.framebuffer, picture(2))
    assert exchange(server, client, bgrx(picture(3))) == [H264]
    for _ in range(2):
        assert exchange(server, client, bgrx(picture(3)), []) is None
    assert set(exchange(server, client, bgrx(picture(3)), [])) == {TIGHT}   # the repaint
    assert np.array_equal(client.framebuffer, picture(3))
    assert set(exchange(server, client, bgrx(picture(4)))) == {TIGHT}      # a new series


def test_a_moving_picture_in_a_window_goes_as_h264_after_a_streak():
    server, client = pair()
    frame = picture(0)
    exchange(server, client, frame, incremental=False)
    window = DamageRect(64, 64, 128, 64)                      # 10.7 % of the screen
    kinds = []
    for i in range(6):
        frame = frame.copy()
        frame[64:128, 64:192] = photo(i, 64, 128)
        kinds.append(exchange(server, client, frame, [window]))
    assert kinds[:3] == [[TIGHT] * 2] * 3
    assert kinds[3:] == [[H264]] * 3
    close_to(client.framebuffer, frame)


def test_odd_sizes_are_padded_and_cropped():
    server, client = pair(161, 97)
    exchange(server, client, picture(0, 97, 161), incremental=False)
    frame = photo(5, 97, 161)
    assert exchange(server, client, frame) == [H264]
    close_to(client.framebuffer, frame)


def test_clients_without_h264_never_get_it():
    server, client = pair(encodings=(TIGHT, ZRLE, COPY_RECT))
    exchange(server, client, picture(0), incremental=False)
    for seed in (1, 2, 3):
        assert set(exchange(server, client, photo(seed))) == {TIGHT}
        assert np.array_equal(client.framebuffer, photo(seed))
    assert server._h264_encoder is None


def test_first_h264_frame_resets_all_contexts_and_later_ones_do_not():
    server, client = pair()
    exchange(server, client, picture(0), incremental=False)
    flags = []
    for seed in (1, 2):
        server.receive(client.request_update(True))
        data = server.update(photo(seed), None)
        flags.append(struct.unpack(">I", data[4 + 12 + 4:4 + 12 + 8])[0])
        client.receive(data)
    assert flags == [rfb_h264.RESET_ALL_CONTEXTS, 0]


def test_prepared_update_keeps_the_pixel_format_it_was_decided_with():
    """The reactor decides, a worker encodes: a SetEncodings arriving in between does not
    change the update already decided."""
    server, client = pair(encodings=(TIGHT, ZRLE))
    server.receive(client.request_update(False))
    prepared = server.prepare_update(picture(0), None)
    server.receive(client.set_encodings((ZRLE,)))
    (update,) = client.receive(prepared.encode())
    assert {r.encoding for r in update.rects} == {SERVER_TIGHT}
    assert np.array_equal(client.framebuffer, picture(0))


# -------------------------------------------------------------------------- end to end
def _show(display: str, img: np.ndarray, window=None):
    """A full-screen window showing ``img`` (put_image in bands), synced."""
    from Xlib import X
    from Xlib import display as xdisplay
    if window is None:
        d = xdisplay.Display(display)
        screen = d.screen()
        win = screen.root.create_window(0, 0, img.shape[1], img.shape[0], 0, screen.root_depth,
                                        override_redirect=True,
                                        background_pixel=screen.black_pixel)
        win.map()
        gc = win.create_gc()
        window = (d, win, gc)
    d, win, gc = window
    h, w = img.shape[:2]
    px = bgrx(img)
    for y in range(0, h, 32):
        chunk = px[y:y + 32]
        win.put_image(gc, 0, y, w, chunk.shape[0], X.ZPixmap, 24, 0, chunk.tobytes())
    d.sync()
    return window


def _screen(display: str) -> np.ndarray:
    import mss
    with mss.MSS(display=display) as sct:
        return np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1].copy()


async def _until(reactor, predicate, timeout: float = 20.0, what: str = "") -> None:
    from twisted.internet import task
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_e2e_our_client_gets_h264_and_vncsnapshot_still_gets_tight(xvfb, tmp_path):
    from twisted.internet import reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from modules.common.screen.capture_x11 import ScreenSource
    from modules.common.screen.rfb_client_twisted import RFBClientProtocol
    from modules.common.screen.rfb_twisted import listen_vnc
    require("vncsnapshot")
    size = (768, 1024)
    window = _show(xvfb.name, picture(0, *size))
    src = ScreenSource(xvfb.name)
    port = listen_vnc(reactor, "127.0.0.1:0", src)
    viewer = RFBClientProtocol(encodings=LOSSLESS_WITH_H264)
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
                              viewer)
        first = await viewer.first_frame
        assert np.array_equal(first, _screen(xvfb.name))
        # a full-screen change: the viewer shows it from H.264, close to the screen ...
        changed = photo(7, *size)
        changed[300:500, 200:800] = picture(7, 200, 600)         # text in a video
        await threads.deferToThread(_show, xvfb.name, changed, window)
        await _until(reactor, lambda: viewer.client.decoded["h264"] >= 1, what="an H.264 rect")
        await _until(reactor, lambda: np.abs(viewer.framebuffer.astype(int)
                                            - changed.astype(int)).mean() < 6,
                     what="the changed picture")
        close_to(viewer.framebuffer, changed)
        # ... and exactly once the screen is quiet (the lossless repaint)
        await _until(reactor, lambda: np.array_equal(viewer.framebuffer, changed),
                     what="the lossless repaint")
        # a still screen is not polled: the server waits for the X server to report a change
        ours = port.factory.connections[0]
        await _until(reactor, lambda: ours._waiting_for_change, what="waiting for a change")
        captures = ours.captures
        await task.deferLater(reactor, 1.0, lambda: None)
        assert ours.captures - captures <= 3          # polling would have captured ~30 times
        reported = ours._watch.changes
        await threads.deferToThread(_show, xvfb.name, picture(3, *size), window)
        await _until(reactor, lambda: np.array_equal(viewer.framebuffer, picture(3, *size)),
                     what="the next picture")
        assert ours._watch.changes > reported
        # a standard viewer on the same server: no H.264 announced, Tight, a correct picture
        snap = tmp_path / "snap.jpg"
        from twisted.internet.utils import getProcessOutputAndValue
        out, err, code = await getProcessOutputAndValue(
            "/usr/bin/timeout", ("20", "vncsnapshot", "-quality", "95", "-encodings", "tight",
                                 f"127.0.0.1::{port.getHost().port}", str(snap)),
            env=os.environ)
        assert code == 0, out + err
        got = np.asarray(Image.open(snap).convert("RGB")).astype(int)
        assert np.abs(got - picture(3, *size).astype(int)).mean() < 2.5
        ours, standard = port.factory.connections
        assert ours.rfb._h264_encoder is not None
        assert standard.rfb.encoding == SERVER_TIGHT and standard.rfb._h264_encoder is None
    finally:
        viewer.transport.loseConnection()
        await port.stopListening()
        window[0].close()
        src.close()


def test_a_new_screen_size_starts_a_new_context_with_a_key_frame():
    server, client = pair()
    exchange(server, client, picture(0), incremental=False)
    assert exchange(server, client, photo(1)) == [H264]
    small = photo(2, 120, 160)
    assert exchange(server, client, small) == [DESKTOP_SIZE] + [TIGHT] * 6     # 3x2 tiles
    assert np.array_equal(client.framebuffer, small)
    server.receive(client.request_update(True))
    data = server.update(photo(3, 120, 160), None)
    assert struct.unpack(">HHHHiII", data[4:24])[2:] == (160, 120, H264, len(data) - 24,
                                                          rfb_h264.RESET_ALL_CONTEXTS)
    client.receive(data)
    close_to(client.framebuffer, photo(3, 120, 160))
    assert len(client._h264) == 1


def test_a_recorded_stream_with_h264_plays_back():
    """Recordings keep the RFB stream as it was sent; the player (and so the MP4 export)
    decodes its H.264 rects with the same client."""
    from protocol import recording
    from protocol.recording_player import frames
    server, client = RFBServer((W, H), name="t"), RFBClient(encodings=LOSSLESS_WITH_H264)
    sent: list[bytes] = []

    def to_client(data: bytes) -> None:
        sent.append(data)
        client.receive(data)

    to_client(server.initial())
    for _ in range(5):
        server.receive(client.data_to_send())
        to_client(server.data_to_send())
    shown = [picture(0), photo(1), photo(2), photo(3)]
    for i, frame in enumerate(shown):
        server.receive(client.request_update(i > 0))
        to_client(server.update(frame, None))
    assert client.decoded["h264"] == 3                      # every photo-like full change
    entries = [recording.Entry(recording.RFB_OUT, 100 * i, data) for i, data in enumerate(sent)]
    pictures = [picture for _t, picture in frames(entries, fps=10)]
    assert np.array_equal(pictures[-1], client.framebuffer)
    close_to(pictures[-1], shown[-1])


def test_a_composited_screen_is_polled_instead_of_watched(xvfb):
    """With a compositing manager, root-window DAMAGE does not reliably report what is on the
    screen: ``watch_changes`` declines and the RFB server polls as before."""
    from Xlib import X
    from Xlib import display as xdisplay

    from modules.common.screen.capture_x11 import ScreenSource
    src = ScreenSource(xvfb.name)
    d = xdisplay.Display(xvfb.name)
    try:
        watch = src.watch_changes(lambda: None)
        assert watch is not None and not watch.failed
        watch.stop()
        owner = d.screen().root.create_window(0, 0, 1, 1, 0, d.screen().root_depth)
        owner.set_selection_owner(d.intern_atom("_NET_WM_CM_S0"), X.CurrentTime)
        d.sync()
        assert src.watch_changes(lambda: None) is None
    finally:
        d.close()
        src.close()
