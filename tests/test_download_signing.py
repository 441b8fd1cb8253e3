"""Signed downloads: the server signs each offered file with its own Ed25519 key, shows the key's
fingerprint, serves NAME.sig, SHA256SUMS and its signature; a file changed after signing is
marked, not signed again.  Checked in Debian's Chromium, English and German, with screenshots."""

from __future__ import annotations

import hashlib
import os
import re

import pytest
from cryptography.hazmat.primitives import serialization

from protocol.download_signature import key_fingerprint, verify_file, verify_sums
from tests.fixtures_console import Console


@pytest.mark.e2e
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_downloads_are_signed_and_a_changed_file_is_marked(running_server, browser, db_url):
    srv = running_server
    downloads = srv.data_dir / "downloads"
    downloads.mkdir(exist_ok=True)
    installer = downloads / "hausmeister-customer-linux-x86_64"
    installer.write_bytes(os.urandom(2 * 1024 * 1024 + 5))
    other = downloads / "hausmeister-host_1.0_all.deb"
    other.write_bytes(os.urandom(4096))

    c = Console(browser, srv.url)
    try:
        c.go("/console/download")
        assert c.page.locator("tr.file").count() == 2  # .sig files and SHA256SUMS are not rows
        shown = c.page.locator("#signing-fingerprint").inner_text()
        r = c.page.request.get(srv.url + "/console/download-signing.pub")
        assert r.status == 200
        public = serialization.load_pem_public_key(r.body())
        assert key_fingerprint(public) == shown
        sha = hashlib.sha256(installer.read_bytes()).hexdigest()
        row = c.page.locator("tr.file", has_text=installer.name)
        assert row.locator("td.signature a").inner_text() == installer.name + ".sig"
        r = c.page.request.get(f"{srv.url}/console/download/{installer.name}.sig")
        assert r.status == 200 and verify_file(public, installer.name, sha, r.body())
        assert not verify_file(public, other.name, sha, r.body())  # bound to the name
        sums = c.page.request.get(srv.url + "/console/download/SHA256SUMS").body()
        sums_sig = c.page.request.get(srv.url + "/console/download/SHA256SUMS.sig").body()
        assert verify_sums(public, sums, sums_sig)
        assert f"{sha}  {installer.name}\n".encode() in sums
        c.shot("download-signed")

        # The key stays the same across views and restarts: it lives in the cert folder.
        key_file = srv.cert_dir / "downloads-signing.key"
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"

        # Someone swaps the installer: it is marked, not signed again, and left out of SHA256SUMS.
        installer.write_bytes(b"not what was signed" * 1000)
        c.go("/console/download")
        row = c.page.locator("tr.file", has_text=installer.name)
        assert "changed after signing: do not use" in row.locator("td.signature").inner_text()
        new_sha = hashlib.sha256(installer.read_bytes()).hexdigest()
        sig = (downloads / (installer.name + ".sig")).read_bytes()
        assert not verify_file(public, installer.name, new_sha, sig)
        sums = c.page.request.get(srv.url + "/console/download/SHA256SUMS").body()
        sums_sig = c.page.request.get(srv.url + "/console/download/SHA256SUMS.sig").body()
        assert installer.name.encode() not in sums and other.name.encode() in sums
        assert verify_sums(public, sums, sums_sig)
        c.assert_local_only()

        # The operator re-signs on purpose: the CLI names the changed file, --force signs it.
        refused = srv.cli("downloads", "sign")
        assert refused.returncode == 1 and re.search(rf"changed after signing +{installer.name}", refused.stdout)
        srv.ok("downloads", "sign", "--force")
        sig = (downloads / (installer.name + ".sig")).read_bytes()
        assert verify_file(public, installer.name, new_sha, sig)
    finally:
        c.close()

    german = Console(browser, srv.url)
    german.context.set_extra_http_headers({"Accept-Language": "de-DE,de;q=0.9"})
    try:
        german.go("/console/download")
        text = german.page.locator("#signing").inner_text()
        assert "Dieser Server signiert jede Datei" in text and shown in text
        row = german.page.locator("tr.file", has_text=installer.name)
        assert row.locator("td.signature").inner_text() == installer.name + ".sig"  # re-signed
        assert "Signatur" in german.page.locator("#files thead").inner_text()
        german.shot("download-signed-de")
    finally:
        german.close()
