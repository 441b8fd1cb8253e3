"""BoxDecoder and encode_box: round trips under any chunking, hostile bytes, limits, Twisted's
own AMP encoding, and the hand-over of raw bytes after a box."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.protocols import amp

from protocol.framing import (
    MAX_KEY_LENGTH,
    MAX_VALUE_LENGTH,
    BoxDecoder,
    FramingError,
    encode_box,
)

FAST = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_PATTERN = bytes(range(256)) * 256  # 65,536 bytes to cut long values from

keys = st.binary(min_size=1, max_size=MAX_KEY_LENGTH)
# mostly short values, sometimes long ones up to the maximum (hypothesis likes the boundaries)
values = st.one_of(
    st.binary(max_size=40),
    st.integers(0, MAX_VALUE_LENGTH).map(lambda n: _PATTERN[:n]),
)
boxes = st.dictionaries(keys, values, max_size=6)
box_lists = st.lists(boxes, min_size=0, max_size=6)


def roomy_decoder() -> BoxDecoder:
    return BoxDecoder(max_box_bytes=8 * 1024 * 1024, max_keys=1000)


def cut(data: bytes, positions: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(p % (len(data) + 1) for p in positions)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def decode_in_chunks(decoder: BoxDecoder, chunks: list[bytes]) -> list[dict]:
    out = []
    for chunk in chunks:
        out.extend(decoder.receive(chunk))
    return out


def raw_pair(key: bytes, value: bytes) -> bytes:
    """One key/value pair without encode_box's checks, for boxes encode_box refuses."""
    return struct.pack("!H", len(key)) + key + struct.pack("!H", len(value)) + value


# --- round trips --------------------------------------------------------------------------------

@FAST
@given(box_lists, st.lists(st.integers(min_value=0), max_size=20))
def test_boxes_survive_any_chunking(sent, positions):
    stream = b"".join(encode_box(box) for box in sent)
    received = decode_in_chunks(roomy_decoder(), cut(stream, positions))
    assert received == sent
    assert [list(box) for box in received] == [list(box) for box in sent]  # key order too
    assert all(type(k) is bytes and type(v) is bytes for box in received for k, v in box.items())


@FAST
@given(st.dictionaries(keys, st.binary(max_size=300), max_size=6))
def test_byte_by_byte_equals_all_at_once(box):
    data = encode_box(box) * 2
    one_by_one = decode_in_chunks(roomy_decoder(), [data[i:i + 1] for i in range(len(data))])
    assert one_by_one == roomy_decoder().receive(data) == [box, box]


# --- Twisted compatibility ----------------------------------------------------------------------

@FAST
@given(box_lists, st.lists(st.integers(min_value=0), max_size=10))
def test_boxes_serialized_by_twisted_decode_identically(sent, positions):
    stream = b"".join(amp.AmpBox(box).serialize() for box in sent)
    assert decode_in_chunks(roomy_decoder(), cut(stream, positions)) == sent


@FAST
@given(box_lists)
def test_twisted_parses_what_we_encode(sent):
    stream = b"".join(encode_box(box) for box in sent)
    assert [dict(box) for box in amp.parseString(stream)] == sent


segments = st.lists(st.one_of(boxes.map(encode_box), st.binary(max_size=30)), max_size=8)


@FAST
@given(segments, st.lists(st.integers(min_value=0), max_size=10))
def test_agrees_with_twisted_parser_whenever_it_accepts(parts, positions):
    """Valid boxes mixed with junk: either we refuse, or we return what Twisted would."""
    stream = b"".join(parts)
    try:
        ours = decode_in_chunks(roomy_decoder(), cut(stream, positions))
    except FramingError:
        return
    assert ours == [dict(box) for box in amp.parseString(stream)]


def test_real_command_boxes_from_twisted():
    from protocol.control import Hello, ListHosts

    proto = amp.AMP()
    hello = Hello.makeArguments({"protocol_version": 1, "module_version": "0.1",
                                 "module_kind": "supporter"}, proto)
    hello[b"_command"], hello[b"_ask"] = b"Hello", b"1"
    hosts = ListHosts.makeResponse({"hosts": [
        {"host_id": f"h{i}", "name": "Praxis Müller", "group": "", "online": bool(i % 2),
         "last_seen": "", "address": "192.0.2.1", "module_version": "0.1"} for i in range(50)
    ]}, proto)
    hosts[b"_answer"] = b"1"
    stream = hello.serialize() + hosts.serialize()
    assert roomy_decoder().receive(stream) == [dict(hello), dict(hosts)]
    assert BoxDecoder().receive(stream) == [dict(hello), dict(hosts)]  # within default limits


# --- hostile bytes ------------------------------------------------------------------------------

SMALL_LIMIT = 512


@FAST
@given(st.lists(st.one_of(st.binary(max_size=700), boxes.map(encode_box)), max_size=12))
def test_arbitrary_bytes_only_ever_raise_framing_error_and_stay_bounded(chunks):
    decoder = BoxDecoder(max_box_bytes=SMALL_LIMIT, max_keys=4)
    failed = None
    for chunk in chunks:
        try:
            for box in decoder.receive(chunk):
                assert len(encode_box(box)) <= SMALL_LIMIT
                assert len(box) <= 4
        except FramingError as exc:
            assert str(exc)
            failed = str(exc)
            break
        assert decoder.buffered <= SMALL_LIMIT
    if failed is not None:  # a failed decoder stays failed, with the same reason
        with pytest.raises(FramingError, match=failed.split(" ")[0]):
            decoder.receive(b"\x00\x00")
        with pytest.raises(FramingError):
            decoder.next_box()


def test_oversized_box_refused_before_it_is_complete():
    decoder = BoxDecoder(max_box_bytes=1000)
    # a key, then a value that announces 2,000 bytes: refused on the announcement
    with pytest.raises(FramingError, match="larger than 1000 bytes"):
        decoder.receive(raw_pair(b"k", b"")[:-2] + struct.pack("!H", 2000) + b"x" * 10)
    assert decoder.buffered < 1000


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_box_size_limit_is_exact(chunk_size):
    limit = 200
    # key "k" (2+1), value length prefix (2), value, terminator (2)
    fits = encode_box({b"k": b"v" * (limit - 7)})
    too_big = encode_box({b"k": b"v" * (limit - 6)})
    assert len(fits) == limit and len(too_big) == limit + 1

    def feed(data):
        decoder = BoxDecoder(max_box_bytes=limit)
        return decode_in_chunks(decoder, [data[i:i + chunk_size]
                                          for i in range(0, len(data), chunk_size)])

    assert feed(fits) == [{b"k": b"v" * (limit - 7)}]
    with pytest.raises(FramingError, match=f"larger than {limit} bytes"):
        feed(too_big)


def test_too_many_keys():
    exactly = {bytes([i + 1]): b"" for i in range(5)}
    assert BoxDecoder(max_keys=5).receive(encode_box(exactly)) == [exactly]
    with pytest.raises(FramingError, match="more than 5 keys"):
        BoxDecoder(max_keys=5).receive(encode_box({**exactly, b"x": b""}))


def test_key_longer_than_255_refused():
    decoder = BoxDecoder()
    with pytest.raises(FramingError, match="key length 256 exceeds 255"):
        decoder.receive(raw_pair(b"k" * 256, b"v") + b"\x00\x00")
    # refused on the length prefix alone, before the key arrives
    with pytest.raises(FramingError, match="key length 65535 exceeds 255"):
        BoxDecoder().receive(b"\xff\xff")


def test_duplicate_key_refused():
    data = raw_pair(b"_command", b"Hello") + raw_pair(b"_command", b"Heartbeat") + b"\x00\x00"
    with pytest.raises(FramingError, match="appears twice"):
        BoxDecoder().receive(data)


def test_empty_values_and_empty_box():
    assert BoxDecoder().receive(b"\x00\x00" + encode_box({b"a": b""})) == [{}, {b"a": b""}]


def test_encode_box_refuses_what_the_wire_cannot_carry():
    with pytest.raises(FramingError, match="1-255 bytes"):
        encode_box({b"": b"x"})
    with pytest.raises(FramingError, match="1-255 bytes"):
        encode_box({b"k" * 256: b"x"})
    with pytest.raises(FramingError, match="more than 65535"):
        encode_box({b"k": b"x" * (MAX_VALUE_LENGTH + 1)})
    assert encode_box({b"k" * 255: b"x" * MAX_VALUE_LENGTH})


# --- switching to raw bytes ---------------------------------------------------------------------

@FAST
@given(st.lists(boxes, min_size=1, max_size=4), st.data(), st.binary(max_size=300),
       st.lists(st.integers(min_value=0), max_size=10))
def test_take_unparsed_returns_exactly_the_bytes_after_the_box(before, data, raw, positions):
    switch_at = data.draw(st.integers(0, len(before) - 1))
    head = b"".join(encode_box(box) for box in before[:switch_at + 1])
    # what follows the switching box may look like anything, boxes and garbage included
    tail = b"".join(encode_box(box) for box in before[switch_at + 1:]) + raw
    decoder = roomy_decoder()
    got = []
    for chunk in cut(head + tail, positions):
        decoder.feed(chunk)
        while not decoder.paused and (box := decoder.next_box()) is not None:
            got.append(box)
            if len(got) == switch_at + 1:
                decoder.pause()
    assert got == before[:switch_at + 1]
    assert decoder.take_unparsed() == tail
    decoder.feed(b"later")  # a paused decoder keeps what it is fed, unparsed
    assert decoder.next_box() is None
    assert decoder.take_unparsed() == b"later"


def test_receive_honours_pause_between_calls():
    decoder = BoxDecoder()
    second = encode_box({b"b": b"2", b"c": b"3"})
    # the second box is half parsed when the caller pauses: none of it is lost
    assert decoder.receive(encode_box({b"a": b"1"}) + second[:9]) == [{b"a": b"1"}]
    decoder.pause()
    assert decoder.receive(second[9:] + b"\xff\xff") == []
    assert decoder.take_unparsed() == second + b"\xff\xff"
    assert decoder.take_unparsed() == b""


def test_an_idle_decoder_holds_no_box_and_no_instance_dict():
    """One decoder per idle control connection: between boxes it keeps no empty dict for the
    next one, and it has no instance dict (bench/README.md, issue 14)."""
    decoder = BoxDecoder()
    assert not hasattr(decoder, "__dict__") and decoder._box is None
    box = {b"_command": b"Heartbeat", b"_ask": b"7"}
    encoded = encode_box(box)
    assert decoder.receive(encoded[:11]) == [] and decoder._box == {}  # its first key read
    assert decoder.receive(encoded[11:] + encode_box({})) == [box, {}]
    assert decoder._box is None and decoder.buffered == 0
    with pytest.raises(FramingError, match="twice"):
        decoder.receive(b"\x00\x01a\x00\x01b\x00\x01a")
