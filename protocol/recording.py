"""Session recordings (``.hmrec``): the file format, a sans-I/O writer and reader.

A recording is made at an endpoint (the module that shows the screen) because only the endpoints
can read the end-to-end encrypted session.  The recording module writes the file itself, already
encrypted, and uploads its bytes; the server stores them without being able to read them unless
it holds the private half of a key the recording key is wrapped for.

Format, version 1 (all integers big-endian)::

    file     = magic header record*
    magic    = "HMREC" 0x00 0x01 "\\n"                    (8 bytes; 0x01 is the format version)
    header   = u32 length, then that many bytes of UTF-8 JSON (at most 64 KiB)
    record   = u32 length, u64 counter, u8 flags, ciphertext
                 length     = 9 + len(ciphertext)         (at most MAX_RECORD bytes)
                 counter    = 0, 1, 2, ... with no gap
                 flags      = bit 0: FINAL (the recorder closed the recording; nothing follows)
                 ciphertext = AES-256-GCM(recording key,
                                          nonce = nonce_prefix (4 bytes, header) || counter (8),
                                          aad   = SHA-256(header JSON bytes) || counter || flags,
                                          plaintext = entry*)   (with its 16-byte tag)
    entry    = u8 type, u32 t_ms (milliseconds since the header's started_at), u32 length, payload

Entry types:

====  ===========  ===========================================================================
 1    RFB_OUT      RFB server→client bytes exactly as the RFB server sent them (a byte stream:
                   consecutive entries concatenate; a large write may span several entries)
 2    RFB_IN       client→server RFB bytes a player needs to decode RFB_OUT: the handshake,
                   SetPixelFormat, SetEncodings, FramebufferUpdateRequest (never input)
 3    EVENT        a session event, JSON ``{"kind": ..., ...}`` (consent, file with SHA-256,
                   chat, comment, direction change, ending)
 4    INPUT        only if the policy records input: JSON ``{"key": keysym|null, "down": b}``
                   (``key`` null when key contents are masked) or ``{"x", "y", "buttons"}``
====  ===========  ===========================================================================

The header JSON::

    {"format": "hausmeister-recording", "version": 1, "session_id": "...", "tenant": "...",
     "recorder": "host", "parties": {"supporter": "hausmeister:supporter:ann", "peer": "..."},
     "started_at": "2026-12-05T18:00:00.000+00:00", "screen": [1280, 800],
     "key_id": "<id of the operator's recording key>", "input": "off" | "masked" | "on",
     "nonce_prefix": "<8 hex>", "wrapped_keys": [{"key_id": "...", "alg": "X25519-HKDF-SHA256-AESGCM",
     "ephemeral": "<base64 raw X25519>", "wrapped": "<base64>"}, ...],
     "key_split": "xor"   (only with split knowledge, see below)}

Key wrapping (``X25519-HKDF-SHA256-AESGCM``): a fresh X25519 key pair per recipient; KEK =
HKDF-SHA256(ECDH(ephemeral, recipient), salt = ephemeral || recipient public, info =
"hausmeister recording key wrap v1"); wrapped = AES-256-GCM(KEK, nonce 0^12, recording key, aad =
key_id).  Whoever holds one recipient's private key opens the recording; the operator's key lives
in the server's certificate folder, an auditor's private key need not be on the server at all.

Split knowledge (header ``"key_split": "xor"``): instead of the recording key itself, each
recipient's entry wraps a *share* (32 random bytes; the last share is the key XOR all others), so
the key exists only where every recipient's private key is at hand: with an auditor's key whose
private half the server does not hold, neither the operator nor the auditor alone can watch.

Why this shape: records are independent and counted, so a file cut off anywhere reads up to its
last whole record (``Reader`` reports ``complete=False``), a reordered, dropped or altered record
fails authentication at its position, and appending a record after a FINAL one is detected.  The
header's hash is in every record's AAD, so a header swapped from another recording fails too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.exceptions import InvalidTag

MAGIC = b"HMREC\x00\x01\n"
VERSION = 1
FORMAT = "hausmeister-recording"
MAX_HEADER = 64 * 1024
MAX_RECORD = 1 << 20            # one record's framed length (counter + flags + ciphertext)
RECORD_PLAINTEXT = 256 * 1024   # the writer closes a record at this plaintext size
FINAL = 0x01
TAG = 16
WRAP_ALG = "X25519-HKDF-SHA256-AESGCM"
WRAP_INFO = b"hausmeister recording key wrap v1"

RFB_OUT, RFB_IN, EVENT, INPUT = 1, 2, 3, 4
ENTRY_TYPES = {RFB_OUT: "rfb_out", RFB_IN: "rfb_in", EVENT: "event", INPUT: "input"}
INPUT_MODES = ("off", "masked", "on")
_ENTRY = struct.Struct(">BII")
_FRAME = struct.Struct(">IQB")


class RecordingError(ValueError):
    """A recording (or a key) is not what it should be; the message names where and why."""


# --- keys ------------------------------------------------------------------------------------

def key_id(public: X25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: X25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public(pem: str | bytes) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError as exc:
        raise RecordingError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, X25519PublicKey):
        raise RecordingError("a recording key must be an X25519 key")
    return key


def load_private(pem: bytes) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise RecordingError(f"not a PEM private key: {exc}") from None
    if not isinstance(key, X25519PrivateKey):
        raise RecordingError("a recording key must be an X25519 key")
    return key


def private_pem(private: X25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, ephemeral + recipient, WRAP_INFO).derive(shared)


def wrap_key(recording_key: bytes, recipient: X25519PublicKey) -> dict:
    ephemeral = X25519PrivateKey.generate()
    eph_raw = ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                  serialization.PublicFormat.Raw)
    rec_raw = recipient.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(recipient)
    kek = _kek(ephemeral.exchange(recipient), eph_raw, rec_raw)
    wrapped = AESGCM(kek).encrypt(b"\0" * 12, recording_key, kid.encode())
    return {"key_id": kid, "alg": WRAP_ALG, "ephemeral": base64.b64encode(eph_raw).decode(),
            "wrapped": base64.b64encode(wrapped).decode()}


def unwrap_key(header: dict, private: X25519PrivateKey) -> bytes:
    """The recording key from the header's wrapped key for ``private``; RecordingError if the
    recording was not made for this key or the wrapped key was altered."""
    if is_split(header):
        raise RecordingError("this recording's key is split among its recipients (split "
                             "knowledge): it opens only with every holder's key together")
    kid = key_id(private.public_key())
    for entry in header.get("wrapped_keys", []):
        if isinstance(entry, dict) and entry.get("key_id") == kid:
            if entry.get("alg") != WRAP_ALG:
                raise RecordingError(f"unknown key wrapping {str(entry.get('alg'))[:40]!r}")
            try:
                eph_raw = base64.b64decode(entry["ephemeral"], validate=True)
                wrapped = base64.b64decode(entry["wrapped"], validate=True)
                rec_raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)
                kek = _kek(private.exchange(X25519PublicKey.from_public_bytes(eph_raw)), eph_raw,
                           rec_raw)
                key = AESGCM(kek).decrypt(b"\0" * 12, wrapped, kid.encode())
            except (KeyError, ValueError, TypeError, InvalidTag):
                raise RecordingError(f"the wrapped key for {kid} does not open "
                                     "(altered header)") from None
            if len(key) != 32:
                raise RecordingError("the wrapped recording key has the wrong length")
            return key
    held = ", ".join(str(e.get("key_id")) for e in header.get("wrapped_keys", [])
                     if isinstance(e, dict))
    raise RecordingError(f"this recording is not readable with key {kid} "
                         f"(it is wrapped for: {held or 'no key'})")


def is_split(header: dict) -> bool:
    """The recording key is split among its recipients (every one is needed to open it)."""
    return header.get("key_split") == "xor"


def open_key(header: dict, privates: Iterable[X25519PrivateKey]) -> bytes:
    """The recording key from the private keys at hand: any one recipient's key, or with
    ``key_split`` every recipient's share; RecordingError names the keys that are missing."""
    privates = list(privates)
    if not is_split(header):
        last: RecordingError | None = None
        for private in privates:
            try:
                return unwrap_key(header, private)
            except RecordingError as exc:
                last = exc
        raise last or RecordingError("no recording key given")
    by_id = {key_id(p.public_key()): p for p in privates}
    entries = [e for e in header.get("wrapped_keys", []) if isinstance(e, dict)]
    missing = [str(e.get("key_id")) for e in entries if e.get("key_id") not in by_id]
    if missing or not entries:
        raise RecordingError("this recording's key is split among its recipients (split "
                             f"knowledge): it also needs the private key {', '.join(missing)}")
    key = bytes(32)
    for entry in entries:
        one = {k: v for k, v in header.items() if k != "key_split"}
        share = unwrap_key({**one, "wrapped_keys": [entry]}, by_id[entry["key_id"]])
        key = bytes(a ^ b for a, b in zip(key, share))
    return key


# --- writer ----------------------------------------------------------------------------------

@dataclass
class Writer:
    """Turns what a session shows into file bytes: ``start()`` once, ``add`` entries as they
    happen, ``flush()`` whenever bytes should leave (a record per call when entries are waiting),
    ``close()`` once for the FINAL record.  Never touches a file or socket."""

    header: dict
    recipients: list[X25519PublicKey]
    key: bytes = field(default_factory=lambda: AESGCM.generate_key(256))
    nonce_prefix: bytes = field(default_factory=lambda: os.urandom(4))
    split: bool = False   # split knowledge: each recipient gets a share, all are needed

    def __post_init__(self) -> None:
        if not self.recipients:
            raise RecordingError("a recording needs at least one recipient key")
        if self.header.get("input", "off") not in INPUT_MODES:
            raise RecordingError("input must be off, masked or on")
        split = self.split and len(self.recipients) > 1
        if split:
            shares = [os.urandom(32) for _ in self.recipients[1:]]
            last = self.key
            for share in shares:
                last = bytes(a ^ b for a, b in zip(last, share))
            wrapped = [wrap_key(s, r) for s, r in zip([last, *shares], self.recipients)]
        else:
            wrapped = [wrap_key(self.key, r) for r in self.recipients]
        self.header = {**self.header, "format": FORMAT, "version": VERSION,
                       "key_id": key_id(self.recipients[0]), "nonce_prefix": self.nonce_prefix.hex(),
                       "input": self.header.get("input", "off"), "wrapped_keys": wrapped,
                       **({"key_split": "xor"} if split else {})}
        self.header_bytes = json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode()
        if len(self.header_bytes) > MAX_HEADER:
            raise RecordingError("the recording header is larger than 64 KiB")
        self._aead = AESGCM(self.key)
        self._header_hash = hashlib.sha256(self.header_bytes).digest()
        self._counter = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._ready: list[bytes] = []
        self.closed = False
        self.bytes_written = 0

    def start(self) -> bytes:
        data = MAGIC + struct.pack(">I", len(self.header_bytes)) + self.header_bytes
        self.bytes_written += len(data)
        return data

    def add(self, kind: int, t_ms: int, payload: bytes) -> None:
        if self.closed:
            raise RecordingError("the recording is closed")
        if kind not in ENTRY_TYPES:
            raise RecordingError(f"unknown entry type {kind}")
        t_ms = max(0, min(int(t_ms), 0xFFFFFFFF))
        room = RECORD_PLAINTEXT - _ENTRY.size
        for start in range(0, max(len(payload), 1), room):  # a big write spans several entries
            piece = payload[start:start + room]
            entry = _ENTRY.pack(kind, t_ms, len(piece)) + piece
            if self._pending_size + len(entry) > RECORD_PLAINTEXT:
                self._seal(0)
            self._pending.append(entry)
            self._pending_size += len(entry)

    def event(self, t_ms: int, kind: str, detail: dict | None = None) -> None:
        self.add(EVENT, t_ms, json.dumps({"kind": kind, **(detail or {})},
                                         separators=(",", ":")).encode())

    @property
    def pending(self) -> int:
        return self._pending_size

    def flush(self) -> bytes:
        if self._pending:
            self._seal(0)
        out, self._ready = b"".join(self._ready), []
        self.bytes_written += len(out)
        return out

    def close(self) -> bytes:
        if self.closed:
            return b""
        self._seal(FINAL)
        self.closed = True
        out, self._ready = b"".join(self._ready), []
        self.bytes_written += len(out)
        return out

    def _seal(self, flags: int) -> None:
        plaintext = b"".join(self._pending)
        self._pending, self._pending_size = [], 0
        counter = self._counter
        self._counter += 1
        aad = self._header_hash + struct.pack(">QB", counter, flags)
        nonce = self.nonce_prefix + struct.pack(">Q", counter)
        ciphertext = self._aead.encrypt(nonce, plaintext, aad)
        self._ready.append(_FRAME.pack(9 + len(ciphertext), counter, flags) + ciphertext)


# --- reader ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    fields: dict
    raw: bytes
    size: int  # bytes of magic + length + JSON


@dataclass(frozen=True)
class Entry:
    kind: int
    t_ms: int
    payload: bytes

    @property
    def name(self) -> str:
        return ENTRY_TYPES[self.kind]

    def json(self) -> dict:
        return json.loads(self.payload)


@dataclass(frozen=True)
class RecordSeen:
    """A whole record was framed (and, with a key, authenticated): ``end`` is its file offset."""

    counter: int
    end: int
    final: bool


class Reader:
    """Bytes in, ``Header`` / ``RecordSeen`` / ``Entry`` out.

    Without ``key`` (and ``unwrap``) it checks only the framing: what the server does while a
    recording is uploaded, to know the last whole record.  With a key (or an ``unwrap(header)``
    callable giving one) every record is authenticated and its entries come out.
    Errors raise ``RecordingError`` naming the byte offset; after that the reader stays failed.
    """

    def __init__(self, key: bytes | None = None,
                 unwrap: Callable[[dict], bytes] | None = None) -> None:
        self._buf = bytearray()
        self._offset = 0          # file offset of _buf[0]
        self._key = key
        self._unwrap = unwrap
        self._aead: AESGCM | None = None
        self.header: Header | None = None
        self.next_counter = 0
        self.final = False
        self.whole_end = 0        # file offset just past the last whole record (or the header)
        self.failed: str | None = None

    @property
    def complete(self) -> bool:
        return self.final

    def receive(self, data: bytes) -> list[Any]:
        if self.failed:
            raise RecordingError(self.failed)
        self._buf += data
        out: list[Any] = []
        try:
            while True:
                item = self._next()
                if item is None:
                    break
                out.extend(item)
        except RecordingError as exc:
            self.failed = str(exc)
            raise
        return out

    def trailing(self) -> int:
        """Bytes after the last whole record (a cut-off upload)."""
        return len(self._buf)

    def _fail(self, why: str) -> None:
        raise RecordingError(f"byte {self._offset}: {why}")

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._offset += n
        return data

    def _next(self) -> list[Any] | None:
        if self.header is None:
            if len(self._buf) < len(MAGIC) + 4:
                if not MAGIC.startswith(bytes(self._buf[:len(MAGIC)])):
                    self._fail("not a Hausmeister recording (wrong magic)")
                return None
            if bytes(self._buf[:len(MAGIC)]) != MAGIC:
                if bytes(self._buf[:6]) == MAGIC[:6]:
                    self._fail(f"recording format version {self._buf[6]} is not supported")
                self._fail("not a Hausmeister recording (wrong magic)")
            (length,) = struct.unpack_from(">I", self._buf, len(MAGIC))
            if length > MAX_HEADER:
                self._fail("header larger than 64 KiB")
            if len(self._buf) < len(MAGIC) + 4 + length:
                return None
            raw = bytes(self._buf[len(MAGIC) + 4:len(MAGIC) + 4 + length])
            try:
                fields = json.loads(raw)
            except ValueError:
                self._fail("the header is not JSON")
            if not isinstance(fields, dict) or fields.get("format") != FORMAT:
                self._fail("the header is not a recording header")
            try:
                prefix = bytes.fromhex(fields.get("nonce_prefix", ""))
            except (TypeError, ValueError):
                prefix = b""
            if len(prefix) != 4:
                self._fail("the header's nonce prefix is not 4 bytes")
            size = len(MAGIC) + 4 + length
            self._take(size)
            self.header = Header(fields, raw, size)
            self.whole_end = size
            self._header_hash = hashlib.sha256(raw).digest()
            self._prefix = prefix
            if self._key is None and self._unwrap is not None:
                self._key = self._unwrap(fields)
            if self._key is not None:
                self._aead = AESGCM(self._key)
            return [self.header]
        if len(self._buf) < 4:
            return None
        (length,) = struct.unpack_from(">I", self._buf)
        if length < 9 + TAG or length > MAX_RECORD:
            self._fail(f"record length {length} is out of bounds")
        if self.final:
            self._fail("bytes after the final record (appended)")
        if len(self._buf) < 4 + length:
            return None
        _, counter, flags = _FRAME.unpack_from(self._buf)
        if counter != self.next_counter:
            self._fail(f"record {counter} where record {self.next_counter} belongs "
                       "(records reordered, dropped or inserted)")
        if flags & ~FINAL:
            self._fail(f"record {counter} has unknown flags {flags:#x}")
        start = self._offset
        frame = self._take(4 + length)
        entries: list[Any] = []
        if self._aead is not None:
            nonce = self._prefix + struct.pack(">Q", counter)
            aad = self._header_hash + struct.pack(">QB", counter, flags)
            try:
                plaintext = self._aead.decrypt(nonce, frame[13:], aad)
            except InvalidTag:
                raise RecordingError(f"byte {start}: record {counter} does not authenticate "
                                     "(altered, or the header or key does not belong to it)") from None
            entries = _entries(plaintext, start, counter)
        self.next_counter += 1
        self.final = bool(flags & FINAL)
        self.whole_end = self._offset
        return [RecordSeen(counter, self._offset, self.final), *entries]


def _entries(plaintext: bytes, offset: int, counter: int) -> list[Entry]:
    out = []
    pos = 0
    while pos < len(plaintext):
        if len(plaintext) - pos < _ENTRY.size:
            raise RecordingError(f"byte {offset}: record {counter} ends inside an entry header")
        kind, t_ms, length = _ENTRY.unpack_from(plaintext, pos)
        pos += _ENTRY.size
        if kind not in ENTRY_TYPES:
            raise RecordingError(f"byte {offset}: record {counter} holds unknown entry type {kind}")
        if pos + length > len(plaintext):
            raise RecordingError(f"byte {offset}: record {counter} ends inside an entry")
        out.append(Entry(kind, t_ms, plaintext[pos:pos + length]))
        pos += length
    return out


@dataclass
class Summary:
    """What ``read_all``/``scan`` found in a whole file."""

    header: dict
    records: int
    entries: int
    complete: bool
    whole_end: int
    trailing: int
    duration_ms: int


def scan(chunks: Iterable[bytes], key: bytes | None = None,
         unwrap: Callable[[dict], bytes] | None = None,
         on_entry: Callable[[Entry], None] | None = None) -> Summary:
    """Read a whole recording (from any iterable of byte chunks); RecordingError if it is damaged."""
    reader = Reader(key, unwrap)
    records = entries = duration = 0
    for chunk in chunks:
        for item in reader.receive(chunk):
            if isinstance(item, RecordSeen):
                records += 1
            elif isinstance(item, Entry):
                entries += 1
                duration = max(duration, item.t_ms)
                if on_entry is not None:
                    on_entry(item)
    if reader.header is None:
        raise RecordingError("the file ends before its header: not a recording, or empty")
    return Summary(reader.header.fields, records, entries, reader.final, reader.whole_end,
                   reader.trailing(), duration)


def file_chunks(path, size: int = 1 << 20) -> Iterable[bytes]:
    with open(path, "rb") as f:
        while True:
            data = f.read(size)
            if not data:
                return
            yield data


# --- the RFB client's messages: keep what a player needs, take input apart --------------------

_C2S_FIXED = {0: 20, 3: 10, 4: 8, 5: 6}


class ClientStream:
    """Splits the RFB client→server byte stream (RFC 6143) into what goes into a recording:
    ``("rfb_in", bytes)`` for the handshake and the messages a player needs, ``("key", down,
    keysym)``, ``("pointer", buttons, x, y)`` and ``("cut_text", text)`` for input.  Unknown
    messages end the split (the RFB server refuses them anyway): ``broken`` is set."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._stage = 0  # 0 version, 1 security choice, 2 ClientInit, 3 messages
        self.broken = False

    def feed(self, data: bytes) -> list[tuple]:
        if self.broken:
            return []
        self._buf += data
        out: list[tuple] = []
        while True:
            if self._stage == 0:
                if len(self._buf) < 12:
                    break
                out.append(("rfb_in", self._pop(12)))
                self._stage = 1
            elif self._stage in (1, 2):
                if not self._buf:
                    break
                out.append(("rfb_in", self._pop(1)))
                self._stage += 1
            else:
                if not self._buf:
                    break
                kind = self._buf[0]
                if kind in _C2S_FIXED:
                    size = _C2S_FIXED[kind]
                elif kind == 2:
                    if len(self._buf) < 4:
                        break
                    size = 4 + 4 * struct.unpack_from(">H", self._buf, 2)[0]
                elif kind == 6:
                    if len(self._buf) < 8:
                        break
                    size = 8 + struct.unpack_from(">I", self._buf, 4)[0]
                else:
                    self.broken = True
                    break
                if len(self._buf) < size:
                    break
                msg = self._pop(size)
                if kind == 4:
                    out.append(("key", bool(msg[1]), struct.unpack_from(">I", msg, 4)[0]))
                elif kind == 5:
                    x, y = struct.unpack_from(">HH", msg, 2)
                    out.append(("pointer", msg[1], x, y))
                elif kind == 6:
                    out.append(("cut_text", msg[8:].decode("latin-1")))
                else:
                    out.append(("rfb_in", msg))
        return out

    def _pop(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data


__all__ = [
    "MAGIC", "VERSION", "RFB_OUT", "RFB_IN", "EVENT", "INPUT", "FINAL", "RecordingError",
    "Writer", "Reader", "Header", "Entry", "RecordSeen", "Summary", "scan", "file_chunks",
    "key_id", "wrap_key", "unwrap_key", "open_key", "is_split", "load_public", "load_private",
    "public_pem", "private_pem",
    "ClientStream",
]
