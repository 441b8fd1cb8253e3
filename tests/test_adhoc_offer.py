"""The ad-hoc ID kept on offer (``modules.supporter.adhoc_offer``): the core with a Clock and
control connections that record what was asked (a lost connection, an expired nameplate, a
clean shutdown's notice, a silent connection, a customer joining, a stop), then
``hausmeister-supporter adhoc`` against the real server on 127.0.0.1 with a 2-second nameplate
lifetime: an expired ID, a cut connection (server stopped, its socket aborted) and a silent one
(server stopped, found by the heartbeat) each print a new ID, Ctrl+C ends the reconnecting; and
the app's ad-hoc tab on that server replaces an expired ID and says so.  (The app's tab across
a cut: test_app_supporter.)"""

from __future__ import annotations

import os
import re
import signal

import pytest
import pytest_twisted
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, error, task

from modules.common.link.reconnect import ReconnectSchedule
from modules.supporter.adhoc_offer import (
    ATTEMPT_SECONDS, MAX_HEARTBEAT, MAX_WAIT, RENEW_AHEAD, AdhocOffer, CustomerJoined, IdOffered,
    IdReplaced, Offline, ReplaceReason,
)
from protocol import control

from .fixtures_qt import qt_app  # noqa: F401 - fixture


class FakeTransport:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.closed = False

    def loseConnection(self) -> None:  # noqa: N802
        if not self.closed:
            self.closed = True
            self.conn.lost.callback("Connection was closed cleanly.")

    def abortConnection(self) -> None:  # noqa: N802
        """As AMP does: the requests not answered yet fail first, then the connection's end."""
        if not self.closed:
            self.closed = True
            held = self.conn.held
            if held is not None and not held.called:
                held.errback(error.ConnectionAborted())
            self.conn.lost.callback("Connection was aborted locally using "
                                    "ITCPTransport.abortConnection.")


class FakeControl:
    """A greeted control connection: ``AllocateNameplate`` answered from ``plates`` (valid for
    ``ttl`` seconds), or held (``hold``) or refused (``refuse``); heartbeats answered unless
    ``silent``."""

    def __init__(self, plates: list[str], ttl: float = 600.0) -> None:
        self.plates = list(plates)
        self.ttl = ttl
        self.asked = 0
        self.beats = 0
        self.silent = False            # heartbeats go unanswered (a wedged server)
        self.greeting = {"heartbeat_seconds": 60.0}
        self.refuse: Exception | None = None
        self.held: defer.Deferred | None = None
        self.hold = False
        self.lost: defer.Deferred = defer.Deferred()
        self.transport = FakeTransport(self)
        self.on_session_ready = None
        self.on_going_away = None

    def callRemote(self, command, **kw):  # noqa: N802
        if command is control.Heartbeat:
            self.beats += 1
            return defer.Deferred() if self.silent else defer.succeed({"server_time": 0.0})
        assert command is control.AllocateNameplate
        self.asked += 1
        if self.refuse is not None:
            return defer.fail(self.refuse)
        answer = {"nameplate": self.plates.pop(0), "expires_in": self.ttl}
        if self.hold:
            self.held = defer.Deferred()
            self.held.addCallback(lambda _: answer)
            return self.held
        return defer.succeed(answer)

    def cut(self) -> None:
        if self.lost.called:
            return
        self.transport.closed = True
        self.lost.callback("Connection to the other side was lost in a non-clean fashion.")


class Server:
    """What ``connect()`` reaches: a queue of connections to hand out, or an error to raise."""

    def __init__(self) -> None:
        self.ready: list[FakeControl] = []
        self.down: Exception | None = None
        self.attempts = 0

    async def connect(self) -> FakeControl:
        self.attempts += 1
        if self.down is not None:
            raise self.down
        return self.ready.pop(0)


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    def adhoc_event(self, event) -> None:
        self.events.append(event)


def offer_on(clock, server, delegate, **kw) -> AdhocOffer:
    schedule = ReconnectSchedule(clock.seconds, cap=MAX_WAIT, rand=lambda a, b: b)  # the longest
    return AdhocOffer(clock, server.connect, delegate, schedule=schedule, **kw)


def started(offer) -> None:
    d = defer.ensureDeferred(offer.start())
    assert d.called and d.result is offer.invitation, d.result


def test_a_lost_connection_draws_a_new_id_after_at_most_five_seconds_each_try():
    clock, server, seen = task.Clock(), Server(), Recorder()
    first = FakeControl(["1111"])
    server.ready.append(first)
    offer = offer_on(clock, server, seen)
    started(offer)
    old = offer.adhoc_id
    assert seen.events == [IdOffered(old, 600.0)] and old.startswith("1111 ")
    first.cut()
    assert seen.events[-1] == Offline(old, first.lost.result, 1.0)
    server.down = ConnectionRefusedError("refused")
    for _ in range(8):                     # the back-off grows, but never past 5 s
        clock.advance(seen.events[-1].retry_in)
    waits = [e.retry_in for e in seen.events if isinstance(e, Offline)]
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert all(isinstance(e.why, ConnectionRefusedError) for e in seen.events[2:])
    second = FakeControl(["2222"])
    server.down, server.ready = None, [second]
    clock.advance(5.0)
    new = offer.adhoc_id
    assert seen.events[-1] == IdReplaced(old, new, ReplaceReason.CONNECTION_LOST, 600.0)
    assert new.startswith("2222 ") and new.split()[1] != old.split()[1]   # a new secret too
    assert offer.conn is second and offer.invitation.conn is second
    # the new connection lost too: the back-off starts from the bottom again
    second.cut()
    assert seen.events[-1].retry_in == 1.0


def test_an_expiring_nameplate_is_replaced_ahead_on_the_same_connection():
    """A tenth of its lifetime before it expires (at most ``RENEW_AHEAD``) the next ID is
    drawn; the old one keeps working until its expiry for a customer who already has it."""
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111", "2222", "3333"], ttl=120.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    first = offer.adhoc_id
    clock.advance(107.9)
    assert conn.asked == 1
    clock.advance(0.1)
    second = offer.adhoc_id
    assert seen.events[-1] == IdReplaced(first, second, ReplaceReason.EXPIRED, 120.0, 12.0)
    assert second.startswith("2222 ") and server.attempts == 1 and not conn.transport.closed
    clock.advance(11.0)       # in the old ID's last second both are on offer
    assert set(offer._drawn) == {"1111", "2222"}
    clock.advance(108.0)
    assert seen.events[-1].old_id == second and offer.adhoc_id.startswith("3333 ")
    # a 10-minute ID: the next one a minute ahead
    conn = FakeControl(["4444", "5555"], ttl=600.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, Recorder())
    started(offer)
    clock.advance(600.0 - RENEW_AHEAD)
    assert offer.delegate.events[-1].old_valid_for == RENEW_AHEAD


def test_the_old_id_joins_after_the_new_one_was_drawn_ahead():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111", "2222"], ttl=600.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    first = offer.invitation
    clock.advance(600.0 - RENEW_AHEAD)
    assert offer.adhoc_id.startswith("2222 ")
    clock.advance(RENEW_AHEAD - 1.0)
    conn.on_session_ready({"nameplate": "1111", "peer_address": "127.0.0.9"})
    invitation, _ticket = offer.joined.result
    assert invitation is first and seen.events[-1] == CustomerJoined(first.adhoc_id, "127.0.0.9")


def test_a_replacement_that_comes_too_late_to_leave_the_old_id_time_says_it_expired():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111", "2222"], ttl=600.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    conn.hold = True
    clock.advance(600.0 - RENEW_AHEAD)
    clock.advance(RENEW_AHEAD - 0.5)      # the server answers with half a second left
    conn.held.callback(None)
    assert seen.events[-1].old_valid_for == 0.0     # not "still usable for 0 s"


def test_a_refused_redraw_at_expiry_reconnects_and_says_why():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111"], ttl=60.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    old = offer.adhoc_id
    conn.refuse = control.WrongState("no free ad-hoc ID right now; try again in a minute")
    clock.advance(60.0)
    assert conn.transport.closed
    [offline] = [e for e in seen.events if isinstance(e, Offline)]
    assert offline.old_id == old and isinstance(offline.why, control.WrongState)
    server.ready.append(FakeControl(["2222"]))
    clock.advance(offline.retry_in)
    assert seen.events[-1].reason is ReplaceReason.EXPIRED    # why the old one went


def test_a_clean_shutdown_notice_sets_the_first_wait():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111"])
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    conn.on_going_away(3.0, 2.0)           # what ServerGoingAway passes on
    conn.cut()
    assert seen.events[-1] == Offline(offer.adhoc_id, "the server is restarting", 5.0)


def test_a_connection_gone_silent_is_found_by_the_heartbeat_and_replaced():
    """No reset arrives (a pulled cable, a wedged server): the heartbeat (the server's 60 s
    capped at 10 s) goes unanswered for 20 s, the connection is given up, a new ID drawn."""
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111"])
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    old = offer.adhoc_id
    clock.pump([MAX_HEARTBEAT] * 3)
    assert conn.beats == 3 and not conn.transport.closed and len(seen.events) == 1
    conn.silent = True
    clock.advance(MAX_HEARTBEAT)                  # asked, not answered ...
    clock.advance(MAX_HEARTBEAT * 2 - 0.1)
    assert not conn.transport.closed
    clock.advance(0.1)                            # ... for 20 s: given up
    assert conn.transport.closed
    assert seen.events[-1] == Offline(old, "the server did not answer for 20 s", 1.0)
    server.ready.append(FakeControl(["2222"]))
    clock.advance(1.0)
    assert seen.events[-1].reason is ReplaceReason.CONNECTION_LOST
    assert offer.adhoc_id.startswith("2222 ")


def test_silence_during_a_redraw_at_expiry_is_said_as_silence():
    """The ID expires while the server has stopped answering: the redraw's request fails when
    the heartbeat gives the connection up, and the event says the server went silent."""
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111", "2222"], ttl=MAX_HEARTBEAT)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    old = offer.adhoc_id
    conn.silent = conn.hold = True
    # the expiry and a heartbeat at 10 s, neither answered, for 20 s
    clock.pump([MAX_HEARTBEAT] + [1.0] * int(MAX_HEARTBEAT * 2))
    assert conn.transport.closed and conn.held.called
    [offline] = [e for e in seen.events if isinstance(e, Offline)]
    assert offline == Offline(old, "the server did not answer for 20 s", 1.0)
    server.ready.append(FakeControl(["3333"]))
    clock.advance(1.0)
    assert seen.events[-1] == IdReplaced(old, offer.adhoc_id, ReplaceReason.EXPIRED, 600.0)


def test_an_attempt_the_server_never_answers_is_given_up_and_retried():
    clock, server, seen = task.Clock(), Server(), Recorder()
    first, second = FakeControl(["1111"]), FakeControl(["2222"])
    hanging: defer.Deferred = defer.Deferred()
    answers = iter([defer.succeed(first), hanging, defer.succeed(second)])
    offer = AdhocOffer(clock, lambda: next(answers), seen,
                       schedule=ReconnectSchedule(clock.seconds, cap=MAX_WAIT,
                                                  rand=lambda a, b: b))
    started(offer)
    first.cut()
    clock.advance(1.0)                        # the attempt: TCP taken, nothing answered
    clock.advance(ATTEMPT_SECONDS - 0.1)
    assert not hanging.called and len(seen.events) == 2
    clock.advance(0.1)
    assert hanging.called                     # cancelled: the endpoint drops the connection
    hanging.addErrback(lambda f: f.trap(defer.CancelledError))
    offline = seen.events[-1]
    assert isinstance(offline, Offline) and isinstance(offline.why, defer.TimeoutError)
    clock.advance(offline.retry_in)
    assert seen.events[-1].adhoc_id.startswith("2222 ")


def test_the_first_attempt_has_the_same_deadline_and_its_error_is_the_callers():
    clock, seen = task.Clock(), Recorder()
    hanging: defer.Deferred = defer.Deferred()
    offer = AdhocOffer(clock, lambda: hanging, seen)
    first = defer.ensureDeferred(offer.start())
    clock.advance(ATTEMPT_SECONDS)
    assert first.called and isinstance(first.result.value, defer.TimeoutError)
    first.addErrback(lambda f: None)
    assert seen.events == [] and clock.getDelayedCalls() == []


def test_the_customer_joining_hands_over_the_connection_and_ends_the_offer():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111", "2222"], ttl=60.0)
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    first = offer.invitation
    # a customer who typed the ID just before it expired, announced just after: its own secret
    conn.hold = True
    clock.advance(60.0)
    conn.on_session_ready({"nameplate": "1111", "peer_address": "127.0.0.9"})
    assert offer.joined.called
    invitation, ticket = offer.joined.result
    assert invitation is first and ticket["peer_address"] == "127.0.0.9"
    assert seen.events[-1] == CustomerJoined(first.adhoc_id, "127.0.0.9")
    conn.held.callback(None)               # the redraw that was under way is dropped
    assert offer.invitation is first and not any(isinstance(e, IdReplaced) for e in seen.events)
    # from now on a cut is the session's business: no reconnect, no event
    conn.cut()
    assert clock.getDelayedCalls() == [] and isinstance(seen.events[-1], CustomerJoined)
    with pytest.raises(control.WrongState):      # and nobody joins a second time
        conn.on_session_ready({"nameplate": "2222", "peer_address": "127.0.0.8"})


def test_stop_ends_the_reconnecting_and_cancelling_the_wait_stops():
    clock, server, seen = task.Clock(), Server(), Recorder()
    conn = FakeControl(["1111"])
    server.ready.append(conn)
    offer = offer_on(clock, server, seen)
    started(offer)
    conn.cut()
    assert len(clock.getDelayedCalls()) == 1        # the retry; no heartbeat, no expiry
    waiting = defer.ensureDeferred(_await(offer.joined))
    waiting.cancel()                       # what closing the tab does
    assert offer.stopped and clock.getDelayedCalls() == []
    assert waiting.called and isinstance(waiting.result.value, defer.CancelledError)
    waiting.addErrback(lambda _: None)
    clock.advance(60)
    assert server.attempts == 1 and isinstance(seen.events[-1], Offline)


def test_a_stop_while_an_attempt_connects_closes_what_it_gets():
    clock, seen = task.Clock(), Recorder()
    first, late = FakeControl(["1111"]), FakeControl(["2222"])
    gate: defer.Deferred = defer.Deferred()
    answers = iter([defer.succeed(first), gate])
    offer = AdhocOffer(clock, lambda: next(answers), seen)
    started(offer)
    first.cut()
    clock.advance(MAX_WAIT)                # the attempt is under way
    offer.stop()
    offer.joined.addErrback(lambda f: f.trap(defer.CancelledError))
    gate.callback(late)
    assert late.transport.closed and late.asked == 0
    assert isinstance(seen.events[-1], Offline) and clock.getDelayedCalls() == []


async def _await(d):
    return await d


STEPS = st.lists(st.sampled_from(["cut", "notice", "server down", "server up", "wait",
                                    "expire", "join current", "join previous", "stop",
                                    "falls silent"]),
                 max_size=40)


@settings(max_examples=200, deadline=None)
@given(steps=STEPS)
def test_any_sequence_keeps_one_valid_id_or_says_it_is_reconnecting(steps):
    """Whatever happens in whatever order: the events tell a consistent story (each new ID
    replaces the one last shown, never repeats it, an offline spell is said before its new ID),
    no wait is longer than 5 s (not even after a notice asking for more), a heartbeat runs
    exactly while connected and waiting, and after the customer joined or a stop nothing more
    happens."""
    clock, server, seen = task.Clock(), Server(), Recorder()
    numbers = iter(f"{n:04d}" for n in range(1, 10_000))

    def fresh() -> FakeControl:
        return FakeControl([next(numbers) for _ in range(50)], ttl=30.0)
    server.ready = [fresh() for _ in range(60)]
    offer = offer_on(clock, server, seen)
    started(offer)
    offer.joined.addErrback(lambda f: f.trap(defer.CancelledError))
    for step in steps:
        conn = offer.conn
        if step == "cut" and conn is not None:
            conn.cut()
        elif step == "notice" and conn is not None:
            conn.on_going_away(4.0, 10.0)
        elif step == "server down":
            server.down = ConnectionRefusedError("refused")
        elif step == "server up":
            server.down = None
        elif step == "wait":
            clock.advance(MAX_WAIT)
        elif step == "expire":
            clock.advance(30.0)
        elif step.startswith("join") and conn is not None and not offer.joined.called:
            plates = list(offer._drawn)       # the one on offer first, then the one before
            plate = plates[0] if step == "join current" else plates[-1]
            try:
                conn.on_session_ready({"nameplate": plate, "peer_address": "127.0.0.5"})
            except control.WrongState:
                pytest.fail("a drawn ID on the live connection was refused")
        elif step == "stop":
            offer.stop()
        elif step == "falls silent" and conn is not None:
            conn.silent = True
        retrying = offer._retry is not None and offer._retry.active()
        beating = offer._heartbeat is not None and offer._heartbeat.running
        assert not (retrying and offer.conn is not None)
        assert beating == (offer.conn is not None and not offer.joined.called
                           and not offer.stopped)
        if offer.stopped or offer.joined.called:
            assert clock.getDelayedCalls() == []
    shown = None
    offline = False
    for event in seen.events:
        if isinstance(event, IdOffered):
            assert shown is None
            shown = event.adhoc_id
        elif isinstance(event, Offline):
            assert event.old_id == shown
            assert event.retry_in <= MAX_WAIT      # a notice too is capped for a person
            offline = True
        elif isinstance(event, IdReplaced):
            assert event.old_id == shown and event.adhoc_id != shown
            assert event.reason is (ReplaceReason.CONNECTION_LOST if offline
                                    else ReplaceReason.EXPIRED)
            shown, offline = event.adhoc_id, False
        elif isinstance(event, CustomerJoined):
            assert event is seen.events[-1] and not offline
    if offer.stopped or offer.joined.called:
        before = len(seen.events)
        clock.advance(600)
        assert len(seen.events) == before


# --- the CLI against the real server ------------------------------------------------------

#: IDs that expire after 2 s; heartbeats every 1.5 s (a silent connection is given up after 3 s)
SHORT_TTL = '\n[adhoc]\nnameplate_ttl = "2s"\n\n[presence]\nheartbeat_seconds = 1.5\n'


@pytest.fixture(scope="module")
def short_lived_ids(tmp_path_factory):
    """A server whose ad-hoc IDs expire after 2 s, and supporter alice enrolled on it (one for
    the module: the CLI and the app test share it)."""
    from .fixtures_server import ADMIN_PASSWORD, ServerProcess, add_enrolled_supporter, write_config
    tmp = tmp_path_factory.mktemp("short-lived-ids")
    data = tmp / "data"
    srv = ServerProcess(write_config(tmp / "h.toml", data, f"sqlite:///{tmp / 'h.db'}",
                                     extra=SHORT_TTL), data)
    assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    srv.start()
    try:
        yield srv, add_enrolled_supporter(srv, "alice", tmp / "alice")
    finally:
        srv.stop()


NEW_ID = re.compile(r"new ad-hoc ID: (\d{4} \d{4})  \((.*); tell your customer the new ID")
LOST = "is no longer valid; trying again in"


def cut_while_stopped(srv, supporter, then=None) -> None:
    """The server stops answering and the supporter's connection breaks (``ss -K``); once the
    supporter said so (and ``then()`` ran) the server goes on."""
    from .test_e2e_brokering import wait_until
    from .test_e2e_recording_resume import cut_connections
    said = supporter.stderr.count(LOST)
    os.kill(srv.process.pid, signal.SIGSTOP)
    try:
        assert cut_connections(supporter.proc.pid, srv.module_port) == 1
        wait_until(lambda: supporter.stderr.count(LOST) > said, what="the supporter offline")
        if then is not None:
            then()
    finally:
        os.kill(srv.process.pid, signal.SIGCONT)


@pytest.mark.e2e
def test_adhoc_prints_a_new_id_when_it_expires_and_after_a_cut(short_lived_ids):
    from .module_process import ModuleProcess
    from .test_e2e_brokering import wait_until
    srv, alice = short_lived_ids
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(alice))
    try:
        first = supporter.wait_for_line(r"ad-hoc ID: (\d{4} \d{4})  \(valid 2 s").group(1)
        expired = supporter.wait_for_line(NEW_ID.pattern)
        assert expired.group(2) == f"{first} expired unused" and expired.group(1) != first
        cut_while_stopped(srv, supporter)
        assert re.search(r"lost the connection to the server \(.+\): the ID \d{4} \d{4} "
                         r"is no longer valid; trying again in \d+\.\d s", supporter.stderr)
        lines = supporter.stderr.splitlines()
        gone = next(i for i, line in enumerate(lines) if LOST in line)
        replaced = wait_until(lambda: [m for line in supporter.stderr.splitlines()[gone:]
                                       if (m := NEW_ID.search(line))], what="a new ID")[0]
        assert replaced.group(2) == "the connection to the server was lost"
        assert replaced.group(1) not in (first, expired.group(1))
        # the server stops answering and nothing breaks the connection (no reset): the
        # heartbeat finds it, the connection is given up, a new ID once the server answers
        os.kill(srv.process.pid, signal.SIGSTOP)
        try:
            supporter.wait_for_line(r"lost the connection to the server \(the server did not "
                                    r"answer for 6 s\): the ID \d{4} \d{4} is no longer valid")
        finally:
            os.kill(srv.process.pid, signal.SIGCONT)
        lines = supporter.stderr.splitlines()
        silent = next(i for i, line in enumerate(lines) if "did not answer" in line)
        wait_until(lambda: [m for line in supporter.stderr.splitlines()[silent:]
                            if (m := NEW_ID.search(line))], what="a new ID after the silence")
        # Ctrl+C while it reconnects: it stops trying and ends
        cut_while_stopped(srv, supporter, then=lambda: (
            supporter.proc.send_signal(signal.SIGINT), supporter.wait(timeout=20)))
        assert supporter.proc.returncode == 0, supporter.stderr    # withdrawn, not failed
        assert "Traceback" not in supporter.stderr, supporter.stderr
    finally:
        supporter.stop()


EXPIRED = {
    "en": "The ID {old} expired unused, so a new ID was drawn. Tell your customer the new ID: "
          "{id}",
    "de": "Die ID {old} ist ungenutzt abgelaufen, daher wurde eine neue ID erzeugt. Nennen Sie "
          "Ihrem Kunden die neue ID: {id}"}


SWITCHED = {
    "en": {"prompt": "Tell your customer this ID:", "valid": "Valid until ",
           "end": "End session", "keys": "Send keys", "rights": "Rights: none",
           "chat": "Type a message", "hosts": "Hosts"},
    "de": {"prompt": "Nennen Sie Ihrem Kunden diese ID:", "valid": "Gültig bis ",
           "end": "Sitzung beenden", "keys": "Tasten senden", "rights": "Rechte: keine",
           "chat": "Nachricht eingeben", "hosts": "Rechner"}}


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_the_app_tab_replaces_an_expired_id_and_says_so(qt_app, short_lived_ids):  # noqa: F811
    """The app's ad-hoc tab on the same server: an expiry shows the new ID with a line naming
    the old one, in the window's language, on the same connection; switching the window's
    language then says the open tab in the other language too."""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.supporter.adhoc_panel import whole
    from modules.supporter.gui import SupporterWindow

    from .fixtures_qt import screenshot, until
    srv, alice = short_lived_ids
    for language in ("en", "de"):
        install_translation(qt_app, language)
        window = SupporterWindow(reactor, ModuleFolder(alice), language)
        try:
            window.show()
            await window.start()
            tab = window.new_adhoc()
            panel = tab.adhoc_panel
            shown = await until(lambda: panel.adhoc_id, what="the first ID")
            conn = await until(lambda: tab.offer.conn, what="the ID's connection")
            await until(lambda: panel.adhoc_id != shown, what="the ID replaced at expiry")
            assert panel.state_label.text() == EXPIRED[language].format(
                old=whole(shown), id=whole(panel.adhoc_id))     # never wrapped inside an ID
            assert window.tabs.tabText(window.tabs.indexOf(tab)) == panel.adhoc_id
            assert tab.offer.conn is conn and not panel.offline   # no reconnect for it
            screenshot(window, f"supporter-adhoc-expired-{language}")
            # switching the window's language says the open tab in the other one too (in one
            # go: no expiry can come between the switch and the checks)
            other = "de" if language == "en" else "en"
            window.language_box.setCurrentIndex(window.language_box.findData(other))
            assert panel.state_label.text() == EXPIRED[other].format(
                old=whole(shown), id=whole(panel.adhoc_id))
            assert panel.prompt.text() == SWITCHED[other]["prompt"]
            assert panel.valid_label.text().startswith(SWITCHED[other]["valid"])
            assert tab.actions["end"].text() == SWITCHED[other]["end"]
            assert tab.keys_button.text() == SWITCHED[other]["keys"]
            assert tab.rights_label.text() == SWITCHED[other]["rights"]
            assert tab.chat_field.placeholderText() == SWITCHED[other]["chat"]
            assert window.tabs.tabText(0) == SWITCHED[other]["hosts"]
            qt_app.processEvents()       # the layout follows the new texts' sizes
            screenshot(window, f"supporter-adhoc-switched-to-{other}")
        finally:
            window.close()


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_the_host_list_notices_a_server_that_stops_answering(qt_app, short_lived_ids):  # noqa: F811
    """The host list stands on the same kept connection: the server stops answering and no
    reset arrives (SIGSTOP, nothing cut): the app's list and ``hosts --watch`` each find it by
    their heartbeat (the server's 1.5 s: given up after 3 s of silence), say they reconnect,
    and are current again by themselves once the server answers."""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.supporter.gui import SupporterWindow

    from .fixtures_qt import until
    from .module_process import ModuleProcess
    srv, alice = short_lived_ids
    install_translation(qt_app, "en")
    window = SupporterWindow(reactor, ModuleFolder(alice), "en")
    watch = ModuleProcess("supporter", "hosts", "--watch", "--home", str(alice))
    try:
        window.show()
        await window.start()
        conn = window.conn
        await until(lambda: "no hosts you may reach" in bytes(watch._out).decode(),
                    what="the watched list")
        os.kill(srv.process.pid, signal.SIGSTOP)
        try:
            await until(lambda: window.offline_text, what="the app's list reconnecting")
            assert window.status_label.text().startswith("Offline, reconnecting to ")
            assert not window.table.isEnabled() and window.conn is None
            await until(lambda: "lost the connection to the server (the server did not answer "
                                "for 6 s): trying again in" in watch.stderr,
                        what="hosts --watch reconnecting")
        finally:
            os.kill(srv.process.pid, signal.SIGCONT)
        await until(lambda: window.conn is not None and not window.offline_text,
                    what="the app's list current again")
        assert window.conn is not conn and window.table.isEnabled()
        await until(lambda: "connected to the server again; the list is current"
                    in watch.stderr, what="hosts --watch current again")
        assert watch.proc.poll() is None and "Traceback" not in watch.stderr, watch.stderr
    finally:
        window.close()
        watch.stop()


AHEAD = {
    "en": "The ID 1111 2222 is about to expire unused, so a new ID was drawn. Tell your customer "
          "the new ID: 3333 4444 (a customer who already has 1111 2222 can still use it for "
          "59 s)",
    "de": "Die ID 1111 2222 läuft gleich ungenutzt ab, daher wurde eine neue ID erzeugt. Nennen "
          "Sie Ihrem Kunden die neue ID: 3333 4444 (ein Kunde, der 1111 2222 schon hat, kann "
          "sie noch 59 s lang nutzen)"}


def test_the_app_tab_says_the_old_id_still_works_after_a_new_one_was_drawn_ahead(
        qt_app, tmp_path):  # noqa: F811
    """The tab's words for an ID drawn ahead of the old one's expiry (the core's event, as
    the tests above make it), in both languages: the new ID to tell, and how long the old one
    still works for a customer who has it.  (With the real server's 2 s IDs the old one has
    under a second left, which is said as expired: the test above.)"""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.common.session.consent import Role
    from modules.supporter.adhoc_panel import AdhocPanel, whole
    from modules.supporter.gui import SessionTab, SupporterWindow

    from .fixtures_qt import screenshot
    for language in ("en", "de"):
        install_translation(qt_app, language)
        window = SupporterWindow(reactor, ModuleFolder(tmp_path / "alice"), language)
        try:
            tab = SessionTab(window, "ad-hoc", Role.CUSTOMER, "the customer")
            window._add(tab)
            panel = AdhocPanel(tab, window.tabs)
            tab.waiting.hide()
            tab.screen_layout.addWidget(panel)
            tab.adhoc_panel = panel
            tab.start(defer.Deferred())     # waiting for the customer, as new_adhoc's tab
            window.show()
            panel.adhoc_event(IdOffered("1111 2222", 600.0))
            panel.adhoc_event(IdReplaced("1111 2222", "3333 4444", ReplaceReason.EXPIRED,
                                         600.0, 59.4))
            said = AHEAD[language].replace("1111 2222", whole("1111 2222")).replace(
                "3333 4444", whole("3333 4444"))
            assert panel.state_label.text() == said
            assert panel.adhoc_id == "3333 4444" and not panel.id_label.font().strikeOut()
            assert AHEAD[language] in tab.chat_log.toPlainText()  # (plain text: spaces)
            assert window.tabs.tabText(window.tabs.indexOf(tab)) == "3333 4444"
            qt_app.processEvents()
            screenshot(window, f"supporter-adhoc-ahead-{language}")
        finally:
            window.close()


def test_adhoc_says_an_id_drawn_ahead_in_one_line(capsys):
    from modules.supporter.cli import AdhocLines
    lines = AdhocLines()
    lines.adhoc_event(IdReplaced("1111 2222", "3333 4444", ReplaceReason.EXPIRED, 600.0, 59.4))
    lines.adhoc_event(IdReplaced("3333 4444", "5555 6666", ReplaceReason.EXPIRED, 600.0))
    said = capsys.readouterr().err.splitlines()
    assert said == [
        "new ad-hoc ID: 3333 4444  (1111 2222 is about to expire unused; a customer who already "
        "has it can still use it for 59 s; tell your customer the new ID, valid 10 min)",
        "new ad-hoc ID: 5555 6666  (3333 4444 expired unused; tell your customer the new ID, "
        "valid 10 min)"]
