"""SessionMux: round trips under any interleaving and record size, hostile record payloads,
strict priority for control, fair shares for screen/data/file, bounded queues."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modules.common.session.mux import (
    HEADER_BYTES,
    MAX_PIECE,
    Channel,
    ChannelData,
    ChannelSpec,
    MuxError,
    QueueFull,
    SessionMux,
)

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

RECORD = 65519  # what modules.common.session.channel can seal in one record
_PATTERN = bytes(range(256)) * 512  # 128 KiB to cut long payloads from
ROOMY = {c: ChannelSpec(weight=None if c is Channel.CONTROL else w, limit=1 << 30,
                        max_message=64 * 1024 if c is Channel.CONTROL else None)
         for c, w in ((Channel.CONTROL, 0), (Channel.SCREEN, 4), (Channel.DATA, 4),
                      (Channel.FILE, 1))}


def frame(channel: int, flags: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack("!BBH", channel, flags, len(payload) if length is None else length) + payload


def drain(sender: SessionMux, receiver: SessionMux, size: int) -> list[ChannelData]:
    out = []
    while (record := sender.next_record(size)) is not None:
        assert len(record) <= size
        out += receiver.receive(record)
    return out


def messages(events: list[ChannelData], channel: int) -> list[bytes]:
    """Whole sends on ``channel``, put back together from pieces by their ``end`` flags."""
    result, current = [], b""
    for event in events:
        if event.channel == channel:
            current += event.payload
            if event.end:
                result.append(current)
                current = b""
    assert current == b"", "a send was cut off"
    return result


# --- round trips --------------------------------------------------------------------------------

payloads = st.one_of(
    st.binary(min_size=1, max_size=40),
    st.integers(1, len(_PATTERN)).map(lambda n: _PATTERN[:n]),
)
operations = st.lists(st.one_of(
    st.tuples(st.just("send"), st.sampled_from(list(Channel)), payloads),
    st.tuples(st.just("record"), st.integers(HEADER_BYTES + 1, 70_000)),
), max_size=40)


@FAST
@given(operations, st.integers(HEADER_BYTES + 1, 70_000))
def test_any_interleaving_round_trips_per_channel(ops, final_record_size):
    sender, receiver = SessionMux(ROOMY), SessionMux(ROOMY)
    sent: dict[int, list[bytes]] = {c: [] for c in Channel}
    got: list[ChannelData] = []
    for op in ops:
        if op[0] == "send":
            _, channel, payload = op
            if channel is Channel.CONTROL:
                payload = payload[:64 * 1024]
            sender.send(channel, payload)
            sent[channel].append(payload)
        else:
            record = sender.next_record(op[1])
            if record is not None:
                assert len(record) <= op[1]
                got += receiver.receive(record)
    got += drain(sender, receiver, final_record_size)
    assert sender.idle and all(sender.pending(c) == 0 for c in Channel)
    for channel in Channel:
        assert messages(got, channel) == sent[channel]
    # control messages arrive whole, one event each
    assert [e.payload for e in got if e.channel is Channel.CONTROL] == sent[Channel.CONTROL]


def test_tiny_records_still_carry_everything():
    sender, receiver = SessionMux(), SessionMux()
    sender.send(Channel.CONTROL, b'{"type":"chat","text":"hi"}')
    sender.send(Channel.DATA, b"abc" * 100)
    events = drain(sender, receiver, HEADER_BYTES + 1)
    assert messages(events, Channel.CONTROL) == [b'{"type":"chat","text":"hi"}']
    assert b"".join(e.payload for e in events if e.channel is Channel.DATA) == b"abc" * 100
    with pytest.raises(ValueError):
        sender.next_record(HEADER_BYTES)


def test_pieces_are_at_most_16_kib_and_frames_never_span_records():
    sender = SessionMux()
    sender.send(Channel.SCREEN, _PATTERN[:100_000])
    record = sender.next_record(RECORD)
    offset, lengths = 0, []
    while offset < len(record):
        channel, flags, length = struct.unpack_from("!BBH", record, offset)
        lengths.append(length)
        offset += HEADER_BYTES + length
    assert offset == len(record)
    assert max(lengths) == MAX_PIECE
    assert len(record) == RECORD


def test_more_channels_can_be_added_for_later_parties():
    pointer = 16  # e.g. one pointer channel per participant in a presentation
    specs = {**ROOMY, pointer: ChannelSpec(weight=2, limit=4096)}
    sender, receiver = SessionMux(specs), SessionMux(specs)
    sender.send(pointer, b"x=10,y=20")
    sender.send(Channel.SCREEN, b"pixels")
    events = drain(sender, receiver, RECORD)
    assert ChannelData(pointer, b"x=10,y=20", True) in events
    # a receiver that does not know the channel refuses it
    sender.send(pointer, b"x=1")
    with pytest.raises(MuxError, match="unknown channel 16"):
        SessionMux().receive(sender.next_record(RECORD))


# --- hostile input ------------------------------------------------------------------------------

@FAST
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=8))
def test_arbitrary_bytes_raise_mux_error_only(records):
    receiver = SessionMux()
    for record in records:
        try:
            events = receiver.receive(record)
        except MuxError:
            with pytest.raises(MuxError):  # and the mux stays failed
                receiver.receive(frame(Channel.DATA, 1, b"x"))
            return
        assert all(isinstance(e, ChannelData) for e in events)


@FAST
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255), st.binary(max_size=30),
                          st.integers(0, 0xFFFF)), min_size=1, max_size=6))
def test_structured_garbage_raises_mux_error_only(frames):
    record = b"".join(frame(c, f, p, n) for c, f, p, n in frames)
    try:
        SessionMux().receive(record)
    except MuxError:
        pass


@pytest.mark.parametrize("record, reason", [
    (b"", "empty record"),
    (b"\x00\x01", "header cut off"),
    (frame(9, 1, b"x"), "unknown channel 9"),
    (frame(Channel.DATA, 0x81, b"x"), "reserved flag bits"),
    (frame(Channel.DATA, 1, b""), "length 0"),
    (frame(Channel.DATA, 1, b"x" * (MAX_PIECE + 1)), "length 16385"),
    (frame(Channel.DATA, 1, b"xy", length=3), "claims 3 bytes"),
    (frame(Channel.DATA, 1, b"ok") + b"\x03", "header cut off"),
    (frame(Channel.CONTROL, 0, _PATTERN[:MAX_PIECE]) * 4 + frame(Channel.CONTROL, 1, b"x"),
     "exceeds 65536 bytes"),
])
def test_malformed_frames_are_refused_with_a_reason(record, reason):
    receiver = SessionMux()
    with pytest.raises(MuxError, match=reason):
        receiver.receive(record)
    with pytest.raises(MuxError, match=reason):
        receiver.receive(frame(Channel.DATA, 1, b"fine"))


def test_oversized_control_message_across_records_is_refused():
    receiver = SessionMux()
    for _ in range(4):
        assert receiver.receive(frame(Channel.CONTROL, 0, _PATTERN[:MAX_PIECE])) == []
    with pytest.raises(MuxError, match="exceeds"):
        receiver.receive(frame(Channel.CONTROL, 0, b"x"))


# --- back-pressure ------------------------------------------------------------------------------

def test_queues_are_bounded_and_pending_shows_back_pressure():
    mux = SessionMux({Channel.CONTROL: ChannelSpec(None, 100, max_message=64),
                      Channel.DATA: ChannelSpec(1, 40_000)})
    mux.send(Channel.DATA, b"d" * 30_000)
    assert mux.pending(Channel.DATA) == 30_000 and mux.room(Channel.DATA) == 10_000
    with pytest.raises(QueueFull):
        mux.send(Channel.DATA, b"d" * 10_001)
    assert mux.pending(Channel.DATA) == 30_000  # nothing of a refused send is queued
    mux.next_record(20_000)
    assert mux.pending(Channel.DATA) < 30_000 - 16_000
    mux.send(Channel.DATA, b"d" * 10_001)
    with pytest.raises(ValueError, match="at most 64"):
        mux.send(Channel.CONTROL, b"c" * 65)
    with pytest.raises(ValueError, match="unknown channel"):
        mux.send(Channel.SCREEN, b"s")
    with pytest.raises(ValueError, match="unknown channel"):
        mux.pending(7)
    mux.send(Channel.DATA, b"")  # nothing to carry
    assert mux.next_record(100) is not None


# --- scheduling ---------------------------------------------------------------------------------

class FileSource:
    """A 100 MB file fed into the mux the way a producer would: topped up while there is room."""

    SIZE = 100 * 1000 * 1000
    CHUNK = 256 * 1024
    PATTERN = bytes(range(251)) * 4200  # ~1 MB; 251 is prime, so chunks differ by position

    def __init__(self) -> None:
        self.offset = 0
        self.digest = hashlib.sha256()

    def top_up(self, mux: SessionMux) -> None:
        while self.offset < self.SIZE and mux.room(Channel.FILE) >= self.CHUNK:
            n = min(self.CHUNK, self.SIZE - self.offset)
            start = self.offset % (len(self.PATTERN) - self.CHUNK)
            chunk = self.PATTERN[start:start + n]
            mux.send(Channel.FILE, chunk)
            self.digest.update(chunk)
            self.offset += n


def test_large_file_never_starves_control_or_screen_and_still_completes():
    sender, receiver = SessionMux(), SessionMux()
    source = FileSource()
    received_file = hashlib.sha256()
    file_bytes = 0
    seq = 0

    def one_record(with_screen: bool) -> dict[int, int]:
        nonlocal seq, file_bytes
        source.top_up(sender)
        if with_screen:
            while sender.room(Channel.SCREEN) >= 64 * 1024 and sender.pending(Channel.SCREEN) < 256 * 1024:
                sender.send(Channel.SCREEN, _PATTERN[:64 * 1024])
        seq += 1
        control = b'{"type":"chat","text":"%d"}' % seq
        sender.send(Channel.CONTROL, control)
        events = receiver.receive(sender.next_record(RECORD))
        # the control message queued before this record is in this record, first
        assert events[0] == ChannelData(Channel.CONTROL, control, True)
        counts = {c: 0 for c in Channel}
        for event in events:
            counts[event.channel] += len(event.payload)
            if event.channel is Channel.FILE:
                received_file.update(event.payload)
                file_bytes += len(event.payload)
        return counts

    # phase 1: screen busy all the time — it keeps the larger share, the file still moves
    totals = {c: 0 for c in Channel}
    for _ in range(400):
        for channel, n in one_record(with_screen=True).items():
            totals[channel] += n
    shared = totals[Channel.SCREEN] + totals[Channel.FILE]
    assert totals[Channel.SCREEN] / shared >= 0.75
    assert totals[Channel.FILE] / shared >= 0.15

    # phase 2: screen idle, control keeps coming — the file gets the rest of the link and ends
    records = 0
    while file_bytes < FileSource.SIZE:
        one_record(with_screen=False)
        records += 1
        assert records < 3000
    while not sender.idle:
        receiver.receive(sender.next_record(RECORD))
    assert received_file.hexdigest() == source.digest.hexdigest()
    # while alone, the file filled whole records (apart from the control message)
    assert records <= FileSource.SIZE // (RECORD - 200) + 400


def test_screen_data_and_file_share_the_link_by_weight():
    sender = SessionMux(ROOMY)
    for channel in (Channel.SCREEN, Channel.DATA, Channel.FILE):
        sender.send(channel, _PATTERN * 40)  # ~5 MB each, all backlogged throughout
    receiver = SessionMux(ROOMY)
    totals = {c: 0 for c in Channel}
    for _ in range(60):
        for event in receiver.receive(sender.next_record(RECORD)):
            totals[event.channel] += len(event.payload)
    whole = sum(totals.values())
    assert totals[Channel.SCREEN] / whole == pytest.approx(4 / 9, abs=0.03)
    assert totals[Channel.DATA] / whole == pytest.approx(4 / 9, abs=0.03)
    assert totals[Channel.FILE] / whole == pytest.approx(1 / 9, abs=0.03)


def test_control_goes_first_even_in_the_middle_of_a_file_turn():
    sender, receiver = SessionMux(), SessionMux()
    sender.send(Channel.FILE, _PATTERN[:200_000])
    receiver.receive(sender.next_record(10_000))  # the file's turn is cut by the record's end
    sender.send(Channel.CONTROL, b'{"type":"emergency_stop","who":"customer"}')
    events = receiver.receive(sender.next_record(10_000))
    assert events[0].channel is Channel.CONTROL
