"""Session protocols: hash-chained JSON lines per session, the billing CSV, verify and show.

The chain is checked here independently of the module (SHA-256 of the previous line's bytes,
a genesis value for line 1), and every way of damaging a file an operator could think of -
an edited byte, a removed, moved or repeated line, a cut-off end - must make ``verify`` name the
damaged line.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import os
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import session_protocol as sp
from server.db.models import Session as SessionRow
from server.session_protocol import (
    ProtocolError, ProtocolWriter, SessionProtocols, SessionSummary, UnknownSession, verify,
)

from .fixtures_server import run_cli, write_config

UTC = dt.timezone.utc
JAN31 = dt.datetime(2025, 1, 31, 23, 59, 58, 250000, tzinfo=UTC)
ALICE = "hausmeister:supporter:alice"
SID = "0b6f3c4e-2a55-4d4c-9d0e-6f1d2b3c4a5e"


class Clock:
    def __init__(self, start: dt.datetime = JAN31) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def typical_session(protocols: SessionProtocols, clock: Clock, tenant: str = "acme",
                    session_id: str = SID) -> Path:
    """The events of an ad-hoc session with a file transfer, ended by the relay: 9 lines."""
    events = [
        ("created", ALICE, "192.0.2.10", {"kind": "adhoc", "nameplate": "12"}),
        ("joined", "customer@198.51.100.7", "198.51.100.7", {}),
        ("key confirmed", ALICE, "192.0.2.10", {"code": "4711-0815"}),
        ("terms accepted", "customer@198.51.100.7", "198.51.100.7", {"sha256": "ab" * 32}),
        ("right requested", ALICE, "192.0.2.10", {"right": "control"}),
        ("right granted", "customer@198.51.100.7", "198.51.100.7", {"right": "control"}),
        ("file completed", ALICE, "192.0.2.10",
         {"name": "Rechnung März.pdf", "size": 12345, "sha256": "cd" * 32, "direction": "to peer"}),
        ("comment", ALICE, "192.0.2.10", {"text": 'printer "HP" fixed\nline two'}),
    ]
    for kind, actor, address, detail in events:
        protocols.record(tenant, session_id, kind, actor, address, detail)
        clock.advance(1.5)
    protocols.ended(tenant, SessionSummary(session_id, "adhoc", JAN31, clock(), ALICE,
                                           "customer@198.51.100.7", 1000, 250000, "peer closed"),
                    by="relay")
    return protocols.protocol_dir / "acme" / "2025" / "01" / f"{session_id}.jsonl"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def protocols(tmp_path, clock) -> SessionProtocols:
    return SessionProtocols(tmp_path / "protocols", clock=clock)


# --- writing ----------------------------------------------------------------------------------

def test_appends_form_a_chain_anyone_can_recompute(protocols, clock):
    path = typical_session(protocols, clock)
    raw = lines_of(path)
    assert len(raw) == 9
    expected_prev = hashlib.sha256(b"hausmeister session protocol v1\n" + SID.encode()).hexdigest()
    for n, line in enumerate(raw, 1):
        record = json.loads(line)
        assert set(record) == {"seq", "time", "session", "kind", "actor", "address", "detail",
                               "prev", "hash"}
        assert record["seq"] == n and record["session"] == SID
        assert record["prev"] == expected_prev
        assert line == json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        without_hash = {k: v for k, v in record.items() if k != "hash"}
        assert record["hash"] == hashlib.sha256(
            json.dumps(without_hash, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        expected_prev = hashlib.sha256(line + b"\n").hexdigest()
    first, last = json.loads(raw[0]), json.loads(raw[-1])
    assert first["time"] == "2025-01-31T23:59:58.250Z"
    assert (first["actor"], first["address"], first["detail"]) == (
        ALICE, "192.0.2.10", {"kind": "adhoc", "nameplate": "12"})
    assert json.loads(raw[6])["detail"]["name"] == "Rechnung März.pdf"
    assert last["kind"] == "ended" and last["actor"] == "server"
    assert last["detail"] == {
        "by": "relay", "reason": "peer closed", "kind": "adhoc",
        "started": "2025-01-31T23:59:58.250Z", "ended": "2025-02-01T00:00:10.250Z",
        "duration_s": 12.0, "bytes_to_peer": 1000, "bytes_to_supporter": 250000,
        "supporter": ALICE, "customer_or_host": "customer@198.51.100.7"}
    result = sp.verify(path)
    assert result.ok and (result.files, result.events, result.unended) == (1, 9, [])
    assert result.summary() == "1 files, 9 events, chains intact"


def test_record_returns_what_was_written_and_refuses_server_fields(protocols):
    record = protocols.record("acme", SID, "created", ALICE, None, {"n": 1})
    assert json.loads(lines_of(protocols.protocol_dir / "acme/2025/01" / f"{SID}.jsonl")[0]) == record
    for event in ({"kind": "x", "actor": ALICE, "seq": 7}, {"kind": "x", "actor": ALICE, "prev": "0"},
                  {"kind": "", "actor": ALICE}, {"kind": "x", "actor": ""},
                  {"kind": "x", "actor": ALICE, "detail": [1]},
                  {"kind": "x", "actor": ALICE, "detail": {"v": float("nan")}},
                  {"kind": "x", "actor": ALICE, "detail": {"v": {1, 2}}},
                  {"kind": "x", "actor": ALICE, "address": 5},
                  {"kind": "ended", "actor": "server"},  # only finish() writes that one
                  {"kind": "x", "actor": ALICE, "detail": {"text": "x" * sp.MAX_LINE_BYTES}}):
        with pytest.raises(ProtocolError):
            protocols.writer.append("acme", SID, event)
    assert len(lines_of(protocols.protocol_dir / "acme/2025/01" / f"{SID}.jsonl")) == 1
    assert sp.verify(protocols.protocol_dir).ok


def test_every_line_is_fsynced_before_append_returns(protocols, monkeypatch):
    synced: list[tuple[int, int]] = []  # (inode, size at fsync)
    real_fsync = os.fsync

    def counting_fsync(fd):
        st_ = os.fstat(fd)
        if stat.S_ISREG(st_.st_mode):
            synced.append((st_.st_ino, st_.st_size))
        return real_fsync(fd)

    monkeypatch.setattr(sp.os, "fsync", counting_fsync)
    for n in range(1, 6):
        protocols.record("acme", SID, "comment", ALICE, None, {"n": n})
        path = protocols.protocol_dir / "acme/2025/01" / f"{SID}.jsonl"
        info = path.stat()
        assert len(synced) == n  # one fsync of the file per line, after the whole line was written
        assert synced[-1] == (info.st_ino, info.st_size)
        assert json.loads(lines_of(path)[-1])["detail"] == {"n": n}


def test_record_many_writes_a_chain_with_one_fsync_or_nothing(protocols, monkeypatch):
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        st_ = os.fstat(fd)
        if stat.S_ISREG(st_.st_mode):
            synced.append((st_.st_ino, st_.st_size))
        return real_fsync(fd)

    monkeypatch.setattr(sp.os, "fsync", counting_fsync)
    path = protocols.protocol_dir / "acme/2025/01" / f"{SID}.jsonl"
    written = protocols.record_many("acme", SID, [
        ("created", "server", "", {"kind": "adhoc", "nameplate": "1234"}),
        ("joined", "server", "", {"customer_address": "198.51.100.7"})])
    info = path.stat()
    assert synced == [(info.st_ino, info.st_size)]  # both lines, then one fsync of the file
    assert [json.loads(line) for line in lines_of(path)] == written
    assert [r["seq"] for r in written] == [1, 2]
    assert written[1]["prev"] == hashlib.sha256(lines_of(path)[0] + b"\n").hexdigest()
    protocols.record("acme", SID, "comment", ALICE, None, {"n": 3})  # the chain goes on
    # one bad event in a batch: nothing of the batch is written
    for bad in ({"text": "x" * sp.MAX_LINE_BYTES}, None):
        events = [("chat", ALICE, None, {"text": "fine"})]
        events.append(("chat", ALICE, None, bad) if bad else ("ended", "server", None, {}))
        with pytest.raises(ProtocolError):
            protocols.record_many("acme", SID, events)
    assert len(lines_of(path)) == 3 and protocols.record_many("acme", SID, []) == []
    result = sp.verify(path)
    assert result.ok and result.events == 3


def test_layout_per_tenant_and_month_with_restrictive_modes(protocols, clock):
    os.umask(0o022)
    protocols.record("acme", SID, "created", ALICE)
    clock.now = dt.datetime(2025, 3, 2, 8, 0, tzinfo=UTC)
    protocols.record("acme", "second-session", "created", ALICE)
    protocols.record("other", "third", "created", ALICE)
    base = protocols.protocol_dir
    files = sorted(str(p.relative_to(base)) for p in base.rglob("*.jsonl"))
    assert files == [f"acme/2025/01/{SID}.jsonl", "acme/2025/03/second-session.jsonl",
                     "other/2025/03/third.jsonl"]
    for path in base.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path
    assert stat.S_IMODE(base.stat().st_mode) == 0o750
    assert protocols.file_of("acme", SID) == f"acme/2025/01/{SID}.jsonl"
    assert protocols.file_of("acme", "never-seen") is None


def test_a_session_keeps_its_file_across_a_month_change_and_a_restart(tmp_path, clock):
    first = SessionProtocols(tmp_path / "p", clock=clock)
    first.record("acme", SID, "created", ALICE)
    clock.advance(3)  # now 1 February
    first.record("acme", SID, "joined", "customer@198.51.100.7", "198.51.100.7")
    clock.now = dt.datetime(2025, 4, 10, tzinfo=UTC)  # a restart months later: nothing in memory
    restarted = SessionProtocols(tmp_path / "p", clock=clock)
    restarted.record("acme", SID, "comment", ALICE, None, {"text": "late"})
    restarted.record("acme", "fresh", "created", ALICE)
    files = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*.jsonl"))
    assert files == [f"acme/2025/01/{SID}.jsonl", "acme/2025/04/fresh.jsonl"]
    records = [json.loads(line) for line in lines_of(tmp_path / "p/acme/2025/01" / f"{SID}.jsonl")]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert [r["time"][:10] for r in records] == ["2025-01-31", "2025-02-01", "2025-04-10"]
    assert sp.verify(tmp_path / "p").ok


def test_the_same_session_id_in_two_tenants_gets_two_files(protocols):
    protocols.record("acme", SID, "created", ALICE)
    protocols.record("globex", SID, "created", "hausmeister:supporter:bob")
    assert len(sp.find_session(protocols.protocol_dir, SID)) == 2
    assert sp.verify(protocols.protocol_dir).events == 2


@pytest.mark.parametrize("tenant", ["../../etc", "/etc/passwd", ".", "..", ".hidden", "a/b",
                                    "a%2Fb", "a\\b", "Müller & Söhne GmbH", "x" * 300, "nul\x00"])
def test_tenant_names_become_one_safe_folder(protocols, tenant):
    protocols.record(tenant, SID, "created", ALICE)
    base = protocols.protocol_dir.resolve()
    [path] = [p.resolve() for p in base.rglob("*.jsonl")]
    folder = path.parents[2]
    assert folder.parent == base and folder.name not in (".", "..")
    assert not folder.name.startswith(".") and "/" not in folder.name
    assert len(folder.name.encode()) <= 255
    if len(tenant) < 60:
        assert sp.tenant_name(folder.name) == tenant


def test_distinct_tenant_names_get_distinct_folders():
    names = ["a/b", "a%2Fb", "a_b", "a b", "a+b", "..", "%2E%2E", "A", "a", "x" * 300, "x" * 301]
    assert len({sp.tenant_folder(n) for n in names}) == len(names)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "/abs", ".hidden", "x*", "a" * 101, "a\nb"])
def test_bad_session_ids_and_tenants_are_refused(protocols, bad):
    with pytest.raises(ProtocolError):
        protocols.record("acme", bad, "created", ALICE)
    with pytest.raises(ProtocolError):
        protocols.show(bad)
    assert not list(protocols.protocol_dir.rglob("*.jsonl"))
    with pytest.raises(ProtocolError):
        protocols.record("", SID, "created", ALICE)


def test_concurrent_appends_from_threads_and_two_writers_stay_one_chain(tmp_path):
    # two writer objects stand for two processes (flock), eight threads for the blocking pool
    writers = [SessionProtocols(tmp_path / "p"), SessionProtocols(tmp_path / "p")]
    start = threading.Barrier(8)
    errors = []

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(25):
                writers[t % 2].record("acme", SID, "comment", f"thread-{t}", None, {"i": i})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    [path] = list((tmp_path / "p").rglob("*.jsonl"))
    records = [json.loads(line) for line in lines_of(path)]
    assert [r["seq"] for r in records] == list(range(1, 201))
    for t in range(8):  # each thread's events, all there, in its order
        assert [r["detail"]["i"] for r in records if r["actor"] == f"thread-{t}"] == list(range(25))
    result = sp.verify(path)
    assert result.ok and result.events == 200


@pytest_twisted.ensureDeferred
async def test_async_variants_run_in_the_blocking_pool(tmp_path):
    protocols = SessionProtocols(tmp_path / "p")
    caller = threading.get_ident()
    seen = []
    real_append = protocols.writer.append

    def append(*args):
        seen.append(threading.get_ident())
        return real_append(*args)

    protocols.writer.append = append
    record = await protocols.record_async("acme", SID, "created", ALICE, "192.0.2.10", {"a": 1})
    assert record["seq"] == 1 and seen and seen[0] != caller
    ended = await protocols.ended_async("acme", SessionSummary(
        SID, "host", None, dt.datetime.now(UTC), ALICE, "hausmeister:host:pc1"))
    assert ended["seq"] == 2 and ended["kind"] == "ended"
    with pytest.raises(ProtocolError):
        await protocols.record_async("acme", "../x", "created", ALICE)


# --- ending and billing -----------------------------------------------------------------------

def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_sessions_csv_has_one_header_and_one_row_per_ended_session(protocols, clock):
    typical_session(protocols, clock)
    row = SessionRow(id="host-session-1", kind="host", supporter_identity=ALICE,
                     peer_identity="hausmeister:host:3f0c", peer_address="203.0.113.5",
                     created_at=JAN31, started_at=JAN31 + dt.timedelta(seconds=2),
                     ended_at=JAN31 + dt.timedelta(seconds=62.5), bytes_to_peer=10,
                     bytes_to_supporter=20, end_reason="=HYPERLINK(\"http://x\")")
    protocols.record("acme", row.id, "created", ALICE)
    first = protocols.ended("acme", row, by=ALICE)
    again = protocols.ended("acme", row, by=ALICE)  # the relay and the broker both report the end
    assert again == first
    adhoc = SessionRow(id="adhoc-2", kind="adhoc", supporter_identity=ALICE, peer_identity=None,
                       peer_address="198.51.100.9", created_at=JAN31, started_at=None,
                       ended_at=JAN31 + dt.timedelta(seconds=5), bytes_to_peer=0,
                       bytes_to_supporter=0, end_reason="pair timeout")
    protocols.ended("acme", adhoc)  # no event before: the end is the protocol's first line
    rows = read_csv(protocols.protocol_dir / "acme" / "sessions.csv")
    assert rows[0] == ["session_id", "kind", "start", "end", "duration_s", "supporter",
                       "customer_or_host", "bytes_to_peer", "bytes_to_supporter", "end_reason"]
    assert [r[0] for r in rows] == ["session_id", SID, "host-session-1", "adhoc-2"]
    assert rows[1] == [SID, "adhoc", "2025-01-31T23:59:58.250Z", "2025-02-01T00:00:10.250Z",
                       "12.000", ALICE, "customer@198.51.100.7", "1000", "250000", "peer closed"]
    assert rows[2][1:7] == ["host", "2025-02-01T00:00:00.250Z", "2025-02-01T00:01:00.750Z",
                            "60.500", ALICE, "hausmeister:host:3f0c"]
    assert rows[2][9] == "'=HYPERLINK(\"http://x\")"  # text, never a spreadsheet formula
    assert rows[3][2] == "2025-01-31T23:59:58.250Z" and rows[3][6] == "customer@198.51.100.9"
    host_lines = [json.loads(x) for x in lines_of(Path(protocols.protocol_dir,
                                                       protocols.file_of("acme", "host-session-1")))]
    assert [r["kind"] for r in host_lines] == ["created", "ended"]
    assert host_lines[1]["detail"]["by"] == ALICE
    assert stat.S_IMODE((protocols.protocol_dir / "acme" / "sessions.csv").stat().st_mode) == 0o640
    result = sp.verify(protocols.protocol_dir)
    assert result.ok and result.files == 3 and result.unended == []


def test_a_repeated_end_restores_a_csv_row_lost_in_a_crash(protocols, clock):
    summary = SessionSummary(SID, "adhoc", JAN31, JAN31 + dt.timedelta(seconds=9), ALICE,
                             "customer@198.51.100.7", 1, 2, "emergency stop")
    protocols.ended("acme", summary, by=ALICE)
    csv_path = protocols.protocol_dir / "acme" / "sessions.csv"
    csv_path.unlink()  # as if the server died between the ended line and the CSV row
    protocols.ended("acme", summary, by=ALICE)
    protocols.ended("acme", summary, by=ALICE)
    assert [r[0] for r in read_csv(csv_path)] == ["session_id", SID]
    assert len(lines_of(Path(protocols.protocol_dir, protocols.file_of("acme", SID)))) == 1


# --- verify: damage of every kind names its line -------------------------------------------

def _sample_protocol() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        clock = Clock()
        path = typical_session(SessionProtocols(Path(folder), clock=clock), clock)
        return path.read_bytes()


SAMPLE = _sample_protocol()
SAMPLE_LINES = SAMPLE.split(b"\n")[:-1]


def verify_bytes(data: bytes) -> sp.VerifyResult:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{SID}.jsonl"
        path.write_bytes(data)
        return sp.verify(path)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, len(SAMPLE) - 1), new=st.integers(0, 255))
def test_changing_any_byte_names_exactly_that_line(position, new):
    if SAMPLE[position] == new:
        new = (new + 1) % 256
    edited = SAMPLE[:position] + bytes([new]) + SAMPLE[position + 1:]
    result = verify_bytes(edited)
    assert not result.ok
    assert result.first.line == SAMPLE[:position].count(b"\n") + 1, str(result.first)


def test_an_edited_value_is_reported_on_its_line_in_plain_words(tmp_path):
    path = tmp_path / f"{SID}.jsonl"
    path.write_bytes(SAMPLE.replace(b'"size":12345', b'"size":12346'))
    result = sp.verify(path)
    assert str(result.first) == (f"{path}: line 7: content does not match its hash "
                                 "(the line was edited after it was written)")


def test_an_edit_that_keeps_the_meaning_is_still_reported_on_its_line():
    assert b"M\\u00e4rz" in SAMPLE_LINES[6]  # same text, other spelling: only the form changed
    for old, new in ((b"M\\u00e4rz", b"M\\u00E4rz"), (b"M\\u00e4rz", "M\u00e4rz".encode()),
                     (b'"size":12345', b'"size": 12345'), (b'"size":12345', b'"size":1.2345e4')):
        result = verify_bytes(SAMPLE.replace(old, new))
        assert result.first.line == 7 and "canonical form" in result.first.message, result.first
    # 12345 -> 12345.0 is canonical JSON, but another value (a float) than the one hashed
    assert verify_bytes(SAMPLE.replace(b'"size":12345', b'"size":12345.0')).first.line == 7


def test_a_rewritten_self_consistent_line_breaks_the_next_lines_prev(tmp_path):
    forged = json.loads(SAMPLE_LINES[5])
    forged["detail"]["right"] = "files"
    forged["hash"] = sp.line_hash(forged)  # a careful forger fixes the line's own hash
    lines = list(SAMPLE_LINES)
    lines[5] = sp.canonical(forged)
    path = tmp_path / f"{SID}.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = sp.verify(path)
    assert str(result.first) == (f"{path}: line 7: prev does not match the hash of line 6 "
                                 "(the file was edited after it was written)")


@pytest.mark.parametrize("removed", range(len(SAMPLE_LINES) - 1))
def test_removing_a_line_is_reported_where_it_was(removed):
    lines = SAMPLE_LINES[:removed] + SAMPLE_LINES[removed + 1:]
    result = verify_bytes(b"\n".join(lines) + b"\n")
    assert result.first.line == removed + 1
    assert "removed" in result.first.message or "start of a chain" in result.first.message


def test_removing_the_last_lines_leaves_the_session_without_its_end():
    result = verify_bytes(b"\n".join(SAMPLE_LINES[:-2]) + b"\n")
    assert result.ok and result.events == 7 and len(result.unended) == 1


@pytest.mark.parametrize("i,j", [(0, 1), (2, 5), (7, 8), (0, 8)])
def test_reordered_lines_are_reported(i, j):
    lines = list(SAMPLE_LINES)
    lines[i], lines[j] = lines[j], lines[i]
    assert verify_bytes(b"\n".join(lines) + b"\n").first.line == i + 1


def test_a_repeated_or_foreign_line_is_reported():
    lines = list(SAMPLE_LINES)
    assert verify_bytes(b"\n".join(lines[:4] + [lines[3]] + lines[4:]) + b"\n").first.line == 5
    foreign = json.loads(lines[2])  # a line of another session's file, hash fixed up
    foreign["session"] = "another-session"
    foreign["hash"] = sp.line_hash(foreign)
    lines[2] = sp.canonical(foreign)
    result = verify_bytes(b"\n".join(lines) + b"\n")
    assert result.first.line == 3 and "another file" in result.first.message


@pytest.mark.parametrize("cut", [1, 2, 30, len(SAMPLE_LINES[-1])])
def test_a_truncated_last_line_is_reported(cut):
    result = verify_bytes(SAMPLE[:-cut - 1] if cut < len(SAMPLE_LINES[-1]) else SAMPLE[:-1])
    assert result.first.line == 9 and "incomplete" in result.first.message


def test_an_empty_file_and_an_empty_line_are_reported(tmp_path):
    assert verify_bytes(b"").first.line == 1
    lines = list(SAMPLE_LINES)
    assert verify_bytes(b"\n".join(lines[:3] + [b""] + lines[3:]) + b"\n").first.line == 4
    assert not sp.verify(tmp_path / "missing").ok


def test_verify_of_a_folder_counts_files_and_lists_every_bad_one(protocols, clock):
    typical_session(protocols, clock)
    for n in range(3):
        protocols.record("acme", f"s{n}", "created", ALICE)
    assert sp.verify(protocols.protocol_dir).summary() == "4 files, 12 events, chains intact"
    bad = [Path(protocols.protocol_dir, protocols.file_of("acme", f"s{n}")) for n in (0, 2)]
    for path in bad:
        path.write_bytes(path.read_bytes().replace(b"created", b"crEated"))
    result = sp.verify(protocols.protocol_dir)
    assert [p.file for p in result.problems] == bad
    assert result.summary().endswith("(and 1 more bad file)")


def test_a_writer_continues_after_a_cut_off_line_and_verify_names_only_that(protocols):
    for n in range(3):
        protocols.record("acme", SID, "comment", ALICE, None, {"n": n})
    path = Path(protocols.protocol_dir, protocols.file_of("acme", SID))
    path.write_bytes(path.read_bytes()[:-20])  # the last write was cut off by a crash
    fresh = SessionProtocols(protocols.protocol_dir, clock=protocols.writer.clock)
    record = fresh.record("acme", SID, "comment", ALICE, None, {"n": 3})
    assert record["seq"] == 4
    result = sp.verify(path)
    assert result.first.line == 3 and "not valid JSON" in result.first.message
    # everything after the damage still chains: check from line 4 on by hand
    raw = lines_of(path)
    assert json.loads(raw[3])["prev"] == hashlib.sha256(raw[2] + b"\n").hexdigest()


# --- show -------------------------------------------------------------------------------------

def test_show_prints_a_readable_timeline(protocols, clock):
    typical_session(protocols, clock)
    text = protocols.show(SID)
    lines = text.splitlines()
    assert lines[0].startswith(f"Session {SID}  tenant acme")
    assert "2025-01-31 23:59:58.250" in lines[2] and ALICE in lines[2] and "created" in lines[2]
    assert "(192.0.2.10)" in lines[2] and "nameplate=12" in lines[2]
    assert 'name="Rechnung März.pdf"' in text and "size=12345" in text
    assert "customer@198.51.100.7" in text and "right granted" in text
    assert 'by=relay reason="peer closed"' in text
    assert lines[-1] == "9 events, chain intact"
    with pytest.raises(UnknownSession):
        protocols.show("no-such-session")


def test_show_does_not_pass_terminal_control_characters_through(protocols):
    protocols.record("acme\x1b]0;owned\x07", SID, "right\x1b[2J requested", ALICE,
                     None, {"right": "control\x9b31m", "note\x1b": "a\u2028b"})
    text = protocols.show(SID)
    assert not any(c in text for c in "\x1b\x07\x9b\u2028"), text
    assert "right\\x1b[2J requested" in text and "control\\x9b31m" in text


def test_show_marks_a_broken_chain(protocols, clock):
    path = typical_session(protocols, clock)
    path.write_bytes(path.read_bytes().replace(b"4711-0815", b"4711-0816"))
    last = protocols.show(SID).splitlines()[-1]
    assert last.startswith("CHAIN BROKEN at line 3: content does not match its hash")


def test_the_end_recorded_in_the_database_catches_a_cut_or_rewritten_tail(protocols, clock):
    """A chain cut after any line, or rebuilt from some line on, still verifies by itself; the
    ``ended`` line the database recorded (seq and hash) does not match it."""
    path = typical_session(protocols, clock)
    ended = json.loads(path.read_bytes().splitlines()[-1])
    anchor = {SID: (ended["seq"], ended["hash"])}
    result = verify(path, anchor)
    assert result.ok and result.anchored == 1
    assert result.summary() == "1 files, 9 events, chains intact, 1 ends match the database"

    original = path.read_bytes()
    path.write_bytes(b"".join(original.splitlines(keepends=True)[:6]))  # the last 3 lines cut
    assert verify(path).ok  # the chain alone cannot tell
    problem = verify(path, anchor).first
    assert problem.line == 0 and "ends after line 6" in problem.message
    assert "database recorded line 9" in problem.message

    # Rewritten from line 7 on with a valid chain (the writer itself continues the cut file): the
    # new line 9 is another "ended" line than the one the database recorded.
    for text in ("nothing happened here", "really nothing"):
        protocols.record("acme", SID, "comment", ALICE, "192.0.2.10", {"text": text})
    protocols.ended("acme", SessionSummary(SID, "adhoc", JAN31, clock(), ALICE,
                                           "customer@198.51.100.7", 1, 2, "forged end"), by="relay")
    assert verify(path).ok and len(path.read_bytes().splitlines()) == 9
    problem = verify(path, anchor).first
    assert problem.line == 9 and "rewritten" in problem.message


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_protocol_verify_and_show(tmp_path, clock):
    data = tmp_path / "data"
    config = write_config(tmp_path / "h.toml", data, f"sqlite:///{tmp_path / 'db.sqlite3'}")
    protocols = SessionProtocols(data / "protocols", clock=clock)
    path = typical_session(protocols, clock)
    protocols.record("globex", "running-session", "created", ALICE)

    def cli(*calls):  # the processes of one step run side by side: each spends ~1 s importing
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda args: run_cli("server", "-c", str(config), "protocol",
                                                      *args), calls))

    (tmp_path / "empty").mkdir()
    refusals = {("show", "no-such-session"): "no protocol for session no-such-session",
                ("verify", str(tmp_path / "empty")): "no protocol files (*.jsonl)"}
    ok, shown, *refused = cli(("verify", str(data / "protocols")), ("show", SID), *refusals)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        "2 files, 10 events, chains intact",
        "1 session(s) without the server's 'ended' line (still running, or the end of the file "
        "is missing): running-session"]
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == protocols.show(SID) and "right granted" in shown.stdout
    for result, words in zip(refused, refusals.values()):
        assert result.returncode == 1 and result.stdout == ""
        [line] = result.stderr.splitlines()
        assert line.startswith(f"hausmeister-server: error: {words}"), line

    path.write_bytes(path.read_bytes().replace(b'"right":"control"', b'"right":"files!!"', 1))
    for bad in cli(("verify", str(path)), ("verify", str(data / "protocols"))):
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.splitlines() == [
            f"hausmeister-server: error: {path}: line 5: content does not match its hash "
            "(the line was edited after it was written)"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_protocol_verify_checks_each_end_against_the_database(server_config, db_url, clock):
    """On a set-up server `protocol verify` also compares each file's end with the ``ended`` line
    the database recorded; `--no-db` checks a copy by its chains alone."""
    from server.db import Database
    from server.db.models import Session as SessionRow

    srv = server_config
    protocols = SessionProtocols(srv.data_dir / "protocols", clock=clock)
    path = typical_session(protocols, clock)
    ended = json.loads(path.read_bytes().splitlines()[-1])
    db = Database(db_url)
    try:
        with db.session() as s:
            s.add(SessionRow(id=SID, kind="adhoc", created_at=dt.datetime.now(dt.timezone.utc),
                             protocol_end_seq=ended["seq"], protocol_end_hash=ended["hash"]))
    finally:
        db.dispose()

    ok = srv.cli("protocol", "verify", str(srv.data_dir / "protocols"))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "1 files, 9 events, chains intact, 1 ends match the database"

    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:6]))
    cut = srv.cli("protocol", "verify", str(path))
    assert cut.returncode == 1 and cut.stdout == ""
    [line] = cut.stderr.splitlines()
    assert line == (f"hausmeister-server: error: {path}: ends after line 6, but the database "
                    "recorded line 9 as the session's end: lines were removed from the end of "
                    "the file")
    copy = srv.cli("protocol", "verify", "--no-db", str(path))
    assert copy.returncode == 0 and "without the server's 'ended' line" in copy.stdout
