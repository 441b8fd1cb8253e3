"""Browser fixtures for the console tests: Debian's Chromium driven by Playwright (never a
downloaded browser), one context per user, every request the page makes recorded, screenshots
to test-artifacts/console/.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"
PAYLOAD = "x'; DROP TABLE hosts; --\"><img src=/console/pwned id=pwned><script>window.pwned=1</script>"

from playwright import sync_api


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Debian chromium is missing: run `make test-system-packages`")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run",
                                    "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


class Console:
    """One browser context (its own cookies) that records every request the page makes."""

    def __init__(self, browser, url: str) -> None:
        self.url = url
        self.context = browser.new_context(ignore_https_errors=True)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))

    def go(self, path: str):
        response = self.page.goto(self.url + path)
        return response

    def login(self, name: str, password: str):
        self.go("/console/login")
        self.page.fill("#user", name)
        self.page.fill("#password", password)
        with self.page.expect_navigation():
            self.page.click("#login")

    def csrf(self) -> str:
        return self.page.locator("input[name=csrf]").first.get_attribute("value")

    def assert_local_only(self) -> None:
        assert self.requests, "the browser made no request at all"
        outside = [u for u in self.requests if not u.startswith(self.url + "/")]
        assert outside == [], f"requests to other hosts: {outside}"

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


def add_session(db_url: str, tenant: str, supporter: str, peer: str) -> None:
    """A finished session row for ``tenant``, written the way the relay records one."""
    from server.db import Database
    from server.db.models import Session, Tenant
    db = Database(db_url)
    try:
        with db.session() as s:
            tenant_id = s.query(Tenant).filter_by(name=tenant).one().id
            start = dt.datetime(2026, 11, 1, 9, 0, tzinfo=dt.timezone.utc)
            s.add(Session(id=str(uuid.uuid4()), tenant_id=tenant_id, kind="adhoc",
                          supporter_identity=supporter, peer_identity=peer, peer_address="10.0.0.7",
                          created_at=start, started_at=start, ended_at=start + dt.timedelta(minutes=5),
                          bytes_to_peer=1234, bytes_to_supporter=56789, end_reason="supporter ended"))
    finally:
        db.dispose()


def tenant_of_admin(srv) -> str:
    out = srv.ok("user", "list")
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[0] == "admin":
            return fields[2]
    raise AssertionError(f"admin not in user list:\n{out}")


def admin_page(browser, srv, lang: str, password: str):
    """A new browser context in ``lang`` at 1280x800, signed in to ``srv``'s console as the first
    admin; returns ``(context, page)`` (the caller closes the context)."""
    context = browser.new_context(ignore_https_errors=True, locale=lang,
                                  extra_http_headers={"Accept-Language": lang},
                                  viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(srv.url + "/console/login")
    page.fill("#user", "admin")
    page.fill("#password", password)
    with page.expect_navigation():
        page.click("#login")
    return context, page
