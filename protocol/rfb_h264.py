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

Before any data reaches FFmpeg, every sequence parameter set in it (``sps_sizes``) must declare
a picture no larger than its rect rounded up to whole macroblocks (a rect never exceeds the
framebuffer): FFmpeg allocates its frame pool from the SPS, so a hostile server could otherwise
make each of the 64 contexts hold a picture of the H.264 maximum.  And all contexts together
may hold at most ``PICTURES_PER_SCREEN`` pictures of the framebuffer's size (a context holds
its SPS's reference frames + 3, measured): within the rect rule, 64 contexts of a 1080p screen
with 16 reference frames each made FFmpeg take 3.9 GB.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

__all__ = ["H264", "RESET_CONTEXT", "RESET_ALL_CONTEXTS", "MAX_CONTEXTS", "H264Error",
           "available", "header", "parse_header", "max_length", "SequenceParameters", "sps_sizes", "check_sps", "H264Contexts",
           "PICTURES_PER_SCREEN"]

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


# a start code and the header byte of a (subset) sequence parameter set, NAL type 7 or 15
_SPS_START = re.compile(rb"\x00\x00\x01([\x07\x27\x47\x67\x87\xa7\xc7\xe7"
                        rb"\x0f\x2f\x4f\x6f\x8f\xaf\xcf\xef])")
MAX_SPS_PER_RECT = 32
MAX_REFERENCE_FRAMES = 16  # H.264's own limit (max_num_ref_frames)
PICTURES_PER_SCREEN = 20   # any tiling of the screen with up to 16 reference frames fits
HELD_BEYOND_REFERENCES = 3  # pictures FFmpeg holds besides the references (measured: 4 at 1)
_SPS_BYTES = 4096          # more than the largest valid SPS (full scaling lists, 255 POC offsets)
# profiles whose SPS carries chroma format, bit depths and scaling lists (H.264 7.3.2.1.1)
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


class _Bits:
    """MSB-first bit reader over an SPS's RBSP; reading past its end raises ``H264Error``."""

    def __init__(self, rbsp: bytes) -> None:
        self.bits = "".join(f"{b:08b}" for b in rbsp)
        self.pos = 0

    def u(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise H264Error("H.264 sequence parameter set is cut short")
        value = int(self.bits[self.pos:self.pos + n] or "0", 2)
        self.pos += n
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise H264Error("H.264 sequence parameter set has an Exp-Golomb code over 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


class SequenceParameters(NamedTuple):
    """What an SPS says about memory: the coded picture in pixels (whole macroblocks, before
    cropping), rows per macroblock row (16, or 32 interlaced) and its reference frames."""
    width: int
    height: int
    unit: int
    refs: int

    @property
    def held_pixels(self) -> int:
        """Pixels of the pictures a decoder context keeps for this stream."""
        return self.width * self.height * (self.refs + HELD_BEYOND_REFERENCES)


def _sps_size(rbsp: bytes) -> SequenceParameters:
    r = _Bits(rbsp)
    profile = r.u(8)
    r.u(16)                                    # constraint flags, level
    r.ue()                                     # seq_parameter_set_id
    if profile in _HIGH_PROFILES:
        chroma = r.ue()
        if chroma == 3:
            r.u(1)                             # separate_colour_plane_flag
        r.ue(), r.ue(), r.u(1)                 # bit depths, qpprime_y_zero_transform_bypass
        if r.u(1):                             # seq_scaling_matrix_present_flag
            for i in range(12 if chroma == 3 else 8):
                if r.u(1):
                    last = following = 8
                    for _ in range(16 if i < 6 else 64):
                        if following:
                            following = (last + r.se() + 256) % 256
                        last = following or last
    r.ue()                                     # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.u(1), r.se(), r.se()
        cycle = r.ue()
        if cycle > 255:
            raise H264Error(f"H.264 sequence parameter set has {cycle} reference frames in a "
                            f"picture order cycle (at most 255)")
        for _ in range(cycle):
            r.se()
    refs = r.ue()                              # max_num_ref_frames
    if refs > MAX_REFERENCE_FRAMES:
        raise H264Error(f"H.264 sequence parameter set has {refs} reference frames (at most "
                        f"{MAX_REFERENCE_FRAMES})")
    r.u(1)                                     # gaps_in_frame_num_value_allowed_flag
    width_mbs, height_units = r.ue() + 1, r.ue() + 1
    unit = 16 * (2 - r.u(1))                   # frame_mbs_only_flag
    return SequenceParameters(width_mbs * 16, height_units * unit, unit, refs)


def sps_sizes(data: bytes) -> list[SequenceParameters]:
    """``SequenceParameters`` of every sequence parameter set in Annex B ``data`` (NAL types 7
    and 15: a subset SPS starts the same way); a malformed one, or more than
    ``MAX_SPS_PER_RECT``, raises ``H264Error``."""
    sizes = []
    for match in _SPS_START.finditer(data):
        if len(sizes) == MAX_SPS_PER_RECT:
            raise H264Error(f"H.264 rect holds more than {MAX_SPS_PER_RECT} sequence parameter "
                            f"sets")
        start = match.end()
        end = data.find(b"\x00\x00\x01", start)
        nal = data[start:end if end >= 0 else len(data)][:_SPS_BYTES]
        sizes.append(_sps_size(nal.replace(b"\x00\x00\x03", b"\x00\x00")))
    return sizes


def check_sps(data: bytes, w: int, h: int) -> list[SequenceParameters]:
    """Refuse a rect of w×h whose data declares a larger picture than w×h in whole
    macroblocks (interlaced: macroblock pairs) — before FFmpeg sees it; the SPSs it holds."""
    found = sps_sizes(data)
    for coded_w, coded_h, unit, _refs in found:
        if coded_w > -(-w // 16) * 16 or coded_h > -(-h // unit) * unit:
            raise H264Error(f"H.264 sequence parameter set declares a {coded_w}x{coded_h} "
                            f"picture for a rect of {w}x{h}")
    return found


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
    screen limit): the reason, or None.  ``framebuffer()``: the framebuffer's (w, h), which
    bounds the pictures all contexts may hold (``PICTURES_PER_SCREEN``); without it there is
    no such bound (a decoder used on its own)."""

    def __init__(self, limit: Any = None,
                 framebuffer: Callable[[], tuple[int, int]] | None = None) -> None:
        self._contexts: OrderedDict[tuple[int, int, int, int], _Context] = OrderedDict()
        self._held: dict[tuple[int, int, int, int], int] = {}   # pixels each context keeps
        self._limit = limit
        self._framebuffer = framebuffer
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
            self._held.clear()
        elif flags & RESET_CONTEXT:
            self._contexts.pop(key, None)
            self._held.pop(key, None)
        if not data:
            return None
        found = check_sps(data, w, h)
        if found:
            self._check_held(key, max(sps.held_pixels for sps in found))
        context = self._contexts.get(key)
        if context is None:
            if len(self._contexts) >= MAX_CONTEXTS:
                dropped, _ = self._contexts.popitem(last=False)
                self._held.pop(dropped, None)
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

    def _check_held(self, key: tuple[int, int, int, int], pixels: int) -> None:
        """Record what the rect's context will keep; refuse if all contexts together would keep
        more than ``PICTURES_PER_SCREEN`` pictures of the framebuffer's size."""
        if self._framebuffer is not None:
            fw, fh = self._framebuffer()
            budget = PICTURES_PER_SCREEN * (-(-fw // 16) * 16) * (-(-fh // 16) * 16)
            others = sum(held for other, held in self._held.items() if other != key)
            if others + pixels > budget:
                raise H264Error(f"H.264 contexts would keep {(others + pixels) / 1e6:.1f} "
                                f"megapixels of pictures (at most {PICTURES_PER_SCREEN} "
                                f"screens: {budget / 1e6:.1f})")
        self._held[key] = pixels
