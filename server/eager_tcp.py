"""A TCP listening port whose connections send a write at once when nothing waits to be sent.

Twisted's TCP transport buffers every write, registers the socket for writing (asyncio's
``add_writer``: an ``epoll_ctl`` and a handle), sends on a later turn of the loop and then
unregisters it (``remove_writer``: another ``epoll_ctl``).  On the module port nearly every
write is one TLS flight or record answering one command on an otherwise idle socket, so that
round costs more Python than the ``send`` itself: the register/unregister pair was ~10 % of the
server's GIL-holding samples of an ad-hoc set-up (bench/README.md, "ad-hoc set-ups: fewer
handshakes").  Here such a write is one ``send``; whatever the kernel does not take at once
(and every write while something is still buffered) goes Twisted's ordinary way, so the order
of bytes, producers' back-pressure and closing stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


class EagerServer(tcp.Server):
    """``tcp.Server`` with the eager write described above."""

    def write(self, data: bytes) -> None:
        if (type(data) is bytes and data and self.connected and not self.disconnecting
                and not self._tempDataBuffer and self.offset == len(self.dataBuffer)):
            try:
                sent = self.socket.send(data)
            except OSError:  # would block, or an error the ordinary write path will report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)


class EagerPort(tcp.Port):
    transport = EagerServer


def listen_eager(reactor: Any, port: int, factory, backlog: int, interface: str) -> EagerPort:
    """``reactor.listenTCP`` with ``EagerServer`` connections."""
    listening = EagerPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening
