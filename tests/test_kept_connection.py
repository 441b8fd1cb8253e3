"""The kept control connection (``modules.common.link.kept_connection``) as the supporter's host
list uses it (``HostDirectory``): with a Clock and control connections that record what was
asked — a heartbeat while idle finds a connection that went silent without a reset, an attempt
the server accepts but never answers is given up after 30 s, a lost connection lists again, a
stop leaves nothing behind; and a hypothesis run over any order of cuts, silences, notices,
server outages and stops.  (The ad-hoc offer on the same core: test_adhoc_offer, which also
runs the host list against a real server that stops answering.)"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, error, task

from modules.common.link.kept_connection import ATTEMPT_SECONDS, MAX_HEARTBEAT
from modules.common.link.reconnect import ReconnectSchedule
from modules.supporter.host_directory import MAX_WAIT, HostDirectory
from protocol import control


class FakeTransport:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.closed = False

    def loseConnection(self) -> None:  # noqa: N802
        self.abortConnection()

    def abortConnection(self) -> None:  # noqa: N802
        """As AMP does: the requests not answered yet fail first, then the connection's end."""
        if not self.closed:
            self.closed = True
            for waiting in self.conn.unanswered:
                if not waiting.called:
                    waiting.errback(error.ConnectionAborted())
            self.conn.lost.callback("Connection was aborted locally.")


class FakeControl:
    """A greeted supporter connection: ``ListHosts`` answered with ``hosts`` (or held while
    ``silent``), heartbeats answered unless ``silent``."""

    def __init__(self, hosts: list[dict], heartbeat_seconds: float = 60.0) -> None:
        self.hosts = hosts
        self.greeting = {"heartbeat_seconds": heartbeat_seconds}
        self.silent = False
        self.beats = self.listed = 0
        self.unanswered: list[defer.Deferred] = []
        self.lost: defer.Deferred = defer.Deferred()
        self.transport = FakeTransport(self)
        self.on_host_presence = self.on_going_away = None

    def callRemote(self, command, **kw):  # noqa: N802
        if command is control.Heartbeat:
            self.beats += 1
            answer = {"server_time": 0.0}
        else:
            assert command is control.ListHosts
            self.listed += 1
            answer = {"hosts": [dict(h) for h in self.hosts]}
        if self.silent:
            self.unanswered.append(defer.Deferred())
            return self.unanswered[-1]
        return defer.succeed(answer)

    def cut(self) -> None:
        if not self.transport.closed:
            self.transport.closed = True
            self.lost.callback("Connection to the other side was lost in a non-clean fashion.")


def host(name: str, online: bool) -> dict:
    return {"host_id": f"id-{name}", "name": name, "group": "office", "online": online,
            "last_seen": "2026-12-06T09:00:00", "address": "127.0.0.7"}


class Server:
    """What ``connect()`` reaches: connections to hand out in turn, an error, or a hang."""

    def __init__(self) -> None:
        self.ready: list = []
        self.down: Exception | None = None
        self.attempts = 0

    def connect(self) -> defer.Deferred:
        self.attempts += 1
        if self.down is not None:
            return defer.fail(self.down)
        nxt = self.ready.pop(0)
        return nxt if isinstance(nxt, defer.Deferred) else defer.succeed(nxt)


class Delegate:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def hosts_listed(self, hosts, changed) -> None:
        self.events.append(("listed", [h["name"] for h in hosts], [h["name"] for h in changed]))

    def host_changed(self, host) -> None:
        self.events.append(("changed", host["name"], host["online"]))

    def connection_changed(self, state, why, retry_in) -> None:
        self.events.append((state, why, retry_in))


def directory_on(clock, server, seen) -> HostDirectory:
    schedule = ReconnectSchedule(clock.seconds, cap=MAX_WAIT, rand=lambda a, b: b)  # the longest
    return HostDirectory(clock, server.connect, seen, schedule=schedule)


def started(directory) -> list:
    d = defer.ensureDeferred(directory.start())
    assert d.called, "start() did not finish"
    return d.result


def test_the_host_list_notices_a_silent_connection_and_lists_again():
    """No reset arrives (a stopped server): the heartbeat while idle (the server's 60 s capped
    at 10 s) goes unanswered for 20 s, the connection is given up, the list says it reconnects
    and, once a connection lists again, is current with what changed meanwhile."""
    clock, server, seen = task.Clock(), Server(), Delegate()
    first = FakeControl([host("kiosk", True), host("till", False)])
    server.ready.append(first)
    directory = directory_on(clock, server, seen)
    assert [h["name"] for h in started(directory)] == ["kiosk", "till"]
    clock.pump([MAX_HEARTBEAT] * 3)
    assert first.beats == 3 and directory.conn is first and len(seen.events) == 1
    first.silent = True
    clock.advance(MAX_HEARTBEAT)                    # asked, not answered ...
    clock.advance(MAX_HEARTBEAT * 2 - 0.1)
    assert not first.transport.closed and directory.conn is first
    clock.advance(0.1)                              # ... for 20 s: given up
    assert first.transport.closed and directory.conn is None
    assert seen.events[-1] == ("reconnecting", "the server did not answer for 20 s", 1.0)
    server.ready.append(FakeControl([host("kiosk", False), host("till", False)]))
    clock.advance(1.0)
    assert seen.events[-2:] == [("listed", ["kiosk", "till"], ["kiosk"]), ("online", "", 0.0)]
    assert directory.conn is not first and directory.conn.on_host_presence is not None


def test_the_heartbeat_follows_a_shorter_server_heartbeat():
    clock, server, seen = task.Clock(), Server(), Delegate()
    conn = FakeControl([], heartbeat_seconds=1.5)
    server.ready.append(conn)
    directory = directory_on(clock, server, seen)
    started(directory)
    clock.pump([1.5] * 4)
    assert conn.beats == 4
    conn.silent = True
    clock.pump([1.5] * 4)              # asked at 7.5 s; a 3 s silence is not yet the end
    assert directory.conn is conn
    clock.pump([1.5])                  # unanswered until 13.5 s: MIN_UNANSWERED
    assert seen.events[-1] == ("reconnecting", "the server did not answer for 6 s", 1.0)


def test_an_attempt_the_server_accepts_but_never_answers_is_given_up_and_retried():
    clock, server, seen = task.Clock(), Server(), Delegate()
    first, silent, second = FakeControl([host("kiosk", True)]), FakeControl([]), \
        FakeControl([host("kiosk", True)])
    silent.silent = True                            # TCP and TLS taken, ListHosts never answered
    server.ready += [first, silent, second]
    directory = directory_on(clock, server, seen)
    started(directory)
    first.cut()
    clock.advance(1.0)                              # the attempt reaches ``silent``
    clock.advance(ATTEMPT_SECONDS - 0.1)
    assert seen.events[-1][0] == "reconnecting" and len(seen.events) == 2
    assert not silent.transport.closed
    clock.advance(0.1)
    assert silent.transport.closed                  # given up: its connection closed
    state, why, retry_in = seen.events[-1]
    assert state == "reconnecting" and isinstance(why, defer.TimeoutError)
    clock.advance(retry_in)
    assert seen.events[-1] == ("online", "", 0.0) and directory.conn is second
    assert silent.beats == 0                        # no heartbeat on a connection never attached


def test_a_connect_that_hangs_is_given_up_too_and_the_first_attempts_error_is_the_callers():
    clock, server, seen = task.Clock(), Server(), Delegate()
    hanging: defer.Deferred = defer.Deferred()
    server.ready.append(hanging)
    directory = directory_on(clock, server, seen)
    first = defer.ensureDeferred(directory.start())
    clock.advance(ATTEMPT_SECONDS)
    assert first.called and isinstance(first.result.value, defer.TimeoutError)
    first.addErrback(lambda f: None)
    assert hanging.called                           # cancelled: the endpoint drops it
    hanging.addErrback(lambda f: f.trap(defer.CancelledError))
    assert seen.events == [] and clock.getDelayedCalls() == []


def test_a_clean_shutdown_notice_is_said_and_sets_the_wait():
    clock, server, seen = task.Clock(), Server(), Delegate()
    conn = FakeControl([])
    server.ready.append(conn)
    directory = directory_on(clock, server, seen)
    started(directory)
    conn.on_going_away(3.0, 1.0)                    # what ServerGoingAway passes on
    conn.cut()
    assert seen.events[-1] == ("reconnecting", "the server is restarting", 4.0)


def test_stop_leaves_no_timer_and_no_connection():
    clock, server, seen = task.Clock(), Server(), Delegate()
    conn = FakeControl([])
    server.ready.append(conn)
    directory = directory_on(clock, server, seen)
    started(directory)
    conn.silent = True
    clock.advance(MAX_HEARTBEAT)                    # a heartbeat waiting for its answer
    directory.stop()
    assert conn.transport.closed and directory.conn is None
    assert clock.getDelayedCalls() == []
    clock.advance(600)
    assert len(seen.events) == 1                    # the first listing only: no "reconnecting"


STEPS = st.lists(st.sampled_from(["cut", "falls silent", "notice", "server down", "server up",
                                  "server hangs", "wait", "heartbeat", "refresh", "stop"]),
                 max_size=40)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS)
def test_any_sequence_keeps_the_list_connected_or_says_it_reconnects(steps):
    """Whatever happens in whatever order: a heartbeat runs exactly while connected, never
    both a connection and a pending retry, no wait longer than ``MAX_WAIT`` (a notice too),
    every "online" follows a "reconnecting" and comes right after a listing, and after a
    stop nothing more happens and no timer is left."""
    clock, server, seen = task.Clock(), Server(), Delegate()
    server.ready = [FakeControl([host("kiosk", True)]) for _ in range(80)]
    directory = directory_on(clock, server, seen)
    started(directory)
    hangs: list[defer.Deferred] = []
    for step in steps:
        conn = directory.conn
        if step == "cut" and conn is not None:
            conn.cut()
        elif step == "falls silent" and conn is not None:
            conn.silent = True
        elif step == "notice" and conn is not None:
            conn.on_going_away(4.0, 10.0)
        elif step == "server down":
            server.down = ConnectionRefusedError("refused")
        elif step == "server up":
            server.down = None
        elif step == "server hangs":
            hangs.append(defer.Deferred())
            server.ready.insert(0, hangs[-1])
        elif step == "wait":
            clock.advance(MAX_WAIT)
        elif step == "heartbeat":
            clock.advance(MAX_HEARTBEAT * 3)
        elif step == "refresh":
            defer.ensureDeferred(directory.refresh()).addErrback(
                lambda f: f.trap(error.ConnectionAborted))
        elif step == "stop":
            directory.stop()
        retrying = directory._retry is not None and directory._retry.active()
        beating = directory._heartbeat is not None and directory._heartbeat.running
        assert not (retrying and directory.conn is not None)
        assert beating == (directory.conn is not None and not directory.stopped)
        if directory.stopped:
            assert directory.conn is None
    clock.advance(ATTEMPT_SECONDS)                  # let a hanging attempt run out
    for hang in hangs:
        hang.addErrback(lambda f: f.trap(defer.CancelledError))
    offline = False
    for before, event in zip([None] + seen.events, seen.events):
        if event[0] == "reconnecting":
            assert event[2] <= MAX_WAIT
            offline = True
        elif event[0] == "online":
            assert offline and before[0] == "listed"
            offline = False
    if directory.stopped:
        assert clock.getDelayedCalls() == []
        count = len(seen.events)
        clock.advance(600)
        assert len(seen.events) == count
