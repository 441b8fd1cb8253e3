"""Nothing the server serves or the modules print points a browser at the outside world.

* A scan of every offline page, template, stylesheet and help text, every module's and the
  server's Python source (their CLI and help texts), the example config and the README: any
  http(s) URL must be loopback, a documentation placeholder, or in the short allow-list below
  with its reason.
* ``link_outside_urls`` escapes free text and links outside URLs only to the warning page.
* Chromium loads EVERY console page registered at run time (``server.console.core.ROUTES``),
  logged in as admin, with real objects behind ``{param}`` routes, and the browser makes no
  request to any host but the server; an outside link in the support terms opens the warning page.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from markupsafe import Markup

from server.console.pages_help import link_outside_urls
from tests.fixtures_console import Console
from tests.fixtures_server import ADMIN_PASSWORD, ServerProcess, run_cli, write_config

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"https?://(\[[^\]\s]*\]|[^/\s:?#\"'<>`)\]]*)[^\s\"'<>`)\]]*", re.IGNORECASE)

#: URL prefix -> why it may appear although it is not on this network
ALLOWED = {
    "https://www.gravatar.com/avatar/": "the default of avatars.gravatar_url: a browser gets it "
                                        "only after the operator switches Gravatar on (off by default)",
    "http://www.w3.org/2000/svg": "the SVG XML namespace name in generated avatars: an identifier, "
                                  "never fetched",
}
#: top-level names that never resolve on the internet (RFC 2606, RFC 6761, RFC 8375, private use)
LOCAL_TLDS = ("example", "invalid", "test", "localhost", "lan", "internal", "local", "home.arpa")

SCANNED = ["offline_pages/**/*.html", "offline_pages/**/*.css", "offline_pages/**/*.md",
           "offline_pages/**/*.txt", "offline_pages/**/*.svg", "modules/**/*.py", "server/**/*.py",
           "protocol/**/*.py", "config/*.toml", "README.md"]


def is_local_or_placeholder(url: str, host: str) -> bool:
    host = host.lower().strip("[]")
    if host in ("localhost", "::1") or re.fullmatch(r"127(\.\d{1,3}){3}", host):
        return True
    if "{" in host or "%" in host:  # a template: f"https://{host}:{port}", "%s"
        return True
    original = URL.match(url).group(1)
    if re.fullmatch(r"[A-Z][A-Z0-9_-]*", original):  # HOST, SERVER
        return True
    return any(host == tld or host.endswith("." + tld) for tld in LOCAL_TLDS)


def outside_urls(text: str) -> list[str]:
    found = []
    for m in URL.finditer(text):
        url, host = m.group(0), m.group(1)
        if not host:  # "http://" on its own, e.g. in "must start with https://"
            continue
        if any(url.startswith(prefix) for prefix in ALLOWED):
            continue
        if not is_local_or_placeholder(url, host):
            found.append(url)
    return found


def scanned_files() -> list[Path]:
    files = {p for pattern in SCANNED for p in ROOT.glob(pattern) if p.is_file()}
    return sorted(p for p in files if "__pycache__" not in p.parts)


def test_the_url_rule_itself():
    assert outside_urls("see https://example.com/x and http://8.8.8.8/") == [
        "https://example.com/x", "http://8.8.8.8/"]
    assert outside_urls('src="//cdn.example.org/x.js"') == []  # protocol-relative: next test
    assert outside_urls("https://127.0.0.1:8443/ https://[::1]:1/ https://localhost/ "
                        "https://{host}:{port}/ https://SERVER:8443/console/ https://HOST:PORT "
                        "https://hausmeister.lan:8443 https://x.example/a https://h.example.invalid "
                        "must start with http:// or https://") == []
    assert outside_urls("https://www.gravatar.com/avatar/abc http://www.w3.org/2000/svg") == []
    assert outside_urls("https://www.gravatar.com.evil.example.net/") == [
        "https://www.gravatar.com.evil.example.net/"]


def test_no_outside_url_in_pages_templates_help_and_module_texts():
    files = scanned_files()
    assert any(p.parent.name == "help" for p in files) and any(p.suffix == ".py" for p in files)
    bad = {str(p.relative_to(ROOT)): urls for p in files
           if (urls := outside_urls(p.read_text(errors="replace")))}
    assert bad == {}, f"URLs to the outside world (add a reason to ALLOWED only if no browser " \
                      f"fetches them): {bad}"


def test_pages_reference_only_this_server():
    """href/src/action in every offline page are paths on this server (or template values the
    console fills in); stylesheets import nothing."""
    pages = [p for p in scanned_files() if p.suffix == ".html"]
    for path in pages:
        text = path.read_text()
        for attr, value in re.findall(r"\b(href|src|action|srcset|poster|data)\s*=\s*\"([^\"]*)\"", text):
            assert value.startswith(("/", "#", "{{")) and not value.startswith("//"), \
                f"{path.relative_to(ROOT)}: {attr}=\"{value}\""
        assert "<script" not in text and "javascript:" not in text, path
    for path in (p for p in scanned_files() if p.suffix == ".css"):
        text = path.read_text()
        assert "@import" not in text, path
        for target in re.findall(r"url\(\s*['\"]?([^'\")]*)", text):
            assert target.startswith("/") and not target.startswith("//"), (path, target)


def test_free_text_is_escaped_and_outside_urls_go_to_the_warning_page():
    text = ("Terms <b>bold</b> & more: see https://example.com/privacy?a=1&b=2. "
            "Also (http://intranet.example.net/x) and javascript:alert(1)")
    html = link_outside_urls(text)
    assert isinstance(html, Markup)
    assert "<b>" not in html and "&lt;b&gt;bold&lt;/b&gt; &amp; more" in html
    hrefs = re.findall(r'href="([^"]*)"', html)
    assert hrefs == ["/console/leave?to=" + quote("https://example.com/privacy?a=1&b=2", safe=""),
                     "/console/leave?to=" + quote("http://intranet.example.net/x", safe="")]
    assert 'href="http' not in html and "javascript:alert(1)" in html  # text, not a link
    assert html.endswith("javascript:alert(1)") and "b=2</a>. Also (" in html
    assert link_outside_urls("<script>x</script>") == "&lt;script&gt;x&lt;/script&gt;"
    assert link_outside_urls(None) == "" and link_outside_urls("http:// alone") == "http:// alone"
    assert 'href="/console/leave?to=https%3A%2F%2Fx.example%2F%22%3E%3Cb%3E"' not in \
        link_outside_urls('https://x.example/"><b>')  # the quote ends the URL, stays escaped


# --- every console page in Chromium ---------------------------------------------------------

TERMS_URL = "https://example.com/privacy?lang=en&v=2"


def route_path(pattern: re.Pattern) -> tuple[str, list[str]]:
    """``sessions/{id}/protocol.csv`` and ``["id"]`` back from a route's regex."""
    text = pattern.pattern.removeprefix("^").removesuffix("$")
    params = re.findall(r"\(\?P<([a-z_]+)>[^)]*\)", text)
    text = re.sub(r"\(\?P<([a-z_]+)>[^)]*\)", r"{\1}", text)
    return re.sub(r"\\(.)", r"\1", text), params


def real_objects(db_url: str) -> dict[str, list[str]]:
    """Ids of the objects of the admin's tenant, by the route segment that shows them."""
    from sqlalchemy import select

    from server import user_links
    from server.db import Database
    from server.db.models import AuditEntry, Certificate, EnrollmentToken, Host, Session, User
    db = Database(db_url)
    try:
        with db.session() as s:
            supporter = s.scalar(select(User).where(User.name == "sam"))
            invited = s.scalar(select(User).where(User.name == "ivy"))
            ids = {
                "sessions": list(s.scalars(select(Session.id))),
                "hosts": list(s.scalars(select(Host.id))),
                "users": [str(i) for i in s.scalars(select(User.id).order_by(User.id))],
                "tokens": [str(i) for i in s.scalars(select(EnrollmentToken.id))],
                "certificates": list(s.scalars(select(Certificate.serial))),
                "audit": [str(i) for i in s.scalars(select(AuditEntry.id).limit(3))],
                "reset": [user_links.issue(s, supporter, "reset", 3600)],
                "invite": [user_links.issue(s, invited, "invite", 3600)],
            }
    finally:
        db.dispose()
    ids["avatar"] = ids["users"]
    return ids


def fill(path: str, params: list[str], objects: dict[str, list[str]], extra: dict[str, list[str]]):
    """Candidate paths for a route: real objects for its segment, else for its parameter name."""
    if not params:
        return [path]
    segment = path.split("/")[0]
    by_name = {"user_id": objects["users"], "serial": objects["certificates"],
               "token_id": objects["tokens"], "host_id": objects["hosts"],
               "session_id": objects["sessions"], **extra}
    values = extra.get(segment) or objects.get(segment) or by_name.get(params[0]) or []
    if not values:  # an area added later: any object might be the one it shows
        values = [v for vs in objects.values() for v in vs]
    out = []
    for value in values[:6]:
        p = path
        for name in params:
            p = p.replace("{" + name + "}", quote(value, safe=""))
        out.append(p)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_console_page_makes_no_outside_request(tmp_path, browser, db_url):
    from server.console import core, pages  # noqa: F401  (registers every page's routes)

    data = tmp_path / "data"
    srv = ServerProcess(write_config(tmp_path / "h.toml", data, db_url, extra=f"""
[adhoc]
terms = "Remote support terms of Example Ltd. Privacy: {TERMS_URL}."
"""), data)
    assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    srv.start()
    c = Console(browser, srv.url)
    try:
        # Real objects behind the {param} routes: a host (enrolled by the real module), a
        # supporter, tokens, a session with its protocol, a file to download, user links.
        token, sid = _seed(db_url, data / "protocols")
        enrolled = run_cli("host", "enroll", "--server", srv.url, "--ca-fingerprint",
                           srv.fingerprint, "--token", token, "--name", "pc1",
                           "--home", str(tmp_path / "pc1"))
        assert enrolled.returncode == 0, enrolled.stderr
        (data / "downloads").mkdir(exist_ok=True)
        (data / "downloads" / "hausmeister-customer.tar.gz").write_bytes(b"bundle" * 1000)
        objects = real_objects(db_url)
        assert sid in objects["sessions"] and objects["hosts"] and objects["certificates"]
        extra = {"help": ["getting-started"], "download": ["hausmeister-customer.tar.gz"],
                 "topic": ["getting-started"], "name": ["hausmeister-customer.tar.gz"]}

        c.login("admin", ADMIN_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        loaded, not_found = [], []
        for r in [r for r in core.ROUTES if r.method == "GET"]:
            path, params = route_path(r.pattern)
            status, is_page = None, False
            for candidate in fill(path, params, objects, extra):
                status, is_page = _probe(c, srv.url + "/console/" + candidate)
                assert status < 500, f"/console/{candidate} answered {status}"
                if status != 404:
                    break
            if status == 404 and params:
                not_found.append(path)  # none of the objects is one this page shows
            if is_page:  # load it as a page: every sub-request it makes is recorded
                response = c.go("/console/" + candidate)
                assert response.status < 500, candidate
            loaded.append(candidate)
        assert {"download", "help", "sessions", f"sessions/{sid}", "hosts"} <= set(loaded), loaded
        assert f"sessions/{sid}" not in not_found
        c.go(f"/console/sessions/{sid}")  # a URL in a protocol's chat line: the warning page
        assert c.page.locator("#timeline a.outside").get_attribute("href") == \
            "/console/leave?to=" + quote(TERMS_URL, safe="")
        c.go("/")  # the server's start page links the console, help and download
        for link in ("/console/download", "/console/help", "/console/"):
            assert c.page.locator(f"a[href='{link}']").count() == 1

        # The outside link in the support terms: the warning page, never the address.
        c.go("/console/download")
        link = c.page.locator("#terms a.outside")
        assert link.inner_text() == TERMS_URL
        with c.page.expect_navigation():
            link.click()
        assert c.page.url.startswith(srv.url + "/console/leave?to=")
        assert c.page.locator("#target").inner_text() == TERMS_URL
        assert "air gap" in c.page.locator("#why").inner_text()
        assert c.page.locator("a[href^='http'], a[href^='//']").count() == 0
        c.shot("leave-outside-link")
        with c.page.expect_navigation():
            c.page.click("#back")
        assert c.page.url.startswith(srv.url + "/console/")
        c.assert_local_only()
        assert not any("example.com" in u.split("?")[0] for u in c.requests)
        print(f"loaded {len(loaded)} console routes; 404 for every object tried: {not_found}")
    finally:
        c.close()
        srv.stop()


def _seed(db_url: str, protocol_dir: Path) -> tuple[str, str]:
    """In the admin's tenant: a group, two enrollment tokens, a supporter ``sam``, an auditor
    ``ivy``, and an ended session with its protocol file; returns (a token, the session id)."""
    from sqlalchemy import func, select

    from server import accounts, certificates
    from server.db import Database
    from server.db.models import Role, Session, Tenant
    from server.session_protocol import ProtocolWriter, SessionSummary
    sid = str(uuid.uuid4())
    now = dt.datetime.now(dt.timezone.utc)
    db = Database(db_url)
    try:
        with db.session() as s:
            tenant = s.get(Tenant, s.scalar(select(func.min(Tenant.id))))
            group = accounts.add_group(s, tenant, "office")
            token, _ = certificates.create_token(s, tenant, group, 3600, "admin")
            certificates.create_token(s, tenant, group, 3600, "admin")
            accounts.add_user(s, tenant, "sam", Role.supporter, "pw-123456789")
            accounts.add_user(s, tenant, "ivy", Role.auditor, "pw-123456789")
            s.add(Session(id=sid, tenant_id=tenant.id, kind="adhoc",
                          supporter_identity="hausmeister:supporter:sam", peer_identity=None,
                          peer_address="10.0.0.9", created_at=now, started_at=now, ended_at=now,
                          bytes_to_peer=1, bytes_to_supporter=2, end_reason="done"))
            tenant_name = tenant.name
    finally:
        db.dispose()
    writer = ProtocolWriter(protocol_dir)
    writer.append(tenant_name, sid, {"kind": "chat", "actor": "hausmeister:supporter:sam",
                                     "address": "127.0.0.1", "detail": {"text": "see " + TERMS_URL}})
    writer.finish(tenant_name, SessionSummary(sid, "adhoc", now, now, "hausmeister:supporter:sam",
                                              "customer@10.0.0.9", 1, 2, "done"))
    return token, sid


def _probe(c: Console, url: str) -> tuple[int, bool]:
    """Status, and whether the answer is a page to load in the browser (not a file download)."""
    r = c.page.request.get(url, max_redirects=0)
    kind = r.headers.get("content-type", "")
    attachment = "attachment" in r.headers.get("content-disposition", "")
    redirect = 300 <= r.status < 400
    return r.status, redirect or (kind.startswith("text/html") and not attachment)
