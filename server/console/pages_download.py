"""The customer module's download page: public, with this server's address and CA fingerprint.

Customers open it without an account: it shows the exact command to join a session, a
pre-filled ``--server-config`` file, the support terms they will be asked to accept, and the
installer files of the operator's offline bundle (``server.downloads_dir``) with size and
SHA-256.  Files are streamed from disk (never read whole into memory); only plain names of
regular files in that one folder are served, so no path leads anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from twisted.web import static

from protocol.identity import fingerprint
from protocol.runtime import run_blocking

from .. import download_signing

from ..i18n import Text
from .core import Ctx, PageError, route
from .pages_help import link_outside_urls

#: what a served file may be called: no path, no leading dot, nothing a shell or URL mangles
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
HASH_CHUNK = 1 << 20
SETTINGS_NAME = "customer.toml"


@dataclass(frozen=True)
class Offered:
    name: str
    size: int
    sha256: str
    signature: str = ""


class HashCache:
    """SHA-256 of files by (path, inode, size, mtime): a big installer is hashed once, not per view."""

    def __init__(self) -> None:
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._known:
                return self._known[key]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
        with self._lock:
            self._known = {k: v for k, v in self._known.items() if k[0] != key[0]}
            self._known[key] = digest.hexdigest()
        return self._known[key]


_hashes = HashCache()


def safe_file(folder: Path, name: str) -> Path | None:
    """``folder/name`` if ``name`` is a plain safe name of a regular file (not a link) there."""
    if not SAFE_NAME.match(name) or ".." in name:
        return None
    path = Path(folder) / name
    try:
        st = path.lstat()
    except OSError:
        return None
    return path if stat.S_ISREG(st.st_mode) else None


def offered_files(folder: Path) -> tuple[list[Offered], int]:
    """Blocking: the files offered for download, and how many others were left out by name."""
    offered, skipped = [], 0
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return [], 0
    for entry in entries:
        if not entry.is_file(follow_symlinks=False) or download_signing.is_signature_file(entry.name):
            continue  # signatures are served beside their file, not offered on their own
        if safe_file(folder, entry.name) is None:
            skipped += 1
            continue
        st = entry.stat(follow_symlinks=False)
        offered.append(Offered(entry.name, st.st_size, _hashes.sha256(Path(entry.path), st)))
    return offered, skipped


def offered_and_signed(folder: Path, cert_dir: Path) -> tuple[list[Offered], int, str]:
    """Blocking: the offered files with their signature state, and the signing key's fingerprint
    (files new to the folder are signed now; see server/download_signing.py)."""
    files, skipped = offered_files(folder)
    if not (Path(cert_dir) / "ca.crt").exists() or not Path(folder).is_dir():
        return files, skipped, ""
    key = download_signing.signing_key(cert_dir)
    states = download_signing.sign_folder(folder, [(f.name, f.sha256) for f in files], key)
    return ([Offered(f.name, f.size, f.sha256, states.get(f.name, "")) for f in files], skipped,
            download_signing.fingerprint(key))


def server_facts(ctx: Ctx) -> dict[str, str]:
    """The server address and the CA fingerprint customers pin."""
    store = ctx.console.store
    return {"server": ctx.console.base_url(),
            "fingerprint": fingerprint(store.ca_cert()) if store is not None else ""}


def support_terms(ctx: Ctx) -> str:
    broker = ctx.console.broker
    if broker is not None and getattr(broker, "terms", None) is not None:
        return broker.terms
    config = ctx.console.config
    return config.adhoc.terms if config is not None else ""


def settings_file(server: str, ca_fingerprint: str) -> str:
    """The ``--server-config`` file the customer and host modules read (TOML)."""
    return ("# Hausmeister server settings for hausmeister-customer and hausmeister-host:\n"
            "#   hausmeister-customer --server-config customer.toml 1234 5678\n"
            "# Compare ca_fingerprint with the one your administrator told you before using it.\n"
            f"server = {json.dumps(server)}\n"
            f"ca_fingerprint = {json.dumps(ca_fingerprint)}\n")


@route("GET", "download", login=False)
def download_page(ctx: Ctx):
    facts = server_facts(ctx)
    terms = link_outside_urls(support_terms(ctx))
    folder = ctx.console.config.server.downloads_dir if ctx.console.config else None

    def show(found: tuple[list[Offered], int, str]) -> bytes:
        files, skipped, signing_fingerprint = found
        return ctx.page("download.html", files=files, skipped=skipped, terms=terms,
                        signing_fingerprint=signing_fingerprint, notice=ctx.take_notice(),
                        **facts)

    if folder is None:
        return show(([], 0, ""))
    cert_dir = ctx.console.config.server.cert_dir
    return run_blocking(offered_and_signed, folder, cert_dir).addCallback(show)


@route("GET", "download-signing.pub", login=False)
def signing_public_key(ctx: Ctx):
    """The public half of the key that signs the downloads (PEM)."""
    cert_dir = ctx.console.config.server.cert_dir if ctx.console.config else None
    if cert_dir is None or not (Path(cert_dir) / download_signing.KEY_NAME).exists():
        return ctx.page("notfound.html", 404)

    def pem() -> bytes:
        return download_signing.public_pem(download_signing.signing_key(cert_dir))

    return run_blocking(pem).addCallback(
        lambda body: ctx.download(body, b"application/x-pem-file", download_signing.PUBLIC_NAME))


@route("GET", "customer.toml", login=False)
def customer_settings(ctx: Ctx) -> bytes:
    facts = server_facts(ctx)
    if not facts["fingerprint"]:
        raise PageError(404, Text("this server has no CA certificate to name"))
    body = settings_file(facts["server"], facts["fingerprint"]).encode()
    return ctx.download(body, b"application/toml; charset=utf-8", SETTINGS_NAME)


@route("GET", "download/{name}", login=False)
def download_file(ctx: Ctx):
    """Stream one file of the downloads folder (synchronous: the producer writes the body)."""
    folder = ctx.console.config.server.downloads_dir if ctx.console.config else None
    path = safe_file(folder, ctx.params["name"]) if folder is not None else None
    if path is None:
        return ctx.page("notfound.html", 404)
    ctx.download(b"", b"application/octet-stream", path.name)
    resource = static.File(str(path), defaultType="application/octet-stream")
    resource.type, resource.encoding = "application/octet-stream", None
    return resource.render(ctx.request)
