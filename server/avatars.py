"""Profile pictures: generated initials, optional Gravatar, uploaded pictures in S3 or on disk.

* Default: an SVG with the user's initials on a color derived from the name (same name, same
  color), made here — no request leaves the server or the browser.
* Gravatar, only when the operator switched it on: the URL of ``avatars.gravatar_url`` (an
  internal mirror works too) for the MD5 of the mail address.
* Uploads: only real PNG/JPEG/GIF/WebP pictures up to ``avatars.max_upload_kib``, checked with
  Pillow and re-encoded as a 128×128 PNG (which drops metadata such as GPS positions).  Stored in
  the S3 bucket when ``s3.enabled`` (key ``avatars/<user id>.png``), else in
  ``<data_dir>/avatars/``; ``users.avatar_key`` says which (``s3:...`` or ``file:...``).

Storage calls block (disk, boto3): run them through ``protocol.runtime.run_blocking``.
"""

from __future__ import annotations

import hashlib
import io
import os
import unicodedata
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

SIZE = 128
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")
MAX_PIXELS = 4096 * 4096      # a small file may still decode to a huge bitmap: refuse that
S3_PREFIX, FILE_PREFIX = "s3:", "file:"


class AvatarError(ValueError):
    """An upload that is not taken, worded for the user; nothing was stored."""


# --- generated initials -------------------------------------------------------------------------

def initials(name: str) -> str:
    """Up to two letters: first letters of the first two words (``anna.berg`` → ``AB``)."""
    words = [w for w in "".join(c if c.isalnum() else " " for c in name).split() if w]
    if not words:
        return "?"
    letters = words[0][0] + (words[1][0] if len(words) > 1 else words[0][1:2])
    return letters.upper()


def color(name: str) -> str:
    """A readable background color (white text stays legible) derived from the name."""
    digest = hashlib.sha256(unicodedata.normalize("NFC", name).encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") % 360
    return _hsl_hex(hue, 0.55, 0.40)


def _hsl_hex(h: float, s: float, lightness: float) -> str:
    c = (1 - abs(2 * lightness - 1)) * s
    x = c * (1 - abs((h / 60) % 2 - 1))
    m = lightness - c / 2
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h // 60) % 6]
    return "#" + "".join(f"{round((v + m) * 255):02x}" for v in (r, g, b))


def initials_svg(name: str) -> bytes:
    text = escape(initials(name))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" '
            f'viewBox="0 0 {SIZE} {SIZE}" role="img" aria-label="{escape(initials(name))}">'
            f'<rect width="{SIZE}" height="{SIZE}" rx="16" fill="{color(name)}"/>'
            f'<text x="50%" y="50%" dy=".35em" text-anchor="middle" fill="#ffffff" '
            f'font-family="sans-serif" font-size="56" font-weight="600">{text}</text></svg>'
            ).encode("utf-8")


# --- Gravatar -----------------------------------------------------------------------------------

def gravatar_url(base: str, email: str, size: int = 64) -> str:
    digest = hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()  # noqa: S324 (Gravatar's scheme)
    return f"{base}{digest}?d=404&s={size}"


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL (what a Content-Security-Policy source names)."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- uploads ------------------------------------------------------------------------------------

def clean_upload(data: bytes, max_kib: int) -> bytes:
    """A 128×128 PNG made from an uploaded picture, or AvatarError saying why not."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if not data:
        raise AvatarError("no file was uploaded: choose a picture first")
    if len(data) > max_kib * 1024:
        raise AvatarError(f"the picture is {len(data) / 1024:.0f} KiB; at most {max_kib} KiB "
                          "is allowed")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format
            if kind not in FORMATS:
                raise AvatarError(f"a {kind} picture is not taken: upload PNG, JPEG, GIF or WebP")
            if probe.width * probe.height > MAX_PIXELS:
                raise AvatarError(f"the picture is {probe.width}×{probe.height} pixels; at most "
                                  "4096×4096 is allowed")
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # a truncated or corrupt file fails here
            img = ImageOps.exif_transpose(img).convert("RGBA")
            img = ImageOps.fit(img, (SIZE, SIZE), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            img.save(out, "PNG", optimize=True)
            return out.getvalue()
    except AvatarError:
        raise
    except UnidentifiedImageError:
        raise AvatarError("the file is not a picture: upload PNG, JPEG, GIF or WebP") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise AvatarError(f"the picture is damaged or incomplete ({exc}); nothing was stored") from None


# --- storage ------------------------------------------------------------------------------------

class AvatarStore:
    """Where uploaded pictures live: the S3 bucket (when enabled) or ``<data_dir>/avatars``."""

    def __init__(self, folder: Path, s3: Any = None) -> None:
        """``s3``: an ``S3Store`` or None for the local folder."""
        self.folder = Path(folder)
        self.s3 = s3

    @staticmethod
    def object_name(user_id: int) -> str:
        return f"avatars/{int(user_id)}.png"

    def save(self, user_id: int, png: bytes) -> str:
        """Store the picture; returns the ``avatar_key`` to record on the user."""
        name = self.object_name(user_id)
        if self.s3 is not None:
            self.s3.put(name, png, "image/png")
            return S3_PREFIX + name
        self.folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        path = self.folder / f"{int(user_id)}.png"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(png)
        os.replace(tmp, path)
        return FILE_PREFIX + name

    def _local(self, key: str) -> Path:
        name = key[len(FILE_PREFIX):]
        if not name.startswith("avatars/") or "/" in name[len("avatars/"):] or ".." in name:
            raise AvatarError(f"not an avatar key: {key!r}")
        return self.folder / name[len("avatars/"):]

    def load(self, key: str) -> bytes:
        """The stored PNG; S3Error / OSError when it cannot be read."""
        if key.startswith(S3_PREFIX):
            if self.s3 is None:
                raise AvatarError("the picture is in S3 but S3 is not enabled any more")
            return self.s3.get(key[len(S3_PREFIX):])
        return self._local(key).read_bytes()

    def delete(self, key: str) -> None:
        if key.startswith(S3_PREFIX):
            if self.s3 is not None:
                self.s3.delete(key[len(S3_PREFIX):])
            return
        self._local(key).unlink(missing_ok=True)


def store_for(config: Any) -> AvatarStore:
    from .s3store import S3Store
    s3 = S3Store(config.s3) if config.s3.enabled else None
    return AvatarStore(config.server.data_dir / "avatars", s3)
