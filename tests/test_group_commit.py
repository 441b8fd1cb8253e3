"""Group commit of session starts and ends: batches, and what a failing batch does.

``GroupCommit`` with a blocking runner the test controls (a batch "runs" until the test lets it
finish), so requests really arrive while a batch is being written; the session writes against a
real SQLite database and a real protocol folder.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pytest
from twisted.internet import defer

from protocol import control
from protocol.session_end import EndCause, EndReason
from server import accounts
from server.db.models import Lockout, Role, Session
from server.group_commit import GroupCommit
from server.relay.core import SessionStats
from server.session_commit import (LockedOut, ProtocolNotWritten, SessionStart, close_sessions,
                                   open_sessions)
from server.session_protocol import SessionProtocols, verify


class HeldRunner:
    """A blocking runner whose jobs run when the test says so (in order)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[defer.Deferred, object, tuple]] = []

    def __call__(self, fn, *args):
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((d, fn, args))
        return d

    def run_next(self) -> None:
        d, fn, args = self.jobs.pop(0)
        try:
            result = fn(*args)
        except Exception as exc:
            d.errback(exc)
        else:
            d.callback(result)


def outcome(d: defer.Deferred):
    box = []
    d.addBoth(box.append)
    assert box, "not answered yet"
    return box[0]


def test_requests_arriving_during_a_batch_go_together_in_the_next():
    seen = []
    runner = HeldRunner()
    commits = GroupCommit(lambda batch: seen.append(list(batch)) or [x * 10 for x in batch],
                          blocking=runner)
    first = commits.submit(1)  # alone: written at once, nobody waits for company
    later = [commits.submit(n) for n in (2, 3, 4)]
    assert len(runner.jobs) == 1
    runner.run_next()
    assert outcome(first) == 10 and not any(d.called for d in later)
    runner.run_next()
    assert [outcome(d) for d in later] == [20, 30, 40]
    assert seen == [[1], [2, 3, 4]] and commits.batch_sizes == [1, 3]
    assert not runner.jobs


def test_a_failing_batch_answers_nobody_as_written_and_the_next_batch_still_runs():
    runner = HeldRunner()

    def work(batch):
        if "bad" in batch:
            raise OSError("disk full")
        return [f"ok {x}" for x in batch]
    commits = GroupCommit(work, blocking=runner)
    first = commits.submit("a")
    batch = [commits.submit(x) for x in ("b", "bad", "c")]
    after = []
    runner.run_next()
    after.append(commits.submit("d"))  # arrives while the failing batch is written
    runner.run_next()
    for d in batch:
        failure = outcome(d)
        assert isinstance(failure, defer.Failure) and failure.check(OSError)
    runner.run_next()
    assert outcome(first) == "ok a" and outcome(after[0]) == "ok d"


def test_one_request_failing_fails_only_that_one():
    commits = GroupCommit(lambda batch: [ValueError(x) if x < 0 else x for x in batch],
                          blocking=lambda fn, *a: defer.maybeDeferred(fn, *a))
    assert outcome(commits.submit(5)) == 5
    assert outcome(commits.submit(-1)).check(ValueError)


def test_a_work_function_that_loses_requests_answers_nobody():
    commits = GroupCommit(lambda batch: batch[:-1],
                          blocking=lambda fn, *a: defer.maybeDeferred(fn, *a))
    assert outcome(commits.submit(1)).check(RuntimeError)


# --- session starts and ends ---------------------------------------------------------------------

@pytest.fixture
def people(database, fast_password_hashing):
    with database.session() as s:
        acme = accounts.get_or_create_tenant(s, "acme")
        accounts.add_user(s, acme, "anna", Role.supporter, "a-long-password-1")
        accounts.add_user(s, acme, "aud", Role.auditor, "a-long-password-1")
        s.add(Lockout(key="adhoc-addr:10.0.0.66", failures=9,
                      last_failure=dt.datetime.now(dt.timezone.utc),
                      locked_until=dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)))


def start(supporter: str = "anna", address: str = "10.0.0.5") -> SessionStart:
    return SessionStart(str(uuid.uuid4()), supporter, dict(
        kind="adhoc", supporter_identity=f"hausmeister:supporter:{supporter}",
        supporter_address="10.0.0.1", peer_identity=None, peer_address=address, host_id=None,
        node=None), (f"adhoc-addr:{address}",),
        [("created", {"kind": "adhoc"}), ("joined", {"customer_address": address})])


def rows(database) -> dict[str, Session]:
    with database.session() as s:
        return {row.id: row for row in s.query(Session)}


def test_a_batch_of_starts_checks_each_lockout_and_supporter_in_one_transaction(
        database, people, tmp_path):
    protocols = SessionProtocols(tmp_path / "protocols")
    ok1, locked, auditor, ok2 = start(), start(address="10.0.0.66"), start("aud"), start()
    outcomes = open_sessions(database, protocols, [ok1, locked, auditor, ok2])
    assert outcomes[0] == "acme" and outcomes[3] == "acme"
    assert isinstance(outcomes[1], LockedOut) and outcomes[1].wait > 200
    assert isinstance(outcomes[2], control.Forbidden)
    # rows and protocol lines for the two that started, nothing for the two refused
    assert set(rows(database)) == {ok1.session_id, ok2.session_id}
    result = verify(tmp_path / "protocols")
    assert result.ok and result.files == 2 and result.events == 4


def test_a_start_batch_whose_transaction_fails_writes_nothing(database, people, tmp_path):
    protocols = SessionProtocols(tmp_path / "protocols")
    first = start()
    twin = start()
    twin.session_id = first.session_id  # the second row breaks the primary key: no commit
    with pytest.raises(Exception, match="UNIQUE|unique|duplicate"):
        open_sessions(database, protocols, [first, twin])
    assert rows(database) == {}
    assert not (tmp_path / "protocols").exists()  # and not a line of protocol


def test_a_start_whose_lines_fail_is_reported_and_the_others_start(database, people, tmp_path):
    protocols = SessionProtocols(tmp_path / "protocols")
    good, doomed = start(), start()
    tenant_dir = tmp_path / "protocols" / "acme"
    now = dt.datetime.now(dt.timezone.utc)
    month = tenant_dir / f"{now:%Y}" / f"{now:%m}"
    month.mkdir(parents=True)
    (month / f"{doomed.session_id}.jsonl").mkdir()  # a folder where its file would go
    outcomes = open_sessions(database, protocols, [good, doomed])
    assert outcomes[0] == "acme"
    assert isinstance(outcomes[1], ProtocolNotWritten) and outcomes[1].tenant == "acme"
    assert set(rows(database)) == {good.session_id, doomed.session_id}  # the broker ends it
    assert protocols.writer.locate("acme", good.session_id) is not None


def test_ends_of_a_batch_are_written_with_their_anchors(database, people, tmp_path):
    protocols = SessionProtocols(tmp_path / "protocols")
    starts = [start(), start(), start()]
    assert open_sessions(database, protocols, starts) == ["acme"] * 3
    now = time.time()
    ended = [SessionStats(s.session_id, 10 * n, 20 * n, now - 5, now, "peer closed",
                          EndReason(EndCause.CONNECTION_LOST, "peer")) for n, s in
             enumerate(starts, 1)]
    ended.append(SessionStats("no-such-session", 0, 0, None, now, "x", None))
    outcomes = close_sessions(database, protocols, ended)
    assert outcomes[3] is None and all(o.session_id == s.session_id
                                       for o, s in zip(outcomes, starts))
    found = rows(database)
    anchors = {}
    for n, s in enumerate(starts, 1):
        row = found[s.session_id]
        assert row.ended_at is not None and row.bytes_to_peer == 10 * n
        assert (row.end_cause, row.ended_by) == ("connection_lost", "customer")
        assert row.protocol_file.endswith(f"{s.session_id}.jsonl") and row.protocol_end_seq == 3
        anchors[s.session_id] = (row.protocol_end_seq, row.protocol_end_hash)
    result = verify(tmp_path / "protocols", anchors)
    assert result.ok and result.anchored == 3 and not result.unended
    csv_rows = (tmp_path / "protocols" / "acme" / "sessions.csv").read_text().splitlines()
    assert len(csv_rows) == 4  # header and one row per session
    # a repeated end adds no second line and no second billing row
    close_sessions(database, protocols, ended[:1])
    assert len((tmp_path / "protocols" / "acme" / "sessions.csv").read_text().splitlines()) == 4
    assert verify(tmp_path / "protocols", anchors).ok
