"""German and English: the catalogue is complete and keeps every placeholder, the mails go out in
the recipient's language (alerts per admin, invitations through a real aiosmtpd relay), and the
language switch in Debian's Chromium is remembered with the account."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from babel.messages.pofile import read_po
from sqlalchemy import select

from server import accounts, alerts, i18n, mail_texts
from server.db import Database
from server.db.models import OutboxMail, Role, User
from server.mail import Outbox
from tests.fixtures_console import Console
from tests.fixtures_server import ADMIN_PASSWORD
from tests.test_alerts import MAIL, T0, certs, nearly_full, policy
from tests.test_console_admin import mail_server  # noqa: F401  (fixture)

CATALOGUE = Path(i18n.__file__).parent / "locale" / "de" / "LC_MESSAGES" / "messages.po"
PLACEHOLDER = re.compile(r"%\((\w+)\)s|%%")


def test_german_catalogue_is_complete_and_keeps_every_placeholder():
    catalogue = read_po(CATALOGUE.open("rb"), locale="de")
    messages = [m for m in catalogue if m.id]
    assert len(messages) > 400
    for m in messages:
        ids = m.id if isinstance(m.id, tuple) else (m.id,)
        strings = m.string if isinstance(m.string, tuple) else (m.string,)
        assert all(strings) and not m.fuzzy, f"untranslated: {ids[0]!r}"
        wanted = sorted(PLACEHOLDER.findall(ids[-1]))
        for text in strings:
            assert sorted(PLACEHOLDER.findall(text)) == wanted, (ids[0], text)
        tags = sorted(re.findall(r"</?\w+", ids[0]))
        assert all(sorted(re.findall(r"</?\w+", s)) == tags for s in strings), ids[0]
    # the compiled catalogue is the one the .po says (make translations was run)
    assert i18n.texts("de").gettext("Log in") == "Anmelden"
    assert i18n.texts("de").gettext("Sessions") == "Sitzungen"
    assert i18n.texts("de").gettext("Certificates") == "Zertifikate"


def test_mails_in_german_and_english():
    link = "https://hm.example.test/console/invite/abc"
    subject, body = mail_texts.invitation("https://hm.example.test", "erika", "admin", link, 86400,
                                          language="de")
    assert subject == "Hausmeister: Ihr Benutzerkonto erika"
    assert "admin hat für Sie das Benutzerkonto „erika“" in body
    assert "(der Link gilt einmal und 1 Tag lang)" in body and link in body
    assert body.endswith("-- \nHausmeister-Fernwartungsserver\n")
    subject, body = mail_texts.invitation("https://hm.example.test", "erika", "admin", link, 86400)
    assert subject == "Hausmeister: your account erika"
    assert "(the link works once and for 1 day)" in body

    subject, body = mail_texts.password_reset("https://hm", "erika", link, 3600, "10.0.0.7",
                                              language="de")
    assert subject == "Hausmeister: Passwort von erika zurücksetzen"
    assert "jemand (Adresse 10.0.0.7)" in body and "1 Stunde lang" in body

    started = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)
    subject, body = mail_texts.session_protocol("https://hm", "sam", "s-1", started,
                                                started + dt.timedelta(minutes=5), [],
                                                language="de", peer="customer:Erika")
    assert subject == "Hausmeister: Protokoll der Sitzung s-1 mit customer:Erika"
    assert "Beginn: 01.11.2026, 09:00:00 UTC" in body
    assert "(keine Ereignisse aufgezeichnet)" in body

    subject, body = mail_texts.disk_alert("https://hm", "recording", "/srv/rec", 5.0, 3 * 2**30, 10,
                                          language="de")
    assert subject == "Hausmeister-Warnung: 5,0 % frei für den Aufzeichnungsordner"
    assert "(3,00 GiB)" in body and "Warnschwelle von 10 %" in body
    subject, _ = mail_texts.cert_expiry_alert("https://hm", "CA", "CN=x", "ab", started, 1,
                                              language="de")
    assert subject == "Hausmeister-Warnung: Das CA-Zertifikat läuft in 1 Tag ab"


@pytest.fixture
def bilingual_admins(database, fast_password_hashing):
    def build(s):
        first = accounts.get_or_create_tenant(s, "operator")
        accounts.add_user(s, first, "anna", Role.admin, "admin-password-1", email="anna@example.test")
        accounts.add_user(s, first, "bernd", Role.admin, "admin-password-2",
                          email="bernd@example.test").language = "de"
    database.call(build)
    return database


def test_alerts_go_out_in_each_admins_language(bilingual_admins, tmp_path):
    outbox = Outbox(bilingual_admins, MAIL)
    bilingual_admins.call(alerts.check, outbox, policy(tmp_path), certs(days_left=10), T0,
                          nearly_full)
    got = bilingual_admins.call(lambda s: {(m.to_address, m.subject) for m in
                                           s.scalars(select(OutboxMail))})
    assert ("anna@example.test", "Hausmeister alert: the server certificate expires in 9 days") in got
    assert ("bernd@example.test",
            "Hausmeister-Warnung: Das Serverzertifikat läuft in 9 Tagen ab") in got
    assert ("bernd@example.test",
            "Hausmeister-Warnung: 5,0 % frei für den Protokollordner") in got
    assert ("anna@example.test", "Hausmeister alert: 5.0% free for the protocol folder") in got


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_switch_is_remembered_and_invitation_goes_out_in_the_new_users_language(
        mail_server, smtp_inbox, browser, db_url):
    srv = mail_server
    inbox, _ = smtp_inbox
    c = Console(browser, srv.url)   # Chromium's default Accept-Language: English
    try:
        c.go("/console/login")
        assert c.page.evaluate("document.documentElement.lang") == "en"
        with c.page.expect_navigation():
            c.page.click("#lang-de")
        assert c.page.url == srv.url + "/console/login"
        assert c.page.evaluate("document.documentElement.lang") == "de"
        assert c.page.inner_text("h1") == "Anmelden"
        c.login("admin", ADMIN_PASSWORD)
        assert c.page.inner_text("#nav-sessions") == "Sitzungen"
        db = Database(db_url)

        def stored() -> str | None:
            return db.call(lambda s: s.scalar(select(User.language).where(User.name == "admin")))
        try:
            assert stored() == "de"   # chosen before the login, the account had none: kept
            with c.page.expect_navigation():
                c.page.click("#lang-en")
            assert c.page.inner_text("#nav-sessions") == "Sessions" and stored() == "en"
            with c.page.expect_navigation():
                c.page.click("#lang-de")
            assert c.page.url == srv.url + "/console/hosts" and stored() == "de"
        finally:
            db.dispose()

        # A German admin adds a user whose language is English, and one left at German.
        c.go("/console/users")
        assert c.page.input_value("#new-language") == "de"
        c.page.fill("#new-name", "erika")
        c.page.fill("#new-email", "erika@support.test")
        with c.page.expect_navigation():
            c.page.click("#add")
        assert "Einladungs-E-Mail an erika@support.test ist eingereiht" in c.page.inner_text("#notice")
        c.page.fill("#new-name", "john")
        c.page.fill("#new-email", "john@support.test")
        c.page.select_option("#new-language", "en")
        with c.page.expect_navigation():
            c.page.click("#add")
        # The switch on the answer to a form goes back to the page, not to the form's address.
        with c.page.expect_navigation():
            c.page.click("#lang-en")
        assert c.page.url == srv.url + "/console/users"
        assert c.page.inner_text("h1").startswith("Users of tenant")
        with c.page.expect_navigation():
            c.page.click("#lang-de")
        german = inbox.wait("Ihr Benutzerkonto erika")[0]
        english = inbox.wait("your account john")[0]
        assert german["To"] == "erika@support.test"
        assert "hat für Sie das Benutzerkonto „erika“" in german.get_content()
        assert "created the account \"john\" for you" in english.get_content()
        c.shot("i18n-de-users-invited")
    finally:
        c.close()

    # Another browser that asks for English: the account's German wins after the login.
    other = Console(browser, srv.url)
    try:
        other.go("/console/login")
        assert other.page.evaluate("document.documentElement.lang") == "en"
        other.login("admin", ADMIN_PASSWORD)
        assert other.page.evaluate("document.documentElement.lang") == "de"
        assert other.page.inner_text("h1").startswith("Hosts des Mandanten")
        other.go("/console/language")   # GET: not a route for GET, the error page in German
        assert other.page.evaluate("document.documentElement.lang") == "de"
    finally:
        other.close()
