"""Accessibility (BITV 2.0 / WCAG 2.1 AA) and languages of the console, checked with the real
axe-core engine in Debian's Chromium against a real server process.

Every console page, in English and German, logged out and as admin, supporter and auditor, with
rows in the tables: axe-core (from the npm registry, pinned; installed once into a cache folder
by ``axe_source``) must find no WCAG 2.0/2.1 A or AA violation, and at 320 px (400 % zoom) no
page may scroll sideways (data tables scroll inside their own box).  A keyboard walk of the login
and hosts pages checks the skip link, the focus order, our own focus outline and that a failed
login puts the focus on the error.  The axe version, every result and screenshots in both
languages go to ``test-artifacts/console/``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures_console import ARTIFACTS, tenant_of_admin
from tests.fixtures_server import ADMIN_PASSWORD
from tests.test_console_pages import add_session, write_protocol

AXE_VERSION = "4.14.1"
AXE_CACHE = Path(os.environ.get("HAUSMEISTER_TEST_CACHE",
                                Path.home() / ".cache" / "hausmeister-tests")) / f"axe-core-{AXE_VERSION}"
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
SAM_PASSWORD = "sam-password-456"
AUDREY_PASSWORD = "audrey-password-456"
TINA_PASSWORD = "tina-password-456"
HELP_TOPICS = ("getting-started", "adhoc-customers", "unattended-hosts", "consent-and-rights",
               "session-protocols", "air-gap", "troubleshooting")
LANGUAGES = {"en": "en-GB", "de": "de-DE"}


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's browser build, pinned, installed by npm into a cache folder once."""
    script = AXE_CACHE / "node_modules" / "axe-core" / "axe.min.js"
    if not script.is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is missing: run `make test-system-packages` (Debian package npm)")
        AXE_CACHE.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "install", "--prefix", str(AXE_CACHE), "--no-save", "--no-audit", "--no-fund",
             "--ignore-scripts", f"axe-core@{AXE_VERSION}"],
            capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or not script.is_file():
            pytest.fail(f"npm could not install axe-core@{AXE_VERSION}: {result.stderr[-2000:]}")
    version = json.loads((script.parent / "package.json").read_text())["version"]
    assert version == AXE_VERSION, version
    return script.read_text()


class Reader:
    """One browser context in one language (its Accept-Language), as one user."""

    def __init__(self, browser, url: str, lang: str, role: str, axe: str, results: list) -> None:
        self.url, self.lang, self.role, self.axe, self.results = url, lang, role, axe, results
        self.context = browser.new_context(ignore_https_errors=True, locale=LANGUAGES[lang],
                                           viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))

    def go(self, path: str):
        return self.page.goto(self.url + path)

    def login(self, name: str, password: str) -> None:
        self.go("/console/login")
        self.page.fill("#user", name)
        self.page.fill("#password", password)
        with self.page.expect_navigation():
            self.page.click("#login")

    def check(self, name: str, path: str | None = None, shot: bool = True) -> None:
        """axe-core on the page as it is now (after ``go(path)``), then the reflow at 320 px."""
        if path is not None:
            self.go(path)
        page = self.page
        assert page.evaluate("document.documentElement.lang") == self.lang, (name, self.lang)
        if shot:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"a11y-{self.lang}-{self.role}-{name}.png"),
                            full_page=True)
        if not page.evaluate("typeof window.axe !== 'undefined'"):
            page.evaluate(self.axe + "\n;0")  # DevTools evaluation: the page's CSP does not apply
        found = page.evaluate(
            "async (tags) => { const r = await axe.run(document, {runOnly: {type: 'tag', values: tags},"
            " resultTypes: ['violations']});"
            " return {violations: r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,"
            " tags: v.tags, nodes: v.nodes.map(n => ({target: n.target, summary: n.failureSummary}))})),"
            " passes: r.passes.length, incomplete: r.incomplete.map(v => v.id)}; }", WCAG_TAGS)
        page.set_viewport_size({"width": 320, "height": 640})
        overflow = page.evaluate(
            "() => ({scroll: document.documentElement.scrollWidth,"
            " client: document.documentElement.clientWidth})")
        if shot and name in ("login", "hosts", "users", "settings", "help-adhoc-customers"):
            page.screenshot(path=str(ARTIFACTS / f"a11y-{self.lang}-{self.role}-{name}-320px.png"),
                            full_page=True)
        page.set_viewport_size({"width": 1280, "height": 800})
        self.results.append({"page": name, "url": page.url.removeprefix(self.url), "lang": self.lang,
                             "role": self.role, "violations": found["violations"],
                             "passes": found["passes"], "incomplete": found["incomplete"],
                             "width_at_320px": overflow["scroll"]})

    def close(self) -> None:
        outside = [u for u in self.requests if not u.startswith(self.url + "/")]
        assert outside == [], f"requests to other hosts: {outside}"
        self.context.close()


def _set_totp(db_url: str, name: str) -> None:
    import pyotp
    from server.db import Database
    from server.db.models import User
    db = Database(db_url)
    try:
        with db.session() as s:
            s.query(User).filter_by(name=name).one().totp_secret = pyotp.random_base32()
    finally:
        db.dispose()


def _data(srv, db_url: str) -> None:
    """Rows in every table: sessions, users of each role, tokens, an audit trail."""
    tenant = tenant_of_admin(srv)
    created = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)
    newest = add_session(db_url, tenant, "adhoc", "hausmeister:supporter:sam", "customer:Erika",
                         created + dt.timedelta(days=1))
    add_session(db_url, tenant, "host", "hausmeister:supporter:sam", "hausmeister:host:pc1", created)
    write_protocol(srv.data_dir / "protocols", tenant, newest, chat="Guten Tag, see "
                   "https://example.org/faq")  # the newest is the first row: timeline in the table
    for name, role, password in (("sam", "supporter", SAM_PASSWORD),
                                 ("audrey", "auditor", AUDREY_PASSWORD),
                                 ("tina", "auditor", TINA_PASSWORD)):
        srv.ok("user", "add", name, "--role", role, "--password-stdin", stdin=password + "\n")
    srv.ok("user", "groups", "sam", "--add", "office")
    srv.ok("token", "create", "--group", "office", "--ttl", "1d")
    _set_totp(db_url, "tina")


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_every_page_in_both_languages_passes_axe_and_reflows(running_server, enrolled_host, browser,
                                                             db_url, axe_source):
    srv = running_server
    _data(srv, db_url)
    results: list[dict] = []
    invite_link = None
    for lang in LANGUAGES:
        # --- as admin (first: the invitation link is used by the logged-out pages) ---------------
        admin = Reader(browser, srv.url, lang, "admin", axe_source, results)
        admin.login("admin", ADMIN_PASSWORD)
        admin.check("hosts", "/console/hosts")
        admin.check("hosts-search", "/console/hosts?q=pc")
        admin.check("sessions", "/console/sessions")
        admin.page.click("a.details >> nth=0")
        admin.page.wait_for_load_state()
        assert admin.page.locator("#timeline tr.event").count() >= 6
        admin.check("session-detail")
        admin.check("users", "/console/users")
        if invite_link is None:
            admin.page.fill("#new-name", "dora")
            with admin.page.expect_navigation():
                admin.page.click("#add")
            invite_link = admin.page.locator("#invite-link").inner_text()
            admin.check("users-invited")
        admin.page.click("tr.user:has-text('sam') a.edit")
        admin.page.wait_for_load_state()
        admin.check("user-edit")
        admin.check("tokens", "/console/tokens")
        with admin.page.expect_navigation():
            admin.page.click("#create")
        admin.check("token-created")
        admin.check("certificates", "/console/certificates")
        admin.check("audit", "/console/audit")
        admin.check("audit-filtered", "/console/audit?actor=admin&action=user")
        admin.check("settings", "/console/settings")
        admin.page.fill("#days", "abc")
        with admin.page.expect_navigation():
            admin.page.click("#retention-save")
        admin.page.wait_for_function("document.activeElement.id === 'setting-error'", timeout=5000)
        admin.check("settings-error")
        admin.check("account", "/console/account")
        admin.check("avatar", "/console/avatar")
        admin.check("error-404", "/console/users/999999")
        admin.close()

        # --- logged out ---------------------------------------------------------------------------
        anon = Reader(browser, srv.url, lang, "anon", axe_source, results)
        anon.check("login", "/console/login")
        anon.login("admin", "not-the-password")
        anon.page.wait_for_function("document.activeElement.id === 'error'", timeout=5000)
        anon.check("login-error")
        anon.check("forgot", "/console/forgot")
        anon.check("help", "/console/help")
        for topic in HELP_TOPICS:
            anon.check(f"help-{topic}", f"/console/help/{topic}")
        anon.check("download", "/console/download")
        anon.check("leave", "/console/leave?to=https%3A%2F%2Fexample.org%2Fterms")
        anon.check("notfound", "/console/no-such-page")
        anon.check("link-invalid", "/console/reset/not-a-token")
        anon.check("invitation", invite_link.removeprefix(srv.url))
        anon.login("tina", TINA_PASSWORD)
        anon.check("totp")
        anon.close()

        # --- as supporter ---------------------------------------------------------------------------
        sam = Reader(browser, srv.url, lang, "supporter", axe_source, results)
        sam.login("sam", SAM_PASSWORD)
        sam.check("account")
        sam.check("avatar", "/console/avatar")
        sam.check("error-403", "/console/hosts")
        sam.close()

        # --- as auditor -----------------------------------------------------------------------------
        audrey = Reader(browser, srv.url, lang, "auditor", axe_source, results)
        audrey.login("audrey", AUDREY_PASSWORD)
        audrey.check("hosts")
        audrey.check("sessions", "/console/sessions")
        audrey.page.click("a.details >> nth=0")
        audrey.page.wait_for_load_state()
        audrey.check("session-detail")
        audrey.check("users", "/console/users")
        audrey.page.click("tr.user:has-text('sam') a.edit")
        audrey.page.wait_for_load_state()
        audrey.check("user-detail")
        audrey.check("tokens", "/console/tokens")
        audrey.check("certificates", "/console/certificates")
        audrey.check("audit", "/console/audit")
        audrey.check("account", "/console/account")
        audrey.close()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "axe-results.json").write_text(json.dumps(
        {"axe_core": AXE_VERSION, "tags": WCAG_TAGS, "pages": results}, indent=1, ensure_ascii=False))
    summary = [f"{r['lang']} {r['role']:9} {r['page']:28} violations={len(r['violations'])} "
               f"passes={r['passes']} width@320={r['width_at_320px']}" for r in results]
    (ARTIFACTS / "axe-summary.txt").write_text(f"axe-core {AXE_VERSION}, {', '.join(WCAG_TAGS)}\n"
                                               + "\n".join(summary) + "\n")
    assert len(results) >= 80, len(results)
    bad = [f"{r['lang']} {r['role']} {r['page']}: {v['id']} ({v['impact']}) {v['help']} "
           f"at {[n['target'] for n in v['nodes']][:3]}"
           for r in results for v in r["violations"]]
    assert bad == [], "axe-core found WCAG 2.1 A/AA violations:\n" + "\n".join(bad)
    wide = [f"{r['lang']} {r['role']} {r['page']}: {r['width_at_320px']} px"
            for r in results if r["width_at_320px"] > 320]
    assert wide == [], "pages that scroll sideways at 320 px:\n" + "\n".join(wide)


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_keyboard_walk_of_login_and_hosts(running_server, enrolled_host, browser, db_url):
    """Tab from the top: the skip link first and visible, then the form in order; every focused
    element shows our own outline; a failed login focuses the error; Enter logs in."""
    srv = running_server
    context = browser.new_context(ignore_https_errors=True, locale="de-DE",
                                  viewport={"width": 1280, "height": 800})
    page = context.new_page()

    def tab() -> dict:
        page.keyboard.press("Tab")
        return page.evaluate(
            "() => { const e = document.activeElement; const s = getComputedStyle(e);"
            " const r = e.getBoundingClientRect();"
            " return {id: e.id, cls: e.className, tag: e.tagName, text: e.innerText || e.value || '',"
            " outline: s.outlineStyle, width: parseFloat(s.outlineWidth), top: r.top}; }")

    def walk(n: int) -> list[dict]:
        steps = []
        for _ in range(n):
            step = tab()
            assert step["outline"] != "none" and step["width"] >= 2, step  # our focus style
            steps.append(step)
        return steps

    try:
        page.goto(srv.url + "/console/login")
        first = walk(1)[0]
        assert first["cls"] == "skip" and first["top"] >= 0, first  # visible when focused
        assert first["text"] == "Zum Inhalt springen"
        page.keyboard.press("Enter")
        assert page.evaluate("document.activeElement.id") == "main"
        order = [s["id"] for s in walk(3)]
        assert order == ["user", "password", "login"], order
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Shift+Tab")
        page.keyboard.type("admin")
        page.keyboard.press("Tab")
        page.keyboard.type("wrong-password")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        page.wait_for_function("document.activeElement.id === 'error'", timeout=5000)
        assert "falscher Benutzername oder falsches Passwort" in page.inner_text("#error")
        page.screenshot(path=str(ARTIFACTS / "keyboard-de-login-error.png"))
        page.fill("#password", ADMIN_PASSWORD)
        page.focus("#password")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.url == srv.url + "/console/hosts"

        # Hosts: skip link, the navigation in reading order, then the search form.
        first = walk(1)[0]
        assert first["cls"] == "skip"
        steps = walk(13)
        ids = [s["id"] for s in steps]
        assert ids[:7] == ["nav-hosts", "nav-sessions", "nav-users", "nav-tokens",
                           "nav-certificates", "nav-audit", "nav-settings"], ids
        assert ids[7:12] == ["nav-help", "who", "logout", "lang-en", "q"], ids
        assert ids[12] == "search", ids
        page.keyboard.press("Shift+Tab")
        page.keyboard.type("pc")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.locator("tr.host").count() == 1
        assert "Hosts zu" in page.inner_text("#query")
        page.screenshot(path=str(ARTIFACTS / "keyboard-de-hosts.png"))
    finally:
        context.close()


def test_accept_language_and_switch_choose_the_language():
    """The negotiation itself: q-values, regions, unknown languages."""
    from server import i18n
    assert i18n.negotiate(None) == "en"
    assert i18n.negotiate("de-DE,de;q=0.9,en;q=0.8") == "de"
    assert i18n.negotiate("fr-FR,fr;q=0.9,de;q=0.5,en;q=0.4") == "de"
    assert i18n.negotiate("en-US,de;q=0.9") == "en"
    assert i18n.negotiate("de;q=0, en;q=0.1") == "en"
    assert i18n.negotiate("fr, *;q=0.1") == "en"
    assert i18n.negotiate("de-AT") == "de"
    assert i18n.negotiate("x" * 5000) == "en"
    assert re.fullmatch(r"\d{2}\.\d{2}\.\d{4}, \d{2}:\d{2}:\d{2} UTC",
                        i18n.texts("de").date_time(__import__("datetime").datetime(
                            2026, 12, 5, 18, 30, tzinfo=__import__("datetime").timezone.utc)))
    assert i18n.texts("de").size(1536) == "1,5\u00a0KiB"
    assert i18n.texts("en").size(1536) == "1.5\u00a0KiB"
    assert i18n.texts("de").duration(7 * 86400) == "7 Tage"
