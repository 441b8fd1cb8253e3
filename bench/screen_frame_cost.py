"""Where a 1080p full-screen frame's time goes, stage by stage, on both sides of the screen.

    python bench/screen_frame_cost.py                 # 1920x1080, ~30 s
    python bench/screen_frame_cost.py --repeat 20

One private Xvfb on which four full-screen pictures alternate: the text-like pictures of
``screen_latency.py`` (coloured bands with glyph blocks) and four frames of its smooth moving
video.  Each stage runs ``--repeat`` times on the real frames; printed per stage: median wall
time and median CPU time of this process (all threads: x264 and swscale work in their own),
which moves much less with the machine's load than wall time does.  Stages:

* capture: ``mss`` grab alone (XShmGetImage), then ``ScreenSource.capture`` (grab, copy,
  tile damage, scroll detection, cursor) as the server runs it in a series of full-screen
  changes (one tracker, alternating pictures), then the server's decision for such a change
  (``prepare_update``: damage, H.264 or not);
* the server's encodings of the whole frame: Tight (lossless, as our viewer asks without a
  quality level; and with JPEG quality 8), and H.264 (``H264Encoder``: colour conversion +
  libx264 ultrafast/zerolatency);
* the client's decoding of them (``protocol.rfb_client.RFBClient``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.screen_latency import Painter  # noqa: E402
from tests.fixtures_x11 import start_xvfb  # noqa: E402


def measure(fn, repeat: int) -> tuple[float, float, object]:
    """(median wall ms, median CPU ms, last result) of ``repeat`` calls after one warm-up."""
    result = fn()
    walls, cpus = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return float(np.median(walls)) * 1e3, float(np.median(cpus)) * 1e3, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--repeat", type=int, default=12)
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))

    from modules.common.screen.capture_x11 import DamageTracker, ScreenSource
    from modules.common.screen.h264_encoder import H264Encoder
    from modules.common.screen.rfb_server import Rect, RFBServer
    from protocol.rfb_client import H264, TIGHT, RFBClient, quality_level

    display = start_xvfb(args.size)
    load = os.getloadavg()
    print(f"{args.size}, {args.repeat} repeats; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}")
    rows: list[tuple[str, float, float, str]] = []
    try:
        painter = Painter(display.name, width, height)
        text_pics = painter.prepare_pictures()
        painter.prepare_video(4)
        src = ScreenSource(display.name)
        grabs = {}
        for kind, first in (("text", 0), ("video", len(text_pics))):
            grabs[kind] = []
            for i in range(4):
                painter.show_picture(first + i)
                grabs[kind].append(src.grab())

        box = {"left": 0, "top": 0, "width": width, "height": height}
        wall, cpu, _ = measure(lambda: src._mss.grab(box), args.repeat)
        rows.append(("capture: mss grab (XShm) alone", wall, cpu, ""))
        wall, cpu, _ = measure(src.grab, args.repeat)
        rows.append(("capture: grab + copy to numpy", wall, cpu, ""))
        k = [0]
        series = DamageTracker(True)

        def full_capture():
            painter.show_picture(k[0] % 4)
            k[0] += 1
            return src.capture(series)
        wall, cpu, _ = measure(full_capture, args.repeat)
        rows.append(("capture(): grab, damage, scroll check, cursor", wall, cpu,
                     "a series of full changes; includes an X copy_area"))
        server = RFBServer((width, height), name="bench")
        server.receive(b"RFB 003.008\n\x01\x01")
        server.data_to_send()
        server.encodings = [TIGHT, H264]
        shown = [0]

        def decide():
            cap = full_capture()
            server._pending = Rect(0, 0, width, height)
            c0 = time.process_time()
            prepared = server.prepare_update(cap.frame, cap.damage, moves=cap.moves)
            decided.append(time.process_time() - c0)
            shown[0] += prepared.h264
            return prepared
        decided: list[float] = []
        measure(decide, args.repeat)
        rows.append(("decide (prepare_update) in a series of full changes",
                     float("nan"), float(np.median(decided)) * 1e3,
                     f"{shown[0]} of {args.repeat + 1} as H.264"))

        for kind in ("text", "video"):
            frames = grabs[kind]
            for label, encodings, h264 in (
                    ("Tight lossless", (TIGHT,), False),
                    ("Tight + JPEG q8", (TIGHT, quality_level(8)), False),
                    ("H.264 (P-frame)", (TIGHT, H264), True)):
                server = RFBServer((width, height), name="bench")
                server.receive(b"RFB 003.008\n\x01\x01")
                server.data_to_send()
                server.encodings = list(encodings)
                client = RFBClient(encodings=encodings)
                client.receive(b"RFB 003.008\n\x01\x01\0\0\0\0" + struct_init(width, height))
                encoder = H264Encoder(width, height) if h264 else None
                i = [0]
                updates = []

                def encode():
                    frame = frames[i[0] % 4]
                    i[0] += 1
                    if encoder is not None:
                        data = encoder.encode(frame)
                        rect = (np.array([0, 0, width, height], ">u2").tobytes()
                                + np.array([H264], ">i4").tobytes()
                                + np.array([len(data), 0 if encoder.frames > 1 else 2],
                                           ">u4").tobytes() + data)
                        msg = b"\0\0\0\1" + rect
                    else:
                        server._pending = Rect(0, 0, width, height)
                        msg = server.update(frame, None)
                    updates.append(msg)
                    return msg
                wall, cpu, msg = measure(encode, args.repeat)
                size = np.median([len(u) for u in updates[1:]])
                rows.append((f"encode {kind}: {label}", wall, cpu, f"{size / 1e3:.0f} KB"))
                j = [0]

                def decode():
                    client.receive(updates[j[0]])
                    j[0] += 1
                wall, cpu, _ = measure(decode, min(args.repeat, len(updates) - 1))
                rows.append((f"decode {kind}: {label}", wall, cpu, ""))
        src.close()
        painter.close()
    finally:
        display.stop()
    load = os.getloadavg()
    print(f"\n{'stage':52} {'wall ms':>8} {'CPU ms':>8}  note")
    for label, wall, cpu, note in rows:
        print(f"{label:52} {wall:8.1f} {cpu:8.1f}  {note}")
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def struct_init(w: int, h: int) -> bytes:
    import struct
    return struct.pack(">HHBBBBHHHBBB3xI", w, h, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 0)


if __name__ == "__main__":
    main()
