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


#: the parts of log prefixes and reprs all connections of a listener share (a handful)
_SHARED_TEXT: dict[str, str] = {}
_SHARED_TEXT_MAX = 256


def _shared(text: str) -> str:
    found = _SHARED_TEXT.get(text)
    if found is None:
        if len(_SHARED_TEXT) >= _SHARED_TEXT_MAX:
            return text
        _SHARED_TEXT[text] = found = text
    return found


class EagerServer(tcp.Server):
    """``tcp.Server`` with the eager write described above, and without two strings of its own.

    ``tcp.Server`` formats its log prefix (``"<listener's prefix>,<session no>,<address>"``,
    read at every reactor event) and its repr at accept and keeps both: ~180 bytes per idle
    host (bench/README.md, issue 14).  Here they are formatted when asked, from the part every
    connection of the listener shares and what the connection keeps anyway; the text is the
    same."""

    _log_prefix = "-"
    _repr_head = "<?"
    _repr_port = None

    @property
    def logstr(self) -> str:
        return f"{self._log_prefix},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, text: str) -> None:  # tcp.Server.__init__'s prefix,sessionno,address
        self._log_prefix = _shared(text.rsplit(",", 2)[0])

    @property
    def repstr(self) -> str:
        return f"{self._repr_head} #{self.sessionno} on {self._repr_port}>"

    @repstr.setter
    def repstr(self, text: str) -> None:  # tcp.Server.__init__'s <protocol #sessionno on port>
        self._repr_head = _shared(text.rsplit(" #", 1)[0])
        self._repr_port = self.server._realPortNumber

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
