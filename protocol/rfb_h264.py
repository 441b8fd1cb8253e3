"""RFB's Open H.264 encoding (number 50): the rect framing and the client's decoder contexts.

A rect of this encoding is ``U32 length, U32 flags`` and ``length`` bytes of H.264 (Annex B, one
or more whole frames).  Flag bit 0 (ResetContext) drops the decoder context of this rect's
coordinates and size, bit 1 (ResetAllContexts) drops all; both apply before the data is decoded,
and ``length`` 0 is a pure control message.  A context is the H.264 decoder state of one rect
(x, y, w, h); the client keeps at most 64 and drops the least recently used.  A decoded frame may
be larger than its rect (the client crops right and bottom), never smaller.  The spec is the
community RFB protocol description (rfbproto, "Open H.264 Encoding").

This module never touches a socket: ``parse_header`` checks the eight header bytes against the
rect, ``H264Contexts.decode`` turns one rect's data into RGB pixels (PyAV's FFmpeg decoder, which
releases the GIL while it works).  Anything malformed raises ``H264Error`` with a reason; the
RFB client turns it into its own error and the connection closes.  PyAV is imported only when
the first H.264 rect arrives; ``available()`` says whether it can be.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["H264", "RESET_CONTEXT", "RESET_ALL_CONTEXTS", "MAX_CONTEXTS", "H264Error",
           "available", "header", "parse_header", "max_length", "H264Contexts"]

H264 = 50
RESET_CONTEXT = 1
RESET_ALL_CONTEXTS = 2
MAX_CONTEXTS = 64
HEADER = struct.Struct(">II")


class H264Error(ValueError):
    """An H.264 rect that cannot be accepted; ``str(exc)`` says why."""


def available() -> bool:
    """True if PyAV with an H.264 decoder can be imported (the encoding may be announced)."""
    try:
        import av
        av.codec.Codec("h264", "r")
    except Exception:            # not installed, or built without the decoder
        return False
    return True


def header(length: int, flags: int = 0) -> bytes:
    return HEADER.pack(length, flags)


def max_length(w: int, h: int) -> int:
    """The most bytes one rect of w×h may carry: four bytes per pixel of the macroblock-padded
    area (an uncompressed 4:2:0 frame is 1.5) plus 1 MiB for parameter sets and a few frames."""
    return (-(-w // 16) * 16) * (-(-h // 16) * 16) * 4 + (1 << 20)


def parse_header(data: bytes, w: int, h: int) -> tuple[int, int]:
    """(length, flags) of an H.264 rect of w×h; unknown flag bits are ignored (as the spec
    says).  An empty rect or more data than ``max_length`` raises ``H264Error``."""
    if len(data) != HEADER.size:
        raise H264Error(f"H.264 rect header is {len(data)} bytes, not {HEADER.size}")
    length, flags = HEADER.unpack(data)
    if length and (w == 0 or h == 0):
        raise H264Error(f"H.264 rect of {w}x{h} carries {length} bytes of picture")
    if length > max_length(w, h):
        raise H264Error(f"H.264 rect of {w}x{h} declares {length} bytes (at most "
                        f"{max_length(w, h)})")
    return length, flags


class _Context:
    """One rect's decoder: FFmpeg's H.264 decoder behind PyAV's parser (which splits the data
    into frames; flushing it after each rect hands out the last frame at once)."""

    def __init__(self) -> None:
        import av
        self.codec = av.CodecContext.create("h264", "r")
        self.codec.thread_type = "SLICE"       # frame threads would hold frames back

    def decode(self, data: bytes) -> Any:
        import av
        last = None
        try:
            for packet in self.codec.parse(data):
                for frame in self.codec.decode(packet):
                    last = frame
            for packet in self.codec.parse(None):
                for frame in self.codec.decode(packet):
                    last = frame
        except av.error.FFmpegError as exc:
            raise H264Error(f"H.264 data cannot be decoded: {exc}") from None
        return last


class H264Contexts:
    """The client's H.264 contexts, keyed by rect, at most ``MAX_CONTEXTS`` (least recently
    used dropped first).  ``limit(w, h)`` may refuse a decoded frame's size (the supporter's
    screen limit): the reason, or None."""

    def __init__(self, limit: Any = None) -> None:
        self._contexts: OrderedDict[tuple[int, int, int, int], _Context] = OrderedDict()
        self._limit = limit
        self.frames = 0

    def __len__(self) -> int:
        return len(self._contexts)

    def decode(self, x: int, y: int, w: int, h: int, flags: int,
               data: bytes) -> np.ndarray | None:
        """Apply ``flags``, decode ``data`` in the rect's context: its picture as h×w×3 RGB, or
        None for a control message (no data)."""
        key = (x, y, w, h)
        if flags & RESET_ALL_CONTEXTS:
            self._contexts.clear()
        elif flags & RESET_CONTEXT:
            self._contexts.pop(key, None)
        if not data:
            return None
        context = self._contexts.get(key)
        if context is None:
            if len(self._contexts) >= MAX_CONTEXTS:
                self._contexts.popitem(last=False)
            context = self._contexts[key] = _Context()
        else:
            self._contexts.move_to_end(key)
        frame = context.decode(data)
        if frame is None:
            raise H264Error(f"H.264 rect {x},{y} {w}x{h} holds no whole picture (a context must "
                            f"start with a key frame)")
        if frame.width < w or frame.height < h:
            raise H264Error(f"H.264 picture of {frame.width}x{frame.height} is smaller than its "
                            f"rect {w}x{h}")
        if self._limit is not None:
            refusal = self._limit(frame.width, frame.height)
            if refusal:
                raise H264Error(refusal)
        self.frames += 1
        rgb = frame.to_ndarray(format="rgb24")
        return rgb[:h, :w]
