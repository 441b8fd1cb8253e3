"""The apps' asyncio loop on Qt (modules/common/qt/event_loop.py), on the test session's
QApplication (xcb on Xvfb) with real TCP connections on 127.0.0.1: Twisted's reads, writes,
timers and calls from threads arrive; a socket callback that removes or replaces its own
notifier is not called or re-enabled again; a callback that spins a nested event loop is not
entered again for the same socket; an exception in a callback reaches the loop's handler and
the loop goes on.  Each test runs its own loop (``run_until_complete``: Qt's exec) while the
test's reactor is idle; a Twisted reactor of its own is built on the loop where needed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from .fixtures_qt import qt_app  # noqa: F401 - fixture

TIMEOUT = 30    # seconds: the machine is shared


@pytest.fixture
def loop(qt_app):  # noqa: F811
    from modules.common.qt.event_loop import QtEventLoop
    event_loop = QtEventLoop(qt_app)
    yield event_loop
    event_loop.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one TCP connection on 127.0.0.1, non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))


def test_twisted_reads_writes_timers_and_thread_calls(loop):
    from twisted.internet import defer, protocol
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor
    reactor = AsyncioSelectorReactor(loop)
    payload = bytes(range(256)) * 32768                      # 8 MiB: the writer path too

    class Echo(protocol.Protocol):
        def dataReceived(self, data):  # noqa: N802
            self.transport.write(data)

    class Client(protocol.Protocol):
        def __init__(self):
            self.got = bytearray()
            self.reads = 0
            self.done = defer.Deferred()

        def connectionMade(self):  # noqa: N802
            self.transport.write(payload)

        def dataReceived(self, data):  # noqa: N802
            self.reads += 1
            self.got += data
            if len(self.got) >= len(payload):
                self.done.callback(bytes(self.got))

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    client = Client()
    from twisted.internet import endpoints
    endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), client)

    async def scenario():
        assert await client.done.asFuture(loop) == payload
        assert client.reads > 1
        # callLater: not before its time, cancelled ones never, in order of their times
        fired = []
        started = time.monotonic()
        later = defer.Deferred()
        reactor.callLater(0.08, lambda: (fired.append(("b", time.monotonic() - started)),
                                         later.callback(None)))
        reactor.callLater(0.04, lambda: fired.append(("a", time.monotonic() - started)))
        reactor.callLater(0.02, fired.append, ("never", 0)).cancel()
        await later.asFuture(loop)
        assert [name for name, _ in fired] == ["a", "b"]
        assert fired[0][1] >= 0.04 - 0.002 and fired[1][1] >= 0.08 - 0.002, fired
        # callFromThread, in the order the thread made the calls
        seen = []
        all_seen = defer.Deferred()

        def note(k):
            seen.append((k, threading.current_thread() is threading.main_thread()))
            if len(seen) == 200:
                all_seen.callback(None)
        threading.Thread(target=lambda: [reactor.callFromThread(note, k) for k in range(200)]
                         ).start()
        await all_seen.asFuture(loop)
        assert seen == [(k, True) for k in range(200)]
        client.transport.loseConnection()
        await defer.maybeDeferred(port.stopListening).asFuture(loop)
    try:
        run(loop, scenario())
    finally:
        reactor.disconnectAll()
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)


def test_call_soon_order_and_cancel(loop):
    order = []

    async def scenario():
        done = loop.create_future()
        for k in range(5):
            loop.call_soon(order.append, k)
        loop.call_soon(order.append, "cancelled").cancel()
        loop.call_later(0.0001, order.append, 5)              # under 1 ms: the same queue
        loop.call_soon(lambda: loop.call_soon(done.set_result, None))   # the next turn
        await done
    run(loop, scenario())
    assert order == [0, 1, 2, 3, 4, 5]


def test_reader_removed_or_replaced_in_its_callback_stays_off(loop):
    a, b = tcp_pair()
    c, d = tcp_pair()
    calls = {"removed": 0, "old": 0, "new": 0}

    async def scenario():
        first = loop.create_future()

        def removes_itself():
            calls["removed"] += 1
            loop.remove_reader(b.fileno())               # its data stays unread
            first.set_result(None)
        loop.add_reader(b.fileno(), removes_itself)
        a.send(b"x")
        await first
        # more data on the removed socket, then on a sentinel: by the time the sentinel's
        # callback runs, a still-watched b would have been called too
        a.send(b"y")
        sentinel = loop.create_future()
        loop.add_reader(d.fileno(), lambda: sentinel.done() or sentinel.set_result(None))
        c.send(b"s")
        await sentinel
        loop.remove_reader(d.fileno())
        assert calls["removed"] == 1

        replaced = loop.create_future()

        def old():
            calls["old"] += 1
            loop.add_reader(b.fileno(), new)             # replaced inside its own callback

        def new():
            calls["new"] += 1
            b.recv(100)                                  # takes "x" and "y"
            if not replaced.done():
                replaced.set_result(None)
        loop.add_reader(b.fileno(), old)
        await replaced
        loop.remove_reader(b.fileno())
    try:
        run(loop, scenario())
    finally:
        for s in (a, b, c, d):
            s.close()
    assert calls == {"removed": 1, "old": 1, "new": 1}


def test_nested_event_loop_in_a_callback_is_not_entered_again(loop):
    from PySide6.QtCore import QEventLoop
    a, b = tcp_pair()
    c, d = tcp_pair()
    entries = []
    nested = QEventLoop()

    async def scenario():
        finished = loop.create_future()

        def reader():
            entries.append("enter")
            if len(entries) == 1:
                # its data is unread (readable all along) while a modal loop spins, until the
                # sentinel's callback quits it
                loop.add_reader(d.fileno(), lambda: (d.recv(10), nested.quit()))
                c.send(b"s")
                nested.exec()
                loop.remove_reader(d.fileno())
            else:
                b.recv(10)
                loop.remove_reader(b.fileno())
                finished.set_result(None)
            entries.append("leave")
        loop.add_reader(b.fileno(), reader)
        a.send(b"x")
        await finished                                   # called again after it returned
    try:
        run(loop, scenario())
    finally:
        for s in (a, b, c, d):
            s.close()
    assert entries == ["enter", "leave", "enter", "leave"]


def test_exception_in_a_callback_reaches_the_handler(loop):
    """A plain callback's exception goes to the loop's handler; one out of Twisted's socket
    path (``callWithLogger``, which the loop calls past) goes to Twisted's log, as before."""
    from twisted.logger import globalLogPublisher
    from twisted.python.log import callWithLogger
    a, b = tcp_pair()
    c, d = tcp_pair()
    caught, logged = [], []
    loop.set_exception_handler(lambda _loop, context: caught.append(context["exception"]))

    def observe(event):
        failure = event.get("log_failure") or event.get("failure")   # new or legacy event
        if failure is not None:
            logged.append(failure.value)
    globalLogPublisher.addObserver(observe)

    class Selectable:
        def logPrefix(self):  # noqa: N802
            return "test"

    def twisted_fails(_selectable, _read):
        d.recv(10)
        raise ValueError("broken doRead")

    async def scenario():
        after = loop.create_future()

        def fails():
            b.recv(10)
            raise ValueError("broken callback")
        loop.add_reader(b.fileno(), fails)
        selectable = Selectable()
        loop.add_reader(d.fileno(), callWithLogger, selectable, twisted_fails, selectable, True)
        a.send(b"x")
        c.send(b"x")
        while not (caught and logged):
            await asyncio.sleep(0.005)                   # the loop's own timers, still running
        loop.remove_reader(b.fileno())
        loop.remove_reader(d.fileno())
        loop.call_soon(after.set_result, "on")
        assert await after == "on"
    try:
        run(loop, scenario())
    finally:
        globalLogPublisher.removeObserver(observe)
        for s in (a, b, c, d):
            s.close()
    assert [str(e) for e in caught] == ["broken callback"]
    assert [str(e) for e in logged] == ["broken doRead"]


def test_nested_event_loop_in_a_timer_callback_runs_what_waits(loop):
    """A call_soon or call_later callback that spins a nested event loop (as a modal dialog
    would): the handles waiting behind it — queued, or due later — still run in there."""
    from PySide6.QtCore import QEventLoop
    ran = []

    def spinner(name):
        nested = QEventLoop()

        def spin():
            ran.append(f"{name} spins")
            nested.exec()
            ran.append(f"{name} spun")
        return spin, nested

    async def scenario():
        done = loop.create_future()
        spin, nested = spinner("soon")
        loop.call_soon(spin)
        loop.call_soon(lambda: (ran.append("queued behind"), nested.quit()))
        spin, nested_later = spinner("later")
        loop.call_later(0.01, spin)
        loop.call_later(0.03, lambda: (ran.append("due later"), nested_later.quit()))
        loop.call_later(0.04, done.set_result, None)
        await done
    run(loop, scenario())
    assert ran == ["soon spins", "queued behind", "soon spun",
                   "later spins", "due later", "later spun"]
