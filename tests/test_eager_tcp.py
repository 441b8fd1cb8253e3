"""``server.eager_tcp``: a write on an idle socket is sent at once, everything else Twisted's way.

Real TCP on 127.0.0.1: a small write leaves without the socket ever being registered for
writing; a write larger than the kernel takes, followed by more writes and a close, arrives
whole and in order (the rest went through Twisted's buffer, producer and close path).
"""

from __future__ import annotations

import hashlib
import socket

import pytest_twisted
from twisted.internet import protocol, reactor, threads

from server.eager_tcp import EagerServer, listen_eager


class Sender(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)


def read_all(port: int, first: bytes) -> tuple[bytes, bytes]:
    """(the first ``len(first)`` bytes, everything after them) — read in a thread."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"go")
        head = b""
        while len(head) < len(first):
            head += sock.recv(len(first) - len(head))
        rest = bytearray()
        while chunk := sock.recv(1 << 20):
            rest += chunk
    return head, bytes(rest)


@pytest_twisted.ensureDeferred
async def test_small_writes_go_at_once_big_ones_whole_and_in_order():
    factory = protocol.Factory.forProtocol(Sender)
    factory.connections = []
    listening = listen_eager(reactor, 0, factory, 50, "127.0.0.1")
    try:
        port = listening.getHost().port
        first = b"hello"
        big = hashlib.sha256(b"x").digest() * (32 * 1024)  # 1 MiB: more than the kernel takes
        tail = b"-and-the-end"
        done = threads.deferToThread(read_all, port, first)
        while not factory.connections:
            await _turn()
        conn = factory.connections[0]
        transport = conn.transport
        assert isinstance(transport, EagerServer)
        # a small send buffer: the kernel takes only part of the big write below
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        transport.write(first)
        assert transport not in reactor.getWriters()  # sent: nothing buffered, no writer
        transport.write(big)
        assert transport in reactor.getWriters()  # the kernel took part; the rest waits
        transport.write(tail)  # behind what is buffered, never ahead of it
        transport.loseConnection()
        head, rest = await done
        assert head == first
        assert rest == big + tail
        # its log prefix and repr read as tcp.Server's, made when asked, not kept per connection
        peer = transport.getPeer()
        assert transport.logPrefix() == f"Sender,{transport.sessionno},{peer.host}"
        assert repr(transport) == f"<Sender #{transport.sessionno} on {port}>"
        assert "logstr" not in vars(transport) and "repstr" not in vars(transport)
    finally:
        await listening.stopListening()


def _turn():
    from twisted.internet.task import deferLater
    return deferLater(reactor, 0.01, lambda: None)
