"""The server's recording receiver (issue 12) with the real broker, database, protocol writer and
recordings folder: idempotent chunks, gaps, damaged uploads, resuming after a server restart,
the hash in the protocol, and the 'required' watchdog."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

import pytest
import pytest_twisted
from twisted.internet import defer

from protocol import control, recording
from server.config import from_mapping
from server.db.models import Recording, Tenant
from server.recordings import keys
from server.recordings.receiver import RecordingReceiver
from server.recordings.storage import FolderStorage

from .test_broker import InlineDB, broker, clock, host, result_of, supporter, world  # noqa: F401


def inline(fn, *args, **kwargs):
    return defer.maybeDeferred(fn, *args, **kwargs)


@pytest.fixture
def setup(broker, database, clock, world, tmp_path):  # noqa: F811
    config = from_mapping({"server": {"data_dir": str(tmp_path / "data")},
                           "recording": {"stall_seconds": 5.0}}, tmp_path)
    keys.ensure(config.server.cert_dir)
    storage = FolderStorage(config.server.recording_dir)

    def make_receiver(config=config):
        return RecordingReceiver(InlineDB(database), config, storage, broker, clock,
                                 blocking=inline, resume_secret=b"s" * 32)
    conn = host(world["pc-lab"])
    result_of(broker.host_online(conn, "1"))
    ticket = result_of(broker.connect_host(supporter("otto"), world["pc-lab"]))
    return {"config": config, "storage": storage, "make": make_receiver, "host": conn,
            "sid": ticket["session_id"], "db": database}


def set_policy(database, policy: str) -> None:
    with database.session() as s:
        s.query(Tenant).filter_by(name="acme").one().recording_policy = policy


def writer_for(answer: dict) -> recording.Writer:
    public = [recording.load_public(p) for p in json.loads(answer["public_keys"])]
    return recording.Writer({"session_id": "x", "recorder": "host"}, public)


def test_policy_off_records_nothing(setup):
    receiver = setup["make"]()
    answer = result_of(receiver.start_recording(setup["host"], setup["sid"]))
    assert answer["policy"] == "off" and answer["recording_id"] == ""


def test_chunks_are_idempotent_gaps_are_not_written_damage_is_refused(setup):
    set_policy(setup["db"], "on")
    receiver = setup["make"]()
    conn = setup["host"]
    answer = result_of(receiver.start_recording(conn, setup["sid"]))
    assert answer["policy"] == "on" and answer["next_offset"] == 0
    rid = answer["recording_id"]
    w = writer_for(answer)
    w.add(recording.RFB_OUT, 1, b"x" * 5000)
    data = w.start() + w.flush()
    assert result_of(receiver.chunk(conn, rid, 0, data))["next_offset"] == len(data)
    # the same chunk again (a resend after a lost answer): nothing changes
    assert result_of(receiver.chunk(conn, rid, 0, data))["next_offset"] == len(data)
    # a chunk beyond what is stored: not written, the answer says where to resume
    assert result_of(receiver.chunk(conn, rid, len(data) + 100, b"zz"))["next_offset"] == len(data)
    upload = receiver.uploads[rid]
    assert setup["storage"].size(upload.location) == len(data)
    # a stranger may not write into it
    with pytest.raises(control.Forbidden):
        receiver.chunk(supporter("anna"), rid, len(data), b"zz")
    # bytes that are not records are refused and the recording is given up
    with pytest.raises(control.RecordingRefused, match="damaged"):
        result_of(receiver.chunk(conn, rid, len(data), b"\xff" * 64))


def test_upload_resumes_after_a_server_restart_and_its_hash_goes_into_the_protocol(setup, tmp_path):
    set_policy(setup["db"], "on")
    conn, sid = setup["host"], setup["sid"]
    first = setup["make"]()
    answer = result_of(first.start_recording(conn, sid))
    rid = answer["recording_id"]
    w = writer_for(answer)
    w.add(recording.EVENT, 1, b'{"kind":"a"}')
    head = w.start() + w.flush()
    w.add(recording.RFB_OUT, 2, b"screen" * 1000)
    second_record = w.flush()
    # half of the second record arrives, then the server stops
    cut = len(second_record) // 2
    result_of(first.chunk(conn, rid, 0, head + second_record[:cut]))
    first.stop()
    restarted = setup["make"]()
    # the recorder comes back on a new connection with its token: a wrong one is refused
    with pytest.raises(control.Forbidden):
        result_of(restarted.resume(conn, rid, "0" * 64))
    again = result_of(restarted.resume(conn, rid, answer["resume_token"]))
    assert again["next_offset"] == len(head) + cut  # the stored prefix stays: send on from there
    rest = second_record + w.close()
    offset = len(head)  # the module resends what it holds; what the server has is skipped
    while offset < len(head) + len(rest):  # chunked as a module does, at most 48 KiB
        piece = rest[offset - len(head):offset - len(head) + control.MAX_RECORDING_CHUNK]
        offset = result_of(restarted.chunk(conn, rid, offset, piece))["next_offset"]
    done = result_of(restarted.end(conn, rid, offset))
    stored = setup["storage"].local_path(restarted_location(setup["db"], rid))
    assert done["complete"] and done["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    key = keys.operator_private(setup["config"].server.cert_dir)
    entries = []
    recording.scan(recording.file_chunks(stored), unwrap=lambda h: recording.unwrap_key(h, key),
                   on_entry=entries.append)
    assert [e.payload for e in entries] == [b'{"kind":"a"}', b"screen" * 1000]
    lines = [json.loads(x) for f in (tmp_path / "protocols").rglob("*.jsonl")
             for x in f.read_text().splitlines()]
    anchored = [x["detail"] for x in lines if x["kind"] == "recording"]
    assert anchored == [{**anchored[0], "sha256": done["sha256"], "status": "complete"}]


def test_a_lost_connection_keeps_the_upload_open_for_its_recorder(setup, clock, world):  # noqa: F811
    """The session ends while the recorder's connection is gone: the upload is not finalised;
    the recorder resumes on a new connection and closes it complete (its hash after the end)."""
    set_policy(setup["db"], "on")
    receiver = setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(receiver.start_recording(conn, sid))
    rid = answer["recording_id"]
    w = writer_for(answer)
    w.add(recording.EVENT, 1, b'{"kind":"a"}')
    head = w.start() + w.flush()
    result_of(receiver.chunk(conn, rid, 0, head))
    receiver.owner_lost(conn)
    result_of(receiver.session_ended(sid))
    assert receiver.uploads[rid].ended is False           # waits for its recorder
    clock.advance(setup["config"].recording.resume_seconds - 1)
    receiver.check()
    assert rid in receiver.uploads
    back = host(world["pc-lab"])   # the module's new control connection
    assert result_of(receiver.resume(back, rid, answer["resume_token"]))["next_offset"] == len(head)
    with pytest.raises(control.Forbidden):     # the old connection is no longer its owner
        receiver.chunk(conn, rid, 0, b"")
    tail = w.close()
    result_of(receiver.chunk(back, rid, len(head), tail))
    assert result_of(receiver.end(back, rid, len(head) + len(tail)))["complete"]


def test_a_recorder_back_at_another_node_is_not_closed_by_the_first(setup, clock, world):  # noqa: F811
    """Several nodes: the recorder's connection to node A is lost and it resumes at node B; A,
    which still holds the upload, lets it go instead of closing it as incomplete."""
    set_policy(setup["db"], "on")
    node_a, node_b = setup["make"](), setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(node_a.start_recording(conn, sid))
    rid = answer["recording_id"]
    w = writer_for(answer)
    head = w.start() + w.flush()
    result_of(node_a.chunk(conn, rid, 0, head))
    node_a.owner_lost(conn)
    at_b = host(world["pc-lab"])
    assert result_of(node_b.resume(at_b, rid, answer["resume_token"]))["next_offset"] == len(head)
    w.add(recording.EVENT, 1, b'{"kind":"b"}')
    more = w.flush()
    result_of(node_b.chunk(at_b, rid, len(head), more))
    clock.advance(setup["config"].recording.resume_seconds + 1)
    node_a.check()
    assert rid not in node_a.uploads
    tail = w.close()
    result_of(node_b.chunk(at_b, rid, len(head) + len(more), tail))
    assert result_of(node_b.end(at_b, rid, len(head) + len(more) + len(tail)))["complete"]


def test_quota_is_enforced_during_the_upload(setup, tmp_path, clock):  # noqa: F811
    """'on': the recording stops at the quota, the session goes on; 'required': the session ends
    with the reason, both parties told."""
    from server.config import from_mapping
    for policy in ("on", "required"):
        set_policy(setup["db"], policy)
        config = from_mapping({"server": {"data_dir": str(tmp_path / "data")},
                               "recording": {"stall_seconds": 5.0, "quota_mib": 0.01}}, tmp_path)
        receiver = setup["make"](config)
        conn, sid = setup["host"], setup["sid"]
        if policy == "required":  # a fresh session: the first one's recording is closed
            receiver.check()
        answer = result_of(receiver.start_recording(conn, sid))
        assert answer["policy"] == policy, answer
        rid = answer["recording_id"]
        w = writer_for(answer)
        w.add(recording.RFB_OUT, 1, b"x" * 4000)
        first = w.start() + w.flush()
        assert result_of(receiver.chunk(conn, rid, 0, first))["next_offset"] == len(first)
        w.add(recording.RFB_OUT, 2, b"y" * 20000)             # beyond 0.01 MiB
        with pytest.raises(control.RecordingRefused, match="quota"):
            result_of(receiver.chunk(conn, rid, len(first), w.flush()))
        ended = [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]
        if policy == "on":
            assert not ended
            closing = receiver.session_ended(sid)
            clock.advance(4)
            result_of(closing)
            with setup["db"].session() as s:
                row = s.get(Recording, rid)
                assert row.status == "incomplete" and row.size == len(first)
                s.delete(row)   # the next round starts from no usage
        else:
            assert ended and ended[0]["cause"] == "recording_failed"
            assert "quota" in ended[0]["detail"]


def test_required_session_whose_upload_stalls_ends_with_the_reason(setup, clock):  # noqa: F811
    set_policy(setup["db"], "required")
    receiver = setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    receiver.check()
    answer = result_of(receiver.start_recording(conn, sid))
    w = writer_for(answer)
    result_of(receiver.chunk(conn, answer["recording_id"], 0, w.start() + w.flush()))
    clock.advance(4)
    receiver.check()
    assert not [kw for cmd, kw in conn.calls if cmd is control.SessionEnded]
    clock.advance(2)            # 6 s without a chunk, stall_seconds is 5
    receiver.check()
    ended = [kw for cmd, kw in conn.calls if cmd is control.SessionEnded]
    assert ended and ended[0]["cause"] == "recording_failed"
    assert "upload stalled" in ended[0]["detail"]


def restarted_location(database, rid: str) -> str:
    with database.session() as s:
        return s.get(Recording, rid).location


def test_required_session_without_a_recording_ends_with_the_reason(setup, clock):  # noqa: F811
    set_policy(setup["db"], "required")
    receiver = setup["make"]()
    receiver.check()              # learns the session's policy
    clock.advance(6)
    receiver.check()
    ended = [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]
    assert ended and ended[0]["cause"] == "recording_failed"
    assert "no recording started" in ended[0]["detail"]


def test_required_with_unusable_storage_refuses_and_ends_the_session(setup):
    set_policy(setup["db"], "required")
    folder = setup["config"].server.recording_dir
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    receiver = setup["make"]()
    with pytest.raises(control.RecordingRefused, match="cannot store recordings"):
        result_of(receiver.start_recording(setup["host"], setup["sid"]))
    ended = [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]
    assert ended and ended[0]["cause"] == "recording_failed"


def test_policy_on_with_unusable_storage_goes_on_unrecorded(setup):
    set_policy(setup["db"], "on")
    folder = setup["config"].server.recording_dir
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.write_text("not a folder")
    receiver = setup["make"]()
    answer = result_of(receiver.start_recording(setup["host"], setup["sid"]))
    assert answer["policy"] == "off" and answer["recording_id"] == ""
    assert not [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]


def test_retention_deletes_old_sessions_with_their_recordings(setup, tmp_path):
    """The retention sweep takes a session's recordings (rows and files) with the session."""
    import datetime as dt

    from server import retention
    from server.db.models import Session
    set_policy(setup["db"], "on")
    receiver = setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(receiver.start_recording(conn, sid))
    w = writer_for(answer)
    data = w.start() + w.close()
    result_of(receiver.chunk(conn, answer["recording_id"], 0, data))
    result_of(receiver.end(conn, answer["recording_id"], len(data)))
    stored = setup["storage"].local_path(restarted_location(setup["db"], answer["recording_id"]))
    assert stored.is_file()
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    with setup["db"].session() as s:
        row = s.get(Session, sid)
        row.created_at = row.started_at = old
        row.ended_at = old + dt.timedelta(minutes=5)
    storage = setup["storage"]
    with setup["db"].session() as s:
        report = retention.sweep(s, tmp_path / "protocols", 30,
                                 recordings=lambda kind, location: storage.delete(location))
    assert report.sessions == 1 and report.recordings == 1
    assert not stored.exists()
    with setup["db"].session() as s:
        assert s.get(Recording, answer["recording_id"]) is None


def test_a_recorder_gone_silent_is_closed_as_incomplete_and_not_reopened(setup, clock):  # noqa: F811
    set_policy(setup["db"], "on")
    receiver = setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(receiver.start_recording(conn, sid))
    w = writer_for(answer)
    data = w.start() + w.flush()
    result_of(receiver.chunk(conn, answer["recording_id"], 0, data))
    clock.advance(61)
    receiver.check()
    with setup["db"].session() as s:
        row = s.get(Recording, answer["recording_id"])
        assert row.status == "incomplete" and row.sha256
    again = result_of(receiver.start_recording(conn, sid))
    assert again["policy"] == "off"   # 'on': the session goes on; the closed file stays as it is


def test_the_sessions_node_takes_only_recording_lines_of_its_own_sessions_from_other_nodes(
        setup, clock, broker, world, tmp_path):  # noqa: F811
    """Several nodes (``server.recordings.nodes``), the session's node's side of the node bus:
    another node may have it write only ``recording_started`` (live sessions) and ``recording``
    (also after the end, only sessions it set up); it watches such an upload by ``rec_alive`` and
    ends the session when it stalls, or when the storing node says the recording failed."""
    set_policy(setup["db"], "required")
    receiver = setup["make"]()
    receiver.node = "node-a"
    sid = setup["sid"]          # set up before this broker had a node name: not node-a's
    receiver.check()            # learns the session's policy

    def line(kind: str, session_id: str = sid, rid: str = "r1"):
        return result_of(receiver._remote_line("node-b", {
            "session_id": session_id, "tenant": "acme", "kind": kind,
            "detail": {"recording_id": rid, "party": "host", "sha256": "0" * 64}}))
    with pytest.raises(control.Forbidden, match="may not write 'ended'"):
        line("ended")
    assert line("recording_started") == {}
    assert "recording_started" in broker.protocols.show(sid)
    clock.advance(4)
    receiver._remote_alive("node-b", {"session_id": sid, "recording_id": "r1"})
    clock.advance(4)
    receiver.check()            # 4 s since the upload last moved, stall_seconds is 5
    assert not [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]
    clock.advance(2)
    receiver.check()
    [ended] = [kw for cmd, kw in setup["host"].calls if cmd is control.SessionEnded]
    assert ended["cause"] == "recording_failed" and "upload stalled" in ended["detail"]
    broker.session_ended(sid)   # the relay closed it
    with pytest.raises(control.Forbidden, match="did not set that session up"):
        line("recording")
    with pytest.raises(control.Forbidden, match="not live"):
        line("recording_started")

    broker.node = "node-a"      # a session node-a sets up: its final line comes after its end
    conn = host(world["pc-lab"])
    result_of(broker.host_online(conn, "1"))
    other = result_of(broker.connect_host(supporter("otto"), world["pc-lab"]))["session_id"]
    receiver.check()
    line("recording_started", other, "r2")
    assert result_of(receiver._remote_failed(
        "node-b", {"session_id": other, "why": "the tenant's quota is used up"})) == {}
    [ended] = [kw for cmd, kw in conn.calls if cmd is control.SessionEnded]
    assert ended["cause"] == "recording_failed" and "quota" in ended["detail"]
    broker.session_ended(other)
    assert line("recording", other, "r2") == {}
    [path] = (tmp_path / "protocols").rglob(f"{other}.jsonl")
    kinds = [json.loads(x)["kind"] for x in path.read_text().splitlines()]
    assert kinds[-2:] == ["recording_started", "recording"], kinds


def test_a_restart_closes_only_uploads_silent_for_resume_seconds(setup, clock):  # noqa: F811
    """What the last run left open is closed as incomplete after ``resume_seconds``; an upload
    that moves meanwhile (another node takes it for a session of this one) stays open."""
    set_policy(setup["db"], "on")
    storing = setup["make"]()
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(storing.start_recording(conn, sid))
    rid = answer["recording_id"]
    w = writer_for(answer)
    result_of(storing.chunk(conn, rid, 0, w.start() + w.flush()))
    resume_seconds = setup["config"].recording.resume_seconds

    def status() -> str:
        with setup["db"].session() as s:
            return s.get(Recording, rid).status
    restarted = setup["make"]()
    clock.advance(resume_seconds + 1)
    restarted.check()
    assert status() == "uploading" and rid in storing.uploads
    with setup["db"].session() as s:   # the upload went silent long ago
        row = s.get(Recording, rid)
        row.last_chunk_at = row.started_at = row.started_at - dt.timedelta(
            seconds=resume_seconds + 5)
    again = setup["make"]()
    clock.advance(resume_seconds + 1)
    again.check()
    assert status() == "incomplete"


def test_the_sessions_node_closes_an_upload_a_dead_node_left_open(setup, clock, broker,  # noqa: F811
                                                                  tmp_path):
    """Several nodes: node B stored an upload for a session of node A and died; the recorder
    did not come back within ``resume_seconds``: A closes it (incomplete, hash in the protocol).
    While the upload still moves (its recorder went on at a live node) A leaves it."""
    set_policy(setup["db"], "on")
    storing = setup["make"]()          # node B: stores the upload
    conn, sid = setup["host"], setup["sid"]
    answer = result_of(storing.start_recording(conn, sid))
    rid = answer["recording_id"]
    w = writer_for(answer)
    result_of(storing.chunk(conn, rid, 0, w.start() + w.flush()))
    session_node = setup["make"]()     # node A, the session's node
    session_node.node = "node-a"
    session_node.check()
    result_of(session_node._remote_line("node-b", {
        "session_id": sid, "tenant": "acme", "kind": "recording_started",
        "detail": {"recording_id": rid, "party": "host"}}))
    resume_seconds = setup["config"].recording.resume_seconds

    def status() -> str:
        with setup["db"].session() as s:
            return s.get(Recording, rid).status
    broker.live_nodes = {"node-a", "node-b"}
    clock.advance(resume_seconds + 1)
    session_node.check()               # node B lives: its upload
    assert status() == "uploading"
    broker.live_nodes = {"node-a"}     # node B died; the row moved a moment ago: not yet
    session_node.check()
    assert status() == "uploading" and rid in session_node.remote
    with setup["db"].session() as s:   # silent for longer than resume_seconds
        row = s.get(Recording, rid)
        row.last_chunk_at = row.started_at = row.started_at - dt.timedelta(
            seconds=resume_seconds + 5)
    clock.advance(resume_seconds + 1)
    session_node.check()
    assert status() == "incomplete"
    [path] = (tmp_path / "protocols").rglob(f"{sid}.jsonl")
    anchored = [json.loads(x) for x in path.read_text().splitlines()
                if json.loads(x)["kind"] == "recording"]
    assert [a["detail"]["recording_id"] for a in anchored] == [rid]
    assert anchored[0]["detail"]["status"] == "incomplete" and anchored[0]["detail"]["sha256"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_a_final_line_for_a_dead_sessions_node_is_written_by_the_storing_node(setup,
                                                                                     tmp_path):
    """Several nodes: the session's node does not answer (a real node bus on PostgreSQL, nobody
    listening on that node's channel) and is not live in ``server_nodes``: the storing node
    writes the recording's final line into the shared protocol itself."""
    from twisted.internet import reactor

    from server.cluster import NodeBus
    receiver = setup["make"]()
    receiver.node = "node-b"
    receiver.bus = NodeBus(setup["db"], "node-b", reactor, call_timeout=0.5)
    sid = setup["sid"]
    await receiver.line(sid, "acme", "node-gone", "recording", {"recording_id": "r9",
                                                                  "status": "complete"})
    [path] = (tmp_path / "protocols").rglob(f"{sid}.jsonl")
    [written] = [json.loads(x) for x in path.read_text().splitlines()
                 if json.loads(x)["kind"] == "recording"]
    assert written["detail"]["recording_id"] == "r9" and written["actor"] == "server"


def test_s3_uploads_wait_in_the_shared_recordings_folder_with_several_nodes(tmp_path):
    """An S3 upload is spooled until it ends: with several nodes in the shared recordings folder
    (its recorder may resume at another node), on one node in its data folder."""
    from server.recordings.storage import S3Storage, storage_for, storage_named
    s3 = {"enabled": True, "endpoint_url": "http://127.0.0.1:9", "bucket": "b"}
    one = from_mapping({"server": {"data_dir": str(tmp_path / "a")}, "s3": s3,
                        "recording": {"storage": "s3"}}, tmp_path)
    several = from_mapping({
        "server": {"data_dir": str(tmp_path / "a"), "protocol_dir": str(tmp_path / "shared/p"),
                   "recording_dir": str(tmp_path / "shared/r")},
        "s3": s3, "recording": {"storage": "s3"},
        "database": {"url": "postgresql+psycopg://u@127.0.0.1/hm"},
        "relay": {"external": ["127.0.0.1:8445"]},
        "cluster": {"enabled": True, "node_name": "node-a"}}, tmp_path)
    for config, spool in ((one, tmp_path / "a" / "recording-spool"),
                          (several, tmp_path / "shared" / "r" / ".s3-spool")):
        for storage in (storage_for(config), storage_named(config, "s3")):
            assert isinstance(storage, S3Storage) and storage.root == spool
