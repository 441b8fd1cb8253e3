"""Recordings with several server nodes (issue 15 with issue 12), as real processes on 127.0.0.1.

PostgreSQL, two ``hausmeister-server run`` nodes and one relay process
(``tests/fixtures_cluster.py``) with ``[recording] default_policy = "required"``.  A host on Xvfb
is connected to node B, its supporter to node A, so A sets the session up and writes its protocol
while B takes the host's recording upload.  The session runs past ``stall_seconds`` (before, A
saw no recording of its own and ended it), B's recording lines are in A's hash chain, the
recording ends complete; the console of either node lists it.  Under ``required`` node A still
ends a session whose upload at node B stalls (the host stopped with SIGSTOP).  In a third session
node B is killed mid-upload: the host fails over to A and sends the rest there
(``RecordingResume``), that recording ends complete too.  The other way round: node A records a
session itself and is stopped; the host sends the rest to node B, which writes the final line
into A's protocol itself (A is gone).  Node B back with the tenant's quota used up refuses the next
recording, and node A ends that session with the reason.
``protocol verify`` (with the recordings' hashes) and ``recording verify`` pass.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from sqlalchemy import select

from server.db import Database
from server.db.models import Recording, Session

from modules.common.link.folder import ModuleFolder
from modules.common.link.servers import set_servers

from .fixtures_server import ADMIN_PASSWORD, add_enrolled_host, add_enrolled_supporter, free_port
from .fixtures_x11 import xvfb  # noqa: F401 - fixture
from .fixtures_cluster import Console, node_config, protocol_lines
from .module_process import ModuleProcess
from .test_e2e_brokering import wait_until

pytestmark = pytest.mark.e2e

STALL_SECONDS = 3.0

RECORDING = f"""
[presence]
heartbeat_seconds = 1.0

[recording]
default_policy = "required"
stall_seconds = {STALL_SECONDS}
resume_seconds = 60.0
"""


def logs(*nodes) -> str:
    """The nodes' logs (one file or one each)."""
    return "".join(dict.fromkeys(node.log() for node in nodes))


def rows(db: Database) -> list[dict]:
    return db.call(lambda s: [
        {"id": r.id, "session_id": r.session_id, "party": r.party, "status": r.status,
         "size": r.size, "sha256": r.sha256}
        for r in s.scalars(select(Recording).order_by(Recording.started_at))])


def live_session(db: Database, session_id: str) -> bool:
    return db.call(lambda s: s.get(Session, session_id).ended_at is None)


def recorded_session(db: Database, supporter: ModuleProcess, known: int) -> dict:
    """The session ``supporter`` opened, once its host's recording has bytes on the server."""
    supporter.wait_for_line("snapshot saved", timeout=60)
    return wait_until(lambda: next((r for r in rows(db)[known:] if r["size"] > 1000), None),
                      timeout=30, what="the host's recording bytes on the server")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_recording_taken_by_another_node_than_the_sessions(tmp_path, db_url, xvfb):  # noqa: F811
    relay_port = free_port()
    fast = "call_timeout_seconds = 3"
    node_a = node_config(tmp_path, "node-a", db_url, relay_port, cluster_extra=fast,
                         extra=RECORDING)
    node_b = node_config(tmp_path, "node-b", db_url, relay_port, cluster_extra=fast,
                         extra=RECORDING)
    for node in (node_a, node_b):  # each starts again later: on the port its modules know
        node.config.write_text(node.config.read_text().replace(
            "module_port = 0", f"module_port = {free_port()}"))
    assert node_a.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    shared = tmp_path / "shared"
    db = Database(db_url)
    relay = ModuleProcess("server", "-c", str(node_a.config), "run", "--role", "relay")
    node_a.start()
    node_b.start()
    host = supporter = None
    try:
        relay.wait_for_line(f"relay listening on .*{relay_port}")
        alice = add_enrolled_supporter(node_a, "alice", tmp_path / "alice")
        pc1 = add_enrolled_host(node_a, "pc1", tmp_path / "pc1", "host-password-1")
        set_servers(ModuleFolder(pc1), [f"127.0.0.1:{node_b.module_port}",
                                        f"127.0.0.1:{node_a.module_port}"])
        password = tmp_path / "pw"
        password.write_text("host-password-1\n")
        xvfb.xterm("recorded-on-b", geometry="80x24+0+0", bg="darkgreen")
        host = ModuleProcess("host", "run", "--screen", xvfb.name, "--max-backoff", "0.5",
                             "--home", str(pc1))
        host.wait_for_line("online; waiting for supporters")

        def connect(name: str) -> ModuleProcess:
            return ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers",
                                 "/dev/null", "--password-file", str(password), "--snapshot",
                                 str(tmp_path / f"{name}.png"), "--home", str(alice))

        # --- 1. set up by node A, recorded through node B, not ended by a stall ---------------
        supporter = connect("first")
        first = recorded_session(db, supporter, 0)
        session = db.call(lambda s: s.get(Session, first["session_id"]))
        assert session.node == "node-a" and first["party"] == "host"
        deadline = time.monotonic() + 2.5 * STALL_SECONDS  # the property is time passing
        while time.monotonic() < deadline:
            assert live_session(db, first["session_id"]), node_a.log()[-3000:]
            assert supporter.proc.poll() is None, supporter.stderr
            time.sleep(0.25)
        started = [line for line in protocol_lines(tmp_path, first["session_id"])
                   if line["kind"] == "recording_started"]
        assert [line["detail"]["recording_id"] for line in started] == [first["id"]], started
        assert started[0]["actor"] == "server" and started[0]["detail"]["policy"] == "required"
        supporter.close_stdin()
        assert supporter.wait(timeout=30) == 0, supporter.stderr
        first = wait_until(lambda: next((r for r in rows(db) if r["id"] == first["id"]
                                         and r["status"] != "uploading"), None),
                           timeout=30, what="the first recording closed")
        assert first["status"] == "complete", first
        lines = wait_until(lambda: (lambda got: got if any(x["kind"] == "recording" for x in got)
                                    and any(x["kind"] == "ended" for x in got) else None)(
            protocol_lines(tmp_path, first["session_id"])), timeout=30,
            what="the recording and ended lines")
        [anchored] = [x["detail"] for x in lines if x["kind"] == "recording"]
        assert anchored["sha256"] == first["sha256"] and anchored["status"] == "complete"
        [ended] = [x["detail"] for x in lines if x["kind"] == "ended"]
        assert "recording" not in json.dumps(ended), ended  # not ended for want of a recording
        log = logs(node_a, node_b)
        assert f"recording {first['id']} for node node-a" in log, log[-3000:]
        assert f"line of recording {first['id']} from node node-b" in log, log[-3000:]

        # the console of either node lists it, beside a verified chain
        console = Console(shared / "certs" / "ca.crt")
        _, _, page = console.request(node_a.url, "GET", "/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        status, where, _ = console.request(node_a.url, "POST", "/console/login", {
            "csrf": csrf, "user": "admin", "password": ADMIN_PASSWORD})
        assert status in (302, 303) and "login" not in where
        for node in (node_a, node_b):
            status, _, page = console.request(node.url, "GET",
                                              f"/console/sessions/{first['session_id']}")
            assert status == 200 and 'id="recording-host"' in page and 'id="chain"' in page, page
            assert 'class="chain-ok"' in page, page

        # --- 2. the upload at node B stalls (host stopped): node A ends the session ----------
        supporter = connect("stalled")
        stalled = recorded_session(db, supporter, 1)
        os.kill(host.proc.pid, signal.SIGSTOP)
        try:
            assert supporter.wait(timeout=60) != 0
        finally:
            os.kill(host.proc.pid, signal.SIGCONT)
        row = db.call(lambda s: s.get(Session, stalled["session_id"]))
        assert row.end_cause == "recording_failed" and "upload stalled" in row.end_reason, \
            (row.end_cause, row.end_reason)
        wait_until(lambda: host.stderr.count("session ended") >= 2, timeout=60,
                   what="the stopped host learning that its session ended")
        wait_until(lambda: next((r for r in rows(db) if r["id"] == stalled["id"]
                                 and r["status"] != "uploading"), None),
                   timeout=60, what="the stalled recording closed")

        # --- 3. node B killed mid-upload: the host sends the rest to node A -------------------
        supporter = connect("second")
        second = recorded_session(db, supporter, 2)
        node_b.process.send_signal(signal.SIGKILL)
        node_b.process.wait()
        node_b.process = None
        assert supporter.wait(timeout=60) != 0  # the host lost its server: the session ends
        second = wait_until(lambda: next((r for r in rows(db) if r["id"] == second["id"]
                                          and r["status"] != "uploading"), None),
                            timeout=90, what="the second recording resumed on node A and closed")
        assert second["status"] == "complete", second
        assert (f"recording {second['id']} of session {second['session_id']}: its recorder is "
                "back") in logs(node_a)
        anchored = wait_until(lambda: [x["detail"] for x in protocol_lines(
            tmp_path, second["session_id"]) if x["kind"] == "recording"], timeout=30,
            what="the second recording's line")
        assert anchored[-1]["sha256"] == second["sha256"], anchored

        # --- 4. node B back; node A records a session itself and stops: the host goes to node
        #        B and sends the rest there; node A being gone, B writes the final line itself
        node_b.start()
        supporter = connect("moved")
        moved = recorded_session(db, supporter, 3)
        node_a.stop()
        assert supporter.wait(timeout=60) != 0
        moved = wait_until(lambda: next((r for r in rows(db) if r["id"] == moved["id"]
                                         and r["status"] != "uploading"), None),
                           timeout=90, what="the recording resumed on node B and closed")
        assert moved["status"] == "complete", moved
        anchored = wait_until(lambda: [x["detail"] for x in protocol_lines(
            tmp_path, moved["session_id"]) if x["kind"] == "recording"], timeout=30,
            what="the moved recording's line")
        assert [a["sha256"] for a in anchored] == [moved["sha256"]], anchored
        b_log = logs(node_b)
        assert (f"recording {moved['id']} of session {moved['session_id']}: its recorder is "
                "back") in b_log
        assert f"session {moved['session_id']}: its node node-a is gone" in b_log
        node_a.start()

        # --- 5. node B again, with the tenant's quota used up: node A ends the session --------
        node_b.stop()
        node_b.config.write_text(node_b.config.read_text().replace(
            "resume_seconds = 60.0", "resume_seconds = 60.0\nquota_mib = 0.01"))
        node_b.start()
        host.stop()  # the host starts again and takes node B, its first address
        host = ModuleProcess("host", "run", "--screen", xvfb.name, "--max-backoff", "0.5",
                             "--home", str(pc1))
        host.wait_for_line("online; waiting for supporters")
        supporter = connect("quota")
        assert supporter.wait(timeout=60) != 0
        row = db.call(lambda s: s.scalars(select(Session).order_by(Session.created_at.desc())
                                          ).first())
        assert row.node == "node-a" and row.host_id is not None
        assert row.end_cause == "recording_failed" and "quota" in row.end_reason, \
            (row.end_cause, row.end_reason)
        assert len(rows(db)) == 4  # nothing stored beyond the quota
    finally:
        for proc in (supporter, host):
            if proc is not None:
                proc.stop()
        node_b.stop()
        node_a.stop()
        relay.stop()
        db.dispose()
    log = logs(node_a, node_b)
    assert not re.search(r"Traceback", log), log[-5000:]
    # the hash chains, the anchors in the database and each recording's SHA-256
    verified = node_a.cli("protocol", "verify", str(shared / "protocols"))
    assert verified.returncode == 0, verified.stderr
    said = node_a.ok("recording", "verify")
    assert said.count("ok   ") == 4, said
