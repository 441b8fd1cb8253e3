"""The recording format (protocol.recording): round trips, cut-off files, tampering, keys."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings, strategies as st

from protocol import recording as rec

OPERATOR = X25519PrivateKey.generate()
AUDITOR = X25519PrivateKey.generate()
HEADER = {"session_id": "s-1", "tenant": "acme", "recorder": "host",
          "parties": {"supporter": "hausmeister:supporter:ann", "peer": "hausmeister:host:h"},
          "started_at": "2026-12-05T18:00:00+00:00", "screen": [640, 480]}

entries_strategy = st.lists(st.tuples(st.sampled_from([rec.RFB_OUT, rec.RFB_IN, rec.EVENT, rec.INPUT]),
                                      st.integers(0, 10_000_000), st.binary(max_size=3000)),
                            max_size=30)


def write(entries, flush_every=3, recipients=(OPERATOR,), close=True) -> bytes:
    w = rec.Writer(dict(HEADER), [k.public_key() for k in recipients])
    out = [w.start()]
    for i, (kind, t, payload) in enumerate(entries):
        w.add(kind, t, payload)
        if i % flush_every == flush_every - 1:
            out.append(w.flush())
    out.append(w.flush())
    if close:
        out.append(w.close())
    return b"".join(out)


def read(data: bytes, private=OPERATOR, split: int = 7) -> tuple[rec.Reader, list]:
    reader = rec.Reader(unwrap=lambda h: rec.unwrap_key(h, private))
    got = []
    for i in range(0, len(data), split):
        got.extend(reader.receive(data[i:i + split]))
    return reader, [(e.kind, e.t_ms, e.payload) for e in got if isinstance(e, rec.Entry)]


@settings(max_examples=60, deadline=None)
@given(entries_strategy, st.integers(1, 5), st.integers(1, 5000))
def test_round_trip_in_any_split(entries, flush_every, split):
    data = write(entries, flush_every)
    reader, got = read(data, split=split)
    assert got == [(k, t, p) for k, t, p in entries]
    assert reader.complete and reader.trailing() == 0
    assert reader.header.fields["session_id"] == "s-1"


def test_large_payload_spans_entries_and_concatenates():
    big = bytes(range(256)) * 5000  # 1.28 MB in one RFB write
    data = write([(rec.RFB_OUT, 5, big)])
    _, got = read(data, split=65536)
    assert b"".join(p for k, _, p in got if k == rec.RFB_OUT) == big
    assert all(t == 5 for _, t, _ in got)


@settings(max_examples=40, deadline=None)
@given(entries_strategy.filter(lambda e: len(e) > 2), st.data())
def test_cut_off_file_reads_up_to_last_whole_record(entries, data):
    whole = write(entries, flush_every=1)
    cut = data.draw(st.integers(0, len(whole) - 1))
    reader = rec.Reader(unwrap=lambda h: rec.unwrap_key(h, OPERATOR))
    items = reader.receive(whole[:cut])
    assert not reader.complete
    seen = [i for i in items if isinstance(i, rec.Entry)]
    # every entry read is a prefix of what was written
    assert [(e.kind, e.t_ms, e.payload) for e in seen] == [tuple(x) for x in entries[:len(seen)]]
    assert reader.whole_end + reader.trailing() == cut


@settings(max_examples=60, deadline=None)
@given(entries_strategy.filter(lambda e: len(e) > 0), st.data())
def test_any_flipped_byte_is_detected(entries, data):
    whole = bytearray(write(entries))
    header_len = len(rec.MAGIC) + 4 + struct.unpack_from(">I", whole, len(rec.MAGIC))[0]
    pos = data.draw(st.integers(header_len, len(whole) - 1))
    whole[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(rec.RecordingError):
        reader, _ = read(bytes(whole))
        if not reader.complete:
            raise rec.RecordingError("incomplete")


def test_swapped_records_and_appended_bytes_are_named():
    w = rec.Writer(dict(HEADER), [OPERATOR.public_key()])
    head = w.start()
    w.add(rec.EVENT, 1, b'{"kind":"a"}')
    r0 = w.flush()
    w.add(rec.EVENT, 2, b'{"kind":"b"}')
    r1 = w.flush()
    end = w.close()
    with pytest.raises(rec.RecordingError, match="record 1 where record 0 belongs"):
        read(head + r1 + r0 + end)
    with pytest.raises(rec.RecordingError, match="after the final record"):
        read(head + r0 + r1 + end + r0)


def test_header_swapped_from_another_recording_fails():
    a = write([(rec.EVENT, 1, b"{}")])
    w = rec.Writer(dict(HEADER, session_id="s-2"), [OPERATOR.public_key()])
    other_header = w.start()
    hdr_len = len(rec.MAGIC) + 4 + struct.unpack_from(">I", a, len(rec.MAGIC))[0]
    with pytest.raises(rec.RecordingError):
        read(other_header + a[hdr_len:])
    assert read(a)[1] == [(rec.EVENT, 1, b"{}")]


def test_auditor_reads_operator_reads_stranger_does_not():
    data = write([(rec.RFB_OUT, 1, b"x")], recipients=(OPERATOR, AUDITOR))
    assert read(data, AUDITOR)[1] == [(rec.RFB_OUT, 1, b"x")]
    assert read(data, OPERATOR)[1] == [(rec.RFB_OUT, 1, b"x")]
    stranger = X25519PrivateKey.generate()
    with pytest.raises(rec.RecordingError, match="not readable with key"):
        read(data, stranger)


def test_framing_only_reader_needs_no_key():
    data = write([(rec.RFB_OUT, 1, b"x" * 100)] * 5, flush_every=1)
    reader = rec.Reader()
    items = reader.receive(data[:-3])
    assert not reader.complete and reader.next_counter == 5
    assert not any(isinstance(i, rec.Entry) for i in items)
    reader.receive(data[-3:])
    assert reader.complete


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_raises_recording_error_only(blob):
    reader = rec.Reader(key=b"k" * 32)
    try:
        reader.receive(rec.MAGIC + blob)
        reader.receive(blob)
    except rec.RecordingError:
        pass


def test_client_stream_splits_input_from_what_a_player_needs():
    cs = rec.ClientStream()
    msgs = (b"RFB 003.008\n" + b"\x01" + b"\x01"
            + b"\x00" + b"\0" * 19                              # SetPixelFormat
            + b"\x02\x00\x00\x02" + b"\0\0\0\x10" + b"\0\0\0\x00"  # SetEncodings
            + b"\x04\x01\x00\x00\x00\x00\x00\x61"             # key 'a' down
            + b"\x05\x01\x00\x10\x00\x20"                     # pointer
            + b"\x06\0\0\0\0\0\0\x02hi"                       # cut text
            + b"\x03\x01\0\0\0\0\x01\x00\x01\x00")            # update request
    got = []
    for i in range(len(msgs)):
        got.extend(cs.feed(msgs[i:i + 1]))
    kinds = [g[0] for g in got]
    assert kinds == ["rfb_in"] * 5 + ["key", "pointer", "cut_text", "rfb_in"]
    assert got[5] == ("key", True, 0x61)
    assert got[6] == ("pointer", 1, 16, 32)
    assert got[7] == ("cut_text", "hi")
