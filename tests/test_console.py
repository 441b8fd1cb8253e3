"""The web console in Debian's Chromium (driven by Playwright, never a downloaded browser) against
a real server process: login, lock-out, CSRF refusal, tenant isolation, escaping, no outside
requests.  Screenshots go to test-artifacts/console/.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from server.console import ConsoleSessions
from server.console.sessions import anonymous_csrf
from tests.fixtures_console import PAYLOAD, Console, add_session, tenant_of_admin
from tests.fixtures_server import ADMIN_PASSWORD

BOB_PASSWORD = "bob-password-789"


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_login_pages_csrf_escaping_and_no_outside_requests(running_server, enrolled_host, browser, db_url):
    srv = running_server
    tenant = tenant_of_admin(srv)
    add_session(db_url, tenant, "supporter:alice", "customer:Erika")
    c = Console(browser, srv.url)
    try:
        # Not logged in: every page leads to the login form.
        c.go("/console/hosts")
        assert c.page.url == srv.url + "/console/login"
        cookie = next(k for k in c.context.cookies() if k["name"] == "hm_console")
        assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/console"
        c.shot("login")
        csp = c.go("/console/login").headers["content-security-policy"]
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp

        # Wrong password: an error, no session.
        c.login("admin", "not-the-password")
        assert "wrong user name or password" in c.page.locator("#error").inner_text()
        assert "try again" not in c.page.locator("#error").inner_text()

        # HTML/SQL in the login name comes back as text in the field, never as markup.
        c.login(PAYLOAD, "whatever-password")
        assert c.page.locator("#error").is_visible()
        assert c.page.input_value("#user") == PAYLOAD
        assert c.page.locator("#pwned").count() == 0
        assert c.page.evaluate("window.pwned") is None

        # A login POST with a forged or missing CSRF token is refused before the password is checked.
        c.go("/console/login")
        for token in ("forged-token", None):
            form = {"user": "admin", "password": ADMIN_PASSWORD}
            if token:
                form["csrf"] = token
            r = c.page.request.post(srv.url + "/console/login", form=form, max_redirects=0)
            assert r.status == 403, r.status
            assert "nothing was changed" in r.text()
        c.go("/console/hosts")
        assert c.page.url == srv.url + "/console/login"

        # The right password: the hosts page of the admin's tenant.
        c.login("admin", ADMIN_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        assert "tenant " + tenant in c.page.locator("#who").inner_text()
        row = c.page.locator("tr.host", has_text="pc1")
        assert row.count() == 1
        assert "office" in row.inner_text() and "offline" in row.inner_text()
        assert "never" in row.inner_text()  # enrolled but never connected yet
        c.shot("hosts")

        # Search: a match, and a payload shown as text.
        c.page.fill("#q", "pc")
        with c.page.expect_navigation():
            c.page.click("#search")
        assert c.page.locator("tr.host").count() == 1
        c.page.fill("#q", PAYLOAD)
        with c.page.expect_navigation():
            c.page.click("#search")
        assert c.page.locator("#no-hosts").is_visible()
        assert PAYLOAD in c.page.locator("#query").inner_text()
        assert c.page.input_value("#q") == PAYLOAD
        assert c.page.locator("#pwned").count() == 0
        assert c.page.evaluate("window.pwned") is None
        c.go("/console/hosts")
        assert c.page.locator("tr.host", has_text="pc1").count() == 1  # DROP TABLE did nothing

        # Sessions of the tenant.
        c.page.click("#nav-sessions")
        c.page.wait_for_url(srv.url + "/console/sessions")
        row = c.page.locator("tr.session")
        assert row.count() == 1
        text = row.inner_text()
        for expected in ("ad-hoc", "supporter:alice", "customer:Erika", "56,789", "supporter ended"):
            assert expected in text
        c.shot("sessions")

        # Forged CSRF on logout: 403, still logged in.
        r = c.page.request.post(srv.url + "/console/logout", form={"csrf": "forged-" + c.csrf()},
                                max_redirects=0)
        assert r.status == 403 and "nothing was changed" in r.text()
        # The same in the browser: the hidden field edited in the page.
        c.page.evaluate("document.querySelector('form.logout input[name=csrf]').value = 'forged'")
        with c.page.expect_navigation():
            c.page.click("#logout")
        assert c.page.locator("#forbidden").is_visible()
        c.go("/console/hosts")
        assert c.page.url == srv.url + "/console/hosts"

        # An outside link: the warning page shows the target and does not follow it.
        target = "https://example.com/help?<b>bold</b>"
        c.go("/console/leave?to=" + quote(target, safe=""))
        assert c.page.locator("#target").inner_text() == target
        assert c.page.locator("#target b").count() == 0
        assert c.page.locator("a[href^='http']").count() == 0
        c.shot("leave")

        # Logout with the real token ends the session; the old cookie no longer works.
        c.go("/console/hosts")
        old_cookie = next(k for k in c.context.cookies() if k["name"] == "hm_console")
        with c.page.expect_navigation():
            c.page.click("#logout")
        assert c.page.url == srv.url + "/console/login", c.page.content()
        r = c.page.request.get(srv.url + "/console/hosts", max_redirects=0,
                               headers={"Cookie": f"hm_console={old_cookie['value']}"})
        assert r.status == 303 and r.headers["location"] == "/console/login"

        c.assert_local_only()
        assert not any(urlsplit(u).path == "/console/pwned" for u in c.requests)  # no <img> made
    finally:
        c.close()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_of_another_tenant_sees_nothing_of_tenant_a(running_server, enrolled_host, browser, db_url):
    srv = running_server
    tenant_a = tenant_of_admin(srv)
    srv.ok("tenant", "add", "b")
    srv.ok("user", "add", "bob", "--role", "admin", "--tenant", "b", "--password-stdin",
           stdin=BOB_PASSWORD + "\n")
    add_session(db_url, tenant_a, "supporter:alice", "customer:Erika")
    add_session(db_url, "b", "supporter:bert", "customer:Berta")

    srv.ok("user", "add", "sam", "--role", "supporter", "--email", "sam@support.test",
           "--password-stdin", stdin=BOB_PASSWORD + "\n")

    sam = Console(browser, srv.url)
    bob = Console(browser, srv.url)
    admin = Console(browser, srv.url)
    try:
        # A supporter gets the own account only: no tenant pages, but the protocol-mail opt-in.
        sam.login("sam", BOB_PASSWORD)
        assert sam.page.url == srv.url + "/console/account"
        assert sam.page.locator("#nav-hosts").count() == 0
        assert sam.go("/console/hosts").status == 403
        assert "needs the role admin or auditor" in sam.page.content()
        r = sam.page.request.post(srv.url + "/console/users/1/role", max_redirects=0,
                                  form={"csrf": sam.csrf(), "role": "admin"})
        assert r.status == 403
        sam.go("/console/account")
        assert sam.page.locator("#protocol-mail-state").inner_text().startswith("Off")
        with sam.page.expect_navigation():
            sam.page.click("#protocol-mail-toggle")
        assert "mailed to you" in sam.page.locator("#notice").inner_text()
        assert "sam@support.test" in sam.page.locator("#protocol-mail-state").inner_text()
        sam.shot("account-supporter")
        sam.assert_local_only()

        bob.login("bob", BOB_PASSWORD)
        assert bob.page.url == srv.url + "/console/hosts"
        assert "tenant b" in bob.page.locator("#who").inner_text()
        assert bob.page.locator("tr.host").count() == 0
        assert "pc1" not in bob.page.content()
        bob.go("/console/hosts?q=pc1")
        assert bob.page.locator("tr.host").count() == 0
        bob.go("/console/sessions")
        rows = bob.page.locator("tr.session")
        assert rows.count() == 1 and "Berta" in rows.inner_text()
        assert "Erika" not in bob.page.content()
        bob.shot("sessions-tenant-b")

        admin.login("admin", ADMIN_PASSWORD)
        assert admin.page.locator("tr.host", has_text="pc1").count() == 1
        admin.go("/console/sessions")
        assert admin.page.locator("tr.session").count() == 1
        assert "Erika" in admin.page.content() and "Berta" not in admin.page.content()

        # Bob's cookie in the admin's browser is just bob's session: still tenant b.
        bob_cookie = next(k for k in bob.context.cookies() if k["name"] == "hm_console")
        r = admin.page.request.get(srv.url + "/console/hosts",
                                   headers={"Cookie": f"hm_console={bob_cookie['value']}"})
        assert r.status == 200 and "pc1" not in r.text() and "tenant b" in r.text()

        bob.assert_local_only()
        admin.assert_local_only()
    finally:
        sam.close()
        bob.close()
        admin.close()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_repeated_wrong_passwords_lock_out(running_server, browser):
    srv = running_server  # lockout_free_attempts = 2, base 30 s (tests/fixtures_server.py)
    c = Console(browser, srv.url)
    try:
        messages = []
        for _ in range(3):
            c.login("admin", "wrong-password-again")
            messages.append(c.page.locator("#error").inner_text())
        assert "try again" not in messages[0]
        assert "try again in 30 s" in messages[-1]
        # Locked: even the right password is refused now, and nothing is logged in.
        c.login("admin", ADMIN_PASSWORD)
        assert c.page.url == srv.url + "/console/login"
        assert "try again in" in c.page.locator("#error").inner_text()
        c.shot("locked-out")
        c.go("/console/hosts")
        assert c.page.url == srv.url + "/console/login"
        c.assert_local_only()
    finally:
        c.close()


def test_idle_sessions_expire_and_login_replaces_the_id():
    now = [1000.0]
    sessions = ConsoleSessions(idle_seconds=900, clock=lambda: now[0])
    anon = sessions.new()
    assert len(anon.id) >= 43 and anon.csrf != anon.id  # 256 bits, url-safe base64
    # before login the token follows from the (secret) cookie: every node checks it alike
    assert anon.csrf == anonymous_csrf(anon.id) != anonymous_csrf(ConsoleSessions().new().id)
    assert len(anon.csrf) == 64 and anon.id not in anon.csrf
    user = sessions.login(anon, "admin", "admin", 1, "default")
    assert user.id != anon.id and user.csrf != anon.csrf
    assert sessions.get(anon.id) == (None, False)
    now[0] += 899
    assert sessions.get(user.id)[0] is user  # activity moves the idle deadline
    now[0] += 899
    assert sessions.get(user.id)[0] is user
    now[0] += 901
    assert sessions.get(user.id) == (None, True)  # expired, and said so once
    assert sessions.get(user.id) == (None, False)
    assert len(sessions) == 0


def test_templates_carry_no_outside_url_inline_script_or_style():
    """Everything the console serves comes from offline_pages/: no URL a browser would fetch
    elsewhere, no inline script or style (the CSP would block them anyway)."""
    pages = Path(__file__).resolve().parent.parent / "offline_pages"
    files = sorted((pages / "console").glob("*.html")) + [pages / "static" / "console.css"]
    assert len(files) >= 8
    for path in files:
        text = path.read_text()
        for bad in ("http://", "https://", "src=\"//", "href=\"//", "url(", "@import",
                    "<script", " style=", "<style", "javascript:"):
            assert bad not in text, f"{bad!r} in {path.name}"
        assert not re.search(r"\son[a-z]+\s*=", text), f"event handler attribute in {path.name}"


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_oversized_body_is_refused_unread_and_the_server_goes_on(running_server):
    """A multipart upload far beyond avatars.max_upload_kib gets 413 before Twisted parses or
    keeps it; the next request is served as usual."""
    import http.client
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    port = int(urlsplit(running_server.url).port)

    def post(body, headers: dict, chunked: bool = False) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        try:
            conn.request("POST", "/console/avatar", body=body, headers=headers,
                         encode_chunked=chunked)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    boundary = "hm-boundary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"picture\"; "
            f"filename=\"big.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    body = part + b"\0" * (3 * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    status, text = post(body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413 and b"nothing was stored" in text
    # the same body sent chunked (no length announced) is cut off as well
    status, text = post(iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                        {"Content-Type": f"multipart/form-data; boundary={boundary}",
                         "Transfer-Encoding": "chunked"}, chunked=True)
    assert status == 413
    status, _ = post(b"csrf=x", {"Content-Type": "application/x-www-form-urlencoded"})
    assert status in (303, 403)  # an ordinary small POST is handled by the console again
