"""AMP box framing as a sans-I/O object: bytes in, boxes out; boxes in, bytes out.

Wire format (the AMP spec): a box is a sequence of key/value pairs, each a 16-bit big-endian
length followed by that many bytes; keys are 1-255 bytes, values at most 65,535; a zero-length
key ends the box.  On top of the spec we bound a box's total size and number of keys, so a peer
cannot make us buffer without limit.  Anything malformed raises ``FramingError`` with a reason
fit for the log; the caller closes the connection.

After a box that switches the connection to raw bytes (a relay leg), ``take_unparsed`` hands
over whatever the peer already sent behind it.
"""

from __future__ import annotations

import struct

Box = dict[bytes, bytes]

MAX_KEY_LENGTH = 255
MAX_VALUE_LENGTH = 0xFFFF
DEFAULT_MAX_BOX_BYTES = 256 * 1024
DEFAULT_MAX_KEYS = 64


class FramingError(ValueError):
    """The peer sent bytes that are not a well-formed, acceptable box."""


def encode_box(box: Box) -> bytes:
    parts = []
    for key, value in box.items():
        if not 0 < len(key) <= MAX_KEY_LENGTH:
            raise FramingError(f"key {key[:40]!r} must be 1-{MAX_KEY_LENGTH} bytes")
        if len(value) > MAX_VALUE_LENGTH:
            raise FramingError(f"value of {key!r} is {len(value)} bytes, more than {MAX_VALUE_LENGTH}")
        parts.append(struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value)
    parts.append(b"\x00\x00")
    return b"".join(parts)


class BoxDecoder:
    """Feed bytes with ``receive``; get back the complete boxes they finish."""

    def __init__(self, max_box_bytes: int = DEFAULT_MAX_BOX_BYTES,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_box_bytes = max_box_bytes
        self.max_keys = max_keys
        self._buffer = bytearray()
        self._offset = 0  # parse position inside _buffer for the box being read
        self._box: Box = {}
        self._key: bytes | None = None
        self._failed: str | None = None
        self.paused = False

    def receive(self, data: bytes) -> list[Box]:
        if self._failed:
            raise FramingError(self._failed)
        self._buffer += data
        boxes: list[Box] = []
        try:
            while not self.paused:
                box = self._next_box()
                if box is None:
                    break
                boxes.append(box)
        except FramingError as exc:
            self._failed = str(exc)
            raise
        return boxes

    def pause(self) -> None:
        """Stop parsing after the current box (e.g. it switched the connection to raw bytes)."""
        self.paused = True

    def take_unparsed(self) -> bytes:
        rest = bytes(self._buffer[self._offset:])
        self._buffer.clear()
        self._offset = 0
        return rest

    def _next_box(self) -> Box | None:
        buf = self._buffer
        while True:
            if len(buf) - self._offset < 2:
                self._check_pending_size()
                return None
            (length,) = struct.unpack_from("!H", buf, self._offset)
            if self._key is None:
                if length == 0:
                    box, self._box = self._box, {}
                    del buf[: self._offset + 2]
                    self._offset = 0
                    return box
                if length > MAX_KEY_LENGTH:
                    raise FramingError(f"key length {length} exceeds {MAX_KEY_LENGTH}")
            if len(buf) - self._offset - 2 < length:
                self._check_pending_size(length)
                return None
            start = self._offset + 2
            chunk = bytes(buf[start:start + length])
            self._offset = start + length
            if self._key is None:
                if chunk in self._box:
                    raise FramingError(f"key {chunk[:40]!r} appears twice in one box")
                self._key = chunk
            else:
                self._box[self._key] = chunk
                self._key = None
                if len(self._box) > self.max_keys:
                    raise FramingError(f"box has more than {self.max_keys} keys")
            if self._offset > self.max_box_bytes:
                raise FramingError(f"box is larger than {self.max_box_bytes} bytes")

    def _check_pending_size(self, wanted: int = 0) -> None:
        if self._offset + 2 + wanted > self.max_box_bytes:
            raise FramingError(f"box is larger than {self.max_box_bytes} bytes")
