#!/usr/bin/env python3
"""The release key: create it once, sign bundles with it, check a bundle against it.

    .venv/bin/python packaging/release_key.py create ~/hausmeister-release.key
    .venv/bin/python packaging/release_key.py public ~/hausmeister-release.key
    .venv/bin/python packaging/release_key.py verify dist/hausmeister-0.1.0-offline.tar

The key is Ed25519 (``cryptography``), stored as unencrypted PKCS#8 PEM with mode 0600: keep it
on the release machine (or an offline medium) only.  Its public half is written into the
installer of every bundle; an installed Hausmeister accepts upgrades signed by the same key only.
Publish the fingerprint ``public`` prints next to each release so operators can compare it with
the one ``install.sh`` prints.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class KeyError_(Exception):
    pass


def create(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        raise KeyError_(f"{path} exists: a release key is never overwritten; choose another path")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def load(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise KeyError_(f"cannot read the release key {path}: {exc}; create one with "
                        "`packaging/release_key.py create FILE`")
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path} is not an Ed25519 key; create one with "
                        "`packaging/release_key.py create FILE`")
    return key


def public_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def fingerprint(public: str) -> str:
    return hashlib.sha256(base64.b64decode(public)).hexdigest()


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The signature file's content: base64 of the 64-byte signature, one line."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify_tar(tar_path: Path, public: str | None) -> str:
    """Check a bundle .tar the way the installer does, with `cryptography` instead."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar_path) as tar:
        tar.extractall(tmp, filter="data")
        tops = os.listdir(tmp)
        bundle = Path(tmp, tops[0])
        sums = (bundle / "SHA256SUMS").read_bytes()
        sig = base64.b64decode((bundle / "SHA256SUMS.sig").read_bytes())
        if public is None:
            import json
            public = json.loads((bundle / "BUNDLE.json").read_text())["release_key"]
        Ed25519PublicKey.from_public_bytes(base64.b64decode(public)).verify(sig, sums)
        for line in sums.decode().splitlines():
            digest, _, name = line.partition("  ")
            if hashlib.sha256((bundle / name).read_bytes()).hexdigest() != digest:
                raise KeyError_(f"{name}: SHA-256 does not match SHA256SUMS")
    return public


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="release_key.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("create", help="create a new Ed25519 release key (file mode 0600)")
    s.add_argument("path", type=Path)
    s = sub.add_parser("public", help="print the public key (base64) and its fingerprint")
    s.add_argument("path", type=Path)
    s = sub.add_parser("verify", help="check a bundle .tar's signature and hashes")
    s.add_argument("tar", type=Path)
    s.add_argument("--public", help="expected public key (base64); default: the bundle's own")
    args = p.parse_args(argv)
    try:
        if args.command == "verify":
            public = verify_tar(args.tar, args.public)
            print(f"{args.tar}: signature and hashes good (release key {fingerprint(public)})")
            return 0
        key = create(args.path) if args.command == "create" else load(args.path)
        public = public_b64(key)
        print(f"public key:   {public}")
        print(f"fingerprint:  {fingerprint(public)}")
        return 0
    except KeyError_ as exc:
        print(f"release_key: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bad signature from `cryptography` is InvalidSignature (no text)
        print(f"release_key: error: {args.command} failed: {type(exc).__name__} {exc}".rstrip(),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
