"""``update``: the one-file customer module replaces itself with the server's newer download.

The new file comes from the server the module was shipped for (TLS pinned to its CA), and it
replaces the running file only if its ``.sig`` verifies against the download-signing key embedded
in this file (``protocol.embedded_settings``) — not against a key the server sends now, so a
server that was taken over cannot push a module its operator never signed with that key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from modules.common.errors import ModuleError
from modules.common.link.enrollment import EnrollmentFailed, fetch_pinned_ca, trusting
from protocol import embedded_settings
from protocol.download_signature import SIG_SUFFIX, verify_file

CHUNK = 1 << 20


def _get(url: str, ctx: ssl.SSLContext, sink, timeout: float = 60) -> None:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as response:
            while chunk := response.read(CHUNK):
                sink(chunk)
    except urllib.error.HTTPError as exc:
        raise ModuleError(f"the server has no {url.rsplit('/', 1)[-1]} to offer (HTTP {exc.code})")
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        raise ModuleError(f"cannot download {url}: {getattr(exc, 'reason', exc)}")


def update(executable: Path, settings: dict | None, name: str | None = None) -> str:
    """Replace ``executable`` with the signed download of the same name; returns what happened."""
    if not settings or not settings.get("download_key"):
        raise ModuleError("this module carries no server settings with a download key: download "
                          "the new version from your server's download page instead")
    name = name or executable.name
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(settings["download_key"]))
        ca = fetch_pinned_ca(settings["server"], settings["ca_fingerprint"])
    except (ValueError, binascii.Error) as exc:
        raise ModuleError(f"the embedded download key is damaged ({exc})")
    except EnrollmentFailed as exc:
        raise ModuleError(str(exc))
    ctx = trusting(ca)
    base = settings["server"].rstrip("/") + "/console/download/" + quote(name)
    signature = bytearray()
    _get(base + SIG_SUFFIX, ctx, signature.extend)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=executable.parent, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            def sink(chunk: bytes) -> None:
                digest.update(chunk)
                out.write(chunk)
            _get(base, ctx, sink)
        if not verify_file(key, name, digest.hexdigest(), bytes(signature)):
            raise ModuleError(f"the downloaded {name} does not carry a valid signature of the "
                              "download key this module was shipped with: not installed")
        if embedded_settings.read(tmp) is None:
            raise ModuleError(f"the downloaded {name} carries no server settings: not installed")
        os.chmod(tmp, 0o755)
        os.replace(tmp, executable)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return f"updated {executable} (SHA-256 {digest.hexdigest()}, signature checked)"
