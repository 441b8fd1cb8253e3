"""The broker as a state machine: nameplates, lock-out, presence, who may reach which host.

Real databases (SQLite and PostgreSQL), a ``task.Clock`` for time, small fake connections that
record what the broker asks of them.  Database work runs inline here (the server runs it in the
blocking pool; the functions are the same).
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
from twisted.internet import defer, task

from protocol import control
from protocol.session_end import EndCause, EndReason
from protocol.identity import Identity
from server import accounts
from server.broker import CONFIRM_SECONDS, Broker, RelayLocator
from server.db.models import Host, Role, Session
from server.relay.core import SessionStats
from server.relay.listener import record_session_end
from server.session_protocol import SessionProtocols, verify

PASSWORD = "a-long-password-1"


class InlineDB:
    """``Database.run`` without threads: same function, same transaction, result as Deferred."""

    def __init__(self, db) -> None:
        self.db = db

    def run(self, fn, *args):
        return defer.maybeDeferred(self.db.call, fn, *args)

    def call(self, fn, *args):
        return self.db.call(fn, *args)

    def call_core(self, fn, *args):
        return self.db.call_core(fn, *args)

    def run_core(self, fn, *args):
        return defer.maybeDeferred(self.db.call_core, fn, *args)


class FakeConnection:
    def __init__(self, identity: Identity | None, address: str = "127.0.0.1",
                 offer_answer: bool = True) -> None:
        self.identity = identity
        self.address = address
        self.module_version = "test"
        self.fingerprint = None if identity is None else "ab" * 32
        self.calls: list[tuple[type, dict]] = []
        self.aborted: str | None = None
        self.offer_answer = offer_answer

    def callRemote(self, command, **kwargs):
        self.calls.append((command, kwargs))
        if command is control.OfferSession:
            return defer.succeed({"accepted": self.offer_answer})
        return defer.succeed({})

    def abort(self, reason: str) -> None:
        self.aborted = reason


def result_of(d: defer.Deferred):
    """The Deferred has fired (everything runs inline): its result, or its exception raised."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred did not fire"
    value = box[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


@pytest.fixture
def world(database, fast_password_hashing):
    """Tenant acme with groups office/lab, hosts in each, and users of every role; tenant other."""
    ids = {}
    with database.session() as s:
        acme = accounts.get_or_create_tenant(s, "acme")
        other = accounts.get_or_create_tenant(s, "other")
        office, lab = accounts.add_group(s, acme, "office"), accounts.add_group(s, acme, "lab")
        foreign_group = accounts.add_group(s, other, "office")
        now = dt.datetime.now(dt.timezone.utc)
        for name, tenant, group in (("pc-office", acme, office), ("pc-lab", acme, lab),
                                    ("pc-other", other, foreign_group)):
            host_id = str(uuid.uuid4())
            ids[name] = host_id
            s.add(Host(id=host_id, tenant_id=tenant.id, group_id=group.id, name=name,
                       enrolled_at=now, online=False))
        for name, role, tenant in (("anna", Role.supporter, acme), ("otto", Role.supporter, acme),
                                   ("ada", Role.admin, acme), ("aud", Role.auditor, acme),
                                   ("olga", Role.supporter, other)):
            accounts.add_user(s, tenant, name, role, PASSWORD)
        otto = accounts.user_named(s, "otto")
        accounts.set_membership(s, otto, lab, True)
    return ids


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def broker(database, clock, world, tmp_path):
    issued = []

    def issue(session_id: str, side: str) -> str:
        issued.append((session_id, side))
        return f"token-{session_id}-{side}"
    policy = accounts.LockoutPolicy(free_attempts=2, base_seconds=10, max_seconds=1000)
    b = Broker(InlineDB(database), accounts.Lockouts(policy), issue,
               RelayLocator(("127.0.0.1", lambda: 4444)), clock, nameplate_ttl=600,
               heartbeat_seconds=30, missed_heartbeats=3, flush_seconds=10,
               terms="Be nice.", protocols=SessionProtocols(tmp_path / "protocols"),
               blocking=lambda fn, *args: defer.maybeDeferred(fn, *args))
    b.issued = issued
    result_of(b.start())
    yield b
    result_of(b.stop())


def supporter(name: str) -> FakeConnection:
    return FakeConnection(Identity("supporter", name))


def host(host_id: str, address: str = "127.0.0.1") -> FakeConnection:
    return FakeConnection(Identity("host", host_id), address)


# --- ad-hoc ------------------------------------------------------------------------------------

def test_nameplates_are_four_digits_unique_and_single_use(broker):
    anna = supporter("anna")
    plates = {broker.allocate_nameplate(anna)[0] for _ in range(300)}
    assert len(plates) == 300 and all(len(p) == 4 and p.isdigit() for p in plates)
    plate = next(iter(plates))
    customer = FakeConnection(None, "127.0.0.9")
    ticket = result_of(broker.join_adhoc(customer, plate))
    assert ticket["supporter"] == "anna" and ticket["relay_port"] == 4444
    assert anna.calls[-1][0] is control.SessionReady
    assert anna.calls[-1][1]["relay_token"] != ticket["relay_token"]  # one token per side
    assert {side for _, side in broker.issued} == {"supporter", "peer"}
    with pytest.raises(control.UnknownNameplate):
        result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.10"), plate))


def test_nameplate_expires_after_its_ttl(broker, clock):
    plate, ttl = broker.allocate_nameplate(supporter("anna"))
    assert ttl == 600
    clock.advance(599)
    assert plate in broker.nameplates
    clock.advance(6)
    assert plate not in broker.nameplates
    with pytest.raises(control.UnknownNameplate, match="unknown or expired"):
        result_of(broker.join_adhoc(FakeConnection(None), plate))


def session_rows(database) -> int:
    with database.session() as s:
        return s.query(Session).count()


def test_an_id_drawn_ahead_leaves_the_old_one_valid_until_its_expiry(broker, clock, database):
    """What the supporter's ad-hoc offer relies on when it draws the next ID a minute before
    the one on offer expires: both nameplates live on the same connection, the old one joins
    until its own expiry.  One offer, one customer: the join takes the other one out of play,
    so a second customer is refused as for any unknown ID and no session row is written for
    a join the supporter could not take."""
    anna, bert = supporter("anna"), supporter("anna")
    old, _ = broker.allocate_nameplate(anna)
    clock.advance(540)
    new, _ = broker.allocate_nameplate(anna)
    elsewhere, _ = broker.allocate_nameplate(bert)   # another offer of the same user
    clock.advance(59)
    assert old in broker.nameplates and new in broker.nameplates
    ticket = result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.11"), old))
    assert ticket["supporter"] == "anna"
    assert new not in broker.nameplates and elsewhere in broker.nameplates
    with pytest.raises(control.UnknownNameplate, match="unknown or expired"):
        result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.12"), new))
    assert [command for command, _ in anna.calls] == [control.SessionReady]
    assert session_rows(database) == 1 and broker.held_offers == []
    # the other way round: the new ID joins, the old one (still in its last minute) is gone
    second_old, _ = broker.allocate_nameplate(bert)
    result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.13"), elsewhere))
    assert second_old not in broker.nameplates and session_rows(database) == 2


def written_later(broker) -> list:
    """Session starts are written when the test calls the returned list's entries."""
    writes = []

    def write_later(fn, *args):
        written = defer.Deferred()
        writes.append(lambda: written.callback(fn(*args)))
        return written
    broker.session_starts.blocking = write_later
    return writes


def test_an_id_drawn_while_the_join_is_written_goes_with_the_offer(broker, database):
    """The offer may draw its next ID just while a customer's join is being written: that one
    belongs to the offer the customer took and is withdrawn with it."""
    anna = supporter("anna")
    plate, _ = broker.allocate_nameplate(anna)
    writes = written_later(broker)
    joining = broker.join_adhoc(FakeConnection(None, "127.0.0.14"), plate)
    drawn, _ = broker.allocate_nameplate(anna)
    writes.pop()()
    assert result_of(joining)["supporter"] == "anna"
    assert drawn not in broker.nameplates and session_rows(database) == 1


def lock_out(database, address: str) -> None:
    with database.session() as s:
        now = dt.datetime.now(dt.timezone.utc)
        s.add(accounts.Lockout(key=f"adhoc-addr:{address}", failures=9, last_failure=now,
                               locked_until=now + dt.timedelta(hours=1)))


def test_a_locked_out_join_puts_the_offer_back_unless_its_supporter_went(broker, database,
                                                                       monkeypatch):
    """A join the lock-out refused used nothing up: the offer's nameplates (the typed one and
    the one drawn ahead) go back.  If the supporter's connection closed while that join was
    being written, they do not: put back, they would point to a gone supporter, and the next
    customer's join would write a session row for a session that cannot happen."""
    lock_out(database, "127.0.0.66")
    anna = supporter("anna")
    old, _ = broker.allocate_nameplate(anna)
    new, _ = broker.allocate_nameplate(anna)
    with pytest.raises(control.LockedOut):
        result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.66"), old))
    assert {old, new} <= set(broker.nameplates) and broker.held_offers == []
    # the supporter goes while the locked-out join is being written
    writes = written_later(broker)
    refused = broker.join_adhoc(FakeConnection(None, "127.0.0.66"), new)
    assert old not in broker.nameplates          # held with the typed one meanwhile ...
    free = next(n for n in range(10_000) if f"{n:04d}" not in (old, new))
    draws = iter([int(old), int(new), free])
    monkeypatch.setattr("server.broker.secrets.randbelow", lambda _n: next(draws))
    assert broker.allocate_nameplate(supporter("otto"))[0] not in (old, new)  # ... not reissued
    broker.connection_lost(anna)
    writes.pop()()
    with pytest.raises(control.LockedOut):
        result_of(refused)
    assert old not in broker.nameplates and new not in broker.nameplates
    with pytest.raises(control.UnknownNameplate, match="unknown or expired"):
        result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.67"), new))
    assert anna.calls == [] and session_rows(database) == 0


def test_supporter_leaving_releases_its_nameplates(broker):
    anna = supporter("anna")
    plate, _ = broker.allocate_nameplate(anna)
    broker.connection_lost(anna)
    assert plate not in broker.nameplates


def test_wrong_nameplates_lock_out_that_address_only(broker, database):
    flooder = FakeConnection(None, "127.0.0.66")
    waits = []
    for attempt in range(5):
        with pytest.raises((control.UnknownNameplate, control.LockedOut)) as info:
            result_of(broker.join_adhoc(flooder, "0000"))
        waits.append(str(info.value))
        if attempt == 4:
            break  # stay locked after the last one
        # the lock-out runs on wall-clock time: let each wait pass before the next attempt
        with database.session() as s:
            row = s.get(accounts.Lockout, "adhoc-addr:127.0.0.66")
            if row.locked_until:
                row.locked_until = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    assert "try again in 10 s" in waits[2] and "try again in 20 s" in waits[3]
    assert "try again in 40 s" in waits[4]
    # Locked now: even a correct nameplate is refused from that address ...
    plate, _ = broker.allocate_nameplate(supporter("anna"))
    with pytest.raises(control.LockedOut, match="try again in"):
        result_of(broker.join_adhoc(flooder, plate))
    # ... while another address is not affected at all.
    assert result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.7"), plate))["supporter"] == "anna"


def test_adhoc_session_is_recorded(broker, database):
    plate, _ = broker.allocate_nameplate(supporter("anna"))
    ticket = result_of(broker.join_adhoc(FakeConnection(None, "127.0.0.5"), plate))
    with database.session() as s:
        row = s.get(Session, ticket["session_id"])
        assert row.kind == "adhoc" and row.supporter_identity == "hausmeister:supporter:anna"
        assert row.peer_address == "127.0.0.5" and row.ended_at is None


# --- hosts -------------------------------------------------------------------------------------

def test_presence_is_pushed_to_supporters_whose_list_shows_the_host(broker, world):
    anna, never_listed = supporter("anna"), supporter("bert")
    result_of(broker.list_hosts(anna))
    office = host(world["pc-office"], "127.0.0.21")
    result_of(broker.host_online(office, "1"))
    broker.connection_lost(office)
    pushed = [(kw["host_id"], kw["online"], kw["address"]) for cmd, kw in anna.calls
              if cmd is control.HostPresenceChanged]
    assert pushed == [(world["pc-office"], True, "127.0.0.21"),
                      (world["pc-office"], False, "127.0.0.21")]
    assert never_listed.calls == []          # only who was shown the host hears of it
    broker.connection_lost(anna)
    result_of(broker.host_online(host(world["pc-office"]), "1"))
    assert len([c for c, _ in anna.calls if c is control.HostPresenceChanged]) == 2


def test_host_presence_online_offline_and_db(broker, world, database, clock):
    conn = host(world["pc-office"], "127.0.0.20")
    # the Hello answer's tenant comes from the same transaction that marks the host online
    assert result_of(broker.host_online(conn, "1.2.3")) == "acme"
    hosts = result_of(broker.list_hosts(supporter("anna")))
    assert [(h["name"], h["online"]) for h in hosts] == [("pc-office", True), ("pc-lab", False)]
    with database.session() as s:
        row = s.get(Host, world["pc-office"])
        assert row.online and row.last_address == "127.0.0.20" and row.module_version == "1.2.3"
    broker.connection_lost(conn)
    hosts = result_of(broker.list_hosts(supporter("anna")))
    assert [(h["name"], h["online"]) for h in hosts] == [("pc-lab", False), ("pc-office", False)]
    with database.session() as s:
        assert not s.get(Host, world["pc-office"]).online


def test_what_the_broker_keeps_per_connected_host_has_no_instance_dicts(broker, world, clock):
    """Per connected host the broker keeps a presence entry and the connection's identity: slots
    only, and the role is the module's constant, not a string per host (bench/README.md,
    issue 14).  The presence still follows heartbeats."""
    from protocol.identity import MODULE_ROLES
    from server.module_port import ModulePort
    conn = host(world["pc-office"])
    conn.identity = Identity.parse(f"hausmeister:{'ho' + 'st'}:{world['pc-office']}")
    assert conn.identity.role is MODULE_ROLES[MODULE_ROLES.index("host")]
    assert not hasattr(conn.identity, "__dict__")
    assert result_of(broker.host_online(conn, "1.2.3")) == "acme"
    presence = broker.hosts[world["pc-office"]]
    assert not hasattr(presence, "__dict__") and presence.connection is conn
    clock.advance(7)
    broker.heartbeat(conn)
    assert presence.last_heartbeat == clock.seconds()
    # the module version: one string for all connections of that version, a bounded number
    port = ModulePort(None, broker, None, None, lambda identity: defer.succeed(""))
    first, again = "".join(["0.1", ".0"]), "".join(["0.1.", "0"])
    assert first == again and first is not again
    assert port.shared_version(first) is first and port.shared_version(again) is first
    for i in range(port.MAX_SHARED_VERSIONS):
        port.shared_version(f"junk {i}")
    late = "".join(["9.9", ".9"])
    assert port.shared_version(late) is late and len(port._versions) == port.MAX_SHARED_VERSIONS


def test_hellos_arriving_while_a_batch_is_written_share_one_transaction(broker, world, database):
    """Thousands of hosts back after a restart: one transaction per batch, not per host; an
    unknown host in a batch is refused, the others are online with their tenant."""
    held = []
    inline = broker.db

    class HeldDB:  # the first write is still running while the next Hellos arrive
        def run_core(self, fn, *args):
            d = defer.Deferred()
            held.append((fn, args, d))
            return d
    broker.db = HeldDB()
    first = host(world["pc-office"])
    answers = [broker.host_online(first, "1")]
    waiting = [host(world["pc-lab"]), host(str(uuid.uuid4())), host(world["pc-office"])]
    answers += [broker.host_online(conn, "2") for conn in waiting]
    assert [len(args[0]) for _, args, _ in held] == [1]  # the later three wait for the first
    for _ in range(2):
        fn, args, d = held.pop(0)
        d.callback(inline.call_core(fn, *args))
    assert held == []  # the three went in one batch
    broker.db = inline
    assert result_of(answers[0]) == "acme" and result_of(answers[1]) == "acme"
    with pytest.raises(control.NotEnrolled):
        result_of(answers[2])
    assert result_of(answers[3]) == "acme"
    assert first.aborted and "newer connection" in first.aborted  # in batch order
    assert broker.hosts[world["pc-office"]].connection is waiting[2]
    with database.session() as s:
        assert s.get(Host, world["pc-lab"]).online and s.get(Host, world["pc-lab"]).module_version == "2"


def test_newest_connection_of_a_host_wins(broker, world):
    old, new = host(world["pc-office"]), host(world["pc-office"])
    result_of(broker.host_online(old, "1"))
    result_of(broker.host_online(new, "1"))
    assert old.aborted and "newer connection" in old.aborted
    assert broker.hosts[world["pc-office"]].connection is new
    broker.connection_lost(old)  # the old one's late goodbye does not take the new one offline
    assert world["pc-office"] in broker.hosts


def test_host_that_misses_heartbeats_is_dropped(broker, world, clock):
    conn = host(world["pc-office"])
    result_of(broker.host_online(conn, "1"))
    for _ in range(4):
        clock.advance(25)
        broker.heartbeat(conn)
    assert conn.aborted is None
    clock.advance(95)
    assert conn.aborted == "missed heartbeats"


def test_heartbeats_are_flushed_to_the_database_in_batches(broker, world, database, clock):
    conn = host(world["pc-office"])
    result_of(broker.host_online(conn, "1"))
    with database.session() as s:
        first_seen = s.get(Host, world["pc-office"]).last_seen
    broker.heartbeat(conn)
    assert world["pc-office"] in broker._dirty
    clock.advance(10)  # the flush loop runs
    assert not broker._dirty
    with database.session() as s:
        assert s.get(Host, world["pc-office"]).last_seen >= first_seen


class CountingDB(InlineDB):
    """InlineDB that counts the transactions the broker asks for."""

    def __init__(self, db) -> None:
        super().__init__(db)
        self.transactions = 0

    def run(self, fn, *args):
        self.transactions += 1
        return super().run(fn, *args)


def test_stop_marks_every_connected_host_offline_in_one_transaction(broker, world, database,
                                                                     monkeypatch):
    monkeypatch.setattr("server.broker.IN_BATCH", 2)  # three hosts: two UPDATE batches
    conns = [host(world[name]) for name in ("pc-office", "pc-lab", "pc-other")]
    for conn in conns:
        result_of(broker.host_online(conn, "1"))
        broker.heartbeat(conn)
    with database.session() as s:
        registered = {h.id: h.last_seen for h in s.query(Host) if h.online}
    assert len(registered) == 3
    broker.db = counting = CountingDB(database)
    result_of(broker.stop())
    assert counting.transactions == 1
    with database.session() as s:
        rows = {h.id: h for h in s.query(Host)}
    assert not any(row.online for row in rows.values())
    assert all(rows[i].last_seen >= seen for i, seen in registered.items())
    for conn in conns:  # the reactor closes the connections after the broker stopped
        broker.connection_lost(conn)
    assert counting.transactions == 1 and broker.hosts == {}


def test_host_registered_while_stopping_still_goes_offline(broker, world, database):
    office, lab = host(world["pc-office"]), host(world["pc-lab"])
    result_of(broker.host_online(office, "1"))
    result_of(broker.stop())
    # Hellos whose database write was still under way when stop() ran
    late_lab, office_again = host(world["pc-lab"]), host(world["pc-office"])
    result_of(broker.host_online(late_lab, "1"))
    result_of(broker.host_online(office_again, "1"))
    for conn in (office, office_again, lab, late_lab):
        broker.connection_lost(conn)
    assert broker.hosts == {}
    with database.session() as s:
        assert not s.get(Host, world["pc-lab"]).online
        assert not s.get(Host, world["pc-office"]).online


def test_visibility_by_tenant_and_group(broker, world):
    names = lambda who: [h["name"] for h in result_of(broker.list_hosts(supporter(who)))]  # noqa: E731
    assert sorted(names("anna")) == ["pc-lab", "pc-office"]   # no groups: the whole tenant
    assert names("otto") == ["pc-lab"]                           # member of lab only
    assert sorted(names("ada")) == ["pc-lab", "pc-office"]     # admin: the whole tenant
    assert names("olga") == ["pc-other"]                         # another tenant
    with pytest.raises(control.Forbidden, match="auditors"):
        result_of(broker.list_hosts(supporter("aud")))
    with pytest.raises(control.UnknownHost):
        result_of(broker.connect_host(supporter("otto"), "pc-office"))
    with pytest.raises(control.UnknownHost):
        result_of(broker.connect_host(supporter("anna"), world["pc-other"]))


def test_connect_to_offline_host_says_so_at_once(broker, world):
    with pytest.raises(control.HostOffline, match="pc-lab.*offline"):
        result_of(broker.connect_host(supporter("anna"), "pc-lab"))


def test_connect_host_offers_the_session_and_hands_out_two_tokens(broker, world, database):
    conn = host(world["pc-lab"])
    result_of(broker.host_online(conn, "1"))
    ticket = result_of(broker.connect_host(supporter("otto"), world["pc-lab"]))
    offer = conn.calls[-1]
    assert offer[0] is control.OfferSession and offer[1]["supporter"] == "otto"
    assert offer[1]["relay_token"] != ticket["relay_token"]
    assert offer[1]["session_id"] == ticket["session_id"]
    with database.session() as s:
        assert s.get(Session, ticket["session_id"]).host_id == world["pc-lab"]


def test_host_that_declines_ends_the_session_record(broker, world, database):
    conn = host(world["pc-lab"])
    conn.offer_answer = False
    result_of(broker.host_online(conn, "1"))
    with pytest.raises(control.Forbidden, match="declined"):
        result_of(broker.connect_host(supporter("anna"), "pc-lab"))
    with database.session() as s:
        rows = s.query(Session).all()
        assert len(rows) == 1 and rows[0].end_reason == "declined by the host"
        assert (rows[0].end_cause, rows[0].ended_by) == ("declined", "host")


def test_unknown_host_identity_is_refused(broker):
    with pytest.raises(control.NotEnrolled):
        result_of(broker.host_online(host(str(uuid.uuid4())), "1"))


# --- session protocol ----------------------------------------------------------------------------

def test_session_events_are_stamped_with_the_sender_and_chained(broker, tmp_path, database):
    anna = supporter("anna")
    customer = FakeConnection(None, "127.0.0.8")
    plate, _ = broker.allocate_nameplate(anna)
    ticket = result_of(broker.join_adhoc(customer, plate))
    assert ticket["terms"] == "Be nice." and ticket["supporter_fingerprint"] == "ab" * 32
    sid = ticket["session_id"]
    result_of(broker.session_event(customer, sid, "terms_accepted", {"sha256": "x"}))
    result_of(broker.session_event(anna, sid, "right_requested", {"right": "control"}))
    with pytest.raises(control.Forbidden):
        broker.session_event(supporter("otto"), sid, "chat", {"text": "I am not in it"})
    stats = SessionStats(sid, 10, 20, None, time.time(), "supporter closed the connection",
                         EndReason(EndCause.CONNECTION_LOST, "supporter"))
    result_of(record_session_end(InlineDB(database), stats, broker.protocols,
                                 blocking=lambda fn, *a: defer.maybeDeferred(fn, *a)))
    broker.session_ended(sid)
    assert sid not in broker.sessions
    text = broker.protocols.show(sid)
    assert "customer@127.0.0.8" in text and "hausmeister:supporter:anna" in text
    result = verify(tmp_path / "protocols")
    assert result.ok and result.events == 5  # created, joined, terms_accepted, right_requested, ended
    csv_text = (tmp_path / "protocols" / "acme" / "sessions.csv").read_text()
    assert sid in csv_text and "the connection to the supporter was lost" in csv_text
    with database.session() as s:
        row = s.get(Session, sid)
        assert row.protocol_file.endswith(f"{sid}.jsonl")
        anchor = (row.protocol_end_seq, row.protocol_end_hash)
    # the "ended" line is anchored in the database: the file's end is checked against it
    assert anchor[0] == 5 and len(anchor[1]) == 64
    assert verify(tmp_path / "protocols", {sid: anchor}).anchored == 1


def test_failed_key_confirmation_counts_against_customer_and_nameplate(broker, database):
    anna = supporter("anna")
    customer = FakeConnection(None, "127.0.0.44")
    plate, _ = broker.allocate_nameplate(anna)
    sid = result_of(broker.join_adhoc(customer, plate))["session_id"]
    result_of(broker.session_event(customer, sid, "key_confirmation_failed", {}))
    with database.session() as s:
        assert s.get(accounts.Lockout, "adhoc-addr:127.0.0.44").failures == 1
        assert s.get(accounts.Lockout, f"nameplate:{plate}").failures == 1


# --- no session without its protocol -------------------------------------------------------------

@pytest.fixture
def read_only_later(tmp_path):
    """A tmpfs of its own for the protocol folder, which the test turns read-only (needs root)."""
    import subprocess
    mount = tmp_path / "protocol-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs (needs root): {done.stderr}")
    yield mount, lambda option: subprocess.run(["mount", "-o", f"remount,{option}", str(mount)],
                                               check=True)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_running_session_whose_protocol_write_fails_is_ended(broker, read_only_later, database):
    mount, remount = read_only_later
    broker.protocols = SessionProtocols(mount)
    ended, alerts = [], []
    broker.end_relay_session = lambda sid, end: ended.append((sid, end)) or True
    broker.on_protocol_failure = alerts.append
    anna, customer = supporter("anna"), FakeConnection(None, "127.0.0.8")
    plate, _ = broker.allocate_nameplate(anna)
    sid = result_of(broker.join_adhoc(customer, plate))["session_id"]
    remount("ro")
    with pytest.raises(control.NotRecordable, match="cannot record sessions"):
        result_of(broker.session_event(customer, sid, "terms_accepted", {"sha256": "x"}))
    # the relay was told to close the session, both parties were told why, the admins alerted
    assert [(s, e.cause.value) for s, e in ended] == [(sid, "protocol_unwritable")]
    for conn in (anna, customer):
        notices = [kw for command, kw in conn.calls if command is control.SessionEnded]
        assert notices and notices[0]["cause"] == "protocol_unwritable"
        assert "could not be written" in notices[0]["text"]
    assert alerts and "Read-only file system" in alerts[0]
    with database.session() as s:
        row = s.get(Session, sid)
        assert (row.end_cause, row.ended_by) == ("protocol_unwritable", "server")
    # and no new session starts until the folder takes writes again
    with pytest.raises(control.NotRecordable):
        broker.allocate_nameplate(anna)
    with pytest.raises(control.NotRecordable):
        result_of(broker.connect_host(anna, "pc-office"))
    remount("rw")
    result_of(broker.probe_protocols())
    assert broker.allocate_nameplate(anna)[0]


def test_a_session_is_refused_when_its_first_protocol_line_fails(broker, read_only_later,
                                                                  database):
    mount, remount = read_only_later
    broker.protocols = SessionProtocols(mount)
    anna, customer = supporter("anna"), FakeConnection(None, "127.0.0.9")
    plate, _ = broker.allocate_nameplate(anna)
    remount("ro")
    with pytest.raises(control.NotRecordable):
        result_of(broker.join_adhoc(customer, plate))
    # the supporter never got relay details; it was told why its wait ended
    kinds = [command for command, _ in anna.calls]
    assert control.SessionReady not in kinds and control.SessionEnded in kinds
    with database.session() as s:
        row = s.query(Session).one()
        assert row.ended_at is not None and row.end_cause == "protocol_unwritable"


# --- one protocol line per event -----------------------------------------------------------------

def protocol_lines(tmp_path) -> list[dict]:
    import json
    lines = []
    for path in sorted((tmp_path / "protocols").rglob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def test_an_event_both_parties_report_is_one_line_confirmed_by_the_other(broker, clock, tmp_path):
    anna, customer = supporter("anna"), FakeConnection(None, "127.0.0.8")
    plate, _ = broker.allocate_nameplate(anna)
    sid = result_of(broker.join_adhoc(customer, plate))["session_id"]
    granted = {"right": "view", "by": "customer", "event_id": "e1-1"}
    first = broker.session_event(customer, sid, "right_granted", granted)
    # a report only one side makes queues behind it: the order of the timeline is kept
    comment = broker.session_event(anna, sid, "comment", {"by": "supporter", "text": "hi"})
    assert not first.called and not comment.called
    result_of(broker.session_event(anna, sid, "right_granted", dict(granted)))
    assert first.called and comment.called
    # an event only one party reported is written alone after the confirmation wait
    lonely = broker.session_event(anna, sid, "right_requested",
                                  {"right": "files", "by": "supporter", "event_id": "e2-1"})
    assert not lonely.called
    clock.advance(CONFIRM_SECONDS - 0.5)
    assert not lonely.called
    clock.advance(1.0)
    assert lonely.called
    # the same kind again is a new event (the next event_id) and gets its own line
    again = broker.session_event(customer, sid, "right_granted", {**granted, "event_id": "e1-2"})
    # an 'ending' report writes what is held before it answers
    result_of(broker.session_event(anna, sid, "ending", {"cause": "ended", "by": "supporter"}))
    assert again.called
    lines = [(e["kind"], e["actor"], e["detail"].get("confirmed_by")) for e in protocol_lines(tmp_path)]
    assert lines == [
        ("created", "server", None), ("joined", "server", None),
        ("right_granted", "customer@127.0.0.8", "hausmeister:supporter:anna"),
        ("comment", "hausmeister:supporter:anna", None),
        ("right_requested", "hausmeister:supporter:anna", None),
        ("right_granted", "customer@127.0.0.8", None),
    ]
    assert verify(tmp_path / "protocols").ok


def test_a_confirmation_later_than_the_wait_is_no_second_line(broker, clock, tmp_path):
    from server.broker import UNCONFIRMED_KEPT
    anna, customer = supporter("anna"), FakeConnection(None, "127.0.0.8")
    plate, _ = broker.allocate_nameplate(anna)
    sid = result_of(broker.join_adhoc(customer, plate))["session_id"]
    sent = {"id": "f1", "name": "a.txt", "size": 3, "sha256": "ab", "event_id": "f-1"}
    first = broker.session_event(anna, sid, "file_sent", sent)
    clock.advance(CONFIRM_SECONDS + 0.1)
    assert first.called  # written alone after the wait
    # the customer's report of the same event comes late: answered, but no second line
    assert result_of(broker.session_event(customer, sid, "file_sent", dict(sent))) == {}
    # a genuinely different event is still written: another kind with the same id, the same
    # party reporting the id again, the next occurrence
    other = broker.session_event(customer, sid, "file_received", dict(sent))
    again = broker.session_event(anna, sid, "file_sent", dict(sent))
    nxt = broker.session_event(customer, sid, "file_sent", {**sent, "event_id": "f-2"})
    clock.advance(CONFIRM_SECONDS + 0.1)
    assert other.called and again.called and nxt.called
    # memory stays bounded: only the newest UNCONFIRMED_KEPT one-sided events are kept
    live = broker.sessions[sid]
    for n in range(UNCONFIRMED_KEPT + 10):
        broker.session_event(anna, sid, "comment", {"text": str(n), "event_id": f"c-{n}"})
    clock.advance(CONFIRM_SECONDS + 0.1)
    assert len(live.unconfirmed) == UNCONFIRMED_KEPT
    assert ("comment", "c-0") not in live.unconfirmed  # oldest out
    result_of(broker.session_event(customer, sid, "comment", {"text": "late", "event_id":
                                                              f"c-{UNCONFIRMED_KEPT + 9}"}))
    result_of(broker.session_event(anna, sid, "ending", {"cause": "ended", "by": "supporter"}))
    lines = [(e["kind"], e["actor"], e["detail"].get("event_id"))
             for e in protocol_lines(tmp_path)][2:]
    assert lines[:4] == [
        ("file_sent", "hausmeister:supporter:anna", "f-1"),
        ("file_received", "customer@127.0.0.8", "f-1"),
        ("file_sent", "hausmeister:supporter:anna", "f-1"),
        ("file_sent", "customer@127.0.0.8", "f-2"),
    ]
    assert len(lines) == 4 + UNCONFIRMED_KEPT + 10  # the late 'comment' made no line either
    assert verify(tmp_path / "protocols").ok
