"""Console TOTP, password reset and invitation in Debian's Chromium against a real server process
whose mail goes to a real aiosmtpd relay on 127.0.0.1: the reset link is read from the mail the
relay received and opened in the browser.  Screenshots go to test-artifacts/console/.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from pathlib import Path

import pyotp
import pytest

from server import accounts, mail_texts, user_links
from server.config import MailSection
from server.console import auth, pages_links
from server.db import Database
from server.db.models import OutboxMail, Role, User, UserLink
from server.mail import Outbox
from server.session_protocol import SessionProtocols, SessionSummary
from tests.fixtures_console import PAYLOAD, Console
from tests.fixtures_mail import mail_toml
from tests.fixtures_server import ADMIN_PASSWORD, ServerProcess, write_config

CARLA_PASSWORD = "carla-password-1"
NEW_PASSWORD = "brand-new-password-2"


def mail_server(tmp_path: Path, db_url: str, port: int, console: str = "",
                extra: str = "") -> ServerProcess:
    """A running server that mails through the relay on ``port``; ``carla`` is an admin with a
    mail address (the ``admin`` of ``init`` has none)."""
    data = tmp_path / "data"
    config = write_config(tmp_path / "hausmeister.toml", data, db_url, extra=mail_toml(port) + f"""
[console]
totp_issuer = "Hausmeister test"
{console}
{extra}
""")
    srv = ServerProcess(config, data)
    srv.ok("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    srv.ok("user", "add", "carla", "--role", "admin", "--email", "carla@example.test",
           "--password-stdin", stdin=CARLA_PASSWORD + "\n")
    return srv.start()


def reset_link(message, base: str, purpose: str = "reset") -> str:
    body = message.get_body(("plain",)).get_content()
    found = re.findall(rf"https://\S+/console/{purpose}/[A-Za-z0-9_-]+", body)
    assert len(found) == 1, body
    assert found[0].startswith(base + "/console/"), (found, base)  # only ever the server itself
    return found[0]


def ended_session_of(db_url: str, protocol_dir: Path, supporter: str) -> str:
    """A session of ``supporter`` (opted in to protocol mails) that ended just now, with its
    protocol file, written the way the relay and broker record one."""
    from server.db.models import Session, Tenant
    sid = str(uuid.uuid4())
    identity = f"hausmeister:supporter:{supporter}"
    ended = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=5)
    start = ended - dt.timedelta(minutes=3)
    db = Database(db_url)
    try:
        def write(s):
            user = s.query(User).filter_by(name=supporter).one()
            user.protocol_mail = True
            s.add(Session(id=sid, tenant_id=user.tenant_id, kind="adhoc", supporter_identity=identity,
                          peer_address="10.0.0.7", created_at=start, started_at=start,
                          ended_at=ended, end_reason="supporter ended"))
            return s.get(Tenant, user.tenant_id).name
        tenant = db.call(write)
    finally:
        db.dispose()
    protocols = SessionProtocols(protocol_dir)
    protocols.record(tenant, sid, "file_sent", identity, "192.0.2.1", {"name": "report.pdf"})
    protocols.ended(tenant, SessionSummary(sid, "adhoc", start, ended, identity, "customer@10.0.0.7"))
    return sid


def audit_actions(db_url: str, actor: str) -> set[str]:
    from server.db.models import AuditEntry
    db = Database(db_url)
    try:
        return set(db.call(lambda s: [a for (a,) in s.query(AuditEntry.action).filter_by(actor=actor)]))
    finally:
        db.dispose()


def submit(c: Console, button: str) -> None:
    with c.page.expect_navigation():
        c.page.click(button)


def error_text(c: Console) -> str:
    return c.page.locator("#error").inner_text()


def totp_login(c: Console, name: str, password: str) -> None:
    c.login(name, password)
    assert c.page.url == c.url + "/console/login/totp", c.page.content()[:2000]


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_totp_set_up_login_reuse_and_turn_off(tmp_path, db_url, smtp_inbox, browser):
    _, port = smtp_inbox
    srv = mail_server(tmp_path, db_url, port)
    c = Console(browser, srv.url)
    try:
        c.login("carla", CARLA_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        c.go("/console/account")
        assert c.page.locator("#me-name").inner_text() == "carla"
        assert c.page.locator("#me-role").inner_text() == "admin"
        assert c.page.locator("#me-email").inner_text() == "carla@example.test"
        assert c.page.locator("#me-totp").inner_text() == "off"

        # Set-up: key as text, the otpauth URI and a QR code drawn by the server itself.
        submit(c, "#totp-new")
        secret = c.page.locator("#totp-secret").inner_text().strip()
        uri = c.page.locator("#totp-uri").inner_text().strip()
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert uri.startswith("otpauth://totp/") and f"secret={secret}" in uri and "carla" in uri
        qr = c.page.request.get(srv.url + "/console/account/totp.svg")
        assert qr.status == 200 and qr.headers["content-type"] == "image/svg+xml"
        c.page.wait_for_function("document.getElementById('totp-qr').complete")
        assert c.page.evaluate("document.getElementById('totp-qr').naturalWidth") > 0
        c.shot("account-totp")
        totp = pyotp.TOTP(secret)
        # A confirmation POST without the CSRF token changes nothing.
        r = c.page.request.post(srv.url + "/console/account/totp/confirm",
                                form={"code": totp.now()}, max_redirects=0)
        assert r.status == 403

        # Each code works once and only the steps -1/0/+1 are valid, so the steps used below go
        # up: confirm with -1, log in with 0, turn off with +1.  Start early in a 30 s step so
        # "the code used at set-up" is still inside the window at the login.
        if time.time() % 30 > 22:
            time.sleep(30.5 - time.time() % 30)
        set_up_code = totp.at(time.time() - 30)
        c.page.fill("#confirm-code", set_up_code)
        submit(c, "#totp-confirm")
        assert "TOTP is on" in c.page.locator("#notice").inner_text()
        assert c.page.locator("#me-totp").inner_text() == "on"
        assert c.page.request.get(srv.url + "/console/account/totp.svg").status == 404

        # Log out; the password alone no longer logs in: the session is pending, not logged in.
        submit(c, "#logout")
        totp_login(c, "carla", CARLA_PASSWORD)
        c.go("/console/hosts")
        assert c.page.url == srv.url + "/console/login"
        totp_login(c, "carla", CARLA_PASSWORD)
        assert c.page.locator("#totp-user").inner_text() == "carla"
        # The code form refuses a POST without the CSRF token (before counting anything).
        r = c.page.request.post(srv.url + "/console/login/totp", form={"code": totp.now()},
                                max_redirects=0)
        assert r.status == 403
        # The code already used at set-up: refused.  (This server allows 2 free failures.)
        c.page.fill("#code", set_up_code)
        submit(c, "#verify")
        assert c.page.url == srv.url + "/console/login/totp"
        assert "already used" in error_text(c)
        # A wrong code: refused, still pending.
        wrong = next(code for code in ("000000", "111111", "222222")
                     if code not in {totp.at(time.time() + d) for d in (-30, 0, 30)})
        c.page.fill("#code", wrong)
        submit(c, "#verify")
        assert "wrong or expired code" in error_text(c)
        # The current code logs in.
        c.page.fill("#code", totp.now())
        submit(c, "#verify")
        assert c.page.url == srv.url + "/console/hosts"
        assert "carla" in c.page.locator("#who").inner_text()

        # Turning TOTP off needs a current code; a POST without CSRF is refused.
        c.go("/console/account")
        r = c.page.request.post(srv.url + "/console/account/totp/off", form={"code": totp.now()},
                                max_redirects=0)
        assert r.status == 403
        assert c.page.locator("#me-totp").inner_text() == "on"
        c.page.fill("#off-code", totp.at(time.time() + 30))
        submit(c, "#totp-off")
        assert "TOTP is off" in c.page.locator("#notice").inner_text()
        assert c.page.locator("#me-totp").inner_text() == "off"

        # Password alone again.
        submit(c, "#logout")
        c.login("carla", CARLA_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        c.assert_local_only()
    finally:
        c.close()
        srv.stop()
    assert audit_actions(db_url, "carla") >= {"totp.enable", "totp.disable", "console.login"}


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_forgot_password_mail_link_reset_and_reuse(tmp_path, db_url, smtp_inbox, browser):
    inbox, port = smtp_inbox
    srv = mail_server(tmp_path, db_url, port)
    c = Console(browser, srv.url)
    other = Console(browser, srv.url)
    try:
        # carla is logged in elsewhere: the reset ends that session.
        other.login("carla", CARLA_PASSWORD)
        assert other.page.url == srv.url + "/console/hosts"

        c.go("/console/login")
        with c.page.expect_navigation():
            c.page.click("#forgot")
        assert c.page.url == srv.url + "/console/forgot"
        c.page.fill("#user", "carla")
        submit(c, "#send")
        answer = c.page.locator("#sent").inner_text()
        c.shot("forgot")

        # An unknown user, a user without mail (admin) and HTML get the same answer; no mail.
        for name in ("nobody-here", "admin", PAYLOAD):
            c.go("/console/forgot")
            c.page.fill("#user", name)
            submit(c, "#send")
            assert c.page.locator("#sent").inner_text().replace(name, "carla") == answer
            assert c.page.locator("#pwned").count() == 0
            assert c.page.evaluate("window.pwned") is None
        # A forgot POST without the CSRF token is refused.
        r = c.page.request.post(srv.url + "/console/forgot", form={"user": "carla"}, max_redirects=0)
        assert r.status == 403

        [message] = inbox.wait("reset the password")
        time.sleep(0.5)
        assert len(inbox.wait("reset the password")) == 1  # none for the other names
        assert message["X-Envelope-To"] == "carla@example.test"
        assert message["Subject"] == "Hausmeister: reset the password of carla"
        link = reset_link(message, srv.url)
        token = link.rsplit("/", 1)[1]
        assert len(token) >= 22  # 128 bits, URL-safe base64

        # Open the link from the mail in the browser.
        c.page.goto(link)
        assert c.page.locator("#link-user").inner_text() == "carla"
        # Refused: without CSRF, two different passwords, a short one; the link stays usable.
        r = c.page.request.post(link, form={"password": NEW_PASSWORD, "again": NEW_PASSWORD},
                                max_redirects=0)
        assert r.status == 403
        c.page.fill("#password", NEW_PASSWORD)
        c.page.fill("#again", NEW_PASSWORD + "x")
        submit(c, "#set-password")
        assert "differ" in error_text(c)
        c.page.fill("#password", PAYLOAD)
        c.page.fill("#again", PAYLOAD)
        c.shot("reset")
        c.page.fill("#password", NEW_PASSWORD)
        c.page.fill("#again", NEW_PASSWORD)
        submit(c, "#set-password")
        assert "is set" in c.page.locator("#done").inner_text()

        # The other browser's session of carla has ended.
        other.go("/console/hosts")
        assert other.page.url == srv.url + "/console/login"

        # The same link again: refused, clearly, and nothing changes.
        response = c.page.goto(link)
        assert response.status == 410
        assert "already used" in c.page.locator("#message").inner_text()
        c.go("/console/forgot")
        r = c.page.request.post(link, form={"csrf": c.csrf(), "password": "another-password-3",
                                            "again": "another-password-3"}, max_redirects=0)
        assert r.status == 410
        # An unknown token: 404.
        assert c.page.goto(srv.url + "/console/reset/AAAAAAAAAAAAAAAAAAAAAA").status == 404

        # The new password logs in; the old one does not.
        c.login("carla", NEW_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        submit(c, "#logout")
        c.login("carla", CARLA_PASSWORD)
        assert "wrong user name or password" in error_text(c)
        c.assert_local_only()
        other.assert_local_only()

    finally:
        c.close()
        other.close()
        srv.stop()
    assert audit_actions(db_url, "carla") >= {"password.reset-request", "password.reset"}


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_expired_link_invitation_own_password_and_background_mails(tmp_path, db_url, smtp_inbox, browser):
    """Also the server's background mails: certificate alerts (every certificate "expires soon"
    with cert_expiry_days = 3650) and the protocol of a session that just ended."""
    inbox, port = smtp_inbox
    srv = mail_server(tmp_path, db_url, port, console='reset_link_ttl = "1s"',
                      extra="[alerts]\ncert_expiry_days = 3650\n")
    srv.ok("user", "add", "sam", "--role", "supporter", "--email", "sam@example.test",
           "--password-stdin", stdin="sam-password-123\n")
    session_id = ended_session_of(db_url, srv.data_dir / "protocols", "sam")
    c = Console(browser, srv.url)
    try:
        # A reset link that lives 1 s is expired by the time its mail arrives.
        c.go("/console/forgot")
        c.page.fill("#user", "carla")
        submit(c, "#send")
        [message] = inbox.wait("reset the password")
        assert "1 second" in message.get_body(("plain",)).get_content()
        # (mail can arrive within the second: then wait, bounded, for the link to run out)
        link, deadline = reset_link(message, srv.url), time.monotonic() + 15
        while (response := c.page.goto(link)).status == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert response.status == 410
        assert "expired" in c.page.locator("#message").inner_text()

        # An invitation (what the users page does: user, link, mail) → first password → login.
        db = Database(db_url)
        try:
            def invite(s):
                user = s.query(User).filter_by(name="carla").one()
                token = user_links.issue(s, user, "invite", 3600)
                return mail_texts.invitation(srv.url, user.name, "admin",
                                             f"{srv.url}/console/invite/{token}",
                                             mail_texts.ttl_text(3600))
            subject, body = db.call(invite)
        finally:
            db.dispose()
        link = re.search(r"https://\S+/console/invite/\S+", body).group(0)
        assert "1 hour" in body and "carla" in subject
        c.page.goto(link)
        assert "Welcome" in c.page.content()
        c.page.fill("#password", NEW_PASSWORD)
        c.page.fill("#again", NEW_PASSWORD)
        submit(c, "#set-password")
        assert "is set" in c.page.locator("#done").inner_text()
        assert c.page.goto(link).status == 410

        # Own password change: current password needed, min length 10.
        c.login("carla", NEW_PASSWORD)
        c.go("/console/account")
        c.page.fill("#current", NEW_PASSWORD)
        c.page.fill("#new", "short1234")
        c.page.fill("#again", "short1234")
        c.page.evaluate("document.getElementById('password-form').noValidate = true")
        submit(c, "#change-password")
        assert "too short" in error_text(c)
        c.page.fill("#current", "not-the-password")
        c.page.fill("#new", "long-enough-password")
        c.page.fill("#again", "long-enough-password")
        submit(c, "#change-password")
        assert "current password is wrong" in error_text(c)
        r = c.page.request.post(srv.url + "/console/account/password",
                                form={"current": NEW_PASSWORD, "new": "x" * 12, "again": "x" * 12},
                                max_redirects=0)
        assert r.status == 403
        c.page.fill("#current", NEW_PASSWORD)
        c.page.fill("#new", CARLA_PASSWORD)
        c.page.fill("#again", CARLA_PASSWORD)
        submit(c, "#change-password")
        assert "password was changed" in c.page.locator("#notice").inner_text()
        submit(c, "#logout")
        c.login("carla", CARLA_PASSWORD)
        assert c.page.url == srv.url + "/console/hosts"
        c.assert_local_only()

        # Background mails: one alert per certificate to the operator admin with a mail address,
        # and sam's protocol (sam opted in).
        alerts = inbox.wait("Hausmeister alert: the", 2)
        assert {m["X-Envelope-To"] for m in alerts} == {"carla@example.test"}
        assert sorted(m["Subject"].split(" certificate")[0] for m in alerts) == [
            "Hausmeister alert: the CA", "Hausmeister alert: the server"]
        assert srv.url in alerts[0].get_body(("plain",)).get_content()
        [protocol] = inbox.wait(f"protocol of session {session_id}")
        assert protocol["X-Envelope-To"] == "sam@example.test"
        text = protocol.get_body(("plain",)).get_content()
        assert "chain intact" in text and "file_sent" in text and "report.pdf" in text
    finally:
        c.close()
        srv.stop()
    assert audit_actions(db_url, "carla") >= {"password.first", "password.change"}
    assert len(inbox.wait("Hausmeister alert")) == 2  # each alert once


# --- the logic under the pages, against a real database (SQLite and PostgreSQL) -----------------


MAIL = MailSection(smtp_host="127.0.0.1", smtp_port=2525, security="none", username="",
                   password="", from_address="hausmeister@example.test")


def test_totp_step_window_and_format():
    secret = pyotp.random_base32()
    totp, now = pyotp.TOTP(secret), time.time()
    step = totp.timecode(dt.datetime.fromtimestamp(now, dt.timezone.utc))
    for delta in (-1, 0, 1):
        assert auth.totp_step(secret, totp.generate_otp(step + delta), now) == step + delta
    assert auth.totp_step(secret, totp.generate_otp(step + 2), now) is None
    assert auth.totp_step(secret, totp.generate_otp(step - 2), now) is None
    code = totp.generate_otp(step)
    assert auth.totp_step(secret, code[:3] + " " + code[3:], now) == step  # as apps show it
    for bad in ("", "12345", "1234567", "abcdef", "<b>12</b>", "１２３４５６"):
        assert auth.totp_step(secret, bad, now) is None


@pytest.fixture
def people(database, fast_password_hashing):
    def build(s):
        tenant = accounts.get_or_create_tenant(s, "acme")
        carla = accounts.add_user(s, tenant, "carla", Role.admin, CARLA_PASSWORD,
                                  email="carla@example.test")
        carla.totp_secret = pyotp.random_base32()
        accounts.add_user(s, tenant, "nomail", Role.admin, CARLA_PASSWORD)
        off = accounts.add_user(s, tenant, "off", Role.auditor, CARLA_PASSWORD, email="off@example.test")
        off.disabled = True
        return carla.id, carla.totp_secret
    return database, *database.call(build)


def test_wrong_codes_count_in_the_lock_out_and_a_code_works_once(people):
    db, carla_id, secret = people
    lockouts = accounts.Lockouts(accounts.LockoutPolicy(free_attempts=2, base_seconds=60))
    totp = pyotp.TOTP(secret)

    def attempt(code: str, source: str = "192.0.2.9"):
        def run(s):
            user = s.get(accounts.User, carla_id)
            auth._check_code(s, lockouts, user, secret, code, source)
        db.call(run)

    code = totp.now()
    attempt(code)
    # The used step is kept in the database: a restarted server (or another node) refuses it too.
    assert db.call(lambda s: s.get(accounts.User, carla_id).totp_last_step) == auth.totp_step(secret, code)
    with pytest.raises(accounts.Refused, match="already used"):
        attempt(code)
    with pytest.raises(accounts.Refused, match="wrong or expired"):
        attempt("000000" if code != "000000" else "111111")
    with pytest.raises(accounts.Refused, match="try again in 60 s"):
        attempt("000000" if code != "000000" else "111111")
    # Locked now: even the right next code waits, from any address (the user key).
    with pytest.raises(accounts.LockedOut):
        attempt(totp.at(time.time() + 30), source="198.51.100.1")
    keys = db.call(lambda s: {k for (k,) in s.query(accounts.Lockout.key)})
    assert keys == {"user:carla", "addr:192.0.2.9", "totp:carla"}


def test_a_login_waiting_for_its_code_is_a_row_used_once(people):
    """The password step leaves a row (any node may take the code); a right code uses it up, a
    wrong one leaves it, after 5 minutes it is gone."""
    from server.db.models import ConsolePendingLogin
    db, carla_id, secret = people
    lockouts = accounts.Lockouts(accounts.LockoutPolicy(free_attempts=5, base_seconds=60))
    now = dt.datetime.now(dt.timezone.utc)
    result = db.call(auth._login, lockouts, carla_id, "192.0.2.9", "key-1", "de", now)
    assert result.totp and result.user == "carla"
    assert db.call(auth._pending_name, "key-1", now) == "carla"
    with pytest.raises(auth.PendingGone):
        db.call(auth._pending_name, "key-2", now)  # another browser's cookie
    with pytest.raises(accounts.Refused):
        db.call(auth._login_totp, lockouts, "key-1", "abcdef", "192.0.2.9", now)
    done, chosen = db.call(auth._login_totp, lockouts, "key-1", pyotp.TOTP(secret).now(),
                           "192.0.2.9", now)
    assert (done.user, done.totp, chosen) == ("carla", False, "de")
    with pytest.raises(auth.PendingGone) as gone:  # used once
        db.call(auth._login_totp, lockouts, "key-1", pyotp.TOTP(secret).now(), "192.0.2.9",
                now)
    assert not gone.value.expired
    db.call(auth._login, lockouts, carla_id, "192.0.2.9", "key-3", None, now)
    later = now + dt.timedelta(seconds=auth.PENDING_SECONDS + 1)
    with pytest.raises(auth.PendingGone) as gone:
        db.call(auth._pending_name, "key-3", later)
    assert gone.value.expired
    assert db.call(lambda s: s.query(ConsolePendingLogin).count()) == 0


def test_forgot_queues_one_mail_only_for_a_user_who_can_get_one(people):
    db, _, _ = people
    lockouts = accounts.Lockouts(accounts.LockoutPolicy(free_attempts=5, base_seconds=60))
    outbox = Outbox(db, MAIL)
    base = "https://hm.example.test:8443"
    for name in ("nobody", "nomail", "off", PAYLOAD):
        db.call(pages_links._forgot, lockouts, outbox, name, "192.0.2.9", base, 3600.0)
    assert db.call(lambda s: s.query(OutboxMail).count()) == 0
    assert db.call(lambda s: s.query(UserLink).count()) == 0
    db.call(pages_links._forgot, lockouts, None, "carla", "192.0.2.10", base, 3600.0)  # mail is off
    assert db.call(lambda s: s.query(UserLink).count()) == 0

    db.call(pages_links._forgot, lockouts, outbox, "carla", "192.0.2.10", base, 3600.0)
    [(to, subject, body)] = db.call(lambda s: [(m.to_address, m.subject, m.body_text)
                                               for m in s.query(OutboxMail)])
    assert to == "carla@example.test" and subject == "Hausmeister: reset the password of carla"
    assert "192.0.2.10" in body and "1 hour" in body
    token = re.search(re.escape(base) + r"/console/reset/([A-Za-z0-9_-]{22})\s", body).group(1)
    # The stored row holds only the hash of the token.
    assert db.call(lambda s: [l.token_hash for l in s.query(UserLink)])[0] != token
    # 5 requests per address are free, the 6th goes through and starts the wait: the 7th waits.
    db.call(pages_links._forgot, lockouts, outbox, "carla", "192.0.2.9", base, 3600.0)
    db.call(pages_links._forgot, lockouts, outbox, "carla", "192.0.2.9", base, 3600.0)
    with pytest.raises(accounts.LockedOut):
        db.call(pages_links._forgot, lockouts, outbox, "carla", "192.0.2.9", base, 3600.0)
    db.call(pages_links._forgot, lockouts, outbox, "carla", "192.0.2.11", base, 3600.0)
