"""The RFB server's H.264 encoder: one context (the whole screen), libx264 through PyAV.

What RFB's Open H.264 encoding asks of a server: baseline profile (lowest latency, no B-frames),
each context starts with a key frame, colour space written into the SPS.  libx264's
``ultrafast``/``zerolatency`` settings give exactly one output frame per input frame, at once.
A key frame only at the start (``keyint=infinite``): the stream runs over a reliable channel, and
a full change is cheaper as a P-frame of intra blocks than as a new IDR.

Frames come as the capture delivers them (H×W×4 BGRX, or H×W×3 RGB); the colour conversion to
4:2:0 (BT.601, limited range, tagged in the SPS) is FFmpeg's swscale, and both it and x264 run
without the GIL, so calling ``encode`` from a worker thread leaves the reactor free.  Odd sizes
are padded (edge pixels repeated) to the even size 4:2:0 needs; the client crops.

Threads: x264's *sliced* threads (one slice per core, PyAV's default ``thread_type`` SLICE with
``thread_count`` 0 = one per core) — frame threads would hold frames back, which a closed loop
of request and update cannot afford.  Measured for a text-like 1080p frame
(``bench/h264_settings.py``): x264 ~14-15 ms of CPU whatever the thread count, rate mode or
CRF (CRF 30: 25 % fewer bytes at 1.4 dB less, hardly less CPU), swscale ~5 ms; so the
settings stay.
"""

from __future__ import annotations

import fractions
from typing import Any

import numpy as np

__all__ = ["H264Encoder", "available", "DEFAULT_CRF"]

DEFAULT_CRF = 26          # visually fine for moving pictures; a lossless refresh follows them


def available() -> bool:
    """True if PyAV with libx264 can be imported (H.264 may be offered to clients)."""
    try:
        import av
        av.codec.Codec("libx264", "w")
    except Exception:            # not installed, or built without libx264
        return False
    return True


class H264Encoder:
    def __init__(self, width: int, height: int, *, crf: int = DEFAULT_CRF):
        import av
        self._av = av
        self.width, self.height = width, height
        self.coded_width, self.coded_height = width + (width & 1), height + (height & 1)
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = self.coded_width, self.coded_height
        codec.pix_fmt = "yuv420p"
        codec.time_base = fractions.Fraction(1, 30)
        codec.thread_type, codec.thread_count = "SLICE", 0
        codec.options = {
            "preset": "ultrafast", "tune": "zerolatency", "profile": "baseline",
            "crf": str(crf),
            "x264-params": ("keyint=infinite:scenecut=0:bframes=0:colorprim=smpte170m:"
                            "transfer=smpte170m:colormatrix=smpte170m:fullrange=off"),
        }
        codec.open()
        self._codec: Any = codec
        # one colour converter for all frames (a frame's own would set up swscale every time)
        from av.video.reformatter import VideoReformatter
        self._reformatter = VideoReformatter()
        self.frames = 0

    def encode(self, frame: np.ndarray) -> bytes:
        """One frame (the size given at creation) → its H.264 access unit (Annex B; the first
        one holds SPS, PPS and a key frame)."""
        h, w, depth = frame.shape
        if (w, h) != (self.width, self.height):
            raise ValueError(f"frame is {w}x{h}, the encoder was made for "
                             f"{self.width}x{self.height}")
        if (w, h) != (self.coded_width, self.coded_height):
            frame = np.pad(frame, ((0, self.coded_height - h), (0, self.coded_width - w), (0, 0)),
                           mode="edge")
        frame = np.ascontiguousarray(frame)
        source = self._av.VideoFrame.from_numpy_buffer(frame,
                                                       format="bgra" if depth == 4 else "rgb24")
        picture = self._reformatter.reformat(source, format="yuv420p", dst_colorspace="ITU601",
                                             dst_color_range="MPEG")
        picture.pts = self.frames
        self.frames += 1
        return b"".join(bytes(packet) for packet in self._codec.encode(picture))
