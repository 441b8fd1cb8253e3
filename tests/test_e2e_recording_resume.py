"""Session recordings survive what cuts an upload short (issue 12, real server, modules, Xvfb):
the host's control connection is cut (``ss -K``) while the server runs, in a second session
the server is killed (``kill -9``) and started again on the same ports, and in a third an ad-hoc
customer's connections are cut.  Each time the session ends, the recording module comes back and
sends the rest it kept (the FINAL record too): the recordings end complete, verify, and export to
the screen the session ended with.

The database is PostgreSQL here: what resumes after the restart is in its ``recordings`` rows.
An auditor key is configured (its private half only in this test's folder): the recording key
is split, so ``recording export`` needs the auditor's key besides the operator's, and the console
says so instead of playing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import recording

from .fixtures_console import ARTIFACTS, admin_page, browser  # noqa: F401 - fixture
from .fixtures_server import (ADMIN_PASSWORD, ServerProcess, add_enrolled_host, add_enrolled_supporter,
                              free_port, write_config)
from .fixtures_x11 import xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_brokering import wait_until
from .test_e2e_recording import last_frame, recordings
from .test_e2e_screen import screen_of

pytestmark = pytest.mark.e2e


def cut_connections(pid: int, port: int) -> int:
    """Abort (RST) every TCP connection process ``pid`` holds to 127.0.0.1:``port``."""
    listing = subprocess.run(["ss", "-tnpH", "state", "established", "dst", f"127.0.0.1:{port}"],
                             capture_output=True, text=True, check=True).stdout
    cut = 0
    for line in listing.splitlines():
        if f"pid={pid}," not in line:
            continue
        local = line.split()[2]  # Recv-Q Send-Q Local Peer (state filtered away)
        sport = local.rsplit(":", 1)[1]
        subprocess.run(["ss", "-K", "-t", "src", "127.0.0.1", "sport", "=", sport],
                       capture_output=True, check=True)
        cut += 1
    return cut


def one_session(w, display, tmp_path, name: str):
    """A supporter views the host until the recording has bytes on the server."""
    snapshot = tmp_path / f"{name}.png"
    supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                              "--password-file", str(w["right"]), "--snapshot", str(snapshot),
                              "--home", str(w["alice"]))
    supporter.wait_for_line("snapshot saved", timeout=60)
    srv = w["srv"]
    wait_until(lambda: any(r["status"] == "uploading" and r["size"] > 1000
                           for r in recordings(srv)), timeout=20, what="recording bytes on the server")
    time.sleep(1.5)  # the screen is still; the recording's last picture is this one
    return supporter, screen_of(display)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_uploads_resume_after_a_connection_loss_and_a_server_restart(tmp_path, db_url, xvfb,  # noqa: F811
                                                                    browser):  # noqa: F811
    auditor = X25519PrivateKey.generate()
    auditor_pem = tmp_path / "auditor.pem"           # stays with the auditor, never the server
    auditor_pem.write_bytes(recording.private_pem(auditor))
    auditor_pub = tmp_path / "auditor.pub.pem"
    auditor_pub.write_text(recording.public_pem(auditor.public_key()))
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "h.toml", data, db_url, extra=f"""
[presence]
heartbeat_seconds = 1.0

[recording]
stall_seconds = 4.0
resume_seconds = 60.0
auditor_key = "{auditor_pub}"
""")
    module_port = free_port()
    cfg.write_text(cfg.read_text().replace("https_port = 0", f"https_port = {free_port()}")
                   .replace("module_port = 0", f"module_port = {module_port}"))
    srv = ServerProcess(cfg, data)
    assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    srv.start()
    host = supporter = None
    try:
        srv.ok("recording", "policy", "on")
        w = {"srv": srv, "alice": add_enrolled_supporter(srv, "alice", tmp_path / "alice"),
             "right": tmp_path / "right"}
        pc1 = add_enrolled_host(srv, "pc1", tmp_path / "pc1", "right-host-password")
        w["right"].write_text("right-host-password\n")
        xvfb.xterm("resumed-term", geometry="80x24+0+0", bg="darkblue")
        host = ModuleProcess("host", "run", "--screen", xvfb.name, "--max-backoff", "0.5",
                             "--home", str(pc1))
        host.wait_for_line("online; waiting for supporters")

        # 1. the host's connections are cut (a network loss) while the server runs
        supporter, _ = one_session(w, xvfb.name, tmp_path, "cut")
        assert cut_connections(host.proc.pid, module_port) >= 1
        assert supporter.wait(timeout=60) != 0
        wait_until(lambda: all(r["status"] != "uploading" for r in recordings(srv)), timeout=60,
                   what="the cut-off upload resumed and closed")
        [first] = recordings(srv)
        assert first["status"] == "complete", first

        # 2. the server is killed mid-upload and started again on the same ports
        supporter, expected_crash = one_session(w, xvfb.name, tmp_path, "crash")
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait()
        srv.process = None
        assert supporter.wait(timeout=60) != 0
        host.wait_for_line("lost the server")
        srv.start()
        wait_until(lambda: len(recordings(srv)) == 2 and all(
            r["status"] != "uploading" for r in recordings(srv)), timeout=60,
            what="the upload resumed after the restart and closed")
        second = next(r for r in recordings(srv) if r["session_id"] != first["session_id"])
        assert second["status"] == "complete", second
        assert host.proc.poll() is None

        # 3. an ad-hoc customer (no certificate) whose connections are cut sends the rest of
        #    its recording over a new connection before the module exits
        adhoc = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--snapshot", str(tmp_path / "adhoc.png"), "--home", str(w["alice"]))
        supporter = adhoc
        nameplate, secret = adhoc.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups()
        yes = tmp_path / "yes"
        yes.write_text("y\ny\ny\n")
        customer = ModuleProcess("customer", "--server", srv.url, "--ca-fingerprint",
                                 srv.fingerprint, f"{nameplate} {secret}", "--pipe", "--answers",
                                 str(yes), "--screen", xvfb.name)
        try:
            adhoc.wait_for_line("snapshot saved", timeout=60)
            wait_until(lambda: any(r["party"] == "customer" and r["size"] > 1000
                                   for r in recordings(srv)), timeout=20,
                       what="the customer's recording on the server")
            assert cut_connections(customer.proc.pid, module_port) >= 1
            assert adhoc.wait(timeout=60) != 0
            customer.wait(timeout=90)
            assert "the session recording is complete on the server" in customer.stderr, \
                customer.stderr
        finally:
            customer.stop()
        [third] = [r for r in recordings(srv) if r["party"] == "customer"]
        assert third["status"] == "complete", third
        for lang in ("en", "de"):
            console_says_auditor_needed(browser, srv, second["session_id"], lang)
    finally:
        if host:
            host.stop()
        if supporter:
            supporter.stop()
        srv.stop()
    log = srv.log()
    assert log.count("its recorder is back") >= 3, log[-3000:]

    # nothing lost: both verify (records authenticated with both keys), their hashes are in the
    # protocols (after the 'ended' line the crash recovery wrote), protocol verify agrees
    said = srv.ok("recording", "verify", "--key", str(auditor_pem))
    assert said.count("ok   ") == 3, said
    without = srv.ok("recording", "verify")  # the operator alone: hash and framing only
    assert without.count("ok   ") == 3 and "auditor's key" in without, without
    assert srv.cli("protocol", "verify", str(data / "protocols")).returncode == 0
    for rec in (first, second, third):
        lines = [json.loads(x) for f in (data / "protocols").rglob(f"{rec['session_id']}.jsonl")
                 for x in f.read_text().splitlines()]
        kinds = [x["kind"] for x in lines]
        anchored = [x["detail"] for x in lines if x["kind"] == "recording"]
        assert anchored and anchored[-1]["sha256"] == rec["sha256"], anchored
        assert anchored[-1]["status"] == "complete"
        if rec is second:  # the restart ended the session before the recording was complete
            assert kinds.index("ended") < kinds.index("recording"), kinds

    # split knowledge: the operator's key alone opens nothing; with the auditor's it exports
    out = tmp_path / "no-auditor.mp4"
    refused = srv.cli("recording", "export", second["session_id"], "--mp4", str(out))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "split" in refused.stderr and not out.exists(), refused.stderr
    out = tmp_path / "with-auditor.mp4"   # the crash's recording ends with the screen it left
    srv.ok("recording", "export", second["session_id"], "--mp4", str(out), "--key", str(auditor_pem))
    picture, _ = last_frame(out)
    assert float(np.abs(picture.astype(np.int16) - expected_crash).mean()) < 6.0
    assert not re.search(r"Traceback", log), log[-3000:]
    assert os.path.exists(auditor_pem)


def console_says_auditor_needed(browser, srv, session_id: str, lang: str) -> None:  # noqa: F811
    """The session page says the auditor's key is needed instead of offering a video that cannot
    be made; the video address answers 409 with the same reason."""
    context, page = admin_page(browser, srv, lang, ADMIN_PASSWORD)
    try:
        page.goto(f"{srv.url}/console/sessions/{session_id}")
        said = page.locator("#split-host").inner_text()
        assert {"en": "auditor", "de": "Prüfer"}[lang] in said, said
        assert page.locator("video").count() == 0
        page.locator("#recording-host").scroll_into_view_if_needed()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"recording-split-{lang}.png"), full_page=False)
        video = context.request.get(f"{srv.url}/console/sessions/{session_id}/recordings/host.mp4")
        assert video.status == 409 and {"en": "auditor", "de": "Prüfer"}[lang] in video.text()
    finally:
        context.close()
