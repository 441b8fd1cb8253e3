"""Directory sign-in against a real OpenLDAP (Debian's slapd, started by the test on 127.0.0.1
with TLS from a trustme CA, people and nested groups loaded with ldapadd).

The client alone (LDAPS and StartTLS, nested groups through memberOf and through group search,
wrong passwords, no mapped group, a wrong CA, a stopped directory), then a real server process:
console login in Debian's Chromium, ``hausmeister-supporter enroll`` through the real CLI, the sync
revoking a removed user's certificate (the live module connection drops), and the directory down:
a clear message in English and German while the local break-glass admin still gets in.
Screenshots go to test-artifacts/console/.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from sqlalchemy import select

from server.config import ConfigError
from server.db import Database
from server.db.models import AuditEntry, Certificate
from server.directory.client import Directory, DirectoryRefused, DirectoryUnavailable
from tests.fixtures_console import Console
from tests.fixtures_ldap import (  # noqa: F401  (slapd is a fixture)
    ADMINS, HELPDESK, LEVEL1, PEOPLE, Slapd, directory_section, password_of, slapd,
)
from tests.fixtures_server import ADMIN_PASSWORD, ServerProcess, run_cli, write_config
from tests.test_e2e_enrollment import module_tls, refused_at_handshake


# --- the client against slapd -------------------------------------------------------------------

@pytest.mark.parametrize("lookup", ["member", "memberof"])
@pytest.mark.parametrize("security", ["ldaps", "starttls"])
def test_directory_admits_mapped_users_through_nested_groups(slapd: Slapd, lookup, security):
    url = slapd.ldaps_url if security == "ldaps" else slapd.ldap_url
    directory = Directory(directory_section(slapd, group_lookup=lookup, security=security,
                                            servers=[url]))
    alice = directory.authenticate("alice", password_of("alice"))  # helpdesk via helpdesk-level1
    assert (alice.name, alice.role, alice.tenant) == ("alice", "supporter", "default")
    assert alice.mail == "alice@example.test" and alice.dn == f"uid=alice,{PEOPLE}"
    assert directory.authenticate("adam", password_of("adam")).role == "admin"
    carol = directory.authenticate("carol", password_of("carol"))
    assert carol.role == "auditor" and carol.mail is None

    with pytest.raises(DirectoryRefused) as wrong:
        directory.authenticate("alice", "not-her-password")
    assert not wrong.value.password_ok
    with pytest.raises(DirectoryRefused) as no_group:
        directory.authenticate("bob", password_of("bob"))
    assert no_group.value.password_ok and "no group" in str(no_group.value)
    for name, password in (("nobody", "x-password-1"), ("alice", ""), ("*", "x"),
                           ("alice)(uid=*", password_of("alice"))):
        with pytest.raises(DirectoryRefused):
            directory.authenticate(name, password)

    verdicts = directory.still_admitted(["alice", "bob", "zed"])
    assert verdicts["alice"].role == "supporter"
    assert "no group" in verdicts["bob"] and "not found" in verdicts["zed"]


def test_direct_user_bind_with_a_dn_template(slapd: Slapd):
    directory = Directory(directory_section(slapd, user_bind_template=f"uid={{user}},{PEOPLE}"))
    assert directory.authenticate("alice", password_of("alice")).role == "supporter"
    with pytest.raises(DirectoryRefused):
        directory.authenticate("alice", password_of("adam"))


def test_wrong_ca_and_stopped_directory_are_unavailable_not_refused(slapd: Slapd):
    with pytest.raises(DirectoryUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        Directory(directory_section(slapd, ca_bundle="")).authenticate("alice", password_of("alice"))
    with pytest.raises(DirectoryUnavailable, match="service account"):
        Directory(directory_section(slapd, bind_password="wrong-one")).authenticate(
            "alice", password_of("alice"))
    slapd.stop()
    started = time.monotonic()
    directory = Directory(directory_section(slapd))
    with pytest.raises(DirectoryUnavailable, match="no directory server answered"):
        directory.authenticate("alice", password_of("alice"))
    with pytest.raises(DirectoryUnavailable):
        directory.still_admitted(["alice"])
    assert time.monotonic() - started < 5


def test_config_refuses_plain_ldap_unless_allowed_and_needs_the_service_account(slapd: Slapd):
    with pytest.raises(ConfigError, match="plain LDAP sends passwords unencrypted"):
        directory_section(slapd, security="plain", servers=[slapd.ldap_url])
    plain = directory_section(slapd, security="plain", servers=[slapd.ldap_url], allow_plain=True)
    assert Directory(plain).authenticate("alice", password_of("alice")).role == "supporter"
    with pytest.raises(ConfigError, match="every server must start with ldaps://"):
        directory_section(slapd, servers=[slapd.ldap_url])
    with pytest.raises(ConfigError, match="directory.bind_dn"):
        directory_section(slapd, bind_dn="")
    with pytest.raises(ConfigError, match="directory.groups"):
        directory_section(slapd, groups=[{"group": ADMINS, "role": "root", "tenant": "t"}])


# --- a real server with the directory ------------------------------------------------------------

def directory_server(tmp_path, slapd: Slapd, db_url: str) -> ServerProcess:
    data = tmp_path / "data"
    config = write_config(tmp_path / "hausmeister.toml", data, db_url,
                          extra=slapd.directory_toml(sync="1s"))
    srv = ServerProcess(config, data)
    srv.ok("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")  # the local break-glass admin
    return srv.start()


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def recorded(db_url: str) -> tuple[dict[str, str], list[str]]:
    """Revocation reasons by identity, and the directory's audit entries, from the database."""
    db = Database(db_url)
    try:
        with db.session() as s:
            reasons = {c.identity: c.revocation_reason for c in s.scalars(
                select(Certificate).where(Certificate.revoked_at.is_not(None)))}
            audit = [f"{a.action} {a.detail}" for a in s.scalars(
                select(AuditEntry).where(AuditEntry.actor == "directory"))]
        return reasons, audit
    finally:
        db.dispose()


def shown_user(c: Console) -> str:
    return c.page.locator("#who").inner_text()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_console_login_enroll_and_sync_against_the_directory(tmp_path, slapd: Slapd, db_url,
                                                             browser):
    srv = directory_server(tmp_path, slapd, db_url)
    try:
        c = Console(browser, srv.url)
        try:
            c.go("/console/login")
            assert "directory" in c.page.locator("#directory-hint").inner_text()
            c.login("adam", password_of("adam"))           # directory admin
            assert c.page.url == srv.url + "/console/hosts", c.page.content()
            assert "adam" in shown_user(c) and "admin" in shown_user(c).lower()
            c.context.clear_cookies()
            c.login("alice", "not-her-password")
            assert "wrong user name or password" in c.page.locator("#error").inner_text()
            c.login("bob", password_of("bob"))               # right password, no mapped group
            assert "not in a directory group" in c.page.locator("#error").inner_text()
            c.login("alice", password_of("alice"))           # supporter: her own account page
            assert c.page.url == srv.url + "/console/account"
            assert "alice" in shown_user(c)
        finally:
            c.close()
        users = srv.ok("user", "list")
        assert "alice" in users and "adam" in users and "bob" not in users
        assert f"directory:         127.0.0.1:{slapd.ldaps_port} (ldaps, service account bound)" \
            in srv.ok("check")

        # the supporter module enrolls with the directory password, through the real CLI
        home = tmp_path / "alice-module"
        enrolled = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                           srv.fingerprint, "--user", "alice", "--password-stdin", "--home",
                           str(home), stdin=password_of("alice") + "\n")
        assert enrolled.returncode == 0, enrolled.stderr
        assert "hausmeister:supporter:alice" in enrolled.stdout
        refused = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                          srv.fingerprint, "--user", "bob", "--password-stdin", "--home",
                          str(tmp_path / "bob-module"), stdin=password_of("bob") + "\n")
        assert refused.returncode != 0 and "not in a directory group" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        # a live module connection; then alice leaves the group: the sync revokes and drops it
        live = module_tls(srv, home / "cert.pem", home / "key.pem")
        live.settimeout(0.2)
        with pytest.raises(socket.timeout):
            live.recv(1)
        slapd.remove_member(LEVEL1, f"uid=alice,{PEOPLE}")
        wait_for(lambda: any(line.split()[3:4] == ["revoked"] and line.endswith(":alice")
                             for line in srv.ok("cert", "list").splitlines()), 30,
                 "the sync revoking alice's certificate")
        reasons, audit = recorded(db_url)
        assert reasons == {"hausmeister:supporter:alice": "removed from the directory"}
        assert any(a.startswith("user.disable alice: ") and "in no group" in a for a in audit)
        live.settimeout(15)
        try:
            assert live.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass  # dropped either way
        live.close()
        assert refused_at_handshake(lambda: module_tls(srv, home / "cert.pem", home / "key.pem"))
        assert "disabled" in [line for line in srv.ok("user", "list").splitlines()
                              if line.split()[:1] == ["alice"]][0]

        # back in the group, she is still disabled until an admin enables her: no silent return
        slapd.add_member(LEVEL1, f"uid=alice,{PEOPLE}")
        c = Console(browser, srv.url)
        try:
            c.login("alice", password_of("alice"))
            assert "disabled" in c.page.locator("#error").inner_text()
        finally:
            c.close()
    finally:
        srv.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_directory_down_says_so_and_the_break_glass_admin_still_works(tmp_path, slapd: Slapd,
                                                                      db_url, browser):
    srv = directory_server(tmp_path, slapd, db_url)
    try:
        c = Console(browser, srv.url)
        try:
            c.login("alice", password_of("alice"))
            assert c.page.url == srv.url + "/console/account"
        finally:
            c.close()
        slapd.stop()
        english = Console(browser, srv.url)
        german = Console(browser, srv.url)
        german.context.set_extra_http_headers({"Accept-Language": "de-DE,de;q=0.9"})
        try:
            # alice signed in a minute ago: nothing cached lets her in while the directory is down
            english.login("alice", password_of("alice"))
            message = english.page.locator("#error").inner_text()
            assert "directory (LDAP) cannot be reached" in message
            assert "Local administrator accounts still work" in message
            english.page.set_viewport_size({"width": 1280, "height": 800})
            english.shot("directory-down-en")
            german.login("alice", password_of("alice"))
            message = german.page.locator("#error").inner_text()
            assert "Verzeichnis (LDAP) ist gerade nicht erreichbar" in message
            german.page.set_viewport_size({"width": 1280, "height": 800})
            german.shot("directory-down-de")
            english.login("admin", ADMIN_PASSWORD)          # the local break-glass admin
            assert english.page.url == srv.url + "/console/hosts"
        finally:
            english.close()
            german.close()
        check = srv.cli("check")
        assert check.returncode == 1 and "directory:         no directory server answered" \
            in check.stdout, check.stdout
        down = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                       srv.fingerprint, "--user", "alice", "--password-stdin", "--home",
                       str(tmp_path / "alice-module"), stdin=password_of("alice") + "\n")
        assert down.returncode != 0 and "cannot be reached" in down.stderr, down.stderr
        assert len(down.stderr.strip().splitlines()) == 1, down.stderr
        # the sync judges nobody while the directory is down
        wait_for(lambda: srv.log().count("directory sync skipped") >= 2, 30, "two sync rounds")
        assert "disabled" not in [line for line in srv.ok("user", "list").splitlines()
                                  if line.split()[:1] == ["alice"]][0]
        assert "directory sync skipped" in srv.log()
    finally:
        srv.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_lock_out_and_totp_apply_to_directory_users(tmp_path, slapd: Slapd, db_url, browser):
    import pyotp
    from server.db.models import User
    srv = directory_server(tmp_path, slapd, db_url)  # lock-out: 2 free attempts, then 30 s
    try:
        c = Console(browser, srv.url)
        try:
            c.login("alice", password_of("alice"))     # creates her local shadow entry
            assert c.page.url == srv.url + "/console/account"
            c.context.clear_cookies()
            secret = pyotp.random_base32()
            db = Database(db_url)
            try:
                with db.session() as s:
                    s.scalars(select(User).where(User.name == "alice")).one().totp_secret = secret
            finally:
                db.dispose()
            c.login("alice", password_of("alice"))     # the directory password is not enough
            assert c.page.url == srv.url + "/console/login/totp"
            c.page.fill("#code", "000000" if pyotp.TOTP(secret).now() != "000000" else "111111")
            with c.page.expect_navigation():
                c.page.click("#verify")
            assert "wrong or expired code" in c.page.locator("#error").inner_text()
            c.page.fill("#code", pyotp.TOTP(secret).now())
            with c.page.expect_navigation():
                c.page.click("#verify")
            assert c.page.url == srv.url + "/console/account"
            assert "alice" in shown_user(c)
            # her password lives in the directory: the console does not pretend to change it
            c.page.fill("#current", password_of("alice"))
            c.page.fill("#new", "a-brand-new-password")
            c.page.fill("#again", "a-brand-new-password")
            with c.page.expect_navigation():
                c.page.click("#change-password")
            assert "change it there" in c.page.locator("#error").inner_text()
            c.context.clear_cookies()

            # last, as it locks this address out too: wrong directory passwords count
            for _ in range(3):
                c.login("dave", "not-his-password")
            assert "try again in" in c.page.locator("#error").inner_text()
            c.login("dave", password_of("dave"))       # the right password while locked out
            assert "too many failed attempts" in c.page.locator("#error").inner_text()
            assert c.page.url == srv.url + "/console/login"
        finally:
            c.close()
    finally:
        srv.stop()
