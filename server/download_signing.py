"""The server's download-signing key and the signatures beside the files it offers.

A file that arrives in the downloads folder is signed the first time the download page lists it
(``NAME.sig``; format in ``protocol.download_signature``).  A file whose content no longer fits
its existing signature is *not* signed again: the page marks it as changed after signing, and
only an operator re-signs it on purpose (``hausmeister-server downloads sign --force``).
``SHA256SUMS`` and ``SHA256SUMS.sig`` always describe the files whose signatures hold.
Blocking file work: call it through ``protocol.runtime.run_blocking``.
"""

from __future__ import annotations

import base64
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.download_signature import (SIG_SUFFIX, SUMS_NAME, key_fingerprint, signed_message,
                                         verify_file)

KEY_NAME = "downloads-signing.key"
PUBLIC_NAME = "downloads-signing.pub"
#: what the folder holds besides the offered files
SIGNATURE_NAMES = (SUMS_NAME, SUMS_NAME + SIG_SUFFIX)

_lock = threading.Lock()


def is_signature_file(name: str) -> bool:
    return name.endswith(SIG_SUFFIX) or name in SIGNATURE_NAMES


def signing_key(cert_dir: Path) -> Ed25519PrivateKey:
    """The key in ``cert_dir`` (created on first use, mode 0600, never replaced)."""
    path = Path(cert_dir) / KEY_NAME
    with _lock:
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(pem)
        return serialization.load_pem_private_key(path.read_bytes(), password=None)


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: Ed25519PrivateKey) -> str:
    return key_fingerprint(key.public_key())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    tmp.replace(path)


def sign_folder(folder: Path, files: list[tuple[str, str]], key: Ed25519PrivateKey,
                force: bool = False) -> dict[str, str]:
    """Sign ``files`` ([(name, sha256)]) where they have no signature yet (or all, ``force``).

    Returns {name: "signed" | "changed after signing" | "unsigned (folder not writable)"}.
    """
    public = key.public_key()
    state: dict[str, str] = {}
    good: list[tuple[str, str]] = []
    with _lock:
        for name, sha256 in files:
            sig_path = Path(folder) / (name + SIG_SUFFIX)
            if sig_path.is_file() and not force:
                if verify_file(public, name, sha256, sig_path.read_bytes()):
                    state[name] = "signed"
                    good.append((name, sha256))
                else:
                    state[name] = "changed after signing"
                continue
            try:
                _write(sig_path, base64.b64encode(key.sign(signed_message(name, sha256))) + b"\n")
            except OSError:
                state[name] = "unsigned (folder not writable)"
                continue
            state[name] = "signed"
            good.append((name, sha256))
        sums = "".join(f"{sha}  {name}\n" for name, sha in sorted(good)).encode()
        sums_path = Path(folder) / SUMS_NAME
        try:
            if not sums_path.is_file() or sums_path.read_bytes() != sums:
                _write(sums_path, sums)
                _write(Path(folder) / (SUMS_NAME + SIG_SUFFIX),
                       base64.b64encode(key.sign(sums)) + b"\n")
        except OSError:
            pass
    return state


# --- `hausmeister-server downloads sign` (registered in server/cli.py) -------------------------

def cmd_downloads_sign(config, args) -> int:
    """Sign what the downloads folder offers now; --force re-signs files changed on purpose."""
    import sys

    from .console.pages_download import offered_files
    folder, cert_dir = config.server.downloads_dir, config.server.cert_dir
    if not (Path(cert_dir) / "ca.crt").exists():
        print(f"hausmeister-server: error: no server is set up in {config.server.data_dir}: run "
              "`hausmeister-server init` first", file=sys.stderr)
        return 2
    files, _skipped = offered_files(folder)
    key = signing_key(cert_dir)
    states = sign_folder(folder, [(f.name, f.sha256) for f in files], key, force=args.force)
    for name, state in sorted(states.items()):
        print(f"{state:32} {name}")
    print(f"download-signing key fingerprint: {fingerprint(key)}")
    return 1 if any(s != "signed" for s in states.values()) else 0


def server_url(config) -> str:
    """The address the download page names: the running server's, else the configured one."""
    from .state import read_state
    state = read_state(config.server.data_dir)
    if state and state.get("https_url") and isinstance(state.get("pid"), int):
        try:
            os.kill(state["pid"], 0)  # only a server that still runs has these ports
            return state["https_url"]
        except OSError:
            pass
    return f"https://{config.server.public_host}:{config.listen.https_port}"


def cmd_downloads_add_customer(config, args) -> int:
    """Offer the customer one-file with this server's address and CA fingerprint inside."""
    import sys

    from protocol import embedded_settings
    from protocol.identity import fingerprint as ca_fingerprint

    from . import pki
    from .console.pages_download import SAFE_NAME, offered_files
    store = pki.CertStore(config.server.cert_dir)
    source = Path(args.file)
    problem = None
    if not store.exists():
        problem = f"no server is set up in {config.server.data_dir}: run `hausmeister-server init` first"
    elif not source.is_file():
        problem = f"{source} is not a file: pass the customer one-file from the bundle's modules/"
    elif not SAFE_NAME.match(source.name):
        problem = f"{source.name!r} is not a name the download page offers (letters, digits, . _ -)"
    if problem:
        print(f"hausmeister-server: error: {problem}", file=sys.stderr)
        return 2
    folder = Path(config.server.downloads_dir)
    folder.mkdir(parents=True, exist_ok=True)
    server = args.server or server_url(config)
    fp = ca_fingerprint(store.ca_cert())
    key = signing_key(config.server.cert_dir)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    embedded_settings.write_with_settings(source, folder / source.name, server, fp,
                                          base64.b64encode(raw).decode())
    files, _skipped = offered_files(folder)
    wanted = [(f.name, f.sha256) for f in files if f.name == source.name]
    sign_folder(folder, wanted, key, force=True)
    sign_folder(folder, [(f.name, f.sha256) for f in files], key)  # SHA256SUMS for all of them
    print(f"offered: {folder / source.name} (server {server}, CA fingerprint {fp}), signed by "
          f"download key {fingerprint(key)}")
    return 0


def add_commands(sub) -> None:
    downloads = sub.add_parser("downloads", help="the files the download page offers: sign")
    dsub = downloads.add_subparsers(dest="downloads_command", metavar="ACTION", required=True)
    s = dsub.add_parser("sign", help="sign every offered file that has no signature yet")
    s.add_argument("--force", action="store_true",
                   help="also sign files again whose content changed after signing")
    s.set_defaults(func=cmd_downloads_sign)
    s = dsub.add_parser("add-customer", help="offer the customer one-file with this server's "
                        "address and CA fingerprint inside, signed")
    s.add_argument("file", metavar="FILE", help="hausmeister-customer-linux-x86_64 from the bundle")
    s.add_argument("--server", metavar="URL", help="address to put inside (default: the running "
                   "server's, else https://PUBLIC_HOST:HTTPS_PORT)")
    s.set_defaults(func=cmd_downloads_add_customer)
