"""The session multiplexer: several logical channels inside the records of one session channel.

A sans-I/O object, one per encrypted session channel.  The caller queues payloads per logical
channel (``send``), asks for the next record payload whenever the channel can take one
(``next_record``, then seals it) and feeds every received record payload to ``receive``, which
returns ``ChannelData`` events.  The mux never touches a socket, a reactor or a clock.  It is
responsible for framing, the order in which channels get the link, and bounded send queues; it is
not responsible for what a channel's bytes mean (consent messages, RFB, file chunks, ``--pipe``
bytes) nor for encryption (``modules.common.session.channel``).

Logical channels (``Channel``)::

    CONTROL 0   whole JSON control messages (``modules.common.session.consent``), reassembled on receipt
    SCREEN  1   opaque byte stream (RFB)
    FILE    2   opaque byte stream of the file-transfer layer
    DATA    3   opaque byte stream (the CLI's ``--pipe``)

Frame format.  A record payload is one or more whole frames; a frame never spans two records,
so every record parses on its own (all integers big-endian)::

    frame   = channel:u8  flags:u8  length:u16  payload[length]
    flags   = bit 0 END: the last piece of one ``send`` (a message boundary); other bits zero
    length  = 1 .. 16384

``send`` cuts a payload into pieces of at most 16 KiB (``MAX_PIECE``), and a piece may be cut
again to fill the rest of a record, so control can always interleave.  On receipt a message
channel (CONTROL) is reassembled up to its ``max_message`` and delivered whole; stream channels
deliver every frame as it arrives, with ``end`` set on the last piece of a ``send``.
Anything malformed (empty record, truncated frame, unknown channel, reserved flag bits, zero or
oversized length, a message over its bound) raises ``MuxError`` with a reason; the caller ends
the session.  After a ``MuxError`` every ``receive`` raises it again.

Scheduling.  ``next_record(max_payload)`` fills one record: first every queued piece of the
strict-priority channels (CONTROL, ``weight=None``), so a control message queued before the call
leaves in that very record (if it fits a record at all); then the weighted channels share the
rest by deficit round robin (Shreedhar & Varghese): each backlogged channel in turn gets a quantum
of ``weight × 16 KiB`` bytes of credit (frame headers count), sends while its credit is positive
(the last frame of a turn may overdraw; the debt is carried into its next turn), and passes the
turn.  With the default weights SCREEN : DATA : FILE = 4 : 4 : 1, a backlogged file transfer gets
a ninth of what control leaves while screen and data are both busy, a fifth while only the screen
is, and all of it when the others are idle.  A turn that is cut off by the end of a record continues in the next record.

Back-pressure.  Every channel's send queue is bounded (``ChannelSpec.limit`` bytes); ``send``
raises ``QueueFull`` rather than buffer more.  ``pending(channel)`` and ``room(channel)`` let a
producer pause early (e.g. stop reading stdin while ``pending(DATA)`` is above a threshold).

More than two parties.  Nothing here assumes two parties: a mux is per session channel (per
pair of endpoints), and a presenter with many viewers keeps one per viewer.  Channel ids are a
byte; 0-15 are reserved for fixed channels of this protocol, and further channels (say, one
pointer channel per participant) are added by passing ``channels=`` with their ``ChannelSpec``.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Mapping

HEADER = struct.Struct("!BBH")
HEADER_BYTES = HEADER.size          # 4
MAX_PIECE = 16 * 1024               # largest frame payload
FLAG_END = 0x01
QUANTUM = MAX_PIECE                 # credit per unit of weight and turn


class Channel(IntEnum):
    CONTROL = 0
    SCREEN = 1
    FILE = 2
    DATA = 3


@dataclass(frozen=True)
class ChannelSpec:
    """How one logical channel is scheduled, bounded and delivered.

    ``weight`` None means strict priority (served before every weighted channel); otherwise the
    channel's share in the round robin.  ``limit`` bounds the bytes waiting in its send queue.
    ``max_message`` set makes it a message channel: pieces are reassembled and a message larger
    than this is refused on both ends; None makes it a stream channel.
    """

    weight: int | None
    limit: int
    max_message: int | None = None

    def __post_init__(self) -> None:
        if self.weight is not None and self.weight < 1:
            raise ValueError("a weight is a positive integer (or None for strict priority)")
        if self.limit < 1:
            raise ValueError("a queue limit is at least one byte")
        if self.max_message is not None and self.max_message < 1:
            raise ValueError("max_message is at least one byte")


DEFAULT_CHANNELS: Mapping[int, ChannelSpec] = {
    Channel.CONTROL: ChannelSpec(weight=None, limit=1024 * 1024, max_message=64 * 1024),
    Channel.SCREEN: ChannelSpec(weight=4, limit=4 * 1024 * 1024),
    Channel.DATA: ChannelSpec(weight=4, limit=1024 * 1024),
    Channel.FILE: ChannelSpec(weight=1, limit=1024 * 1024),
}


class MuxError(ValueError):
    """The peer sent a record payload that is not well-formed, acceptable mux framing."""


class QueueFull(Exception):
    """``send`` would put more than the channel's limit into its queue: pause the producer."""


@dataclass(frozen=True)
class ChannelData:
    """Bytes that arrived on one logical channel.  On a message channel ``payload`` is one whole
    message; on a stream channel it is one piece, and ``end`` marks the last piece of a send."""

    channel: int
    payload: bytes
    end: bool = True


def _channel_id(channel: int) -> int:
    try:
        return Channel(channel)
    except ValueError:
        return channel


class SessionMux:
    """Frames, schedules and bounds the logical channels of one session channel."""

    def __init__(self, channels: Mapping[int, ChannelSpec] | None = None) -> None:
        specs = dict(DEFAULT_CHANNELS if channels is None else channels)
        for channel_id in specs:
            if not 0 <= channel_id <= 255:
                raise ValueError(f"channel id {channel_id} does not fit a byte")
        self._specs: dict[int, ChannelSpec] = {_channel_id(c): s for c, s in specs.items()}
        self._queues: dict[int, deque[tuple[memoryview, bool]]] = {c: deque() for c in specs}
        self._pending: dict[int, int] = {c: 0 for c in specs}
        self._strict = [c for c, s in sorted(self._specs.items()) if s.weight is None]
        # deficit round robin over the weighted channels that have something queued
        self._active: deque[int] = deque()
        self._deficit: dict[int, int] = {c: 0 for c in specs}
        self._turn_started = False
        # receiving side
        self._partial: dict[int, list[bytes]] = {c: [] for c in specs}
        self._partial_size: dict[int, int] = {c: 0 for c in specs}
        self._failed: str | None = None

    # --- sending ------------------------------------------------------------------------------

    def send(self, channel: int, payload: bytes) -> None:
        """Queue ``payload`` on ``channel``; it leaves through ``next_record``.

        Raises ``QueueFull`` if the queue would exceed its limit (nothing is queued then) and
        ``ValueError`` for an unknown channel or a message over the channel's ``max_message``.
        An empty payload is ignored: it would carry nothing, not even a boundary worth keeping.
        """
        spec = self._spec(channel)
        size = len(payload)
        if size == 0:
            return
        if spec.max_message is not None and size > spec.max_message:
            raise ValueError(f"a message on channel {channel} is at most {spec.max_message} "
                             f"bytes, not {size}")
        if self._pending[channel] + size > spec.limit:
            raise QueueFull(f"channel {channel} holds {self._pending[channel]} bytes; "
                            f"{size} more would pass its limit of {spec.limit}")
        view = memoryview(bytes(payload))
        queue = self._queues[channel]
        was_idle = not queue
        for start in range(0, size, MAX_PIECE):
            piece = view[start:start + MAX_PIECE]
            queue.append((piece, start + MAX_PIECE >= size))
        self._pending[channel] += size
        if was_idle and spec.weight is not None and channel not in self._active:
            self._active.append(channel)

    def pending(self, channel: int) -> int:
        """Payload bytes queued on ``channel`` and not yet handed out by ``next_record``."""
        self._spec(channel)
        return self._pending[channel]

    def room(self, channel: int) -> int:
        """How many more bytes ``send`` would accept on ``channel`` right now."""
        return self._spec(channel).limit - self.pending(channel)

    @property
    def idle(self) -> bool:
        """Nothing is queued on any channel."""
        return not any(self._pending.values())

    def next_record(self, max_payload: int) -> bytes | None:
        """The next record payload (at most ``max_payload`` bytes) to seal, or None if idle."""
        if max_payload <= HEADER_BYTES:
            raise ValueError(f"a record must hold more than the {HEADER_BYTES}-byte frame header")
        out = bytearray()
        for channel in self._strict:
            queue = self._queues[channel]
            while queue and max_payload - len(out) > HEADER_BYTES:
                self._emit(channel, out, max_payload)
        self._fill_weighted(out, max_payload)
        return bytes(out) if out else None

    def _fill_weighted(self, out: bytearray, max_payload: int) -> None:
        while self._active and max_payload - len(out) > HEADER_BYTES:
            channel = self._active[0]
            if not self._turn_started:
                self._deficit[channel] += self._specs[channel].weight * QUANTUM
                self._turn_started = True
            queue = self._queues[channel]
            while queue and self._deficit[channel] > 0 and max_payload - len(out) > HEADER_BYTES:
                self._deficit[channel] -= self._emit(channel, out, max_payload)
            if not queue:
                # an idle channel keeps neither credit nor debt (classic DRR)
                self._deficit[channel] = 0
                self._active.popleft()
                self._turn_started = False
            elif self._deficit[channel] <= 0:
                self._active.rotate(-1)
                self._turn_started = False
            # else: the record is full; the turn goes on in the next record

    def _emit(self, channel: int, out: bytearray, max_payload: int) -> int:
        """Move (part of) the head piece of ``channel`` into ``out``; return the bytes used."""
        queue = self._queues[channel]
        piece, end = queue[0]
        take = min(len(piece), max_payload - len(out) - HEADER_BYTES)
        if take == len(piece):
            queue.popleft()
            flags = FLAG_END if end else 0
        else:
            queue[0] = (piece[take:], end)
            flags = 0
        out += HEADER.pack(channel, flags, take)
        out += piece[:take]
        self._pending[channel] -= take
        return HEADER_BYTES + take

    # --- receiving ----------------------------------------------------------------------------

    def receive(self, record_payload: bytes) -> list[ChannelData]:
        """Parse one record payload; return what it carried, in order."""
        if self._failed:
            raise MuxError(self._failed)
        try:
            return self._parse(bytes(record_payload))
        except MuxError as e:
            self._failed = str(e)
            raise

    def _parse(self, data: bytes) -> list[ChannelData]:
        if not data:
            raise MuxError("empty record")
        events: list[ChannelData] = []
        offset = 0
        while offset < len(data):
            if len(data) - offset < HEADER_BYTES:
                raise MuxError(f"frame header cut off at byte {offset} of the record")
            channel, flags, length = HEADER.unpack_from(data, offset)
            offset += HEADER_BYTES
            spec = self._specs.get(channel)
            if spec is None:
                raise MuxError(f"frame for unknown channel {channel}")
            if flags & ~FLAG_END:
                raise MuxError(f"frame on channel {channel} has reserved flag bits {flags:#04x}")
            if not 0 < length <= MAX_PIECE:
                raise MuxError(f"frame on channel {channel} has length {length} "
                               f"(1-{MAX_PIECE} allowed)")
            if offset + length > len(data):
                raise MuxError(f"frame on channel {channel} claims {length} bytes, "
                               f"the record holds {len(data) - offset}")
            payload = data[offset:offset + length]
            offset += length
            end = bool(flags & FLAG_END)
            channel = _channel_id(channel)
            if spec.max_message is None:
                events.append(ChannelData(channel, payload, end))
                continue
            size = self._partial_size[channel] + length
            if size > spec.max_message:
                raise MuxError(f"message on channel {channel} exceeds {spec.max_message} bytes")
            if end:
                parts = self._partial[channel]
                events.append(ChannelData(channel, b"".join(parts) + payload if parts else payload))
                self._partial[channel] = []
                self._partial_size[channel] = 0
            else:
                self._partial[channel].append(payload)
                self._partial_size[channel] = size
        return events

    def _spec(self, channel: int) -> ChannelSpec:
        try:
            return self._specs[channel]
        except KeyError:
            raise ValueError(f"unknown channel {channel}") from None


__all__ = ["Channel", "ChannelData", "ChannelSpec", "DEFAULT_CHANNELS", "HEADER_BYTES",
           "MAX_PIECE", "MuxError", "QueueFull", "SessionMux"]
