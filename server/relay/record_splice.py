"""The relay's fast path: TLS records of a paired leg go to its partner without Python objects.

Twisted's way per relayed chunk is a dozen Python layers: ``doRead`` makes a ``bytes``, the TLS
layer feeds it to pyOpenSSL, reads plaintext ``bytes`` until a ``WantReadError``, hands them
through the relay glue to the partner's TLS layer, which encrypts them into more ``bytes`` for
the TCP transport's buffer, sent on a later reactor turn with two ``epoll_ctl`` calls around it.
bench/README.md measured ~45 µs of relay CPU per 1 KiB chunk for that.

Here, once both legs of a session are paired and answered, a leg's readable event is one
Python function making C calls on the *same* OpenSSL objects Twisted's TLS layer owns:

    recv into a shared buffer -> BIO_write into the leg's TLS -> SSL_read each plaintext record
    -> SSL_write it into the partner's TLS -> BIO_read the partner's ciphertext -> send it

The plaintext lives only in one preallocated C buffer, never in a Python object; nothing is
buffered that Twisted would not buffer.  What the kernel does not take at once goes to the
partner's Twisted TCP transport (``write``), which keeps the order and pauses this leg when it
holds more than its ``bufferSize`` — the back-pressure of ``server.relay.core`` is unchanged.

Security is unchanged too: both legs keep their TLS (keys, record sequence numbers, verified
peer), only *who calls* OpenSSL changes.  Anything but application data (a close_notify, an
alert, a record that fails authentication) is left in the TLS layer's BIO and handed back to
Twisted (``_flushReceiveBIO``), which does what it always does; the leg then stays on
Twisted's path.

It relies on private attributes of Twisted (``TLSMemoryBIOProtocol._tlsConnection``, the TCP
transport's ``socket`` and write buffer) and of pyOpenSSL (``Connection._ssl`` and its memory
BIOs).  ``attach`` checks for every one of them and returns False if anything is missing or
different (a WebSocket tunnel, write aggregation, another TLS class): the leg then simply stays
on Twisted's path, which is correct, only slower.
"""

from __future__ import annotations

import select
from typing import Any

from twisted.internet import main
from twisted.logger import Logger
from twisted.internet.tcp import Connection as TCPConnection
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol

try:  # pyOpenSSL's cffi binding of OpenSSL (the library its Connection objects live in)
    from OpenSSL.SSL import Connection as _Connection, _ffi, _lib
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    AVAILABLE = all(hasattr(_lib, name) for name in
                    ("SSL_read", "SSL_write", "SSL_get_error", "BIO_read", "BIO_write"))
except Exception:  # pragma: no cover - another pyOpenSSL layout: Twisted's path only
    AVAILABLE = False

#: ciphertext read per event: as Twisted's ``bufferSize`` for relay legs (bench/README.md)
READ_BYTES = 256 * 1024
#: one TLS record's plaintext is at most 16 KiB
PLAIN_BYTES = 64 * 1024
#: what the partner's TLS produced for one read: 16 records of 16 KiB plus their overhead
OUT_BYTES = READ_BYTES + 64 * 1024

log = Logger(namespace="hausmeister.relay")

#: Test hook: called with every relayed plaintext record (``tests/helpers/relay_tap.py`` shows
#: that what the relay sees of a session is ciphertext of the session channel).  None in use.
observer = None

if AVAILABLE:
    # One set of buffers for the whole process: the reactor runs one event at a time.
    _IN = _ffi.new("char[]", READ_BYTES)
    _IN_VIEW = memoryview(_ffi.buffer(_IN))
    _PLAIN = _ffi.new("char[]", PLAIN_BYTES)
    _OUT = _ffi.new("char[]", OUT_BYTES)
    _OUT_VIEW = memoryview(_ffi.buffer(_OUT))


def _tls_parts(transport: Any) -> tuple[Any, Any, Any] | None:
    """(TCP transport, SSL*, pyOpenSSL Connection) of a leg's transport if the fast path can
    drive it, else None."""
    if not AVAILABLE or not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    if isinstance(transport, BufferingTLSTransport) and "write" not in vars(transport):
        return None  # small writes are aggregated: a direct SSL_write would overtake them
    tcp = getattr(transport, "transport", None)
    conn = getattr(transport, "_tlsConnection", None)
    if not isinstance(tcp, TCPConnection) or not isinstance(conn, _Connection):
        return None
    if getattr(tcp, "socket", None) is None or not tcp.connected or tcp.disconnecting:
        return None
    if getattr(conn, "_into_ssl", None) is None or getattr(conn, "_from_ssl", None) is None:
        return None  # not a memory-BIO connection
    if getattr(transport, "_appSendBuffer", None) or transport.disconnecting \
            or getattr(transport, "_lostTLSConnection", True):
        return None
    for name in ("dataBuffer", "_tempDataLen", "_flushReceiveBIO"):
        if not hasattr(tcp if name != "_flushReceiveBIO" else transport, name):
            return None
    return tcp, conn._ssl, conn


class _SpliceReader:
    """One epoll set for every leg on the fast path, itself one reader of the reactor.

    The reactor dispatches each ready descriptor inside a logging context (~a quarter of the
    Python time per relayed chunk in a profile); here one reactor event serves every leg that
    is ready, each with one plain call."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.poller = select.epoll()
        self.sides: dict[int, SpliceSide] = {}
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.poller.fileno()

    def logPrefix(self) -> str:
        return "relay-splice"

    def doRead(self) -> None:
        try:
            events = self.poller.poll(0, max(16, len(self.sides)))
        except InterruptedError:
            return None
        sides = self.sides
        for fd, _event in events:
            side = sides.get(fd)
            if side is None:
                continue
            try:
                why = side.do_read()
            except BaseException as exc:  # as the reactor does: log, then drop the connection
                log.failure("relay record splice of {leg} failed", leg=repr(side.leg))
                why = exc
            if why is not None:
                side.stop_reading()
                self.reactor._disconnectSelectable(side.tcp, why, True)
        return None

    def connectionLost(self, reason: Any) -> None:
        _readers.pop(id(self.reactor), None)
        self.poller.close()


_readers: dict[int, _SpliceReader] = {}


def _reader_for(reactor: Any) -> _SpliceReader | None:
    if not hasattr(reactor, "_disconnectSelectable"):
        return None  # not a posix reactor: Twisted's path
    reader = _readers.get(id(reactor))
    if reader is None:
        reader = _readers[id(reactor)] = _SpliceReader(reactor)
    return reader


class SpliceSide:
    """One leg's end of the fast path: reads its socket, writes into its partner."""

    __slots__ = ("leg", "tls", "tcp", "sock", "fd", "conn", "ssl", "rbio", "wbio", "partner",
                 "session", "seconds", "reader", "registered")

    def __init__(self, leg: Any, parts: tuple[Any, Any, Any], reader: _SpliceReader) -> None:
        self.leg = leg
        self.tls = leg.transport
        self.tcp, self.ssl, self.conn = parts
        self.sock = self.tcp.socket
        self.fd = self.sock.fileno()
        self.rbio = self.conn._into_ssl
        self.wbio = self.conn._from_ssl
        # these BIO pointers are kept here (and used by the partner's side): the guarded TLS
        # layer must not swap them for fresh ones any more (tls.release_handshake_buffers)
        self.tls.handshake_buffers_kept = False
        self.partner: SpliceSide | None = None
        self.session = leg.session
        self.seconds = leg.relay.seconds
        self.reader = reader
        self.registered = False

    def __repr__(self) -> str:
        return f"<SpliceSide {self.leg!r}>"

    # --- reading: called for each readable event of the leg's socket -----------------------

    def do_read(self):
        leg = self.leg
        partner = self.partner
        if leg._write is None or partner is None:  # session over: Twisted's path again
            self.detach()
            return self.tcp.doRead()
        try:
            n = self.sock.recv_into(_IN_VIEW)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        lib = _lib
        if lib.BIO_write(self.rbio, _IN, n) != n:  # a memory BIO takes everything
            return main.CONNECTION_LOST
        ssl, partner_ssl = self.ssl, partner.ssl
        total = 0
        while True:
            got = lib.SSL_read(ssl, _PLAIN, PLAIN_BYTES)
            if got <= 0:
                break
            if observer is not None:
                observer(_ffi.buffer(_PLAIN, got)[:])
            if lib.SSL_write(partner_ssl, _PLAIN, got) != got:
                # the partner's TLS refuses (it failed or was shut down): let Twisted's write
                # path raise and close it as it would have
                lib.ERR_clear_error()
                partner.flush_out()
                leg.bytes_forwarded += total + got
                leg._write(_ffi.buffer(_PLAIN, got)[:])
                total = -1
                break
            total += got
        if total > 0:
            leg.bytes_forwarded += total
            self.session.last_active = self.seconds()
        if total:
            partner.flush_out()
        if total < 0 or lib.SSL_get_error(ssl, got) != _WANT_READ:
            # close_notify, an alert, a bad record: still in the TLS layer's BIO, where
            # Twisted's TLS finds it and does what it always does
            self.detach()
            self.tls._flushReceiveBIO()
            return None
        self.flush_out()  # our own TLS may have to answer (e.g. a TLS 1.3 KeyUpdate)
        return None

    # --- writing: what this leg's TLS produced, to this leg's socket -----------------------

    def flush_out(self) -> None:
        lib = _lib
        while True:
            m = lib.BIO_read(self.wbio, _OUT, OUT_BYTES)
            if m <= 0:
                return
            self._send(m)
            if m < OUT_BYTES:
                return

    def _send(self, m: int) -> None:
        tcp = self.tcp
        if tcp.dataBuffer or tcp._tempDataLen or not tcp.connected or tcp.disconnecting:
            tcp.write(_OUT_VIEW[:m].tobytes())  # behind what Twisted still holds, in order
            return
        try:
            sent = self.sock.send(_OUT_VIEW[:m])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0  # Twisted's write finds the error again and closes the connection
        if sent < m:
            # Twisted keeps the rest, sends it when the socket is writable, and pauses the
            # partner leg (its registered producer) above ``bufferSize``
            tcp.write(_OUT_VIEW[sent:m].tobytes())

    # --- switching: the TCP transport's start/stopReading now mean our epoll set --------------

    def start_reading(self) -> None:
        if not self.registered:
            self.reader.poller.register(self.fd, select.EPOLLIN)
            self.reader.sides[self.fd] = self
            self.registered = True

    def stop_reading(self) -> None:
        if self.registered:
            self.registered = False
            self.reader.sides.pop(self.fd, None)
            try:
                self.reader.poller.unregister(self.fd)
            except OSError:
                pass  # closed already

    def attach(self) -> None:
        tcp = self.tcp
        tcp.stopReading()  # Twisted's reactor no longer reads it ...
        tcp.startReading = self.start_reading  # ... and pausing/resuming the leg means ours
        tcp.stopReading = self.stop_reading
        if self.leg._reading:
            self.start_reading()

    def detach(self) -> None:
        was_reading = self.registered
        self.stop_reading()
        for name in ("startReading", "stopReading"):
            vars(self.tcp).pop(name, None)
        if self.leg.splice is self:
            self.leg.splice = None
        if was_reading and self.tcp.connected and not self.tcp.disconnected:
            self.tcp.startReading()


def attach_pair(a: Any, b: Any) -> bool:
    """Put two paired, splicing relay legs on the fast path; False (nothing changed) if either
    transport is not one it can drive."""
    parts_a, parts_b = _tls_parts(a.transport), _tls_parts(b.transport)
    if parts_a is None or parts_b is None:
        return False
    reader = _reader_for(a.relay.reactor)
    if reader is None:
        return False
    side_a, side_b = SpliceSide(a, parts_a, reader), SpliceSide(b, parts_b, reader)
    side_a.partner, side_b.partner = side_b, side_a
    a.splice, b.splice = side_a, side_b
    side_a.attach()
    side_b.attach()
    return True


__all__ = ["AVAILABLE", "SpliceSide", "attach_pair", "READ_BYTES"]
