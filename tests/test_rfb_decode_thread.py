"""The viewer's decoder thread (``RFBClientProtocol(decode_thread=True)``, the default of every
viewer's ``ViewerScreen``): while a large update decodes, the reactor thread is free (input goes
out at once) and the picture others draw holds only whole updates.  Event-based: the decoder is
held at a gate, nothing is timed."""

from __future__ import annotations

import queue
import threading

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from modules.common.screen.rfb_client_twisted import RFBClientProtocol
from modules.common.screen.screen_session import ViewerScreen
from protocol.rfb_client import FramebufferUpdated, RFBClient, ServerInit
from tests.test_rfb_client import (TightEncoder, ZrleEncoder, copy_rect, handshake, random_image,
                                   raw_rect, update)

W, H = 1920, 1080
WAIT = 60


class Reactor:
    """Stands in for ``reactor.callFromThread``: the test thread runs what was handed over."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()

    def call(self, f, *args) -> None:
        self.calls.put((f, args))

    def run_until(self, done) -> None:
        while not done():
            f, args = self.calls.get(timeout=WAIT)
            f(*args)


def gate_decoder(client, held: bytes):
    """Make ``client`` (decoding in its thread) stop before it decodes the chunk ``held`` until
    ``open_gate`` is set: (first_done — a chunk was decoded, at_gate — it waits, open_gate)."""
    real_receive = client.receive
    first_done, at_gate, open_gate = threading.Event(), threading.Event(), threading.Event()

    def gated(data: bytes):
        if data == held:
            at_gate.set()
            assert open_gate.wait(WAIT)
        result = real_receive(data)
        first_done.set()
        return result
    client.receive = gated
    return first_done, at_gate, open_gate


def test_input_goes_out_and_the_picture_stays_whole_while_a_large_update_decodes():
    reactor = Reactor()
    events = []
    protocol = RFBClientProtocol(on_event=events.append, decode_thread=True,
                                 call_in_reactor=reactor.call)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(handshake(W, H))
    reactor.run_until(lambda: any(isinstance(e, ServerInit) for e in events))
    assert threading.current_thread() is threading.main_thread()

    rng = np.random.default_rng(7)
    picture = rng.integers(0, 256, (H, W, 3), np.uint8)
    top, bottom = raw_rect(0, 0, picture[:H // 2]), raw_rect(0, H // 2, picture[H // 2:])
    message = update(top, bottom)
    first_half = len(message) - len(bottom)

    # the decoder decodes the first rect, then waits at the gate before the second
    first_done, at_gate, open_gate = gate_decoder(protocol.client, message[first_half:])

    transport.clear()
    protocol.dataReceived(message[:first_half])
    assert first_done.wait(WAIT)
    protocol.dataReceived(message[first_half:])
    assert at_gate.wait(WAIT)
    # mid-update: the top half is in the client's back buffer, not in the picture shown
    assert np.array_equal(protocol.client.framebuffer[:H // 2], picture[:H // 2])
    with protocol.framebuffer_lock:
        assert not protocol.framebuffer.any()
    # input goes out from this thread at once, before the update is done
    protocol.pointer(1, 10, 20)
    protocol.key(True, 0x61)
    sent = transport.value()
    assert sent == protocol.client.pointer(1, 10, 20) + protocol.client.key(True, 0x61)
    assert not any(isinstance(e, FramebufferUpdated) for e in events)

    open_gate.set()
    reactor.run_until(lambda: any(isinstance(e, FramebufferUpdated) for e in events))
    with protocol.framebuffer_lock:
        assert np.array_equal(protocol.framebuffer, picture)
    assert protocol.first_frame.called
    # the adapter asked for the next update from the reactor thread, after the input
    assert transport.value().endswith(protocol.client.request_update(True))

    # bytes still queued are decoded before the end is reported, and a bad stream still fails
    ended = []
    protocol.ended.addCallback(ended.append)
    protocol.dataReceived(update(raw_rect(0, 0, picture[:4, :4] ^ 0xFF)))
    protocol.dataReceived(b"\x63")                    # unknown server message type
    reactor.run_until(lambda: protocol.error is not None)
    assert "unknown server message type" in protocol.error
    assert transport.disconnecting
    protocol.connectionLost(None)
    reactor.run_until(lambda: ended)
    assert ended == [protocol.error]
    assert np.array_equal(protocol.framebuffer[:4, :4], picture[:4, :4] ^ 0xFF)


class ThreadReactor(Reactor):
    """``ViewerScreen`` hands work to the reactor thread with ``reactor.callFromThread``."""

    callFromThread = Reactor.call


def test_the_shipped_viewer_sends_input_while_a_large_update_decodes():
    """``ViewerScreen`` as the session builds it for every viewer (no option given): decoding
    runs off the reactor thread, input goes out mid-update, and the request for the next update
    went out when the update started, before it was decoded."""
    reactor = ThreadReactor()
    sent: list[bytes] = []
    events = []
    screen = ViewerScreen(reactor, send=sent.append, close=lambda: None, on_event=events.append)
    protocol = screen.protocol
    screen.received(handshake(W, H))
    reactor.run_until(lambda: any(isinstance(e, ServerInit) for e in events))

    picture = np.random.default_rng(8).integers(0, 256, (H, W, 3), np.uint8)
    top, bottom = raw_rect(0, 0, picture[:H // 2]), raw_rect(0, H // 2, picture[H // 2:])
    message = update(top, bottom)
    first_done, at_gate, open_gate = gate_decoder(protocol.client, message[-len(bottom):])

    sent.clear()
    screen.received(message[:-len(bottom)])
    assert first_done.wait(WAIT)        # decoded apart from the rest (queued chunks are joined)
    screen.received(message[-len(bottom):])
    assert at_gate.wait(WAIT)
    next_request = protocol.client.request_update(True)
    reactor.run_until(lambda: next_request in sent)       # asked for when the update started
    protocol.pointer(1, 10, 20)                           # the reactor thread is free
    protocol.key(True, 0x61)
    assert sent[-2:] == [protocol.client.pointer(1, 10, 20), protocol.client.key(True, 0x61)]
    assert not any(isinstance(e, FramebufferUpdated) for e in events)
    with protocol.framebuffer_lock:
        assert not protocol.framebuffer.any()             # nothing half-applied is shown

    open_gate.set()
    reactor.run_until(lambda: any(isinstance(e, FramebufferUpdated) for e in events))
    with protocol.framebuffer_lock:
        assert np.array_equal(protocol.framebuffer, picture)
    assert screen.first_frame.called
    assert sent.count(next_request) == 1                  # no second request after the update
    screen.stop()


_UPDATE_KINDS = ("raw", "fill", "palette", "copyrect", "zrle")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2 ** 32 - 1),
       st.lists(st.lists(st.tuples(st.sampled_from(_UPDATE_KINDS), st.integers(0, 63),
                                   st.integers(0, 47), st.integers(1, 64), st.integers(1, 48)),
                         min_size=1, max_size=12), min_size=1, max_size=6),
       st.integers(0, 90))
def test_the_swapped_front_buffer_shows_every_update_as_one_client_decodes_it(seed, updates,
                                                                               tiles):
    """The decoder thread swaps front and back buffers and lets the back catch up lazily (less
    what later rects overwrite; CopyRect reads a caught-up back): after every update the front
    is exactly the picture a plain client decodes, whatever the mix and size of the rects, and
    also after an update of up to 90 small tiles (more pieces of lag than are kept)."""
    rng = np.random.default_rng(seed)
    w, h = 64, 48
    reactor, events = Reactor(), []
    protocol = RFBClientProtocol(on_event=events.append, decode_thread=True,
                                 call_in_reactor=reactor.call)
    protocol.makeConnection(StringTransport())
    reference = RFBClient()
    for client_feed in (protocol.dataReceived, reference.receive):
        client_feed(handshake(w, h))
    reactor.run_until(lambda: any(isinstance(e, ServerInit) for e in events))
    tight, zrle_enc = TightEncoder(), ZrleEncoder()
    messages = []
    grid = [("fill", x, y, 8, 8) for y in range(0, h, 8) for x in range(0, w, 8)][:tiles]
    for spec in updates + ([grid] if grid else []):
        rects = []
        for kind, x, y, rw, rh in spec:
            x, y = min(x, w - 1), min(y, h - 1)
            rw, rh = min(rw, w - x), min(rh, h - y)
            img = random_image(rng, rh, rw, 3 if kind == "palette" else None)
            if kind == "raw":
                rects.append(raw_rect(x, y, img))
            elif kind == "fill":
                rects.append(tight.fill(x, y, rw, rh, tuple(int(v) for v in img[0, 0])))
            elif kind == "palette":
                rects.append(tight.palette(x, y, img))
            elif kind == "copyrect":
                rects.append(copy_rect(x, y, rw, rh, int(rng.integers(0, w - rw + 1)),
                                       int(rng.integers(0, h - rh + 1))))
            else:
                rects.append(zrle_enc.rect(x, y, img))
        messages.append(update(*rects))
    for n, message in enumerate(messages, 1):
        protocol.dataReceived(message)
        reference.receive(message)
        reactor.run_until(lambda: sum(isinstance(e, FramebufferUpdated) for e in events) == n)
        with protocol.framebuffer_lock:
            assert np.array_equal(protocol.pixels, reference.pixels), n
