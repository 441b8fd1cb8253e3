"""Relay tokens: single-use tickets the broker gives each party of a session for its relay leg.

A token says "this connection may be the ``side`` leg of relay session ``session_id`` until
``expires_at``".  It is stateless (HMAC-SHA256 with a secret shared by the server and every
relay process, read from ``relay.secret_file``), so a separate relay process verifies it without
asking anyone.  Single use is the relay's job: it remembers the token's random nonce until the
token expires (``server.relay.core``).  This module does no I/O except ``load_or_create_secret``.

Wire form (ASCII, URL-safe, ~150 characters)::

    base64url("1|<session_id>|<side>|<expires_ms>|<nonce>") "." base64url(HMAC-SHA256)

``side`` is ``supporter`` or ``peer`` today; the grammar already admits ``viewer:3`` and the
like, so more than two parties per session need no new token format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InvalidToken

VERSION = "1"
SECRET_BYTES = 32
NONCE_BYTES = 16
MAX_TOKEN_LENGTH = 512
_MAC_CONTEXT = b"hausmeister relay token\x00"

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
SIDE = re.compile(r"[a-z][a-z0-9_-]{0,31}(:[0-9]{1,6})?")
_B64 = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class TokenClaims:
    session_id: str
    side: str
    expires_at: float  # seconds since the epoch (wall clock: tokens cross processes)
    nonce: str         # what the relay remembers to make the token single-use


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    if not _B64.fullmatch(text):
        raise InvalidToken(f"relay token is malformed: {what} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken(f"relay token is malformed: {what} is not base64url")
    if _b64encode(data) != text:  # one spelling per token: no look-alike variants
        raise InvalidToken(f"relay token is malformed: {what} is not canonical base64url")
    return data


class RelayTokens:
    """Issues and verifies relay tokens with one shared secret."""

    def __init__(self, secret: bytes, ttl: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < SECRET_BYTES:
            raise ValueError(f"the relay secret must be at least {SECRET_BYTES} bytes")
        if not ttl > 0:
            raise ValueError("the relay token lifetime must be positive")
        self._secret = bytes(secret)
        self.ttl = float(ttl)
        self.clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _MAC_CONTEXT + payload, hashlib.sha256).digest()

    def issue(self, session_id: str, side: str) -> str:
        if not SESSION_ID.fullmatch(session_id):
            raise ValueError(f"session id {session_id!r} must be 1-64 of A-Z a-z 0-9 _ -")
        if not SIDE.fullmatch(side):
            raise ValueError(f"relay side {side!r} must look like 'supporter', 'peer' or 'viewer:3'")
        expires_ms = int((self.clock() + self.ttl) * 1000)
        nonce = _b64encode(secrets.token_bytes(NONCE_BYTES))
        payload = f"{VERSION}|{session_id}|{side}|{expires_ms}|{nonce}".encode("ascii")
        return _b64encode(payload) + "." + _b64encode(self._mac(payload))

    def verify(self, token: str) -> TokenClaims:
        """The claims of a genuine, unexpired token; anything else raises ``InvalidToken``."""
        if not isinstance(token, str) or not token:
            raise InvalidToken("relay token is missing")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"relay token is malformed: longer than {MAX_TOKEN_LENGTH} characters")
        body, dot, mac_text = token.partition(".")
        if not dot or not body or not mac_text:
            raise InvalidToken("relay token is malformed: expected PAYLOAD.MAC")
        payload = _b64decode(body, "payload")
        mac = _b64decode(mac_text, "MAC")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidToken("relay token is not genuine (bad MAC): it was not issued by this "
                               "server or the relay has another relay.secret_file")
        # Genuine from here on: a parse error means a version we do not speak.
        fields = payload.decode("ascii", "replace").split("|")
        if len(fields) != 5 or fields[0] != VERSION or not fields[3].isdigit():
            raise InvalidToken("relay token has an unknown format version")
        _, session_id, side, expires_ms, nonce = fields
        expires_at = int(expires_ms) / 1000.0
        now = self.clock()
        if now >= expires_at:
            raise InvalidToken(f"relay token expired {now - expires_at:.1f} s ago")
        return TokenClaims(session_id, side, expires_at, nonce)


def load_or_create_secret(path: Path) -> bytes:
    """The shared relay secret: read it, or create 32 random bytes (mode 0600) if missing.

    Creation is atomic even when several relay processes start at once: each writes a private
    temporary file and links it into place; whoever loses the race reads the winner's secret.
    """
    path = Path(path)
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(SECRET_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        secret = path.read_bytes()
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"relay secret file {path} holds {len(secret)} bytes, needs at least "
                         f"{SECRET_BYTES}: delete it to have a new one made (then copy it to every "
                         "relay machine)")
    return secret


__all__ = ["RelayTokens", "TokenClaims", "InvalidToken", "load_or_create_secret"]
