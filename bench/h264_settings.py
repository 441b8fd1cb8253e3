"""x264's settings and the pipelining question, on the screen benchmark's own 1080p frames.

    python bench/h264_settings.py                  # ~1 min
    python bench/h264_settings.py --frames 8

The four text-like pictures and four frames of the moving picture of ``screen_latency.py`` are
shown on a private Xvfb and grabbed once (``ScreenSource.grab``, BGRX).  Then, printed with the
load average (CPU time of this process, all threads; wall time moves with the machine's load):

* **settings**: libx264 ultrafast/zerolatency/baseline as ``H264Encoder`` sets it, with other
  CRFs, a constant QP and fixed thread counts: CPU ms per P-frame, KB per frame, and the PSNR
  of FFmpeg's decoded RGB against the grabbed picture (text-like pictures alternate, video
  frames follow each other);
* **swscale**: the BGRX → 4:2:0 conversion alone, with PyAV's thread choices and sampling;
* **overlap**: encoding frame N beside a capture-like step (copy, ``DamageTracker.update``) in
  two threads against one after the other — what pipelining capture and encode can gain here;
* **GIL**: encoding alone against encoding beside a pure-Python busy thread.

Nothing fails on a number; ``bench/README.md`` has the figures measured here.
"""

from __future__ import annotations

import argparse
import fractions
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.screen_latency import Painter  # noqa: E402
from tests.fixtures_x11 import start_xvfb  # noqa: E402

PARAMS = ("keyint=infinite:scenecut=0:bframes=0:colorprim=smpte170m:transfer=smpte170m:"
          "colormatrix=smpte170m:fullrange=off")


def grab_frames(width: int, height: int) -> dict[str, list[np.ndarray]]:
    from modules.common.screen.capture_x11 import ScreenSource
    display = start_xvfb(f"{width}x{height}")
    try:
        painter = Painter(display.name, width, height)
        text = painter.prepare_pictures()
        painter.prepare_video(4)
        src = ScreenSource(display.name)
        frames: dict[str, list[np.ndarray]] = {}
        for kind, first in (("text", 0), ("video", len(text))):
            frames[kind] = []
            for i in range(4):
                painter.show_picture(first + i)
                frames[kind].append(src.grab())
        src.close()
        painter.close()
        return frames
    finally:
        display.stop()


def encoder(width: int, height: int, rate: tuple[str, int] = ("crf", 26),
            threads: int = 0) -> object:
    import av
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.thread_type, codec.thread_count = "SLICE", threads
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
                     rate[0]: str(rate[1]), "x264-params": PARAMS}
    codec.open()
    return codec


def to_yuv(frame: np.ndarray, **options: object) -> object:
    import av
    source = av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(frame), format="bgra")
    return source.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG",
                           **options)


def psnr(decoded: object, frame: np.ndarray) -> float:
    rgb = decoded.to_ndarray(format="rgb24").astype(int)
    mse = float(((rgb - frame[..., 2::-1].astype(int)) ** 2).mean())
    return 10 * np.log10(255 ** 2 / max(mse, 1e-9))


def settings(frames: dict[str, list[np.ndarray]], count: int) -> None:
    import av
    h, w = frames["text"][0].shape[:2]
    print(f"\n{'settings (ultrafast, zerolatency, baseline)':44} {'kind':>5} {'CPU ms':>7} "
          f"{'KB':>6} {'PSNR dB':>8}")
    for label, rate, threads in (("CRF 26 (as shipped), sliced threads auto", ("crf", 26), 0),
                                 ("CRF 23", ("crf", 23), 0), ("CRF 30", ("crf", 30), 0),
                                 ("CRF 34", ("crf", 34), 0), ("QP 26", ("qp", 26), 0),
                                 ("CRF 26, 1 thread", ("crf", 26), 1),
                                 ("CRF 26, 2 sliced threads", ("crf", 26), 2)):
        for kind, shots in frames.items():
            pictures = [to_yuv(f) for f in shots]
            codec, decoder = encoder(w, h, rate, threads), av.CodecContext.create("h264", "r")
            cpu, sizes, quality = 0.0, [], []
            for n in range(4 + count):
                picture = pictures[n % 4]
                picture.pts = n
                c0 = time.process_time()
                packets = codec.encode(picture)
                spent = time.process_time() - c0
                for packet in packets:
                    for decoded in decoder.decode(packet):
                        if n >= 4:
                            quality.append(psnr(decoded, shots[n % 4]))
                if n >= 4:
                    cpu += spent
                    sizes.append(sum(p.size for p in packets))
            print(f"{label:44} {kind:>5} {cpu / count * 1e3:7.1f} {np.median(sizes) / 1e3:6.0f} "
                  f"{np.median(quality):8.1f}")


def swscale(frames: dict[str, list[np.ndarray]], count: int) -> None:
    print(f"\n{'swscale BGRX -> 4:2:0 (text-like)':44} {'CPU ms':>7} {'wall ms':>8}")
    for label, options in (("PyAV default (threads auto)", {}), ("threads 1", {"threads": 1}),
                           ("threads 2", {"threads": 2}),
                           ("point sampling", {"interpolation": "POINT"})):
        to_yuv(frames["text"][0], **options)
        c0, t0 = time.process_time(), time.perf_counter()
        for n in range(count):
            to_yuv(frames["text"][n % 4], **options)
        print(f"{label:44} {(time.process_time() - c0) / count * 1e3:7.1f} "
              f"{(time.perf_counter() - t0) / count * 1e3:8.1f}")


def overlap(frames: dict[str, list[np.ndarray]], count: int) -> None:
    from modules.common.screen.capture_x11 import DamageTracker
    from modules.common.screen.h264_encoder import H264Encoder
    shots = frames["text"]
    h, w = shots[0].shape[:2]
    enc, tracker = H264Encoder(w, h), DamageTracker(True)
    for shot in shots:
        enc.encode(shot)

    def encoding() -> None:
        for n in range(count):
            enc.encode(shots[n % 4])

    def capturing() -> None:
        for n in range(count):
            tracker.update(shots[n % 4].copy())      # the grab's copy, damage, scroll check

    def timed(*steps) -> float:
        threads = [threading.Thread(target=step) for step in steps]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return (time.perf_counter() - t0) / count * 1e3

    alone_encode, alone_capture = timed(encoding), timed(capturing)
    both = timed(encoding, capturing)
    print(f"\noverlap, wall ms per frame: encode {alone_encode:.1f} + capture-like "
          f"{alone_capture:.1f} = {alone_encode + alone_capture:.1f} one after the other; "
          f"{both:.1f} in two threads")
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass
    alone = timed(encoding)
    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        beside = timed(encoding)
    finally:
        stop.set()
        spinner.join()
    print(f"GIL: encode {alone:.1f} ms per frame alone, {beside:.1f} beside a pure-Python busy "
          f"thread")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--frames", type=int, default=16, help="measured frames per figure")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))
    frames = grab_frames(width, height)
    load = os.getloadavg()
    print(f"{args.size}, {args.frames} frames per figure; load average {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f}")
    settings(frames, args.frames)
    swscale(frames, args.frames)
    overlap(frames, args.frames)
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


if __name__ == "__main__":
    main()
