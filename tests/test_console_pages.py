"""Console pages in Debian's Chromium against a real server: the sessions list (filters, CSV with
formula cells defused), a session's page with the protocol timeline read from a real hash-chained
protocol file (and the warning when a line was edited), tenant isolation (another tenant's session
is "not found"), the public customer download page (real CA fingerprint, files with SHA-256,
streamed downloads, no path traversal, a settings file the customer module accepts) and the
offline help.  Screenshots: session-detail, download, help.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import http.client
import io
import json
import os
import ssl
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from server.console.pages_sessions import csv_bytes, read_timeline
from server.session_protocol import ProtocolWriter
from tests.fixtures_console import PAYLOAD, Console, tenant_of_admin
from tests.fixtures_server import ADMIN_PASSWORD, run_cli

FORMULA = '=HYPERLINK("http://127.0.0.1/x","click")'


def add_session(db_url: str, tenant: str, kind: str, supporter: str, peer: str,
                created: dt.datetime, end_reason: str = "supporter ended") -> str:
    """A finished session row of ``tenant`` (as the relay records one); returns its id."""
    from server.db import Database
    from server.db.models import Session, Tenant
    sid = str(uuid.uuid4())
    db = Database(db_url)
    try:
        with db.session() as s:
            tenant_id = s.query(Tenant).filter_by(name=tenant).one().id
            s.add(Session(id=sid, tenant_id=tenant_id, kind=kind, supporter_identity=supporter,
                          peer_identity=peer, peer_address="10.0.0.7", created_at=created,
                          started_at=created, ended_at=created + dt.timedelta(minutes=5),
                          bytes_to_peer=1234, bytes_to_supporter=56789, end_reason=end_reason))
    finally:
        db.dispose()
    return sid


def write_protocol(protocol_dir: Path, tenant: str, sid: str, chat: str = "hello") -> Path:
    """A protocol as the server writes it: the real writer, its hash chain, its ended line."""
    writer = ProtocolWriter(protocol_dir)
    supporter = "hausmeister:supporter:alice"
    for kind, actor, address, detail in [
        ("created", supporter, "127.0.0.1", {"mode": "adhoc"}),
        ("joined", "customer@10.0.0.7", "10.0.0.7", {}),
        ("key_confirmed", supporter, None, {"code": "123 456"}),
        ("granted", "customer@10.0.0.7", None, {"right": "view"}),
        ("chat", "customer@10.0.0.7", None, {"text": chat}),
    ]:
        writer.append(tenant, sid, {"kind": kind, "actor": actor, "address": address,
                                    "detail": detail})
    from server.session_protocol import SessionSummary
    now = dt.datetime.now(dt.timezone.utc)
    writer.finish(tenant, SessionSummary(sid, "adhoc", now - dt.timedelta(minutes=5), now,
                                         supporter, "customer@10.0.0.7", 1234, 56789,
                                         "supporter ended"), by=supporter)
    return writer.locate(tenant, sid)


def raw_get(base_url: str, path: str, method: str = "GET",
            headers: dict | None = None) -> tuple[int, bytes]:
    """``path`` exactly as given (no client-side normalisation) from the loopback server."""
    status, body, _ = raw_request(base_url, path, method, headers)
    return status, body


def raw_request(base_url: str, path: str, method: str = "GET",
                headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
    parts = urlsplit(base_url)
    assert parts.hostname == "127.0.0.1"
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                       context=ssl._create_unverified_context())
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response.headers
    finally:
        conn.close()


def rows_of(body: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(body.decode("utf-8"))))


def test_csv_cells_that_a_spreadsheet_would_run_are_text():
    body = csv_bytes(["a", "b"], [["=1+1", "+x"], ["-2", "@SUM(A1)"], ["plain, \"quoted\"", 5]])
    assert rows_of(body) == [["a", "b"], ["'=1+1", "'+x"], ["'-2", "'@SUM(A1)"],
                             ['plain, "quoted"', "5"]]


def test_timeline_reads_only_the_tenants_own_protocol(tmp_path):
    """A recorded path that leaves the tenant's folder is ignored; the tenant's months are searched."""
    sid, foreign = str(uuid.uuid4()), str(uuid.uuid4())
    own = write_protocol(tmp_path, "a", sid)
    theirs = write_protocol(tmp_path, "b", foreign)
    t = read_timeline(tmp_path, "a", sid, "../../etc/passwd")
    assert t.verified and t.total == 6 and t.path == str(own.relative_to(tmp_path))
    t = read_timeline(tmp_path, "a", sid, str(theirs.relative_to(tmp_path)))
    assert t.path == str(own.relative_to(tmp_path))
    t = read_timeline(tmp_path, "a", foreign, str(theirs.relative_to(tmp_path)))
    assert t.missing and not t.events  # tenant b's file, even with its exact path recorded
    own.write_bytes(own.read_bytes()[:-10])  # a cut-off last line
    t = read_timeline(tmp_path, "a", sid, "")
    assert not t.verified and t.broken_line == 6 and "incomplete" in t.problem


def test_timeline_end_is_checked_against_the_one_the_database_recorded(tmp_path):
    sid = str(uuid.uuid4())
    path = write_protocol(tmp_path, "a", sid)
    last = json.loads(path.read_bytes().splitlines()[-1])
    anchor = (last["seq"], last["hash"])
    t = read_timeline(tmp_path, "a", sid, "", anchor=anchor)
    assert t.verified and t.anchored
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:4]))  # tail removed
    assert read_timeline(tmp_path, "a", sid, "").verified  # the chain alone cannot tell
    t = read_timeline(tmp_path, "a", sid, "", anchor=anchor)
    assert not t.verified and t.broken_line == 0
    assert "ends after line 4" in t.problem and "removed from the end" in t.problem


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sessions_filter_csv_detail_timeline_and_tenant_isolation(running_server, browser, db_url):
    srv = running_server
    tenant = tenant_of_admin(srv)
    srv.ok("tenant", "add", "b")
    protocols = srv.data_dir / "protocols"
    nov = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)
    oct_ = dt.datetime(2026, 10, 15, 9, 0, tzinfo=dt.timezone.utc)
    adhoc = add_session(db_url, tenant, "adhoc", "hausmeister:supporter:alice", FORMULA, nov)
    host = add_session(db_url, tenant, "host", "hausmeister:supporter:bert", "hausmeister:host:pc1",
                       oct_, end_reason="-1 relay idle")
    other = add_session(db_url, "b", "adhoc", "hausmeister:supporter:berta", "customer:Berta", nov)
    write_protocol(protocols, tenant, adhoc, chat=PAYLOAD)
    tampered = write_protocol(protocols, tenant, host)
    write_protocol(protocols, "b", other)
    lines = tampered.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"right":"view"', b'"right":"control"')
    tampered.write_bytes(b"\n".join(lines))

    c = Console(browser, srv.url)
    try:
        c.login("admin", ADMIN_PASSWORD)
        c.go("/console/sessions")
        assert c.page.locator("tr.session").count() == 2
        assert "Berta" not in c.page.content()

        # Filters: kind, dates (the "to" day included), text; each alone and together.
        c.page.select_option("#kind", "host")
        with c.page.expect_navigation():
            c.page.click("#search")
        assert c.page.locator("tr.session").count() == 1
        assert "bert" in c.page.locator("tr.session").inner_text()
        c.go("/console/sessions")
        c.shot("sessions-filters")
        c.go("/console/sessions?from=2026-10-20")
        assert c.page.locator("tr.session").count() == 1 and "alice" in c.page.content()
        c.go("/console/sessions?from=2026-10-15&to=2026-10-15")
        assert c.page.locator("tr.session").count() == 1 and "bert" in c.page.content()
        c.go("/console/sessions?q=alice&kind=host")
        assert c.page.locator("#no-sessions").is_visible()
        c.go("/console/sessions?q=" + PAYLOAD.replace("#", "%23").replace("&", "%26"))
        assert c.page.locator("#no-sessions").is_visible() and c.page.locator("#pwned").count() == 0
        for bad, message in (("from=2026-13-01", "expected YYYY-MM-DD"), ("kind=bogus", "adhoc, host"),
                             ("from=2026-11-02&to=2026-11-01", "is after")):
            r = c.go("/console/sessions?" + bad)
            assert r.status == 400 and message in c.page.locator("#message").inner_text()

        # CSV of the filtered list: csv quoting, formula cells defused.
        r = c.page.request.get(srv.url + "/console/sessions.csv?kind=adhoc")
        assert r.status == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        rows = rows_of(r.body())
        assert rows[0][0] == "session_id" and len(rows) == 2
        record = dict(zip(rows[0], rows[1]))
        assert record["session_id"] == adhoc and record["peer"] == "'" + FORMULA
        assert record["bytes_to_supporter"] == "56789" and record["duration_s"] == "300.000"
        everything = rows_of(c.page.request.get(srv.url + "/console/sessions.csv").body())
        assert {row[0] for row in everything[1:]} == {adhoc, host}
        assert dict(zip(everything[0], everything[2]))["end_reason"] == "'-1 relay idle"

        # The detail page from the list: facts and the verified timeline of the real protocol.
        c.go("/console/sessions?kind=adhoc")
        with c.page.expect_navigation():
            c.page.click("tr.session a.details")
        assert c.page.url == f"{srv.url}/console/sessions/{adhoc}"
        assert c.page.locator("#fact-peer").inner_text().startswith(FORMULA)
        events = c.page.locator("#timeline tr.event")
        assert events.count() == 6
        kinds = [events.nth(i).locator("td.kind").inner_text() for i in range(6)]
        assert kinds == ["created", "joined", "key_confirmed", "granted", "chat", "ended"]
        assert "code=\"123 456\"" in events.nth(2).inner_text()
        assert "hausmeister:supporter:alice" in events.nth(0).locator("td.actor").inner_text()
        assert "Hash chain verified: 6 events" in c.page.locator("#chain").inner_text()
        assert c.page.locator("#pwned").count() == 0 and c.page.evaluate("window.pwned") is None
        assert PAYLOAD[:20] in events.nth(4).inner_text()
        c.shot("session-detail")
        r = c.page.request.get(f"{srv.url}/console/sessions/{adhoc}/protocol.csv")
        timeline = rows_of(r.body())
        assert r.status == 200 and len(timeline) == 7
        assert [row[3] for row in timeline[1:]] == kinds and timeline[1][7] == "yes"

        # An edited line: the page says where the chain breaks, and marks the line.
        c.go(f"/console/sessions/{host}")
        warning = c.page.locator("#chain").inner_text()
        assert "Chain broken at line 4" in warning and "content does not match its hash" in warning
        assert "broken" in c.page.locator("#line-4").get_attribute("class")
        assert "control" in c.page.locator("#line-4").inner_text()
        c.shot("session-detail-broken")
        last = rows_of(c.page.request.get(f"{srv.url}/console/sessions/{host}/protocol.csv").body())
        assert last[1][7] == "no: broken at line 4"

        # Another tenant's session, an unknown one, and a malformed id: not found, nothing shown.
        for sid in (other, str(uuid.uuid4()), "..%2Fetc", "x" * 201):
            for suffix in ("", "/protocol.csv"):
                r = c.page.request.get(f"{srv.url}/console/sessions/{sid}{suffix}")
                assert r.status == 404, (sid, suffix, r.status)
                assert "Berta" not in r.text()
        c.assert_local_only()
    finally:
        c.close()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_download_page_files_settings_and_help(running_server, browser, db_url, tmp_path):
    srv = running_server
    downloads = srv.data_dir / "downloads"
    downloads.mkdir(exist_ok=True)
    installer = downloads / "hausmeister-customer_1.0_all.deb"
    installer.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (downloads / "with space.txt").write_text("not offered")
    (srv.data_dir / "secret.txt").write_text("outside the downloads folder")
    (downloads / "link.deb").symlink_to(srv.data_dir / "secret.txt")
    (downloads / "sub").mkdir()

    c = Console(browser, srv.url)  # not logged in: customers use this page
    try:
        c.go("/console/download")
        assert c.page.locator("#fingerprint").inner_text() == srv.fingerprint
        assert c.page.locator("#server").inner_text() == srv.url
        command = c.page.locator("#command").inner_text()
        assert command == (f"hausmeister-customer --server {srv.url} --ca-fingerprint "
                           f"{srv.fingerprint} 1234 5678")
        assert f"--ca-fingerprint {srv.fingerprint} --token TOKEN" in c.page.locator("#host-command").inner_text()
        files = c.page.locator("tr.file")
        assert files.count() == 1
        sha = hashlib.sha256(installer.read_bytes()).hexdigest()
        assert installer.name in files.inner_text() and sha in files.inner_text()
        assert "Remote support terms" in c.page.locator("#terms").inner_text()
        c.shot("download")

        r = c.page.request.get(f"{srv.url}/console/download/{installer.name}")
        assert r.status == 200 and hashlib.sha256(r.body()).hexdigest() == sha
        assert r.headers["content-type"] == "application/octet-stream"
        assert f'filename="{installer.name}"' in r.headers["content-disposition"]
        assert r.headers["x-content-type-options"] == "nosniff"
        path = f"/console/download/{installer.name}"
        status, body, headers = raw_request(srv.url, path, "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) == installer.stat().st_size
        status, body, headers = raw_request(srv.url, path, headers={"Range": "bytes=100-199"})
        assert status == 206 and body == installer.read_bytes()[100:200]

        # Sent byte for byte (a browser would resolve the dots before sending).
        for bad in ("..", "../secret.txt", "..%2Fsecret.txt", "%2E%2E%2Fsecret.txt",
                    "..%2F..%2Fhausmeister.db", "with%20space.txt", "link.deb", "sub", ".hidden",
                    "%2Fetc%2Fpasswd", "missing.deb", "..%5Csecret.txt", "%00"):
            status, body = raw_get(srv.url, "/console/download/" + bad)
            assert status == 404, (bad, status)
            assert b"outside the downloads folder" not in body

        # The settings file: the real customer module accepts it and reaches this server.
        r = c.page.request.get(srv.url + "/console/customer.toml")
        settings = tmp_path / "customer.toml"
        settings.write_bytes(r.body())
        result = run_cli("customer", "check", "--server-config", str(settings))
        assert result.returncode == 0, result.stderr
        assert "the server's CA matches the fingerprint" in result.stdout

        # Offline help: every topic from the index, real text, nothing from elsewhere.
        c.go("/console/help")
        topics = c.page.locator("#topic-list a")
        names = [topics.nth(i).inner_text() for i in range(topics.count())]
        assert len(names) == 7 and "Consent and rights" in names
        for name in names:
            c.go("/console/help")
            with c.page.expect_navigation():
                c.page.locator("#topic-list a", has_text=name).click()
            assert c.page.locator("article h1").inner_text() == name
            assert len(c.page.locator("#help").inner_text()) > 600
        c.go("/console/help/adhoc-customers")
        assert f"--server {srv.url}" in c.page.locator("#help").inner_text()
        c.shot("help")
        assert c.go("/console/help/no-such-topic").status == 404
        for bad in ("..", "..%2Fconsole%2Fbase", "getting-started.html", "GETTING-STARTED"):
            assert raw_get(srv.url, "/console/help/" + bad)[0] == 404, bad
        c.assert_local_only()
    finally:
        c.close()
