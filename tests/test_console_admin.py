"""The console's admin pages (users, enrollment tokens, certificates, audit log) in Debian's
Chromium against a real server process, a real aiosmtpd relay on loopback for the invitation mail
and a real host module enrolled with a token made in the browser.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import shlex
import uuid
from urllib.parse import quote, urlsplit

import pytest
from sqlalchemy import delete, select

from server import certificates, user_links
from server.db import Database
from server.db.models import AuditEntry, Certificate, EnrollmentToken, User
from tests.fixtures_console import PAYLOAD, Console
from tests.fixtures_mail import mail_toml
from tests.fixtures_server import ADMIN_PASSWORD, ServerProcess, run_cli, write_config
from tests.module_process import ModuleProcess

BOB_PASSWORD = "bob-password-789"
AUDREY_PASSWORD = "audrey-password-012"


@pytest.fixture
def mail_server(tmp_path, db_url, smtp_inbox):
    """A running server whose mail goes to the aiosmtpd relay on loopback."""
    _, port = smtp_inbox
    data = tmp_path / "data"
    config = write_config(tmp_path / "hausmeister.toml", data, db_url, extra=mail_toml(port))
    srv = ServerProcess(config, data)
    result = srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    srv.start()
    yield srv
    srv.stop()


def submit(c: Console, selector: str) -> None:
    with c.page.expect_navigation():
        c.page.click(selector)


def no_markup(c: Console) -> None:
    assert c.page.locator("#pwned").count() == 0
    assert c.page.evaluate("window.pwned") is None


def user_id(c: Console, name: str) -> str:
    """The id of the user row named exactly ``name`` on the users page."""
    for row in c.page.locator("tr.user").all():
        if row.locator("td.name").inner_text() == name:
            return row.get_attribute("id").removeprefix("user-")
    raise AssertionError(f"no user {name!r} on the page")


def row_id(c: Console, row_selector: str, prefix: str) -> str:
    return c.page.locator(row_selector).first.get_attribute("id").removeprefix(prefix)


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_admin_invites_supporter_enrolls_host_with_token_and_revokes_its_certificate(
        mail_server, smtp_inbox, browser, db_url, tmp_path):
    srv = mail_server
    relay, _ = smtp_inbox
    srv.ok("group", "add", "office")
    c = Console(browser, srv.url)
    with contextlib.ExitStack() as stack:
        stack.callback(c.close)
        c.login("admin", ADMIN_PASSWORD)
        c.page.click("#nav-users")
        c.page.wait_for_url(srv.url + "/console/users")
        assert c.page.locator("tr.user").count() == 1  # the admin

        # HTML/SQL as a user name and as a mail address: refused, shown as text, nothing added.
        c.page.fill("#new-name", PAYLOAD)
        submit(c, "#add")
        assert "is not valid" in c.page.locator("#error").inner_text()
        assert c.page.input_value("#new-name") == PAYLOAD
        no_markup(c)
        c.page.fill("#new-name", "carla")
        c.page.fill("#new-email", PAYLOAD)
        submit(c, "#add")
        assert "not a single mail address" in c.page.locator("#error").inner_text()
        assert c.page.input_value("#new-email") == PAYLOAD
        no_markup(c)
        c.go("/console/users")
        assert c.page.locator("tr.user").count() == 1

        # A supporter with a mail address, limited to the group "office".
        c.page.fill("#new-name", "carla")
        c.page.select_option("#new-role", "supporter")
        c.page.fill("#new-email", "carla@support.test")
        c.page.check("input[name=groups]")
        submit(c, "#add")
        assert "invitation mail to carla@support.test is queued" in c.page.locator("#notice").inner_text()
        assert c.page.locator("#invite-link").count() == 0  # mailed, so not shown
        carla = c.page.locator("tr.user", has_text="carla")
        assert "supporter" in carla.inner_text() and "office" in carla.inner_text()
        c.shot("users")

        # The same name again: a clear refusal.
        c.page.fill("#new-name", "carla")
        submit(c, "#add")
        assert "already exists" in c.page.locator("#error").inner_text()

        # An enrollment token for the group, shown once with the exact enroll command.
        c.page.click("#nav-tokens")
        c.page.wait_for_url(srv.url + "/console/tokens")
        assert c.page.input_value("#token-ttl") == "1h"  # security.token_default_ttl
        c.page.select_option("#token-group", label="office")
        c.page.select_option("#token-ttl", "1d")
        submit(c, "#create")
        token = c.page.locator("#token").inner_text()
        assert re.fullmatch(r"[0-9a-f]{32}", token)
        command = c.page.locator("#command").inner_text()
        assert command == (f"hausmeister-host enroll --server {srv.url} --ca-fingerprint "
                           f"{srv.fingerprint} --token {token}")

        # The invitation mail reached the relay, with a link that works.
        [mail] = relay.wait("your account carla")
        assert mail["X-Envelope-To"] == "carla@support.test"
        body = mail.get_content()
        link = re.search(re.escape(srv.url) + r"/console/invite/([A-Za-z0-9_-]+)", body)
        assert link, body
        assert "admin" in body and "carla" in body and "7 days" in body
        db = Database(db_url)
        try:
            with db.session() as s:
                assert user_links.check(s, link.group(1), "invite").name == "carla"
        finally:
            db.dispose()

        # The shown command enrolls a real host module.
        home = tmp_path / "pc-carla"
        args = shlex.split(command)[1:] + ["--name", "pc-carla", "--home", str(home)]
        result = run_cli("host", *args)
        assert result.returncode == 0, result.stderr
        assert run_cli("host", "set-password", "--password-stdin", "--home", str(home),
                       stdin="host-password-1\n").returncode == 0
        host = ModuleProcess("host", "run", "--max-backoff", "0.5", "--home", str(home))
        stack.callback(host.stop)
        host.wait_for_line("online; waiting for supporters")
        c.go("/console/tokens")
        used = c.page.locator("tr.token", has_text="pc-carla")
        assert used.count() == 1 and "used" in used.inner_text() and "office" in used.inner_text()
        assert used.locator("button.revoke").count() == 0

        # A second token, revoked in the browser, enrolls nothing.
        submit(c, "#create")
        second = c.page.locator("#token").inner_text()
        c.go("/console/tokens")
        fresh = c.page.locator("tr.token", has_text="unused")
        assert fresh.count() == 1
        with c.page.expect_navigation():
            fresh.locator("button.revoke").click()
        assert "revoked" in c.page.locator("#notice").inner_text()
        assert c.page.locator("tr.token", has_text="unused").count() == 0
        assert c.page.locator("tr.token td.state.revoked").count() == 1
        c.shot("tokens")
        result = run_cli("host", "enroll", "--server", srv.url, "--ca-fingerprint", srv.fingerprint,
                         "--token", second, "--name", "pc-late", "--home", str(tmp_path / "late"))
        assert result.returncode != 0 and "expired" in result.stderr

        # Certificates: the CA with its fingerprint, and the new host's certificate, revoked.
        c.page.click("#nav-certificates")
        c.page.wait_for_url(srv.url + "/console/certificates")
        assert c.page.locator("#ca-fingerprint").inner_text() == srv.fingerprint
        pem = c.page.request.get(srv.url + "/console/certificates/ca.pem")
        assert pem.status == 200 and "attachment" in pem.headers["content-disposition"]
        assert pem.body() == c.page.request.get(srv.url + "/ca.pem").body()
        host_row = c.page.locator("tr.cert", has_text="pc-carla")
        assert host_row.count() == 1 and "valid" in host_row.inner_text()
        serial = host_row.get_attribute("id").removeprefix("cert-")
        assert c.page.locator("tr.cert", has_text="this server").count() == 1  # operator admin
        host_row.locator("input[name=reason]").fill(PAYLOAD)
        with c.page.expect_navigation():
            host_row.locator("button.revoke").click()
        assert serial in c.page.locator("#notice").inner_text()
        host_row = c.page.locator(f"#cert-{serial}")
        assert host_row.locator("td.state").inner_text().startswith("revoked")
        assert host_row.locator(".reason").inner_text() == PAYLOAD
        no_markup(c)
        c.shot("certificates")
        listed = next(line for line in srv.ok("cert", "list").splitlines() if line.startswith(serial))
        assert "revoked" in listed.split()
        # The running host module is dropped at once and refused when it tries again.
        host.wait_for_line("lost the server", timeout=10)
        host.wait_for_line("the server refused this host", timeout=10)
        c.go("/console/hosts")
        assert "offline" in c.page.locator("tr.host", has_text="pc-carla").inner_text()

        # Changing a user: disable and enable carla, a payload as address is refused.
        c.go("/console/users")
        carla_id = user_id(c, "carla")
        c.go(f"/console/users/{carla_id}")
        submit(c, "#disable")
        assert c.page.locator("#state").inner_text() == "disabled"
        submit(c, "#enable")
        assert c.page.locator("#state").inner_text() == "active"
        c.page.fill("#email-input", PAYLOAD)
        submit(c, "#save-email")
        assert "not a single mail address" in c.page.locator("#error").inner_text()
        assert c.page.locator("#email").inner_text() == "carla@support.test"
        no_markup(c)
        submit(c, "#toggle-protocol-mail")
        assert c.page.locator("#protocol-mail").inner_text() == "yes"
        c.shot("user-edit")

        # The admin can neither disable nor demote themselves (even with a hand-made POST).
        c.go("/console/users")
        admin_id = user_id(c, "admin")
        for action, form in (("disable", {}), ("role", {"role": "auditor"})):
            r = c.page.request.post(f"{srv.url}/console/users/{admin_id}/{action}",
                                    form={"csrf": c.csrf(), **form}, max_redirects=0)
            assert r.status == 400 and "yourself" in r.text(), (action, r.status)
        # No CSRF token, or a forged one: refused before anything is read.
        for token_value in (None, "forged"):
            form = {"name": "mallory", "role": "admin"}
            if token_value:
                form["csrf"] = token_value
            r = c.page.request.post(srv.url + "/console/users/add", form=form, max_redirects=0)
            assert r.status == 403 and "nothing was changed" in r.text()
        c.go("/console/users")
        assert c.page.locator("tr.user", has_text="mallory").count() == 0
        assert "admin" in c.page.locator(f"#user-{admin_id}").inner_text()

        # Audit log: every action above, with a filter; a payload filter is just text.
        c.page.click("#nav-audit")
        c.page.wait_for_url(srv.url + "/console/audit")
        actions = c.page.locator("tr.entry td.action").all_inner_texts()
        for expected in ("user.add", "token.create", "token.revoke", "certificate.revoke",
                         "user.disable", "user.enable", "user.protocol_mail", "console.login"):
            assert any(a.startswith(expected) for a in actions), (expected, actions)
        c.shot("audit")
        c.page.fill("#action", "token.")
        submit(c, "#filter")
        actions = c.page.locator("tr.entry td.action").all_inner_texts()
        assert actions and all(a.startswith("token.") for a in actions)
        c.page.fill("#action", "")
        c.page.fill("#actor", PAYLOAD)
        submit(c, "#filter")
        assert c.page.locator("#no-entries").is_visible()
        assert PAYLOAD in c.page.locator("#query").inner_text()
        no_markup(c)

        c.assert_local_only()
        assert not any(urlsplit(u).path == "/console/pwned" for u in c.requests)


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_other_tenant_and_auditor_cannot_see_or_change(running_server, enrolled_host, browser):
    srv = running_server  # no mail relay: invitation links are shown once on the page
    srv.ok("tenant", "add", "b")
    srv.ok("user", "add", "bob", "--role", "admin", "--tenant", "b", "--password-stdin",
           stdin=BOB_PASSWORD + "\n")
    srv.ok("user", "add", "audrey", "--role", "auditor", "--password-stdin",
           stdin=AUDREY_PASSWORD + "\n")
    admin, bob, audrey = (Console(browser, srv.url) for _ in range(3))
    try:
        admin.login("admin", ADMIN_PASSWORD)
        admin.go("/console/users")
        admin.page.fill("#new-name", "dora")
        admin.page.fill("#new-email", "dora@support.test")
        submit(admin, "#add")
        link = admin.page.locator("#invite-link").inner_text()
        assert link.startswith(srv.url + "/console/invite/")
        assert "No invitation mail was sent" in admin.page.locator("#notice").inner_text()
        dora_id = user_id(admin, "dora")
        office_id = admin.page.locator("input[name=groups]").first.get_attribute("value")
        admin.go("/console/tokens")
        submit(admin, "#create")
        admin.go("/console/tokens")
        token_id = row_id(admin, "tr.token:has-text('unused')", "token-")
        admin.go("/console/certificates")
        serial = row_id(admin, "tr.cert:has-text('pc1')", "cert-")

        # Bob, admin of tenant b, sees nothing of tenant A.
        bob.login("bob", BOB_PASSWORD)
        bob.go("/console/users")
        assert bob.page.locator("tr.user").all_inner_texts()[0].startswith("bob")
        assert bob.page.locator("tr.user").count() == 1
        bob.go(f"/console/users/{dora_id}")
        assert "dora" not in bob.page.content()
        bob.go("/console/tokens")
        assert bob.page.locator("tr.token").count() == 0
        bob.go("/console/certificates")
        assert bob.page.locator("tr.cert").count() == 0  # neither pc1 nor the server's
        assert serial not in bob.page.content()
        bob.go("/console/audit")
        text = bob.page.locator("#audit").inner_text()
        assert "console.login" in text and "dora" not in text and "token.create" not in text
        assert "tenant.add" not in text  # server-wide entries are for operator admins
        # Forged POSTs with tenant A's ids: refused as unknown, nothing changes.
        csrf = bob.csrf()
        for path, form, status in (
                (f"users/{dora_id}/disable", {}, 404),
                (f"users/{dora_id}/email", {"email": "x@y.test"}, 404),
                (f"tokens/{token_id}/revoke", {}, 404),
                (f"certificates/{serial}/revoke", {"reason": "forged"}, 404),
                ("users/add", {"name": "bert", "role": "supporter", "groups": office_id}, 400),
                ("tokens/create", {"group": office_id, "ttl": "1h"}, 400)):
            r = bob.page.request.post(f"{srv.url}/console/{path}", form={"csrf": csrf, **form},
                                      max_redirects=0)
            assert r.status == status, (path, r.status)
            assert "dora" not in r.text() and "pc1" not in r.text()
        # A name taken in tenant A is "taken", and nothing more about it.
        r = bob.page.request.post(f"{srv.url}/console/users/add", max_redirects=0,
                                  form={"csrf": csrf, "name": "dora", "role": "supporter"})
        assert r.status == 400 and "user &#39;dora&#39; already exists" in r.text()
        assert "dora@support.test" not in r.text() and "default" not in r.text().split('<main id="main"')[1]
        bob.go("/console/users")
        assert bob.page.locator("tr.user").count() == 1  # no bert or dora either
        bob.shot("users-tenant-b")

        # The auditor of tenant A sees every page and changes nothing.
        audrey.login("audrey", AUDREY_PASSWORD)
        for page in ("users", f"users/{dora_id}", "tokens", "certificates", "audit"):
            assert audrey.go(f"/console/{page}").status == 200, page
        audrey.go("/console/users")
        assert audrey.page.locator("tr.user", has_text="dora").count() == 1
        assert audrey.page.locator("#add-user").count() == 0
        audrey.go("/console/certificates")
        assert audrey.page.locator("button.revoke").count() == 0
        csrf = audrey.csrf()
        for path, form in ((f"users/{dora_id}/disable", {}), ("users/add", {"name": "eve"}),
                           ("tokens/create", {}), (f"tokens/{token_id}/revoke", {}),
                           (f"certificates/{serial}/revoke", {"reason": "auditor"})):
            r = audrey.page.request.post(f"{srv.url}/console/{path}", form={"csrf": csrf, **form},
                                         max_redirects=0)
            assert r.status == 403, (path, r.status)

        # Tenant A is as it was: dora active, the token unused, pc1's certificate valid.
        admin.go("/console/users")
        assert "active" in admin.page.locator(f"#user-{dora_id}").inner_text()
        admin.go("/console/tokens")
        assert "unused" in admin.page.locator(f"#token-{token_id}").inner_text()
        admin.go("/console/certificates")
        assert "valid" in admin.page.locator(f"#cert-{serial} td.state").inner_text()
        admin.go("/console/audit?action=" + quote("tenant.add"))
        assert admin.page.locator("tr.entry.server-wide").count() == 1  # operator: server-wide too

        # Disabling audrey ends her console session at once.
        admin.go("/console/users")
        admin.go(f"/console/users/{user_id(admin, 'audrey')}")
        submit(admin, "#disable")
        assert admin.page.locator("#state").inner_text() == "disabled"
        audrey.go("/console/users")
        assert audrey.page.url == srv.url + "/console/login"

        for c in (admin, bob, audrey):
            c.assert_local_only()
    finally:
        for c in (admin, bob, audrey):
            c.close()


# --- the tenant scoping of the page queries, on both database backends ----------------------------

T0 = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.UTC)


def _world(session) -> dict:
    """Two tenants, each with a group, a host, a supporter, a token, certificates, audit entries."""
    from server import accounts
    from server.db.models import Certificate, CertRole, Host, Role

    out = {}
    for name in ("a", "b"):
        tenant = accounts.get_or_create_tenant(session, name)
        group = accounts.add_group(session, tenant, f"office-{name}")
        user = accounts.add_user(session, tenant, f"sup-{name}", Role.supporter, "x" * 12)
        host_id = str(uuid.uuid4())
        session.add(Host(id=host_id, tenant_id=tenant.id, group_id=group.id, name=f"pc-{name}",
                         enrolled_at=T0))
        _, token = certificates.create_token(session, tenant, group, 3600, "admin")
        for serial, role, identity in ((f"a1{name}", CertRole.host, f"hausmeister:host:{host_id}"),
                                       (f"b2{name}", CertRole.supporter, f"hausmeister:supporter:sup-{name}")):
            session.add(Certificate(serial=serial, role=role, identity=identity, fingerprint=serial * 4,
                                    not_before=T0, not_after=T0 + dt.timedelta(days=365), pem="-",
                                    issued_at=T0))
        accounts.audit(session, "admin", f"thing.{name}", "100% _done_", tenant_id=tenant.id)
        out[name] = {"tenant": tenant.id, "group": group.id, "user": user.id, "token": token.id}
    session.add(Certificate(serial="c3", role=CertRole.server, identity="localhost", fingerprint="c3" * 32,
                            not_before=T0, not_after=T0 + dt.timedelta(days=365), pem="-", issued_at=T0))
    accounts.audit(session, "cli", "tenant.add", "name=b")
    session.flush()
    return out


def test_page_queries_never_cross_tenants(database, fast_password_hashing):
    from server import accounts
    from server.console import (
        PageError,
        pages_audit,
        pages_certs,
        pages_tokens,
        pages_users,
    )

    with database.session() as s:
        w = _world(s)
    a, b = w["a"], w["b"]
    with database.session() as s:
        users = pages_users.listing(s, a["tenant"])
        assert [u["name"] for u in users["users"]] == ["sup-a"]
        assert [g["name"] for g in users["groups"]] == ["office-a"]
        certs = pages_certs.tenant_certificates(s, a["tenant"], operator=False)
        assert sorted((c["serial"], c["owner"]) for c in certs) == [("a1a", "pc-a"), ("b2a", "sup-a")]
        certs = pages_certs.tenant_certificates(s, a["tenant"], operator=True)
        assert "c3" in {c["serial"] for c in certs}
        assert [t["id"] for t in pages_tokens._tokens(s, a["tenant"])] == [a["token"]]
        entries = pages_audit._entries(s, a["tenant"], False, "", "", 0)["entries"]
        assert [e["action"] for e in entries] == ["thing.a"]
        entries = pages_audit._entries(s, a["tenant"], True, "", "", 0)["entries"]
        assert {e["action"] for e in entries} == {"thing.a", "tenant.add"}
        # LIKE wildcards in a filter are plain characters.
        assert pages_audit._entries(s, a["tenant"], True, "", "%", 0)["entries"] == []
        assert pages_audit._entries(s, a["tenant"], True, "", "_", 0)["entries"] == []

    # Tenant a's admin reaching for tenant b's objects: "not found", nothing changed.
    refusals = [
        lambda s: pages_users._apply(s, a["tenant"], str(b["user"]), "admin", 0, "user.disable",
                                     pages_users.change_disabled, (True,)),
        lambda s: pages_tokens._revoke(s, a["tenant"], "admin", str(b["token"])),
        lambda s: pages_certs._revoke(s, a["tenant"], "admin", "a1b", "forged"),
        lambda s: pages_certs._revoke(s, a["tenant"], "admin", "c3", "the server's"),
        lambda s: pages_users._apply(s, a["tenant"], "²", "admin", 0, "user.disable",
                                     pages_users.change_disabled, (True,)),
    ]
    for attempt in refusals:
        with pytest.raises(PageError) as refused:
            database.call(attempt)
        assert refused.value.status == 404
    for attempt in (lambda s: pages_tokens._create(s, a["tenant"], "admin", str(b["group"]), "1h"),
                    lambda s: pages_users.change_groups(s, s.get(User, a["user"]), 0, [str(b["group"])]),
                    lambda s: pages_tokens._create(s, a["tenant"], "admin", "", "999d")):
        with pytest.raises(accounts.AccountError):
            database.call(attempt)
    # Changes within the tenant: groups set and cleared, TOTP reset once, audited with the tenant.
    said = database.call(pages_users._apply, a["tenant"], str(a["user"]), "admin", 0, "user.groups",
                         pages_users.change_groups, ([str(a["group"])],))
    assert said == "sup-a"
    with database.session() as s:
        s.get(User, a["user"]).totp_secret = "JBSWY3DPEHPK3PXP"
    database.call(pages_users._apply, a["tenant"], str(a["user"]), "admin", 0, "user.totp_reset",
                  pages_users.reset_totp, ())
    with pytest.raises(accounts.AccountError, match="no TOTP"):
        database.call(pages_users._apply, a["tenant"], str(a["user"]), "admin", 0, "user.totp_reset",
                      pages_users.reset_totp, ())
    with database.session() as s:
        assert pages_users.listing(s, a["tenant"])["users"][0]["groups"] == ["office-a"]
        assert s.get(User, a["user"]).totp_secret is None
        rows = s.execute(select(AuditEntry.action, AuditEntry.tenant_id, AuditEntry.detail)
                         .where(AuditEntry.action.in_(["user.groups", "user.totp_reset"]))).all()
        assert [(r[0], r[1]) for r in rows] == [("user.groups", a["tenant"]),
                                                ("user.totp_reset", a["tenant"])]
        s.execute(delete(AuditEntry).where(AuditEntry.action.in_(["user.groups", "user.totp_reset"])))
    # Self-protection: an admin cannot disable or demote themselves.
    with pytest.raises(accounts.AccountError, match="yourself"):
        database.call(lambda s: pages_users.change_disabled(s, s.get(User, a["user"]), a["user"], True))
    with pytest.raises(accounts.AccountError, match="yourself"):
        database.call(lambda s: pages_users.change_role(s, s.get(User, a["user"]), a["user"], "auditor"))
    with database.session() as s:
        assert not s.get(User, b["user"]).disabled
        assert s.get(EnrollmentToken, b["token"]).expires_at > dt.datetime.now(dt.UTC)
        assert all(c.revoked_at is None for c in s.scalars(select(Certificate)))
        assert [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.id))] == [
            "thing.a", "thing.b", "tenant.add"]
