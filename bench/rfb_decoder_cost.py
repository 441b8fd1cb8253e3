"""CPU the supporter's RFB client spends per KiB a (hostile) VNC server sends.

Issue 10, finding 9: whoever shows the screen feeds ``modules.supporter.rfb_client``.  Before the
decoders were vectorised, a Tight gradient rect of 512x512 from 851 bytes took 1.7 s and a ZRLE
palette-RLE rect of 2048x2048 from 5.7 KB took 2.1 s (a per-pixel Python loop).  This prints,
for each hostile input and a few honest ones for comparison: bytes received, pixels written, CPU
seconds of the decode (``time.process_time``) and milliseconds per KiB received.

Run: ``.venv/bin/python bench/rfb_decoder_cost.py [--repeat N]``.  Prints figures, never fails.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from modules.supporter.rfb_client import COPY_RECT, TIGHT, ZRLE, RFBClient  # noqa: E402

PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


def handshake(w: int, h: int) -> bytes:
    return (b"RFB 003.008\n" + b"\x01\x01" + struct.pack(">I", 0) + struct.pack(">HH", w, h)
            + PIXEL_FORMAT + struct.pack(">I", 4) + b"test")


def update(*rects: bytes) -> bytes:
    return struct.pack(">BxH", 0, len(rects)) + b"".join(rects)


def header(x: int, y: int, w: int, h: int, enc: int) -> bytes:
    return struct.pack(">HHHHi", x, y, w, h, enc)


def compact(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    if n > 0x7F:
        out[0] |= 0x80
        out.append((n >> 7) & 0x7F)
        if n > 0x3FFF:
            out[1] |= 0x80
            out.append(n >> 14)
    return bytes(out)


def tight_gradient(w: int, h: int, diff: bytes | None = None) -> bytes:
    """A gradient-filtered Tight rect; all-zero differences (a flat area) compress ~1000:1."""
    data = diff if diff is not None else bytes(w * h * 3)
    z = zlib.compressobj(9)
    comp = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    return header(0, 0, w, h, TIGHT) + bytes((0x40, 2)) + compact(len(comp)) + comp


def zrle(w: int, h: int, tile) -> bytes:
    """A ZRLE rect whose every tile is ``tile(tw, th)``."""
    parts = []
    for ty in range(0, h, 64):
        for tx in range(0, w, 64):
            parts.append(tile(min(64, w - tx), min(64, h - ty)))
    z = zlib.compressobj(9)
    comp = z.compress(b"".join(parts)) + z.flush(zlib.Z_SYNC_FLUSH)
    return header(0, 0, w, h, ZRLE) + struct.pack(">I", len(comp)) + comp


def prle_single_pixel_runs(tw: int, th: int) -> bytes:
    return bytes([130]) + b"\x00\x00\x00\xff\xff\xff" + bytes(i & 1 for i in range(tw * th))


def prle_flagged_runs(tw: int, th: int) -> bytes:
    """Every pixel its own token with the run flag and a run byte of 0: two bytes a pixel."""
    return bytes([130]) + b"\x00\x00\x00\xff\xff\xff" + b"".join(
        (b"\x80\x00", b"\x81\x00")[i & 1] for i in range(tw * th))


def rle_single_pixel_runs(tw: int, th: int) -> bytes:
    return b"\x80" + b"".join((b"\x00\x00\x00\x00", b"\xff\xff\xff\x00")[i & 1]
                              for i in range(tw * th))


def rle_long_runs(tw: int, th: int) -> bytes:
    """Runs of 256 pixels: each run length is 255 + 0, the case a 4-byte-token guess misses."""
    n = tw * th
    tokens = [bytes((i & 1,)) * 3 + b"\xff\x00" for i in range(n // 256)]
    rest = n - 256 * len(tokens)
    if rest:
        tokens.append(b"\x07\x07\x07" + bytes((rest - 1,)) if rest <= 255
                      else b"\x07\x07\x07\xff" + bytes((rest - 256,)))
    return b"\x80" + b"".join(tokens)


def rle_mixed_runs(tw: int, th: int) -> bytes:
    """Built against the decoder: 40 one-pixel runs (past its token-by-token start), then 15
    runs of 256 alternating with one-pixel runs (each long run breaks its 4-byte stride)."""
    n = tw * th
    tokens = [b"\x01\x02\x03\x00"] * 40
    left = n - 40
    for _ in range(15):
        if left < 257:
            break
        tokens += [b"\x04\x05\x06\xff\x00", b"\x07\x08\x09\x00"]
        left -= 257
    tokens += [b"\x01\x02\x03\x00"] * left
    return b"\x80" + b"".join(tokens)


def solid(tw: int, th: int) -> bytes:
    return b"\x01\x10\x20\x30"


def cases() -> list[tuple[str, int, int, bytes]]:
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 4, (256, 256, 3), dtype=np.uint8).tobytes()  # small noisy diffs
    return [
        ("Tight gradient 512x512, flat (issue: 851 B, 1.7 s)", 512, 512, tight_gradient(512, 512)),
        ("Tight gradient 2048x1024, flat", 2048, 1024, tight_gradient(2048, 1024)),
        ("Tight gradient 2048x2 (thin), flat", 2048, 2, tight_gradient(2048, 2)),
        ("Tight gradient 2x2048 (thin), flat", 2, 2048, tight_gradient(2, 2048)),
        ("Tight gradient 2048x8, flat", 2048, 8, tight_gradient(2048, 8)),
        ("Tight gradient 256x256, noisy (honest)", 256, 256, tight_gradient(256, 256, photo)),
        ("ZRLE palette-RLE 2048x2048, 1-pixel runs (issue: 5.7 KB, 2.1 s)", 2048, 2048,
         zrle(2048, 2048, prle_single_pixel_runs)),
        ("ZRLE palette-RLE 2048x2048, flagged 1-pixel runs", 2048, 2048,
         zrle(2048, 2048, prle_flagged_runs)),
        ("ZRLE plain RLE 2048x2048, 1-pixel runs", 2048, 2048, zrle(2048, 2048, rle_single_pixel_runs)),
        ("ZRLE plain RLE 2048x2048, 256-pixel runs", 2048, 2048, zrle(2048, 2048, rle_long_runs)),
        ("ZRLE plain RLE 2048x2048, 15 long runs between short ones", 2048, 2048,
         zrle(2048, 2048, rle_mixed_runs)),
        ("ZRLE solid tiles 2048x2048 (per-tile floor)", 2048, 2048, zrle(2048, 2048, solid)),
        ("CopyRect 2048x2048 (memcpy floor)", 2048, 2048,
         header(0, 0, 2048, 2048, COPY_RECT) + struct.pack(">HH", 0, 0)),
    ]


def measure(w: int, h: int, rect: bytes, repeat: int) -> tuple[float, str]:
    best = float("inf")
    error = ""
    for _ in range(repeat):
        client = RFBClient()
        client.receive(handshake(w, h))
        start = time.process_time()
        try:
            client.receive(update(rect))
        except Exception as exc:  # a refusal is a result too
            error = f" refused: {exc}"[:90]
        best = min(best, time.process_time() - start)
    return best, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best is shown")
    args = parser.parse_args()
    print(f"{'input':66} {'bytes':>8} {'pixels':>10} {'CPU s':>8} {'ms/KiB':>9}")
    for name, w, h, rect in cases():
        data = update(rect)
        seconds, error = measure(w, h, rect, args.repeat)
        per_kib = seconds * 1000 / (len(data) / 1024)
        print(f"{name:66} {len(data):8d} {w * h:10d} {seconds:8.3f} {per_kib:9.1f}{error}",
              flush=True)


if __name__ == "__main__":
    main()
