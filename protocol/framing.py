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


_U16 = struct.Struct("!H")


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
    """Feed bytes, pull complete boxes.

    ``receive(data)`` feeds and returns every box the bytes complete.  A caller that may switch
    the connection to raw bytes after any box (``OpenRelayLeg``) uses ``feed`` and ``next_box``
    instead and pauses between two boxes, so nothing behind the switching box is parsed.

    A box's encoded size, its terminator included, is at most ``max_box_bytes``; bytes that
    cannot start an acceptable box are refused as soon as they are seen, so the decoder never
    holds more than ``max_box_bytes`` of an unfinished box (unless paused: then it keeps what
    it is fed for ``take_unparsed``).  After a ``FramingError`` every call raises it again.
    """

    # One decoder per control connection, mostly idle: slots, and no empty dict waiting for
    # the next box (~130 bytes per idle host, bench/README.md issue 14).
    __slots__ = ("max_box_bytes", "max_keys", "_buffer", "_offset", "_box", "_key", "_failed",
                 "paused")

    def __init__(self, max_box_bytes: int = DEFAULT_MAX_BOX_BYTES,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_box_bytes = max_box_bytes
        self.max_keys = max_keys
        self._buffer = bytearray()
        self._offset = 0  # parse position inside _buffer; _buffer[0] is where the box starts
        self._box: Box | None = None  # the box being read, once its first key has come
        self._key: bytes | None = None
        self._failed: str | None = None
        self.paused = False

    def receive(self, data: bytes) -> list[Box]:
        self.feed(data)
        boxes: list[Box] = []
        while (box := self.next_box()) is not None:
            boxes.append(box)
        return boxes

    def feed(self, data: bytes) -> None:
        if self._failed:
            raise FramingError(self._failed)
        self._buffer += data

    def next_box(self) -> Box | None:
        """The next complete box, or None if more bytes are needed or the decoder is paused."""
        if self._failed:
            raise FramingError(self._failed)
        if self.paused:
            return None
        if not self._buffer and self.max_box_bytes >= 2:
            return None  # nothing fed since the last box (no box is half read: its bytes stay)
        try:
            return self._parse()
        except FramingError as exc:
            self._failed = str(exc)
            raise

    def pause(self) -> None:
        """Parse no further box (the last one switched the connection to raw bytes)."""
        self.paused = True

    def take_unparsed(self) -> bytes:
        """Every byte fed that is not part of a box already returned, and forget them."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._offset = 0
        self._box = None
        self._key = None
        return rest

    @property
    def buffered(self) -> int:
        """Bytes held: the unfinished box so far plus anything not parsed yet."""
        return len(self._buffer)

    def _parse(self) -> Box | None:
        # The decoder's state in local variables while it parses, written back on every way
        # out (a heartbeat's box is parsed per idle host per minute: fewer attribute look-ups)
        buf = self._buffer
        offset, key, box = self._offset, self._key, self._box
        size, limit = len(buf), self.max_box_bytes
        try:
            while True:
                available = size - offset
                if available < 2:
                    # at least a length prefix (or the terminator) still follows
                    if offset + 2 > limit:
                        self._check_size(offset + 2)
                    return None
                (length,) = _U16.unpack_from(buf, offset)
                if key is None:
                    if length == 0:
                        # its size was checked with the last value, which counted this
                        # terminator
                        del buf[:offset + 2]
                        offset = 0
                        done, box = box if box is not None else {}, None
                        return done
                    if length > MAX_KEY_LENGTH:
                        raise FramingError(f"key length {length} exceeds {MAX_KEY_LENGTH}")
                    if box is not None and len(box) >= self.max_keys:
                        raise FramingError(f"box has more than {self.max_keys} keys")
                    # the shortest box a key can belong to: the value's length prefix and
                    # at least the terminator follow it
                    if offset + 6 + length > limit:
                        self._check_size(offset + 6 + length)
                    if available - 2 < length:
                        return None
                    start = offset + 2
                    chunk = bytes(buf[start:start + length])
                    offset = start + length
                    if box is None:
                        box = {}
                    elif chunk in box:
                        raise FramingError(f"key {chunk[:40]!r} appears twice in one box")
                    key = chunk
                else:
                    # after a value, at least the terminator
                    if offset + 4 + length > limit:
                        self._check_size(offset + 4 + length)
                    if available - 2 < length:
                        return None
                    start = offset + 2
                    box[key] = bytes(buf[start:start + length])
                    offset = start + length
                    key = None
        finally:
            self._offset, self._key, self._box = offset, key, box

    def _check_size(self, at_least: int) -> None:
        if at_least > self.max_box_bytes:
            raise FramingError(f"box is larger than {self.max_box_bytes} bytes")
