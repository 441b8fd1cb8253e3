"""The customer module as one file (PyInstaller) that carries the server's address and CA
fingerprint: built from this checkout, put on the download page by ``downloads add-customer``,
downloaded over TLS with its signature, started with no options — it checks the server and asks
for the 8-digit ID with the server preset."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from modules.customer.onefile import with_embedded
from protocol import embedded_settings
from protocol.download_signature import verify_file
from tests.fixtures_x11 import stop_process, wait_for_window, xvfb  # noqa: F401 - fixture
from tests.test_console_pages import raw_get

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"server": "https://10.0.0.5:8443", "ca_fingerprint": "ab" * 32}


def test_settings_trailer_round_trip_and_replacement(tmp_path):
    body = os.urandom(70_000)
    source = tmp_path / "plain"
    source.write_bytes(body)
    assert embedded_settings.read(source) is None
    first = tmp_path / "first"
    embedded_settings.write_with_settings(source, first, **SETTINGS)
    assert embedded_settings.read(first) == SETTINGS
    assert first.read_bytes().startswith(body) and first.stat().st_mode & stat.S_IXUSR
    second = tmp_path / "second"  # a new address replaces the old trailer, not stacks on it
    embedded_settings.write_with_settings(first, second, "https://h:1", "cd" * 32)
    assert second.read_bytes()[: len(body)] == body
    assert len(second.read_bytes()) - len(first.read_bytes()) == len("https://h:1") - len(SETTINGS["server"])
    broken = tmp_path / "broken"
    broken.write_bytes(first.read_bytes()[:-40] + b"x" * 40)
    assert embedded_settings.read(broken) is None


def test_embedded_settings_fill_in_only_what_the_customer_left_out():
    asked = []
    argv = with_embedded([], SETTINGS, ask=lambda prompt: asked.append(prompt) or "1234 5678")
    assert argv == ["join", "--server", SETTINGS["server"], "--ca-fingerprint",
                    SETTINGS["ca_fingerprint"], "1234", "5678"]
    assert asked and "8-digit ID" in asked[0]
    assert with_embedded(["check"], SETTINGS)[:3] == ["check", "--server", SETTINGS["server"]]
    assert with_embedded(["12345678"], SETTINGS)[0] == "join"
    own = ["check", "--server-config", "x.toml"]
    assert with_embedded(own, SETTINGS) == own
    assert with_embedded(["check"], None) == ["check"]
    assert with_embedded([], SETTINGS, desktop=True) == ["gui", "--server", SETTINGS["server"],
                                                         "--ca-fingerprint",
                                                         SETTINGS["ca_fingerprint"]]
    assert with_embedded([], None, desktop=True) == ["gui"]


@pytest.fixture(scope="module")
def onefile(tmp_path_factory) -> Path:
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.fail("PyInstaller is missing: run `make install` (it is in the test extras)",
                    pytrace=False)
    out = tmp_path_factory.mktemp("onefile")
    built = subprocess.run([sys.executable, str(ROOT / "packaging" / "build_customer_onefile.py"),
                            "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    print(built.stdout.strip())
    return out / "hausmeister-customer-linux-x86_64"


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_downloaded_onefile_finds_its_server_and_asks_for_the_id(onefile, running_server, db_url,
                                                                  tmp_path):
    srv = running_server
    added = srv.cli("downloads", "add-customer", str(onefile))
    assert added.returncode == 0, added.stderr
    status, page = raw_get(srv.url, "/console/download")
    assert status == 200 and b"hausmeister-customer-linux-x86_64.sig" in page
    status, body = raw_get(srv.url, "/console/download/hausmeister-customer-linux-x86_64")
    assert status == 200
    status, sig = raw_get(srv.url, "/console/download/hausmeister-customer-linux-x86_64.sig")
    status, pem = raw_get(srv.url, "/console/download-signing.pub")
    import hashlib
    public = serialization.load_pem_public_key(pem)
    assert verify_file(public, onefile.name, hashlib.sha256(body).hexdigest(), sig)
    changed = bytearray(body)
    changed[len(changed) // 3] ^= 1
    assert not verify_file(public, onefile.name, hashlib.sha256(bytes(changed)).hexdigest(), sig)

    download = tmp_path / "Downloads" / onefile.name
    download.parent.mkdir()
    download.write_bytes(body)
    download.chmod(0o755)
    embedded = embedded_settings.read(download)
    assert embedded["server"] == srv.url and embedded["ca_fingerprint"] == srv.fingerprint
    assert embedded["download_key"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HAUSMEISTER") and k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["HOME"] = str(tmp_path / "home")  # a terminal: no desktop
    check = subprocess.run([str(download), "check"], capture_output=True, text=True, timeout=120,
                           env=env, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "the server's CA matches the fingerprint" in check.stdout

    # Started with nothing: it names the preset server, asks for the ID, and the server answers
    # (an ID nobody handed out is refused by the server, not by a missing address).
    started = subprocess.run([str(download)], input="9876 5432\n", capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
    assert f"Hausmeister remote support: server {srv.url}" in started.stdout
    assert "Enter the 8-digit ID your supporter reads out:" in started.stdout
    assert started.returncode != 0
    assert "this ID is unknown or expired" in started.stderr, started.stderr

    # update: a file swapped on the server (changed after signing) is not taken ...
    served = srv.data_dir / "downloads" / onefile.name
    original = served.read_bytes()
    served.write_bytes(original + b"\0")
    before = download.read_bytes()
    refused = subprocess.run([str(download), "update"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not carry a valid signature" in lines[0], refused.stderr
    assert download.read_bytes() == before
    # ... a different file the operator put there on purpose (and so signed) is.
    assert srv.cli("downloads", "add-customer", "--server", srv.url + "/",
                   str(onefile)).returncode == 0
    done = subprocess.run([str(download), "update"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "signature checked" in done.stdout, done.stderr
    assert download.read_bytes() == served.read_bytes() != before
    assert embedded_settings.read(download)["server"] == srv.url + "/"
    again = subprocess.run([str(download), "check"], capture_output=True, text=True, timeout=120,
                           env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_onefile_opens_the_customer_window_on_a_desktop(onefile, running_server, db_url, xvfb,
                                                        tmp_path):
    """Double-clicked on a desktop: the customer's window with the server preset, ready for the
    ID (Xvfb, the real xcb platform, the one-file exactly as downloaded)."""
    import mss
    import mss.tools

    srv = running_server
    assert srv.cli("downloads", "add-customer", str(onefile)).returncode == 0
    status, body = raw_get(srv.url, "/console/download/" + onefile.name)
    assert status == 200
    download = tmp_path / onefile.name
    download.write_bytes(body)
    download.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HAUSMEISTER", "QT_"))}
    env.update(DISPLAY=xvfb.name, HOME=str(tmp_path / "home"), LANG="C.UTF-8",
               LANGUAGE="en", QT_QPA_PLATFORM="xcb")
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        app = subprocess.Popen([str(download)], env=env, stdout=out, stderr=subprocess.STDOUT,
                               cwd=tmp_path)
    try:
        try:
            wait_for_window(xvfb.name, "Hausmeister Support", timeout=90)
        except TimeoutError:
            pytest.fail(f"no customer window: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(1.0)  # let Qt paint the first frame before the screenshot
        assert app.poll() is None, log.read_text(errors="replace")
        shots = ROOT / "test-artifacts" / "apps"
        shots.mkdir(parents=True, exist_ok=True)
        with mss.mss(display=xvfb.name) as screen:
            grab = screen.grab(screen.monitors[1])
            mss.tools.to_png(grab.rgb, grab.size, output=str(shots / "customer-onefile-en.png"))
    finally:
        stop_process(app)
    assert "No server is set up" not in log.read_text(errors="replace")
