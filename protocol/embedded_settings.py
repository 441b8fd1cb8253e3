"""Server settings carried at the end of a module's one-file executable.

The server appends its address and CA fingerprint to the customer module it offers for download,
so the customer starts the file and types the 8-digit ID, nothing else.  PyInstaller's one-file
loader finds its own archive from the end of the file by a search, so bytes after it do no harm.
Layout at the very end of the file::

    <JSON {"server": ..., "ca_fingerprint": ..., "download_key": ...}> <length: 4 bytes> MAGIC

``download_key`` (base64 of the server's raw Ed25519 download-signing key) is what the module
checks an update's signature against before it replaces itself.  The settings are not secret;
they are covered by the download's signature like every other byte.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

MAGIC = b"\nHAUSMEISTER-EMBEDDED-SETTINGS-1\n"
MAX_JSON = 4096


def trailer(server: str, ca_fingerprint: str, download_key: str = "") -> bytes:
    settings = {"server": server, "ca_fingerprint": ca_fingerprint}
    if download_key:
        settings["download_key"] = download_key
    payload = json.dumps(settings, sort_keys=True).encode()
    if len(payload) > MAX_JSON:
        raise ValueError("embedded settings are limited to 4 KiB")
    return payload + struct.pack(">I", len(payload)) + MAGIC


def _tail_length(fh, size: int) -> int | None:
    """Bytes of the trailer at the end of an open file, or None when there is none."""
    if size < len(MAGIC) + 4:
        return None
    fh.seek(size - len(MAGIC) - 4)
    tail = fh.read(len(MAGIC) + 4)
    if tail[4:] != MAGIC:
        return None
    (length,) = struct.unpack(">I", tail[:4])
    if length > MAX_JSON or length + len(MAGIC) + 4 > size:
        return None
    return length + len(MAGIC) + 4


def read(path: str | os.PathLike) -> dict | None:
    """The embedded settings of ``path``, or None (no trailer, or not readable as settings)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            total = _tail_length(fh, size)
            if total is None:
                return None
            fh.seek(size - total)
            settings = json.loads(fh.read(total - len(MAGIC) - 4))
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or not all(
            isinstance(settings.get(k), str) and settings[k] for k in ("server", "ca_fingerprint")):
        return None
    return settings


def write_with_settings(source: Path, dest: Path, server: str, ca_fingerprint: str,
                        download_key: str = "") -> None:
    """``dest`` = ``source`` without any old trailer, plus these settings (mode 0755)."""
    with open(source, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        body_size = size - (_tail_length(fh, size) or 0)
        fh.seek(0)
        tmp = Path(dest).with_name(f".{Path(dest).name}.tmp")
        with open(tmp, "wb") as out:
            left = body_size
            while left:
                chunk = fh.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{source} shrank while it was copied")
                out.write(chunk)
                left -= len(chunk)
            out.write(trailer(server, ca_fingerprint, download_key))
    os.chmod(tmp, 0o755)
    tmp.replace(dest)
