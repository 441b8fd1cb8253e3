"""Pixel decoders of the RFB client whose work is not proportional to the bytes received.

Whoever shows a screen feeds these, and zlib lets a few hundred bytes stand for megabytes of
filter input.  So no decoder here runs a Python step per pixel of a large area: the Tight
gradient filter is undone along anti-diagonals (every pixel on one depends only on the two
diagonals before it), ZRLE's run-length tiles are tokenised with array operations.  What is
left per Python step is a diagonal of up to ``GRADIENT_BAND`` pixels, a pixel of a rect at most
``GRADIENT_SCALAR_ROWS`` thin, one of the first ``PLAIN_RLE_SCALAR_TOKENS`` runs of a tile, one
run longer than 255 pixels (at most 16 per tile), or one tile.  bench/rfb_decoder_cost.py has the
figures.  Output is bit-exact with the per-pixel loops of the protocol's description (the
references in tests/test_rfb_decode.py).

Malformed data raises ``DecodeError`` with a reason; the client turns it into its own error.
"""

from __future__ import annotations

import functools

import numpy as np

ZRLE_TILE = 64
GRADIENT_BAND = 512      # rows undone together; bounds the skewed work arrays to ~(w+512)*512*9 B
PLAIN_RLE_SCALAR_TOKENS = 32  # a tile of so few tokens is read token by token
GRADIENT_SCALAR_ROWS = 12  # this thin (on its side), a scalar pass per row beats a step per diagonal


class DecodeError(ValueError):
    """The data does not decode; ``str(exc)`` says why."""


# --- Tight gradient filter ------------------------------------------------------------------

def gradient(diff: np.ndarray) -> np.ndarray:
    """Undo Tight's gradient filter on ``h x w x 3`` uint8 differences: each component was sent
    as ``value - clamp(left + up - upleft, 0, 255)`` modulo 256 (outside the rect counts as 0)."""
    h, w, _ = diff.shape
    if h == 0 or w == 0:
        return np.zeros((h, w, 3), np.uint8)
    if h > w:  # the predictor is symmetric in rows and columns: work with the short side down
        return gradient(diff.transpose(1, 0, 2)).transpose(1, 0, 2).copy()
    if h == 1:  # up and upleft are 0, so the prediction is the left value: a running sum
        return (np.cumsum(diff, axis=1, dtype=np.int64) & 0xFF).astype(np.uint8)
    if h <= GRADIENT_SCALAR_ROWS:
        return _gradient_rows(diff)
    out = np.empty((h, w, 3), np.uint8)
    above = np.zeros((w, 3), np.int16)
    bands = -(-h // GRADIENT_BAND)
    rows = -(-h // bands)  # equal bands: a thin last band would cost a step per column
    for top in range(0, h, rows):
        band = _gradient_band(diff[top:top + rows], above)
        out[top:top + len(band)] = band
        above = band[-1].astype(np.int16)
    return out


def _gradient_band(diff: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Rows ``diff`` (b x w x 3) below the row ``above``, one anti-diagonal per step.

    Cell (r, c) lives at ``cells[r + c + 2, r + 1]``: row -1 (``above``) and column -1 are the
    zero border, and the left, upper and upper-left neighbours of a whole diagonal are slices
    of the two diagonals before it."""
    b, w, _ = diff.shape
    diagonals = w + b - 1
    cells = np.zeros((diagonals + 2, b + 1, 3), np.int16)
    cells[1:w + 1, 0] = above
    # skewed differences: skew[k, r] = diff[r, k - r]; each row shifted right by its index
    padded = np.zeros((b, w + b, 3), np.uint8)
    padded[:, :w] = diff
    skew = np.ascontiguousarray(
        padded.reshape(-1, 3)[:b * diagonals].reshape(b, diagonals, 3).transpose(1, 0, 2))
    work = np.empty((b, 3), np.int16)
    add, sub, low, high, mask = np.add, np.subtract, np.maximum, np.minimum, np.bitwise_and
    for k in range(diagonals):
        lo = k - w + 1 if k >= w else 0
        hi = k + 1 if k < b else b
        t = work[:hi - lo]
        add(cells[k + 1, lo + 1:hi + 1], cells[k + 1, lo:hi], out=t)   # left + up
        sub(t, cells[k, lo:hi], out=t)                                  # - upleft
        low(t, 0, out=t)
        high(t, 255, out=t)
        add(t, skew[k, lo:hi], out=t)
        mask(t, 0xFF, out=cells[k + 2, lo + 1:hi + 1])
    # un-skew: out[r, c] = cells[r + c + 2, r + 1]
    flat = np.ascontiguousarray(cells[2:, 1:].transpose(1, 0, 2)).reshape(-1)
    view = np.lib.stride_tricks.as_strided(
        flat, shape=(b, w, 3), strides=((diagonals + 1) * 3 * flat.itemsize, 3 * flat.itemsize,
                                        flat.itemsize), writeable=False)
    return view.astype(np.uint8)


def _gradient_rows(diff: np.ndarray) -> np.ndarray:
    """A rect of a few rows: the first row is a running sum, each further row one scalar pass
    per colour component (cheaper than a numpy step per diagonal this thin)."""
    h, w, _ = diff.shape
    out = np.empty((h, w, 3), np.uint8)
    out[0] = np.cumsum(diff[0], axis=0, dtype=np.int64) & 0xFF
    for row in range(1, h):
        for ch in range(3):
            up_row = out[row - 1, :, ch].tolist()
            d_row = diff[row, :, ch].tolist()
            values = [0] * w
            left = upleft = 0
            for col in range(w):
                up = up_row[col]
                pred = left + up - upleft
                if pred < 0:
                    pred = 0
                elif pred > 255:
                    pred = 255
                left = (pred + d_row[col]) & 0xFF
                values[col] = left
                upleft = up
            out[row, :, ch] = values
    return out


# --- BGRX words --------------------------------------------------------------------------

# The client's picture is 32-bit words 0xFFRRGGBB (bytes B G R 255 in memory on little-endian
# machines: QImage.Format_RGB32 as is).  The helpers below make such words from the 3-byte pixels
# of the wire with one array operation each: a uint32 view at a stride of 3 bytes reads each
# pixel with one neighbouring byte, and OR-ing 0xFF000000 overwrites that byte.

OPAQUE = np.uint32(0xFF000000)


def word_of(r: int, g: int, b: int) -> int:
    """The framebuffer word of one RGB colour."""
    return 0xFF000000 | (r << 16) | (g << 8) | b


def rgb_into(out: np.ndarray, buf, offset: int = 0) -> None:
    """Write the ``h x w`` RGB pixels (R G B bytes, rows one after another) that start at
    ``offset`` of ``buf`` (bytes, bytearray or a C-contiguous array) into ``out`` (``h x w``
    uint32 words).  A big-endian word ending at each pixel's B is ``? R G B``."""
    h, w = out.shape
    if h == 0 or w == 0:
        return
    if offset >= 1:
        np.bitwise_or(np.ndarray((h, w), ">u4", buf, offset - 1, (3 * w, 3)), OPAQUE, out=out)
        return
    # no byte before the first pixel: that pixel by hand, the rest one word later
    first = bytes(memoryview(buf).cast("B")[offset:offset + 3])
    out[0, 0] = word_of(*first)
    if w > 1:
        np.bitwise_or(np.ndarray((w - 1,), ">u4", buf, offset + 2, (3,)), OPAQUE, out=out[0, 1:])
    if h > 1:
        np.bitwise_or(np.ndarray((h - 1, w), ">u4", buf, offset + 3 * w - 1, (3 * w, 3)),
                      OPAQUE, out=out[1:])


def rgb_array_into(out: np.ndarray, rgb: np.ndarray) -> None:
    """``out`` (``h x w`` words) = ``rgb`` (``h x w x 3`` uint8, any layout)."""
    rgb_into(out, np.ascontiguousarray(rgb, np.uint8))


def bgr_words(buf: bytes, offset: int, n: int) -> np.ndarray:
    """The words of ``n`` B G R pixels at ``offset`` of ``buf`` (a little-endian word starting
    at each pixel's B is ``B G R ?``)."""
    if n == 0:
        return np.zeros(0, np.uint32)
    if offset + 3 * n < len(buf):
        return np.ndarray((n,), "<u4", buf, offset, (3,)) | OPAQUE
    words = np.empty(n, np.uint32)
    if n > 1:
        np.bitwise_or(np.ndarray((n - 1,), "<u4", buf, offset, (3,)), OPAQUE, out=words[:-1])
    b, g, r = buf[offset + 3 * n - 3:offset + 3 * n]
    words[-1] = word_of(r, g, b)
    return words


def words_as_rgb(words: np.ndarray) -> np.ndarray:
    """``... x 3`` RGB of framebuffer words (a view where ``words`` is contiguous)."""
    words = np.asarray(words, np.uint32)
    flat = np.ascontiguousarray(words).reshape(-1)
    return flat.view(np.uint8).reshape(words.shape + (4,))[..., 2::-1]


# --- Tight palette filter -------------------------------------------------------------------

# the eight pixels (most significant bit first) of every byte of a two-colour rect's bitmap
_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)
_BYTES = np.arange(256, dtype=np.uint32)
# for a code byte that holds ``per`` indices of ``bits`` bits, first pixel in the lowest bits:
# the index of each of its pixels
_CODE_INDEX = {per: (_BYTES[:, None] >> (np.arange(per, dtype=np.uint32) * (8 // per)))
               & ((1 << (8 // per)) - 1) for per in (2, 4)}


def tight_palette(palette: np.ndarray, data: bytes, w: int, h: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The ``h x w`` framebuffer words (0xFFRRGGBB) of a Tight palette-filter rect:
    ``palette`` is ``n x 3`` RGB, ``data`` one bit per pixel, rows padded to a byte (two
    colours), or one index byte per pixel.  ``out``: where the words go (the framebuffer's
    rect); when it is contiguous (a full-width rect) they are gathered straight into it and
    ``out`` is returned, else a new array.

    A table gather, not fancy indexing: for two colours each bitmap byte becomes its eight
    pixels at once (a 32-byte row of a 256-row table), for up to 4 (16) colours four (two)
    indices make one byte that picks a row of four (two) pixels, and ``np.take`` copies whole
    rows.  Rows of 8, 16 and 32 bytes are ones numpy's take copies without a call per row, which
    3-byte pixels (24-, 12-, 6-byte rows) are not: ~3x faster per rect."""
    colours = palette.tobytes()
    n = len(colours) // 3
    if n == 2:
        rows = np.frombuffer(data, np.uint8).reshape(h, (w + 7) // 8)
        return _gather(_table(colours, 8), rows, w, h, out)
    idx = np.frombuffer(data, np.uint8).reshape(h, w)
    if idx.max() >= n:
        raise DecodeError(f"Tight palette index {int(idx.max())} beyond {n} colours")
    # few colours: several indices make one byte (code), so fewer (larger) rows are gathered
    if n <= 4 and w % 4 == 0:
        v = idx.view("<u4")                        # i0 | i1 << 8 | i2 << 16 | i3 << 24
        code = v | (v >> 6)
        code |= v >> 12
        code |= v >> 18                            # low byte: i0 | i1 << 2 | i2 << 4 | i3 << 6
        return _gather(_table(colours, 4), code.astype(np.uint8), w, h, out)
    if n <= 16 and w % 2 == 0:
        v = idx.view("<u2")                        # i0 | i1 << 8
        code = (v | (v >> 4)).astype(np.uint8)     # low byte: i0 | i1 << 4
        return _gather(_table(colours, 2), code, w, h, out)
    return _gather(_table(colours, 1), idx, w, h, out)


@functools.lru_cache(maxsize=256)
def _table(colours: bytes, per: int) -> np.ndarray:
    """The gather table of a palette (``colours``: R G B bytes) whose index units hold ``per``
    pixels: 8 (a two-colour bitmap byte), 4 or 2 (a code byte), 1 (an index).  Kept, as a
    server sends the same few palettes again and again (the colours of a text band)."""
    pal = np.frombuffer(colours, np.uint8).reshape(-1, 3).astype(np.uint32)
    words = OPAQUE | (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    if per == 8:
        table = words[_BYTE_BITS]
    elif per == 1:
        table = words
    else:
        full = np.zeros(1 << (8 // per), np.uint32)
        full[:len(words)] = words
        table = full[_CODE_INDEX[per]]
    table.flags.writeable = False
    return table


def _gather(table: np.ndarray, index: np.ndarray, w: int, h: int,
            out: np.ndarray | None) -> np.ndarray:
    """Rows of ``table`` (words) picked by ``index`` (every index is a row of it), as
    ``h x w`` words."""
    per = table.shape[1] if table.ndim == 2 else 1
    if out is not None and out.flags.c_contiguous and index.shape[1] * per == w:
        np.take(table, index, axis=0, out=out.reshape(index.shape + table.shape[1:]),
                mode="clip")
        return out
    return np.take(table, index, axis=0).reshape(h, -1)[:, :w]


# --- ZRLE tiles -----------------------------------------------------------------------------

def _need(raw: bytes, pos: int, n: int) -> None:
    if pos + n > len(raw):
        raise DecodeError("ZRLE tile data ends early")


def zrle_tile(raw: bytes, data: np.ndarray, pos: int, tw: int, th: int) -> tuple[np.ndarray, int]:
    """Decode one ZRLE tile at ``pos`` (CPIXEL = 3 bytes B G R); return ``th x tw x 3`` RGB
    pixels (or one RGB colour for a solid tile) and the position after the tile.  ``data`` is
    ``raw`` as a uint8 array.  (The client uses ``zrle_tile_words``.)"""
    words, pos = zrle_tile_words(raw, data, pos, tw, th)
    return words_as_rgb(np.asarray(words, np.uint32)), pos


def _bgr_array_words(colours: np.ndarray) -> np.ndarray:
    c = colours.astype(np.uint32)
    return OPAQUE | (c[:, 2] << 16) | (c[:, 1] << 8) | c[:, 0]


def zrle_tile_words(raw: bytes, data: np.ndarray, pos: int, tw: int,
                    th: int) -> tuple[np.ndarray | int, int]:
    """Decode one ZRLE tile at ``pos``; return its ``th x tw`` framebuffer words (or one word
    for a solid tile) and the position after the tile."""
    _need(raw, pos, 1)
    sub = raw[pos]
    pos += 1
    n = tw * th
    if sub == 0:                                             # raw cpixels
        _need(raw, pos, n * 3)
        return bgr_words(raw, pos, n).reshape(th, tw), pos + n * 3
    if sub == 1:                                             # solid
        _need(raw, pos, 3)
        b, g, r = raw[pos:pos + 3]
        return word_of(r, g, b), pos + 3
    if 2 <= sub <= 16:                                       # packed palette
        _need(raw, pos, sub * 3)
        palette = bgr_words(raw, pos, sub)
        pos += sub * 3
        bits = 1 if sub == 2 else 2 if sub <= 4 else 4
        row = (tw * bits + 7) // 8
        _need(raw, pos, row * th)
        packed = data[pos:pos + row * th].reshape(th, row)
        pos += row * th
        unpacked = np.unpackbits(packed, axis=1).reshape(th, row * 8 // bits, bits)
        weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.uint8)
        idx = (unpacked * weights).sum(axis=2)[:, :tw]
        if idx.max() >= sub:
            raise DecodeError(f"ZRLE palette index {int(idx.max())} beyond {sub} colours")
        return palette[idx], pos
    if sub >= 130:                                           # palette RLE
        size = sub - 128
        _need(raw, pos, size * 3)
        palette = bgr_words(raw, pos, size)
        pos += size * 3
        colours, runs, pos = _palette_runs(raw, data, pos, n, tw, th, size)
        pixels = palette[colours] if runs is None else np.repeat(palette[colours], runs)
        return pixels.reshape(th, tw), pos
    if sub == 128:                                           # plain RLE
        colours, runs, pos = _plain_runs(raw, data, pos, n, tw, th)
        return np.repeat(_bgr_array_words(colours), runs).reshape(th, tw), pos
    raise DecodeError(f"ZRLE subencoding {sub} is not defined")


def _overflow(run: int, tw: int, th: int) -> DecodeError:
    return DecodeError(f"ZRLE run of {run} pixels overflows the {tw}x{th} tile")


def _palette_runs(raw: bytes, data: np.ndarray, pos: int, n: int, tw: int, th: int,
                  size: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Palette-RLE tokens of one tile: (palette indices, run lengths or None for all ones,
    position after).

    A token is an index byte, and if its top bit is set, run bytes ``255* x`` (x < 255) adding
    up to the run length minus one.  Whether a byte starts a token is a two-state machine
    (index / in a run) in which a byte below 128 always leads to "index", 255 always to "run",
    and 128-254 flips the state, so the state of every byte follows from the last byte of the
    first two kinds and the number of flips since: array operations, no loop per token."""
    if pos + n <= len(raw):
        single = data[pos:pos + n]
        if int(single.max()) < 128:  # n tokens of one pixel each: the common dense case
            if int(single.max()) >= size:
                raise DecodeError(f"ZRLE palette index {int(single.max())} beyond {size} colours")
            return single, None, pos + n
    end = min(len(raw), pos + 2 * n)  # a token holds at least one pixel per two bytes
    seg = data[pos:end]
    m = len(seg)
    if m == 0:
        raise DecodeError("ZRLE tile data ends early")
    to_run = seg == 255
    reset = (seg < 128) | to_run
    # position 0 of the extended arrays is a virtual reset to "index" before the first byte
    flips = np.zeros(m + 1, np.int32)
    np.cumsum(~reset, out=flips[1:])
    last = np.maximum.accumulate(np.where(reset, np.arange(1, m + 1), 0))
    base = np.zeros(m + 1, np.int32)
    base[1:] = to_run
    in_run = np.zeros(m, bool)
    in_run[1:] = ((base[last] + flips[1:] - flips[last]) & 1)[:-1].astype(bool)
    starts = np.flatnonzero(~in_run)
    tokens = seg[starts]
    runs = np.add.reduceat(np.where(in_run, seg, 0).astype(np.int64), starts) + 1
    done = np.cumsum(runs)
    t = int(np.searchsorted(done, n))  # the token that reaches n pixels
    ends = np.append(starts[1:], m)
    # the last token in the window may lack its terminating run byte
    last_complete = not (tokens[-1] & 0x80) or (ends[-1] > starts[-1] + 1 and seg[m - 1] != 255)
    if t >= len(starts):
        raise DecodeError("ZRLE tile data ends early")
    if t == len(starts) - 1 and not last_complete:
        if done[t] > n:
            raise _overflow(int(runs[t]), tw, th)
        raise DecodeError("ZRLE tile data ends early")
    if done[t] != n:
        raise _overflow(int(runs[t]), tw, th)
    colours = tokens[:t + 1] & 0x7F
    if int(colours.max()) >= size:
        raise DecodeError(f"ZRLE palette index {int(colours.max())} beyond {size} colours")
    return colours, runs[:t + 1], pos + int(ends[t])


class _Stride:
    """The tokens of a plain-RLE window that start at offsets ``a, a+4, a+8, ...``: their
    colours, their first run byte, the running pixel count if each run were that one byte,
    and which of them have a first run byte of 255 (a run of 256 pixels or more)."""

    def __init__(self, window: np.ndarray, a: int) -> None:
        count = (len(window) - a) // 4
        quads = window[a:a + 4 * count].reshape(count, 4)
        self.colours = quads[:, :3]
        self.runs = quads[:, 3].astype(np.int64) + 1
        self.done = np.cumsum(self.runs)
        self.longs = np.flatnonzero(quads[:, 3] == 255)

    def pixels_before(self, j: int) -> int:
        return int(self.done[j - 1]) if j else 0


def _plain_runs(raw: bytes, data: np.ndarray, pos: int, n: int, tw: int,
                th: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Plain-RLE tokens of one tile: (B G R colours, run lengths, position after).

    A token is a 3-byte CPIXEL and run bytes ``255* x``.  Runs shorter than 256 pixels make
    4-byte tokens, so from any token on, the tokens up to the first run of 256 or more lie at
    a stride of 4 (``_Stride``, computed once per offset modulo 4); that longer run (at most 16
    per tile) is read on its own and the stride goes on after it."""
    colour_parts, run_parts = [], []
    pos, remaining = _few_plain_runs(raw, pos, n, tw, th, colour_parts, run_parts)
    if remaining == 0:
        return _joined(colour_parts, run_parts) + (pos,)
    window = data[pos:min(len(raw), pos + 4 * remaining)]  # at least a pixel per 4 bytes
    m = len(window)
    strides: dict[int, _Stride] = {}
    offset = 0
    while True:
        a = offset % 4
        stride = strides.get(a)
        if stride is None:
            stride = strides[a] = _Stride(window, a)
        j0 = offset // 4
        count = len(stride.done)
        k = int(stride.longs.searchsorted(j0))
        first_long = int(stride.longs[k]) if k < len(stride.longs) else count
        before = stride.pixels_before(j0)
        t = int(stride.done.searchsorted(before + remaining))
        if t < first_long:  # the tile ends within this stretch of short runs
            if int(stride.done[t]) != before + remaining:
                raise _overflow(int(stride.runs[t]), tw, th)
            colour_parts.append(stride.colours[j0:t + 1])
            run_parts.append(stride.runs[j0:t + 1])
            break
        if first_long >= count:
            raise DecodeError("ZRLE tile data ends early")
        if first_long > j0:
            colour_parts.append(stride.colours[j0:first_long])
            run_parts.append(stride.runs[j0:first_long])
            remaining -= stride.pixels_before(first_long) - before
        # the long run: 255 bytes, then one below 255
        offset = a + 4 * first_long
        q = offset + 3
        run = 1
        while True:
            if q >= m:
                if pos + q >= len(raw):
                    raise DecodeError("ZRLE tile data ends early")
                raise _overflow(run, tw, th)
            b = int(window[q])
            q += 1
            run += b
            if b != 255:
                break
            if run > remaining:
                raise _overflow(run, tw, th)
        if run > remaining:
            raise _overflow(run, tw, th)
        colour_parts.append(window[offset:offset + 3].reshape(1, 3))
        run_parts.append(np.array([run], np.int64))
        remaining -= run
        offset = q
        if remaining == 0:
            return _joined(colour_parts, run_parts) + (pos + offset,)
    end_offset = a + 4 * (t + 1)
    return _joined(colour_parts, run_parts) + (pos + end_offset,)


def _few_plain_runs(raw: bytes, pos: int, n: int, tw: int, th: int, colour_parts: list,
                    run_parts: list) -> tuple[int, int]:
    """Read up to ``PLAIN_RLE_SCALAR_TOKENS`` tokens one by one (cheaper than setting up the
    strides for a tile of a few long runs); return the position and the pixels still due."""
    colours = bytearray()
    runs: list[int] = []
    end = len(raw)
    remaining = n
    for _ in range(PLAIN_RLE_SCALAR_TOKENS):
        if pos + 4 > end:
            raise DecodeError("ZRLE tile data ends early")
        q = pos + 3
        run = 1
        while True:
            if q >= end:
                raise DecodeError("ZRLE tile data ends early")
            b = raw[q]
            q += 1
            run += b
            if b != 255:
                break
            if run > remaining:
                raise _overflow(run, tw, th)
        if run > remaining:
            raise _overflow(run, tw, th)
        colours += raw[pos:pos + 3]
        runs.append(run)
        remaining -= run
        pos = q
        if remaining == 0:
            break
    if runs:
        colour_parts.append(np.frombuffer(bytes(colours), np.uint8).reshape(-1, 3))
        run_parts.append(np.array(runs, np.int64))
    return pos, remaining


def _joined(colour_parts: list, run_parts: list) -> tuple[np.ndarray, np.ndarray]:
    if len(colour_parts) == 1:
        return colour_parts[0], run_parts[0]
    return np.concatenate(colour_parts), np.concatenate(run_parts)
