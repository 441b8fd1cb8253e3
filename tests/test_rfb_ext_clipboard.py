"""The RFB Extended Clipboard (issue 16 §4): UTF-8 clipboard text between our RFB server and
the viewer's client, the Latin-1 fallback for clients without it, the message parser under
hypothesis, and bounds (a zlib bomb, a message the client never asked for)."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.common.screen.rfb_server import ClientCutText, RFBError, RFBServer
from protocol import rfb_ext_clipboard as ext
from protocol.rfb_client import DEFAULT_ENCODINGS, RFBClient, RFBClientError, ServerCutText

TEXT = "Grüße aus Köln, Ärger über Öl — 你好，世界 🙂\nzweite Zeile\twith a tab"


def connected(encodings=DEFAULT_ENCODINGS) -> tuple[RFBServer, RFBClient]:
    """A server and a client that went through the handshake, bytes pumped both ways."""
    server = RFBServer((64, 48), name="t")
    client = RFBClient(encodings=encodings)
    client.receive(server.initial())
    pump(server, client)
    assert server.ready and client.initialised
    return server, client


def pump(server: RFBServer, client: RFBClient) -> tuple[list, list]:
    """Move bytes until both are quiet; returns (server events, client events)."""
    got_s, got_c = [], []
    for _ in range(10):
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
        if to_server:
            got_s += server.receive(to_server)
        if to_client:
            got_c += client.receive(to_client)
    return got_s, got_c


def test_utf8_text_both_ways_with_the_extended_clipboard():
    server, client = connected()
    assert server.clipboard.active and client.clipboard.active     # caps exchanged
    out = server.cut_text(TEXT)
    assert struct.unpack(">B3xi", out[:8])[1] < 0                  # the extended form
    assert client.receive(out) == [ServerCutText(TEXT)]
    events = server.receive(client.cut_text(TEXT + " zurück"))
    assert events == [ClientCutText(TEXT + " zurück")]


def test_clients_without_it_get_latin1_as_rfc6143_says():
    plain = tuple(e for e in DEFAULT_ENCODINGS if e != ext.EXTENDED_CLIPBOARD)
    server, client = connected(plain)
    assert not server.clipboard.active and not client.clipboard.active
    assert client.receive(server.cut_text("Grüße 你好")) == [ServerCutText("Grüße ??")]
    assert server.receive(client.cut_text("Öl 世界")) == [ClientCutText("Öl ??")]
    # ... and an extended message from such a client is a protocol error
    with pytest.raises(RFBError, match="did not announce"):
        server.receive(ext.provide(ext.CLIENT, "x"))
    with pytest.raises(RFBClientError, match="did not ask"):
        client.receive(ext.provide(ext.SERVER, "x"))


def test_notify_request_and_peek_are_answered():
    peer = ext.ClipboardPeer(ext.SERVER)
    peer.handle(ext.parse(ext.message(ext.CLIENT, ext.CAPS | ext.NOTIFY | ext.REQUEST | ext.TEXT,
                                      struct.pack(">I", 1000))[8:]))
    # a peer that takes notify but not provide is told, then asks, then gets the text
    assert peer.send_text("Grüße") == ext.message(ext.SERVER, ext.NOTIFY | ext.TEXT)
    reply, text = peer.handle(ext.parse(ext.message(ext.CLIENT, ext.REQUEST | ext.TEXT)[8:]))
    assert text is None and ext.parse(reply[8:]).text == "Grüße"
    reply, _ = peer.handle(ext.parse(ext.message(ext.CLIENT, ext.PEEK)[8:]))
    assert ext.parse(reply[8:]) == ext.ExtClipboard(ext.NOTIFY, ext.TEXT, {})
    reply, _ = peer.handle(ext.parse(ext.message(ext.CLIENT, ext.NOTIFY | ext.TEXT)[8:]))
    assert ext.parse(reply[8:]) == ext.ExtClipboard(ext.REQUEST, ext.TEXT, {})


@pytest.mark.parametrize("payload, reason", [
    (b"\x10", "has no flags"),
    (struct.pack(">I", ext.PROVIDE | ext.NOTIFY), "2 actions"),
    (struct.pack(">I", 0x00010001), "reserved flag bits"),
    (struct.pack(">I", ext.CAPS | ext.TEXT | 2), "carry 0 sizes"),
    (struct.pack(">I", ext.PROVIDE | ext.TEXT) + b"not zlib", "not a zlib stream"),
    (struct.pack(">I", ext.PROVIDE | ext.TEXT) + zlib.compress(struct.pack(">I", 50) + b"x"),
     "not the 50"),
    (struct.pack(">I", ext.PROVIDE | ext.TEXT) + zlib.compress(b"\0" * (3 << 20)), "inflates"),
    (struct.pack(">I", ext.PROVIDE | ext.TEXT) + zlib.compress(struct.pack(">I", 2) + b"\xff\0"),
     "not UTF-8"),
])
def test_malformed_messages_are_refused_with_a_reason(payload, reason):
    with pytest.raises(ext.ExtClipboardError, match=reason):
        ext.parse(payload)


def test_a_bad_message_ends_the_rfb_connection_with_a_reason():
    server, client = connected()
    with pytest.raises(RFBError, match="extended clipboard: provide data is not a zlib"):
        server.receive(ext.message(ext.CLIENT, ext.PROVIDE | ext.TEXT, b"junk"))
    with pytest.raises(RFBClientError, match="extended clipboard: .*2 actions"):
        client.receive(ext.message(ext.SERVER, ext.PROVIDE | ext.REQUEST))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_raises_only_its_error(data):
    try:
        ext.parse(data)
    except ext.ExtClipboardError:
        pass


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 2**32 - 1), body=st.binary(max_size=64))
def test_parser_on_any_flags_raises_only_its_error(flags, body):
    for payload in (struct.pack(">I", flags) + body,
                    struct.pack(">I", flags) + zlib.compress(body)):
        try:
            msg = ext.parse(payload)
        except ext.ExtClipboardError:
            continue
        assert msg.action in (ext.CAPS, ext.REQUEST, ext.PEEK, ext.NOTIFY, ext.PROVIDE)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\0"),
               max_size=300))
def test_provided_text_round_trips(text):
    msg = ext.provide(ext.SERVER, text)
    assert struct.unpack(">B3xi", msg[:8]) == (3, -(len(msg) - 8))
    assert ext.parse(msg[8:]).text == text
