"""The vectorised RFB decoders (``modules.supporter.rfb_decode``) against the per-pixel loops
they replaced: bit-exact output and the same refusals, on generated and hostile input."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modules.supporter.rfb_decode import DecodeError, gradient, zrle_tile

from .test_rfb_client import ZrleEncoder


# --- references: the loops as the protocol describes them ------------------------------------

def gradient_reference(diff: np.ndarray) -> np.ndarray:
    h, w, _ = diff.shape
    out = np.zeros((h + 1, w + 1, 3), np.int32)
    d = diff.astype(np.int32)
    for row in range(h):
        up = out[row]
        cur = out[row + 1]
        for col in range(w):
            pred = np.clip(cur[col] + up[col + 1] - up[col], 0, 255)
            cur[col + 1] = (pred + d[row, col]) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _need(raw: bytes, pos: int, n: int) -> None:
    if pos + n > len(raw):
        raise DecodeError("ZRLE tile data ends early")


def zrle_tile_reference(raw: bytes, pos: int, tw: int, th: int) -> tuple[np.ndarray, int]:
    """Decode one ZRLE tile (CPIXEL = 3 bytes B G R); return RGB pixels and the new position."""
    _need(raw, pos, 1)
    sub = raw[pos]
    pos += 1
    n = tw * th
    if sub == 0:                                             # raw cpixels
        _need(raw, pos, n * 3)
        px = np.frombuffer(raw, np.uint8, n * 3, pos).reshape(th, tw, 3)[..., ::-1]
        return px, pos + n * 3
    if sub == 1:                                             # solid
        _need(raw, pos, 3)
        return np.frombuffer(raw, np.uint8, 3, pos)[::-1], pos + 3
    if 2 <= sub <= 16:                                       # packed palette
        _need(raw, pos, sub * 3)
        palette = np.frombuffer(raw, np.uint8, sub * 3, pos).reshape(sub, 3)[:, ::-1]
        pos += sub * 3
        bits = 1 if sub == 2 else 2 if sub <= 4 else 4
        row = (tw * bits + 7) // 8
        _need(raw, pos, row * th)
        packed = np.frombuffer(raw, np.uint8, row * th, pos).reshape(th, row)
        pos += row * th
        unpacked = np.unpackbits(packed, axis=1).reshape(th, row * 8 // bits, bits)
        weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
        idx = (unpacked * weights).sum(axis=2)[:, :tw]
        if idx.max() >= sub:
            raise DecodeError(f"ZRLE palette index {int(idx.max())} beyond {sub} colours")
        return palette[idx], pos
    if sub == 128 or sub >= 130:                             # plain RLE / palette RLE
        palette = None
        if sub >= 130:
            size = sub - 128
            _need(raw, pos, size * 3)
            palette = np.frombuffer(raw, np.uint8, size * 3, pos).reshape(size, 3)[:, ::-1]
            pos += size * 3
        out = np.empty((n, 3), np.uint8)
        done = 0
        end = len(raw)
        while done < n:
            if palette is None:
                if pos + 3 > end:
                    raise DecodeError("ZRLE tile data ends early")
                colour = raw[pos + 2], raw[pos + 1], raw[pos]
                pos += 3
                run_follows = True
            else:
                if pos >= end:
                    raise DecodeError("ZRLE tile data ends early")
                index = raw[pos]
                pos += 1
                run_follows = bool(index & 0x80)
                index &= 0x7F
                if index >= len(palette):
                    raise DecodeError(f"ZRLE palette index {index} beyond {len(palette)} "
                                         f"colours")
                colour = palette[index]
            run = 1
            if run_follows:
                while True:
                    if pos >= end:
                        raise DecodeError("ZRLE tile data ends early")
                    b = raw[pos]
                    pos += 1
                    run += b
                    if b != 255:
                        break
                    if run > n:
                        break
            if done + run > n:
                raise DecodeError(f"ZRLE run of {run} pixels overflows the {tw}x{th} tile")
            out[done:done + run] = colour
            done += run
        return out.reshape(th, tw, 3), pos
    raise DecodeError(f"ZRLE subencoding {sub} is not defined")


# --- gradient ---------------------------------------------------------------------------------

@pytest.mark.parametrize("h, w", [(1, 1), (1, 300), (300, 1), (2, 70), (12, 40), (13, 40),
                                  (40, 13), (64, 64), (100, 37), (513, 9), (9, 600)])
@pytest.mark.parametrize("kind", ["noise", "small", "extremes"])
def test_gradient_is_bit_exact(h, w, kind):
    rng = np.random.default_rng(h * 1000 + w)
    if kind == "noise":
        diff = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif kind == "small":  # a smooth image: small differences, few clamps
        diff = rng.integers(0, 4, (h, w, 3), dtype=np.uint8)
    else:  # 0 and 255 only: the prediction clamps at both ends all the time
        diff = (rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)
    assert np.array_equal(gradient(diff), gradient_reference(diff))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 40), st.integers(1, 40), st.binary(min_size=1, max_size=64), st.data())
def test_gradient_matches_the_reference_on_any_differences(h, w, pattern, data):
    raw = (pattern * (h * w * 3 // len(pattern) + 1))[:h * w * 3]
    if data.draw(st.booleans()):
        raw = data.draw(st.binary(min_size=h * w * 3, max_size=h * w * 3))
    diff = np.frombuffer(raw, np.uint8).reshape(h, w, 3)
    assert np.array_equal(gradient(diff), gradient_reference(diff))


# --- ZRLE tiles -------------------------------------------------------------------------------

def both(raw: bytes, tw: int, th: int):
    """(pixels, pos) from the new decoder and the reference, or the DecodeError each raised."""
    results = []
    for decode in (lambda: zrle_tile(raw, np.frombuffer(raw, np.uint8), 0, tw, th),
                   lambda: zrle_tile_reference(raw, 0, tw, th)):
        try:
            pixels, pos = decode()
            results.append((np.broadcast_to(pixels, (th, tw, 3)).copy(), pos))
        except DecodeError as exc:
            results.append(exc)
    return results


def assert_same(raw: bytes, tw: int, th: int) -> None:
    new, old = both(raw, tw, th)
    if isinstance(old, DecodeError) or isinstance(new, DecodeError):
        assert isinstance(new, DecodeError) and isinstance(old, DecodeError), (new, old)
        return
    assert new[1] == old[1]
    assert np.array_equal(new[0], old[0])


_MODES = [("raw", None), ("solid", 1), ("packed", 2), ("packed", 16), ("rle", 3), ("rle", 40),
          ("prle", 2), ("prle", 5), ("prle", 127)]


@pytest.mark.parametrize("mode, colours, tw, th", [
    (mode, colours, tw, th) for mode, colours in _MODES
    for tw, th in [(64, 64), (13, 7), (1, 1), (64, 1)]
    if (tw, th) != (1, 1) or mode not in ("packed", "prle")])  # a palette tile has two colours
def test_encoded_tiles_decode_like_the_reference(mode, colours, tw, th):
    rng = np.random.default_rng(tw * th)
    if colours is None:
        img = rng.integers(0, 256, (th, tw, 3), dtype=np.uint8)
    else:
        palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
        img = palette[rng.integers(0, colours, (th, tw))]
        img[: th // 2] = img[0, 0]  # long runs too (over 255 pixels in a full tile)
    if mode in ("packed", "prle") and len({tuple(p) for p in img.reshape(-1, 3)}) < 2:
        img[-1, -1] = img[0, 0] ^ 1
    if mode == "solid":
        img[:] = img[0, 0]
    raw = ZrleEncoder().tile(img, mode) + b"\xff\x01trailing"  # the next tile's bytes
    new, old = both(raw, tw, th)
    assert not isinstance(new, Exception) and not isinstance(old, Exception), (new, old)
    assert new[1] == old[1] == len(raw) - 10
    assert np.array_equal(new[0], img) and np.array_equal(old[0], img)


_run_bytes = st.one_of(st.just(b"\x00"), st.just(b"\xfe"), st.just(b"\xff\x00"),
                       st.just(b"\xff\xff\x03"), st.binary(min_size=1, max_size=3))


@st.composite
def rle_tiles(draw):
    """Token streams near the grammar: tokens with short and long runs, cut or padded."""
    palette_mode = draw(st.booleans())
    tokens = []
    for _ in range(draw(st.integers(0, 40))):
        if palette_mode:
            index = draw(st.integers(0, 255))
            tokens.append(bytes((index,)) + (draw(_run_bytes) if index & 0x80 else b""))
        else:
            tokens.append(draw(st.binary(min_size=3, max_size=3)) + draw(_run_bytes))
    body = b"".join(tokens) * draw(st.integers(1, 30))
    if palette_mode:
        size = draw(st.integers(2, 127))
        head = bytes((128 + size,)) + draw(st.binary(min_size=size * 3, max_size=size * 3))
    else:
        head = b"\x80"
    return head + body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rle_tiles(), st.integers(1, 64), st.integers(1, 64))
def test_run_length_tiles_decode_like_the_reference(raw, tw, th):
    assert_same(raw, tw, th)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64), st.integers(1, 64))
def test_arbitrary_tile_bytes_decode_like_the_reference(raw, tw, th):
    assert_same(raw, tw, th)


def test_tile_data_from_a_zlib_stream_is_a_bytes_prefix():
    """The decoder reads a tile from the middle of a rect's inflated data."""
    z = zlib.compressobj()
    data = z.compress(b"\x01\x10\x20\x30" * 3) + z.flush()
    raw = zlib.decompress(data)
    pixels, pos = zrle_tile(raw, np.frombuffer(raw, np.uint8), 4, 8, 8)
    assert pos == 8 and tuple(pixels) == (0x30, 0x20, 0x10)


def test_tight_palette_matches_indexing_for_every_table_shape():
    """Two colours (bitmap rows), up to 4 and up to 16 colours (indices packed into one table
    row where the width allows), more: all give the framebuffer words of ``palette[idx]``
    (B G R 255 in memory); an index beyond the palette is refused."""
    from protocol.rfb_decode import tight_palette, words_as_rgb
    rng = np.random.default_rng(3)
    for n in (2, 3, 4, 5, 16, 17, 200):
        for w in (1, 2, 3, 4, 6, 8, 17, 64):
            pal = rng.integers(0, 256, (n, 3), dtype=np.uint8)
            idx = rng.integers(0, n, (3, w), dtype=np.uint8)
            data = np.packbits(idx, axis=1).tobytes() if n == 2 else idx.tobytes()
            words = tight_palette(pal, data, w, 3)
            assert np.array_equal(words_as_rgb(words), pal[idx]), (n, w)
            assert (words >> 24 == 0xFF).all()
            fb = np.zeros((5, w), np.uint32)             # a full-width rect of a framebuffer
            target = fb[1:4]
            got = tight_palette(pal, data, w, 3, out=target)
            assert np.array_equal(words_as_rgb(got), pal[idx]), (n, w)
            assert got is target or w != 64              # in place where whole rows fit
            assert not fb[0].any() and not fb[4].any()
    with pytest.raises(DecodeError, match="index 3 beyond 3"):
        tight_palette(np.zeros((3, 3), np.uint8), bytes([0, 1, 2, 3]), 4, 1)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 7), st.booleans(), st.data())
def test_rgb_and_bgr_bytes_become_the_same_words_as_the_reference(w, h, offset, tail, data):
    """The stride-3 word views (``rgb_into``, ``bgr_words``) give 0xFFRRGGBB for every pixel
    wherever the pixels sit in their buffer: at its start, after ``offset`` bytes, up to its
    last byte or before more bytes."""
    from protocol.rfb_decode import bgr_words, rgb_into, words_as_rgb
    rgb = np.frombuffer(data.draw(st.binary(min_size=w * h * 3, max_size=w * h * 3)),
                        np.uint8).reshape(h, w, 3)
    pad = b"\xa5" * offset
    buf = pad + rgb.tobytes() + (b"\x5a" if tail else b"")
    out = np.zeros((h + 2, w + 2), np.uint32)          # written inside, left alone around
    rgb_into(out[1:-1, 1:-1], buf, offset)
    assert np.array_equal(words_as_rgb(out[1:-1, 1:-1]), rgb)
    assert (out[1:-1, 1:-1] >> 24 == 0xFF).all() and not out[0].any() and not out[:, 0].any()
    bgr = pad + rgb[..., ::-1].tobytes() + (b"\x5a" if tail else b"")
    words = bgr_words(bgr, offset, w * h)
    assert np.array_equal(words_as_rgb(words).reshape(h, w, 3), rgb)
