"""Settings page and avatars in Debian's Chromium against a real server process, with a real
aiosmtpd relay, a real moto S3 server and a stand-in Gravatar server — all on 127.0.0.1.

Screenshots: test-artifacts/console/settings.png, avatar.png.
"""

from __future__ import annotations

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from PIL import Image

from server import avatars, settings_store
from server.config import from_mapping
from server.egress import count_refusals
from server.db import Database
from server.db.models import User
from tests.fixtures_console import PAYLOAD, Console
from tests.fixtures_server import (
    ADMIN_PASSWORD, ServerProcess, add_enrolled_supporter, free_port, write_config,
)
from tests.module_process import ModuleProcess
from tests.test_avatars import BUCKET, moto_s3, picture  # noqa: F401 (moto_s3 is a fixture)
from tests.test_e2e_brokering import answers, server_args, wait_until
from tests.test_mail import StoreHandler

BOB_PASSWORD = "bob-password-789"
RELAY_PASSWORD = "relay-secret-never-shown"
MAX_KIB = 64


@pytest.mark.parametrize("key, value, message", [
    ("gravatar", "maybe", "expected on or off"),
    ("support_terms", "   ", "must not be empty"),
    ("support_terms", "x" * 4001, "at most 4000 characters"),
    ("support_terms", "a\0b", "NUL"),
    ("retention_days", "-1", "whole number of days from 0 to 36500"),
    ("retention_days", "1e3", "whole number"),
    ("retention_days", 36501, "whole number"),
    ("retention_days", True, "whole number"),
    ("colour", "red", "unknown setting"),
])
def test_settings_are_validated_with_clear_errors(key, value, message):
    with pytest.raises(settings_store.SettingError, match=message):
        settings_store.validate(key, value)


def test_stored_settings_override_the_config_file(database, tmp_path):
    config = from_mapping({"server": {"data_dir": str(tmp_path)}, "retention": {"protocol_days": 7},
                           "adhoc": {"terms": "config terms"}}, tmp_path)
    assert database.call(settings_store.all_settings, config) == {
        "gravatar": False, "support_terms": "config terms", "retention_days": 7}
    with database.session() as s:
        assert settings_store.put(s, "gravatar", "on", "admin") is True
        assert settings_store.put(s, "support_terms", " new\r\nterms ", "admin") == "new\nterms"
        assert settings_store.put(s, "retention_days", "0", "admin") == 0
    assert database.call(settings_store.all_settings, config) == {
        "gravatar": True, "support_terms": "new\nterms", "retention_days": 0}
    changes = database.call(settings_store.changes)
    assert set(changes) == {"gravatar", "support_terms", "retention_days"}
    assert changes["gravatar"]["by"] == "admin"
    with database.session() as s:  # a stored value that no longer validates: the config's value
        s.get(settings_store.Setting, "retention_days").value = '"forever"'
    assert database.call(settings_store.get, config, "retention_days") == 7


def accept_any(server, session, envelope, mechanism, auth_data):
    from aiosmtpd.smtp import AuthResult
    return AuthResult(success=True, handled=False, auth_data=auth_data)


class GravatarStandIn(BaseHTTPRequestHandler):
    """Answers every picture request with a small PNG and remembers the paths."""

    paths: list[str] = []
    png = picture("PNG", (64, 64), (20, 120, 200))

    def do_GET(self):
        self.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


@pytest.fixture
def gravatar_server():
    GravatarStandIn.paths = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), GravatarStandIn)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/avatar/"
    httpd.shutdown()
    httpd.server_close()


class RelayHandler(StoreHandler):
    """Stores mail; refuses the mailbox ``bounce@...`` for good (550)."""

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("bounce@"):
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def smtp_relay():
    handler = RelayHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(),
                            authenticator=accept_any, auth_require_tls=False)
    controller.start()
    yield handler, controller.port
    controller.stop()


def start_server(tmp_path, db_url, extra: str) -> ServerProcess:
    data = tmp_path / "data"
    srv = ServerProcess(write_config(tmp_path / "hausmeister.toml", data, db_url, extra), data)
    result = srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return srv.start()


def user_ids(db_url: str) -> dict[str, int]:
    db = Database(db_url)
    try:
        return db.call(lambda s: {u.name: u.id for u in s.query(User)})
    finally:
        db.dispose()


def avatar_key(db_url: str, name: str) -> str | None:
    db = Database(db_url)
    try:
        return db.call(lambda s: s.query(User).filter_by(name=name).one().avatar_key)
    finally:
        db.dispose()


def audit_actions(db_url: str) -> list[str]:
    from server.db.models import AuditEntry
    db = Database(db_url)
    try:
        return db.call(lambda s: [a.action for a in s.query(AuditEntry)])
    finally:
        db.dispose()


def submit(c: Console, selector: str) -> None:
    with c.page.expect_navigation():
        c.page.click(selector)


def bucket_keys(moto) -> list[str]:
    return [o["Key"] for o in moto.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def portrait() -> bytes:
    """A JPEG with a face-like drawing (for the screenshot) and camera data to be dropped."""
    from PIL import ImageDraw
    img = Image.linear_gradient("L").resize((400, 240)).convert("RGB")
    img = Image.merge("RGB", (img.getchannel(0), Image.new("L", img.size, 120),
                              img.getchannel(0).point(lambda v: 255 - v)))
    draw = ImageDraw.Draw(img)
    draw.ellipse((140, 40, 260, 200), fill=(240, 200, 160))
    draw.ellipse((170, 90, 185, 105), fill=(40, 40, 40))
    draw.ellipse((215, 90, 230, 105), fill=(40, 40, 40))
    draw.arc((170, 120, 230, 170), 20, 160, fill=(120, 30, 30), width=5)
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    out = io.BytesIO()
    img.save(out, "JPEG", exif=exif)
    return out.getvalue()


def noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((side, side), 120).convert("RGB").save(out, "PNG")
    return out.getvalue()


def customer_sees_terms(srv, tmp_path, home, marker: str) -> None:
    """An ad-hoc session set up through the real CLIs: the customer is shown the current terms."""
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--home", str(home))
    customer = None
    try:
        nameplate, secret = supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups()
        customer = ModuleProcess("customer", *server_args(srv), f"{nameplate} {secret}", "--pipe",
                                 "--answers", answers(tmp_path, "n"))
        customer.wait_for_line(marker)
    finally:
        for proc in (customer, supporter):
            if proc is not None:
                proc.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_settings_mail_s3_gravatar_terms_retention_and_avatars(
        tmp_path, db_url, browser, moto_s3, gravatar_server, smtp_relay):
    handler, smtp_port = smtp_relay
    srv = start_server(tmp_path, db_url, f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
security = "none"
username = "relay-user"
password = "{RELAY_PASSWORD}"
from_address = "hausmeister@example.test"

[s3]
enabled = true
endpoint_url = "{moto_s3.endpoint}"
bucket = "{BUCKET}"
access_key = "testing"
secret_key = "testing"

[avatars]
gravatar_url = "{gravatar_server}"
max_upload_kib = {MAX_KIB}
""")
    admin = bob = None
    try:
        srv.ok("user", "add", "carla", "--role", "auditor", "--email", " Carla@Example.TEST ",
               "--password-stdin", stdin=BOB_PASSWORD + "\n")
        srv.ok("tenant", "add", "b")
        srv.ok("user", "add", "bob", "--role", "admin", "--tenant", "b", "--password-stdin",
               stdin=BOB_PASSWORD + "\n")
        alice = add_enrolled_supporter(srv, "alice", tmp_path / "alice")
        ids = user_ids(db_url)

        admin = Console(browser, srv.url)
        admin.login("admin", ADMIN_PASSWORD)
        admin.go("/console/settings")
        page = admin.page
        assert page.locator("#smtp-relay").inner_text() == f"127.0.0.1:{smtp_port}"
        assert RELAY_PASSWORD not in page.content()
        assert page.locator("#s3-endpoint").inner_text() == moto_s3.endpoint
        assert "egress allow-list" in page.content()
        assert page.locator("#gravatar-state").inner_text() == "off"

        # Test mail: a payload address is refused and shown as text; a real one arrives.
        page.fill("#mail-to", PAYLOAD)
        page.eval_on_selector("#mail-to", "e => e.type = 'text'")
        submit(admin, "#mail-test")
        assert "not a single mail address" in page.locator("#mail-error").inner_text()
        assert page.locator("#pwned").count() == 0 and page.evaluate("window.pwned") is None
        page.fill("#mail-to", "ops@example.test")
        submit(admin, "#mail-test")
        assert "Test mail to ops@example.test queued" in page.locator("#notice").inner_text()
        wait_until(lambda: handler.messages, timeout=20, what="the test mail at aiosmtpd")
        sender, rcpts, content, login = handler.messages[0]
        assert rcpts == ["ops@example.test"] and b"Hausmeister test mail" in content
        assert login == "relay-user"
        page.fill("#mail-to", "bounce@example.test")
        submit(admin, "#mail-test")

        def counted():
            admin.go("/console/settings")
            text = page.locator("#mail-counts").inner_text()
            return "1 failed" in text and text
        assert "1 sent" in wait_until(counted, timeout=20, what="the bounce marked failed")
        failure = page.locator("#mail-failures tr.failure")
        assert failure.count() == 1 and "bounce@example.test" in failure.inner_text()
        assert "550" in failure.inner_text()

        # S3 test: passes with moto; a missing bucket is a clear error, nothing changed.
        submit(admin, "#s3-test")
        assert page.locator("#s3-result").inner_text().startswith("S3 test passed")
        moto_s3.client().delete_bucket(Bucket=BUCKET)
        submit(admin, "#s3-test")
        result = page.locator("#s3-result").inner_text()
        assert "S3 test failed" in result and "does not exist" in result
        assert "Nothing was changed" in result
        moto_s3.client().create_bucket(Bucket=BUCKET)

        # Stored settings: bad values are refused with a message, payloads escaped.
        for bad, message in (("abc", "whole number of days"), ("-1", "whole number"),
                             (PAYLOAD, "whole number")):
            page.fill("#days", bad)
            submit(admin, "#retention-save")
            assert message in page.locator("#setting-error").inner_text()
            assert page.locator("#pwned").count() == 0
        page.fill("#days", "30")
        submit(admin, "#retention-save")
        assert "older than 30 days" in page.locator("#notice").inner_text()
        assert page.locator("#retention-state").inner_text() == "Currently: 30 days."
        marker = "Terms-Marker-4711"
        page.fill("#terms", f"{marker}: we only look. {PAYLOAD}")
        submit(admin, "#terms-save")
        assert "Support terms saved" in page.locator("#notice").inner_text()
        assert page.input_value("#terms") == f"{marker}: we only look. {PAYLOAD}"
        assert page.locator("#pwned").count() == 0 and page.evaluate("window.pwned") is None
        page.fill("#terms", " ")
        submit(admin, "#terms-save")
        assert "must not be empty" in page.locator("#setting-error").inner_text()
        r = page.request.post(f"{srv.url}/console/settings/terms", max_redirects=0,
                              form={"csrf": admin.csrf(), "terms": "x" * 4001})
        assert r.status == 400 and "at most 4000 characters, got 4001" in r.text()
        submit(admin, "#gravatar-toggle")
        assert page.locator("#gravatar-state").inner_text() == "on"
        admin.shot("settings")

        # The new terms reach the broker at once: the next ad-hoc customer is shown them.
        customer_sees_terms(srv, tmp_path, alice, marker)

        # Avatars: initials for a user without picture and mail; Gravatar for one with mail.
        svg = page.request.get(f"{srv.url}/console/avatar/{ids['admin']}")
        assert svg.status == 200 and svg.headers["content-type"] == "image/svg+xml"
        assert b">AD</text>" in svg.body()
        md5 = hashlib.md5(b"carla@example.test").hexdigest()
        to_gravatar = page.request.get(f"{srv.url}/console/avatar/{ids['carla']}", max_redirects=0)
        assert to_gravatar.status == 303
        assert to_gravatar.headers["location"] == f"{gravatar_server}{md5}?d=404&s=64"

        # Upload: a real picture goes to the S3 bucket, re-encoded, and is served back.
        admin.go("/console/avatar")
        assert "Your initials" in page.locator("#avatar-source").inner_text()
        original = portrait()
        page.set_input_files("#picture", files=[{"name": "me.jpg", "mimeType": "image/jpeg",
                                                 "buffer": original}])
        submit(admin, "#upload")
        assert "Your picture is saved" in page.locator("#notice").inner_text()
        assert bucket_keys(moto_s3) == [f"avatars/{ids['admin']}.png"]
        assert avatar_key(db_url, "admin") == f"s3:avatars/{ids['admin']}.png"
        expected = avatars.clean_upload(original, MAX_KIB)
        stored = moto_s3.client().get_object(Bucket=BUCKET, Key=f"avatars/{ids['admin']}.png")
        assert stored["Body"].read() == expected and b"SecretCam" not in expected
        served = page.request.get(f"{srv.url}/console/avatar/{ids['admin']}")
        assert served.headers["content-type"] == "image/png" and served.body() == expected
        assert page.locator("#current-avatar").evaluate("img => img.naturalWidth") == 128
        admin.shot("avatar")

        # Not a picture, too large, wrong CSRF: refused, nothing stored.
        for name, data, message in (
                ("evil.png", PAYLOAD.encode(), "not a picture"),
                ("big.png", noise_png(300), f"at most {MAX_KIB} KiB"),
                ("cut.png", picture("PNG")[:150], "damaged or incomplete")):
            page.set_input_files("#picture", files=[{"name": name, "mimeType": "image/png",
                                                     "buffer": data}])
            submit(admin, "#upload")
            assert message in page.locator("#error").inner_text(), name
            assert page.locator("#pwned").count() == 0
        forged = page.request.post(f"{srv.url}/console/avatar", max_redirects=0, multipart={
            "csrf": "forged", "picture": {"name": "x.png", "mimeType": "image/png",
                                          "buffer": picture("PNG", (50, 50), (0, 0, 0))}})
        assert forged.status == 403
        assert moto_s3.client().get_object(
            Bucket=BUCKET, Key=f"avatars/{ids['admin']}.png")["Body"].read() == expected

        # Deleting the picture removes the object; the initials show again.
        admin.go("/console/avatar")
        submit(admin, "#delete-avatar")
        assert "Your picture is deleted" in page.locator("#notice").inner_text()
        assert bucket_keys(moto_s3) == [] and avatar_key(db_url, "admin") is None
        assert page.request.get(f"{srv.url}/console/avatar/{ids['admin']}").headers[
            "content-type"] == "image/svg+xml"
        page.set_input_files("#picture", files=[{"name": "me.png", "mimeType": "image/png",
                                                 "buffer": picture("PNG", (90, 90))}])
        submit(admin, "#upload")
        assert bucket_keys(moto_s3) == [f"avatars/{ids['admin']}.png"]

        # A payload in the hidden Gravatar field is refused and shown as text.
        admin.go("/console/settings")
        r = page.request.post(f"{srv.url}/console/settings/gravatar", max_redirects=0,
                              form={"csrf": admin.csrf(), "gravatar": PAYLOAD[:10]})
        assert r.status == 400 and "expected on or off" in r.text()
        assert "<img src=/console/pwned" not in r.text()

        # Every change is in the audit log, under the operator's tenant.
        actions = audit_actions(db_url)
        for action in ("settings.mail_test", "settings.s3_test", "settings.retention_days",
                       "settings.support_terms", "settings.gravatar", "avatar.upload",
                       "avatar.delete"):
            assert action in actions, action

        # Gravatar on the avatar page: the browser fetches it from the configured origin only.
        carla = Console(browser, srv.url)
        try:
            carla.login("carla", BOB_PASSWORD)
            carla.go("/console/avatar")
            assert "Your Gravatar" in carla.page.locator("#avatar-source").inner_text()
            wait_until(lambda: any(p.startswith(f"/avatar/{md5}?d=404&s=64")
                                   for p in GravatarStandIn.paths), what="the Gravatar fetch")
            assert carla.page.locator("#current-avatar").evaluate("img => img.naturalWidth") == 64
            outside = [u for u in carla.requests if not u.startswith(srv.url + "/")]
            assert outside and all(u.startswith(gravatar_server) for u in outside), outside
            # An auditor of the operator's tenant is no admin: no settings.
            assert carla.go("/console/settings").status == 403
        finally:
            carla.close()

        # Another tenant's admin: no settings, no avatars of tenant A.
        bob = Console(browser, srv.url)
        bob.login("bob", BOB_PASSWORD)
        assert bob.page.locator("#nav-settings").count() == 0
        assert bob.go("/console/settings").status == 403
        assert bob.go(f"/console/avatar/{ids['admin']}").status == 404
        assert bob.go("/console/avatar/99999").status == 404
        bob.go("/console/hosts")
        r = bob.page.request.post(f"{srv.url}/console/settings/gravatar", max_redirects=0,
                                  form={"csrf": bob.csrf(), "gravatar": "off"})
        assert r.status == 403
        assert bob.go(f"/console/avatar/{ids['bob']}").status == 200

        # S3 down: the picture falls back to the initials, the test button says why.
        admin.go("/console/settings")
        moto_s3.stop()
        down = page.request.get(f"{srv.url}/console/avatar/{ids['admin']}")
        assert down.status == 200 and down.headers["content-type"] == "image/svg+xml"
        submit(admin, "#s3-test")
        assert "cannot be reached" in page.locator("#s3-result").inner_text()
        admin.assert_local_only()
    finally:
        for c in (admin, bob):
            if c is not None:
                c.close()
        srv.stop()

    # A restart keeps what the console changed.
    srv.start()
    again = Console(browser, srv.url)
    try:
        again.login("admin", ADMIN_PASSWORD)
        again.go("/console/settings")
        assert again.page.locator("#gravatar-state").inner_text() == "on"
        assert again.page.input_value("#terms").startswith(marker)
        assert again.page.locator("#retention-state").inner_text() == "Currently: 30 days."
        assert "gravatar=True, retention 30 days" in srv.log()   # applied at start
    finally:
        again.close()
        srv.stop()
    # Mail, S3 and Gravatar made the server itself connect only where the config allows: its
    # egress guard refused nothing (Gravatar pictures are fetched by the browser, not the server).
    refusals = srv.data_dir / "egress-refusals.jsonl"
    assert not refusals.exists() or count_refusals(refusals) == 0, refusals.read_text()


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_without_relay_and_s3_no_mail_and_pictures_in_the_data_folder(tmp_path, db_url, browser):
    srv = start_server(tmp_path, db_url, "")
    c = Console(browser, srv.url)
    try:
        c.login("admin", ADMIN_PASSWORD)
        c.go("/console/settings")
        assert c.page.locator("#mail-off").is_visible()
        assert c.page.locator("#s3-off").is_visible() and c.page.locator("#s3-test").count() == 0
        c.page.fill("#mail-to", "ops@example.test")
        submit(c, "#mail-test")
        assert ("no SMTP relay configured; set [mail] smtp_host"
                in c.page.locator("#mail-error").inner_text())
        r = c.page.request.post(f"{srv.url}/console/settings/s3-test", max_redirects=0,
                                form={"csrf": c.csrf()})
        assert r.status == 409 and "S3 is off" in r.text()

        admin_id = user_ids(db_url)["admin"]
        c.go("/console/avatar")
        original = picture("GIF", (60, 140))
        c.page.set_input_files("#picture", files=[{"name": "me.gif", "mimeType": "image/gif",
                                                   "buffer": original}])
        submit(c, "#upload")
        assert "this server's data folder" in c.page.locator("#avatar-source").inner_text()
        stored = srv.data_dir / "avatars" / f"{admin_id}.png"
        assert stored.read_bytes() == avatars.clean_upload(original, 512)
        served = c.page.request.get(f"{srv.url}/console/avatar/{admin_id}")
        assert served.body() == stored.read_bytes()
        submit(c, "#delete-avatar")
        assert not stored.exists()
        c.assert_local_only()
    finally:
        c.close()
        srv.stop()
