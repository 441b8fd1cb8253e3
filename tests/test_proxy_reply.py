"""The module's reading of an HTTP proxy's answer to CONNECT (``modules.common.link.proxy``), sans I/O:
split anywhere it reads the same; garbage and endless headers are a ValueError, never a hang or a
crash; the proxy setting is parsed or refused in one line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from modules.common.link.proxy import MAX_REPLY, ConnectReply, _bypassed, parse_proxy

REPLY = b"HTTP/1.1 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n"


def feed_in_pieces(data: bytes, cuts: list[int]) -> ConnectReply:
    reply = ConnectReply()
    start = 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        reply.feed(data[start:cut])
        start = cut
    return reply


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), st.binary(max_size=200))
def test_a_reply_split_anywhere_reads_the_same(cuts, tunnel_bytes):
    reply = feed_in_pieces(REPLY + tunnel_bytes, cuts)
    assert reply.done and reply.status == 200 and reply.reason == "Connection established"
    assert reply.rest == tunnel_bytes


@settings(max_examples=300)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_are_an_answer_a_wait_or_a_value_error(data):
    reply = ConnectReply()
    try:
        done = reply.feed(data)
    except ValueError:
        return
    if done:
        assert 100 <= reply.status <= 999
    else:
        assert b"\r\n\r\n" not in data


def test_refusals_and_garbage():
    for raw, status in ((b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n", 407),
                        (b"HTTP/1.1 403 Access violation\r\nX: y\r\n\r\n", 403)):
        reply = ConnectReply()
        assert reply.feed(raw) and reply.status == status
    with pytest.raises(ValueError, match="not HTTP"):
        ConnectReply().feed(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ValueError, match="longer than"):
        ConnectReply().feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_REPLY // 6 + 10))


def test_proxy_settings():
    proxy = parse_proxy("http://tester:s%40cret@127.0.0.1:8888")
    assert (proxy.host, proxy.port, proxy.user, proxy.password) == ("127.0.0.1", 8888, "tester",
                                                                    "s@cret")
    assert proxy.shown == "http://tester@127.0.0.1:8888" and "cret" not in proxy.shown
    assert b"Proxy-Authorization: Basic dGVzdGVyOnNAY3JldA==" in proxy.connect_request("h", 443)
    assert parse_proxy("proxy.lan").port == 3128
    for bad in ("ftp://x:1", "http://:8080", "http://h:0", "http://h:99999", "http://h:1/path"):
        with pytest.raises(ValueError):
            parse_proxy(bad)
    assert _bypassed("server.corp.example", ".corp.example, other")
    assert _bypassed("127.0.0.1", "127.0.0.1") and not _bypassed("127.0.0.1", "localhost")
