"""A recording's screen as an MP4 (H.264 through PyAV), faster than real time.

Reads the encrypted file, decodes the RFB stream with ``protocol.recording_player`` and encodes
one frame per 1/fps second (libx264, ``veryfast``, yuv420p so every browser plays it).  Frames
are written whole; an unchanged screen costs the encoder almost nothing.
"""

from __future__ import annotations

import time
from fractions import Fraction
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from protocol import recording
from protocol.recording_player import frames


@dataclass
class ExportResult:
    frames: int
    duration_ms: int
    seconds: float          # wall-clock time the export took
    complete: bool          # False: the recording was cut off (exported up to its last record)
    width: int
    height: int

    @property
    def speed(self) -> float:
        """Times faster than real time."""
        return (self.duration_ms / 1000.0) / self.seconds if self.seconds > 0 else 0.0


def entries(chunks: Iterable[bytes], unwrap: Callable[[dict], bytes], state: dict):
    reader = recording.Reader(unwrap=unwrap)
    for chunk in chunks:
        for item in reader.receive(chunk):
            if isinstance(item, recording.Entry):
                yield item
            elif isinstance(item, recording.Header):
                state["header"] = item.fields
    state["complete"] = reader.final


def to_mp4(chunks: Iterable[bytes], unwrap: Callable[[dict], bytes], out: Path,
           fps: float = 10.0) -> ExportResult:
    import av
    started = time.monotonic()
    state: dict = {}
    tmp = Path(out).with_name(Path(out).name + ".part")
    container = av.open(str(tmp), mode="w", format="mp4")
    stream = None
    count = 0
    last_t = 0
    last_pts = -1
    w = h = 0
    try:
        # B G R 255 pictures as the RFB client keeps them: libswscale takes them as "bgra"
        for t_ms, picture in frames(entries(chunks, unwrap, state), fps, bgrx=True):
            if stream is None:
                h, w = picture.shape[:2]
                stream = container.add_stream("libx264", rate=int(fps))
                stream.width, stream.height = w + (w & 1), h + (h & 1)
                stream.pix_fmt = "yuv420p"
                # variable frame rate: a frame only where the screen changed, stamped in ms
                stream.codec_context.time_base = Fraction(1, 1000)
                stream.time_base = Fraction(1, 1000)
                stream.options = {"preset": "ultrafast", "crf": "23"}
            if picture.shape[:2] != (h, w):  # the desktop was resized: fit into the first size
                fitted = np.zeros((h, w, 4), np.uint8)
                ph, pw = min(h, picture.shape[0]), min(w, picture.shape[1])
                fitted[:ph, :pw] = picture[:ph, :pw]
                picture = fitted
            if (w & 1) or (h & 1):
                picture = np.pad(picture, ((0, h & 1), (0, w & 1), (0, 0)))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="bgra")
            if t_ms <= last_pts:
                continue  # the final picture at the same instant as the last change
            frame.pts = t_ms
            frame.time_base = Fraction(1, 1000)
            last_pts = t_ms
            for packet in stream.encode(frame):
                container.mux(packet)
            count += 1
            last_t = t_ms
        if stream is None:
            raise recording.RecordingError("the recording holds no screen picture")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    tmp.replace(out)
    return ExportResult(count, last_t, time.monotonic() - started, state.get("complete", False),
                        w, h)
