"""The bookkeeping behind the connection guard, without sockets: caps per address and in total,
deadlines per stage, who is displaced when the total is full, and the rate-limited refusal log."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from server.admission import HANDSHAKE, PendingConnections, RefusalLog, address_key


def test_per_address_cap_refuses_the_newcomer_and_the_total_displaces_the_oldest_handshake():
    p = PendingConnections(per_address=2, total=3)
    assert p.admit("a1", "10.0.0.1", 5, now=0).admitted
    assert p.admit("a2", "10.0.0.1", 5, now=1).admitted
    refused = p.admit("a3", "10.0.0.1", 5, now=2)
    assert not refused.admitted and "2 connections from 10.0.0.1" in refused.reason
    p.advance("a1", "first command", 5, now=2)  # a1 finished TLS: a2 is the oldest handshake
    third = p.admit("b1", "10.0.0.2", 5, now=3)
    assert third.admitted and third.evicted is None and len(p) == 3
    fourth = p.admit("c1", "10.0.0.3", 5, now=4)
    assert fourth.admitted and fourth.evicted == "a2" and fourth.evicted_address == "10.0.0.1"
    assert "a2" not in p and p.count_of("10.0.0.1") == 1 and len(p) == 3


def test_deadlines_expire_per_stage_and_settled_connections_never_expire():
    p = PendingConnections(per_address=10, total=10)
    p.admit("x", "10.0.0.1", 2, now=0)
    p.admit("y", "10.0.0.1", 2, now=1)
    p.admit("z", "10.0.0.2", 2, now=1)
    p.advance("x", "first command", 10, now=1.5)   # now due at 11.5
    p.settle("z")
    assert p.expired(now=2.9) == []
    assert p.expired(now=3.0) == [("y", HANDSHAKE, 2, "10.0.0.1")]
    assert p.expired(now=11.4) == []
    assert p.expired(now=11.5) == [("x", "first command", 10, "10.0.0.1")]
    assert len(p) == 0 and p.count_of("10.0.0.1") == 0


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4():
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::7") == \
        "2001:db8:1:2::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("127.0.0.1") == "127.0.0.1"


operations = st.lists(st.tuples(
    st.sampled_from(["admit", "advance", "settle", "expire"]),
    st.integers(0, 30),              # connection id
    st.integers(0, 4),               # address
    st.floats(0.1, 3.0),             # time step
), max_size=200)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 5), st.integers(1, 12))
def test_caps_and_counts_hold_whatever_happens(ops, per_address, total):
    p = PendingConnections(per_address=per_address, total=total)
    now = 0.0
    model: dict[int, tuple[str, float]] = {}  # conn -> (address, deadline)
    for op, conn, addr, step in ops:
        now += step
        address = f"10.0.0.{addr}"
        if op == "admit" and conn not in p:
            decision = p.admit(conn, address, 2.0, now)
            if decision.evicted is not None:
                assert decision.evicted in model
                del model[decision.evicted]
            if decision.admitted:
                model[conn] = (address, now + 2.0)
        elif op == "advance":
            if conn in model:
                model[conn] = (model[conn][0], now + 1.0)
            p.advance(conn, "first command", 1.0, now)
        elif op == "settle":
            assert p.settle(conn) == (conn in model)
            model.pop(conn, None)
        elif op == "expire":
            gone = {c for c, *_ in p.expired(now)}
            assert gone == {c for c, (_, due) in model.items() if due <= now}
            for c in gone:
                del model[c]
        assert len(p) == len(model) <= total
        for a in {a for a, _ in model.values()}:
            assert p.count_of(a) == sum(1 for x, _ in model.values() if x == a) <= per_address


def test_refusal_log_gives_one_line_per_kind_and_interval_and_summarises_the_rest():
    log = RefusalLog(interval=10)
    assert log.note("no TLS handshake", "10.0.0.1", now=0)
    assert not any(log.note("no TLS handshake", f"10.0.0.{i % 3}", now=1) for i in range(999))
    assert log.note("over the per-address cap", "10.0.0.9", now=2)  # another kind: own line
    assert log.due(now=9) == []
    summaries = {s.kind: s for s in log.due(now=10)}
    flood = summaries["no TLS handshake"]
    assert flood.suppressed == 999 and flood.top_address == "10.0.0.0" and flood.top_count == 333
    assert "over the per-address cap" not in summaries  # nothing suppressed there
    assert log.due(now=20) == []                         # a quiet interval closes the window
    assert log.note("no TLS handshake", "10.0.0.1", now=31)  # quiet again: its own line


# --- the guard's clock-driven side, with a fake clock and connections that record their abort --

class FakeConnection:
    def __init__(self, factory, address: str) -> None:
        self.factory, self.address = factory, address
        self.closed_by_guard = False
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


def guard_with_clock(**overrides):
    from types import SimpleNamespace

    from twisted.internet.task import Clock

    from server.config import LimitsSection
    from server.connection_guard import ConnectionGuard
    values = dict(tls_handshake_seconds=2.0, first_command_seconds=3.0, http_header_seconds=3.0,
                  pending_per_address=3, pending_total=5, raise_open_file_limit=False,
                  refusal_log_seconds=10.0)
    values.update(overrides)
    clock = Clock()
    guard = ConnectionGuard(LimitsSection(**values), clock, total=values["pending_total"])
    factory = SimpleNamespace(listener="module port", after_handshake=("Hello", 3.0), guard=guard)
    return guard, clock, factory


def test_guard_aborts_at_each_deadline_and_refuses_over_the_address_cap_before_building():
    guard, clock, factory = guard_with_clock()
    guard.start()
    silent, greeted, slow = (FakeConnection(factory, "10.0.0.1") for _ in range(3))
    for conn in (silent, greeted, slow):
        assert guard.admit(conn)
    assert guard.refuse_early("module port", "10.0.0.1")      # a fourth: nothing is built
    assert not guard.refuse_early("module port", "10.0.0.2")
    guard.handshake_done(greeted)
    guard.handshake_done(slow)
    guard.settle(greeted)                                     # said Hello: no deadline any more
    clock.advance(1.5)
    assert (silent.aborted, slow.aborted) == (0, 0)
    clock.advance(1.0)                                        # 2.5 s: past the TLS deadline
    assert silent.aborted == 1 and silent.closed_by_guard and slow.aborted == 0
    clock.advance(1.0)                                        # 3.5 s: past Hello's deadline
    assert slow.aborted == 1 and greeted.aborted == 0
    assert len(guard.pending) == 0 and guard.closed_count == 3
    guard.lost(silent)                                        # its close is not logged twice
    guard.stop()


def test_guard_displaces_the_oldest_handshake_when_full_and_releases_memory_once_calm():
    from server import connection_guard
    guard, clock, factory = guard_with_clock(pending_per_address=100, pending_total=300)
    guard.start()
    flood = [FakeConnection(factory, f"10.0.{i % 3}.1") for i in range(300)]
    for conn in flood:
        assert guard.admit(conn)
    newcomer = FakeConnection(factory, "192.0.2.1")
    assert guard.admit(newcomer) and flood[0].aborted == 1 and newcomer.aborted == 0
    assert guard.peak == 300 >= connection_guard.TRIM_AFTER_PEAK
    guard.settle(newcomer)
    clock.advance(2.5)                                        # the flood expires
    assert all(c.aborted == 1 for c in flood) and len(guard.pending) == 0
    assert guard.trims == []                                  # not before it stayed calm
    clock.pump([1.0] * int(connection_guard.CALM_SECONDS + 2))
    assert len(guard.trims) == 1                              # once, not every sweep
    clock.pump([1.0] * 10)
    assert len(guard.trims) == 1
    guard.stop()


def test_a_closed_module_connection_is_freed_without_the_cycle_collector_and_fails_late_calls():
    """A flood of closed connections must not wait for a full collection to give memory back;
    an answer or a call that comes after the close fails the way AMP expects, quietly."""
    import gc
    import weakref

    from twisted.internet.error import ConnectionDone
    from twisted.internet.testing import StringTransport
    from twisted.protocols import amp
    from twisted.python.failure import Failure

    from protocol import control
    from server.module_port import ConnectionRegistry, ModuleConnection, ModulePort

    port = ModulePort(ConnectionRegistry(), None, None, None, None)
    conn = ModuleConnection(port)
    conn.makeConnection(StringTransport())
    conn.connectionLost(Failure(ConnectionDone()))
    gone = weakref.ref(conn)
    gc.disable()
    try:
        del conn
        assert gone() is None  # freed by reference counting alone
    finally:
        gc.enable()

    late = ModuleConnection(port)
    late.makeConnection(StringTransport())
    late.connectionLost(Failure(ConnectionDone()))
    failed = []
    late.callRemote(control.Heartbeat).addErrback(lambda f: failed.append(f.type))
    assert failed == [ConnectionDone]
    late._safeEmit(amp.AmpBox(answer=b"late"))  # dropped, nothing raised
