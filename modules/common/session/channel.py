"""The end-to-end session channel between supporter and peer: SPAKE2, then AES-256-GCM records.

A sans-I/O object: the caller feeds it the bytes that arrive on the relayed stream
(``receive``, ``eof``), handles the events it returns (``channel_events``), and sends what it asks
for (``start``, ``seal``, ``close`` return bytes; ``data_to_send`` drains what a reaction to input
produced).  It never touches a socket, a reactor or a clock of its own.  It is responsible for
keys, key confirmation, record integrity and ordering, and the peer's certificate; it is not
responsible for what the records mean (the session multiplexer), for deciding which supporters
a host admits (the caller gets the identity in ``KeyConfirmed``) or for lock-out (the caller
reports ``Failed`` with ``FailureKind.KEY_CONFIRMATION`` to the server).

Wire format (all integers big-endian)::

    frame      = length:u32 body            length <= 512 for a hello, <= 65536 for a record
    hello body = "HMCH" version:u8(=1) mode:u8(1 adhoc, 2 host) role:u8(1 supporter, 2 peer)
                 n:u8 spake2_message[n] n:u8 salt[n] n:u8 certificate_fingerprint[n]
    record     = AES-256-GCM(key[direction], nonce = record number as 96 bits,
                             aad = "hausmeister channel v1 <from>-><to>",
                             plaintext = type:u8 body)       (ciphertext includes the tag)
    types      = 1 confirm (first record each way), 2 data, 3 close (empty body),
                 4 abort (body: the reason, UTF-8, at most 500 bytes)
    confirm    = transcript_hash[32] n:u16 certificate_der[n] n:u16 ecdsa_signature[n]

Handshake: each side sends one hello (the host's carries its argon2id salt, and a supporter in the
host flow sends its hello only after it has the salt and the derived password).  SPAKE2 (A for the
supporter, B for the peer, ids carrying mode and session id) gives a shared key; the transcript
hash covers the mode, the session id, both hellos and both certificate fingerprints as this side
believes them (its own, and the peer's expected one if the caller gave it, else the announced
one).  HKDF-SHA256 with the transcript hash as salt derives one key per direction and the
verification code.  Whoever holds a certificate signs the transcript hash (ECDSA P-256) in its
confirmation record; the receiver checks the certificate against the pinned CA, its fingerprint
against the bound one, the signature, and the identity in its SAN.  A wrong password, a different
session id or a disagreement about the certificates makes the keys differ, so the first record
fails to authenticate on both sides.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from argon2.low_level import Type, hash_secret_raw
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID
from spake2 import SPAKE2_A, SPAKE2_B

from protocol.identity import (Identity, IdentityError, fingerprint, identity_of,
                               normalise_fingerprint)

from modules.common.session.channel_events import (Closed, Event, Failed, FailureKind, HostSaltReceived, KeyConfirmed,
                             Record)

VERSION = 1
MAGIC = b"HMCH"
MAX_HELLO = 512
MAX_RECORD = 64 * 1024            # ciphertext of one record, tag included
TAG_BYTES = 16
MAX_PAYLOAD = MAX_RECORD - TAG_BYTES - 1   # one byte of record type
SALT_BYTES = 16
HOST_SECRET_BYTES = 32

_CONFIRM, _DATA, _CLOSE, _ABORT = 1, 2, 3, 4
MAX_ABORT_REASON = 500
_LABEL = b"hausmeister channel v1"
_SIGNATURE_LABEL = _LABEL + b" transcript signature\x00"
_WRONG_KEY = ("key confirmation failed: wrong code or password "
              "(or the two sides disagree on the session or the certificates)")


class Role(str, Enum):
    SUPPORTER = "supporter"
    PEER = "peer"          # an ad-hoc customer or an unattended host


class Mode(str, Enum):
    ADHOC = "adhoc"        # password: the whole 8-digit code; only the supporter has a certificate
    HOST = "host"          # password: argon2id(host password, salt); both sides sign


_ROLE_BYTE = {Role.SUPPORTER: 1, Role.PEER: 2}
_MODE_BYTE = {Mode.ADHOC: 1, Mode.HOST: 2}


class ChannelError(Exception):
    """Misuse by the caller: sealing before ``KeyConfirmed``, after ``Failed`` or after ``close``,
    or a payload larger than ``MAX_PAYLOAD``."""


# --- passwords ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostKdf:
    """argon2id parameters for host passwords (RFC 9106's second recommendation by default)."""

    time_cost: int = 3
    memory_cost_kib: int = 64 * 1024
    parallelism: int = 4


HOST_KDF = HostKdf()


def derive_host_secret(password: str, salt: bytes, kdf: HostKdf = HOST_KDF) -> bytes:
    """argon2id(password, salt): what the host stores and the SPAKE2 password of the host flow.
    Blocks for a fraction of a second with the default parameters: keep it off the reactor."""
    if not password:
        raise ValueError("the host password is empty")
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the salt must be {SALT_BYTES} bytes, not {len(salt)}")
    typed = unicodedata.normalize("NFC", password).encode()
    return hash_secret_raw(typed, salt, kdf.time_cost, kdf.memory_cost_kib, kdf.parallelism,
                           HOST_SECRET_BYTES, Type.ID)


def new_host_secret(password: str, kdf: HostKdf = HOST_KDF) -> tuple[bytes, bytes]:
    """A fresh ``(salt, secret)`` for a host to store instead of its password."""
    salt = secrets.token_bytes(SALT_BYTES)
    return salt, derive_host_secret(password, salt, kdf)


def adhoc_password(code: str) -> bytes:
    """The SPAKE2 password of an ad-hoc session: the whole 8-digit code, without spaces/dashes."""
    digits = code.replace(" ", "").replace("-", "")
    if len(digits) != 8 or not (digits.isascii() and digits.isdigit()):
        raise ValueError("an ad-hoc code has 8 digits (shown as 1234 5678)")
    return digits.encode()


# --- certificates -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """A module's certificate and its private key (ECDSA P-256), used to sign the transcript."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    def __post_init__(self) -> None:
        key = self.private_key
        if not (isinstance(key, ec.EllipticCurvePrivateKey)
                and isinstance(key.curve, ec.SECP256R1)):
            raise ValueError("the module key must be ECDSA P-256")
        if key.public_key() != self.certificate.public_key():
            raise ValueError("the private key does not belong to the certificate")

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> "Credentials":
        return cls(x509.load_pem_x509_certificate(cert_pem),
                   serialization.load_pem_private_key(key_pem, password=None))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- internals ------------------------------------------------------------------------------------

class _Fail(Exception):
    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class _State(Enum):
    NEW = "new"
    WAIT_HELLO = "waiting for the peer's hello"
    WAIT_PASSWORD = "waiting for provide_password"
    CONFIRMING = "waiting for the peer's key confirmation"
    OPEN = "open"
    PEER_CLOSED = "closed by the peer"
    FAILED = "failed"


@dataclass(frozen=True)
class _Hello:
    mode: Mode
    role: Role
    spake: bytes
    salt: bytes
    fingerprint: bytes

    def encode(self) -> bytes:
        out = bytearray(MAGIC)
        out += bytes((VERSION, _MODE_BYTE[self.mode], _ROLE_BYTE[self.role]))
        for field in (self.spake, self.salt, self.fingerprint):
            out.append(len(field))
            out += field
        return bytes(out)

    @classmethod
    def decode(cls, body: bytes) -> "_Hello":
        if body[:4] != MAGIC:
            raise _Fail(FailureKind.PROTOCOL,
                        "the first message is not a Hausmeister channel hello (wrong magic)")
        if len(body) < 7 or body[4] != VERSION:
            version = body[4] if len(body) > 4 else "?"
            raise _Fail(FailureKind.PROTOCOL,
                        f"unsupported channel version {version} (this side: {VERSION})")
        modes = {v: k for k, v in _MODE_BYTE.items()}
        roles = {v: k for k, v in _ROLE_BYTE.items()}
        if body[5] not in modes or body[6] not in roles:
            raise _Fail(FailureKind.PROTOCOL, "the hello names an unknown mode or role")
        fields, at = [], 7
        for _ in range(3):
            if at >= len(body) or at + 1 + body[at] > len(body):
                raise _Fail(FailureKind.PROTOCOL, "the hello is cut short")
            fields.append(body[at + 1:at + 1 + body[at]])
            at += 1 + body[at]
        if at != len(body):
            raise _Fail(FailureKind.PROTOCOL, "the hello has trailing bytes")
        return cls(modes[body[5]], roles[body[6]], *fields)


def _hkdf(key: bytes, transcript: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=transcript, info=_LABEL + b" " + info).derive(key)


def _transcript(mode: Mode, session_id: str, supporter_hello: bytes, peer_hello: bytes,
                supporter_fp: bytes, peer_fp: bytes) -> bytes:
    digest = hashlib.sha256()
    for part in (_LABEL + b" transcript", mode.value.encode(), session_id.encode(),
                 supporter_hello, peer_hello, supporter_fp, peer_fp):
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    return digest.digest()


def _signed_message(signer: Role, transcript: bytes) -> bytes:
    return _SIGNATURE_LABEL + signer.value.encode() + b"\x00" + transcript


def _verification_code(value: bytes) -> str:
    digits = f"{int.from_bytes(value, 'big') % 1_000_000:06d}"
    return f"{digits[:3]} {digits[3:]}"


def _abort_reason(reason: str) -> bytes:
    return reason.encode("utf-8")[:MAX_ABORT_REASON]


def _u16_field(data: bytes, at: int, what: str) -> tuple[bytes, int]:
    if at + 2 > len(data):
        raise _Fail(FailureKind.PROTOCOL, f"the key confirmation is cut short ({what})")
    n = int.from_bytes(data[at:at + 2], "big")
    if at + 2 + n > len(data):
        raise _Fail(FailureKind.PROTOCOL, f"the key confirmation is cut short ({what})")
    return data[at + 2:at + 2 + n], at + 2 + n


# --- the channel ----------------------------------------------------------------------------------

class SessionChannel:
    """One side of an end-to-end channel.  See the module docstring for the wire format.

    ``role``          ``"supporter"`` or ``"peer"`` (ad-hoc customer or unattended host).
    ``password``      ad-hoc: ``adhoc_password(code)`` on both sides; host flow: the stored
                      ``argon2id`` secret on the host, ``None`` on the supporter (it answers
                      ``HostSaltReceived`` with ``provide_password(derive_host_secret(...))``).
    ``session_id``    the relay session id both sides were given; bound into SPAKE2 and the keys.
    ``mode``          ``"adhoc"`` or ``"host"``.
    ``host_salt``     host flow, host side: the salt its secret was derived with.
    ``credentials``   this side's certificate and key (supporters and hosts; never a customer).
    ``ca_certificate``  the pinned CA the peer's certificate must be issued by (every side whose
                      peer has a certificate: all but the ad-hoc supporter).
    ``expected_peer`` the identity the peer's certificate must carry (required on the supporter
                      in the host flow: the host it meant to reach); otherwise only its role is
                      checked and the identity is reported in ``KeyConfirmed``.
    ``peer_fingerprint``  the SHA-256 fingerprint the peer's certificate must have, if known (e.g.
                      from the broker); bound into the keys, so a mismatch fails both sides.
    ``clock``         now, as an aware UTC datetime (certificate validity).
    """

    def __init__(self, role: Role | str, password: bytes | None, session_id: str, *,
                 mode: Mode | str = Mode.ADHOC, host_salt: bytes | None = None,
                 credentials: Credentials | None = None,
                 ca_certificate: x509.Certificate | None = None,
                 expected_peer: Identity | str | None = None,
                 peer_fingerprint: str | None = None,
                 clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.role, self.mode = Role(role), Mode(mode)
        self.session_id = session_id
        if not session_id:
            raise ValueError("the session id is empty")
        host_supporter = self.mode is Mode.HOST and self.role is Role.SUPPORTER
        host_peer = self.mode is Mode.HOST and self.role is Role.PEER
        if password is not None and not isinstance(password, bytes):
            raise TypeError("the password is bytes (adhoc_password(), derive_host_secret())")
        if host_supporter:
            if password is not None:
                raise ValueError("a supporter in the host flow gets its password after the salt: "
                                 "pass None and answer HostSaltReceived with provide_password()")
        elif not password:
            raise ValueError("the channel needs a password")
        if host_peer != (host_salt is not None):
            raise ValueError("host_salt is given by (and only by) the host in the host flow")
        if host_salt is not None and len(host_salt) != SALT_BYTES:
            raise ValueError(f"the host salt must be {SALT_BYTES} bytes")
        # Who holds a certificate: supporters and hosts always, an ad-hoc customer never.
        self._own_certified = not (self.mode is Mode.ADHOC and self.role is Role.PEER)
        self._peer_certified = not (self.mode is Mode.ADHOC and self.role is Role.SUPPORTER)
        if self._own_certified != (credentials is not None):
            raise ValueError("credentials are required for supporters and hosts and "
                             "not allowed for an ad-hoc customer")
        if self._peer_certified != (ca_certificate is not None):
            raise ValueError("ca_certificate is required whenever the peer has a certificate "
                             "(everyone but the ad-hoc supporter) and unused otherwise")
        if not self._peer_certified and (expected_peer is not None or peer_fingerprint is not None):
            raise ValueError("an ad-hoc customer has no certificate to expect")
        if isinstance(expected_peer, str):
            expected_peer = Identity.parse(expected_peer)
        self._peer_role = ("supporter" if self.role is Role.PEER else
                           "host" if self.mode is Mode.HOST else "customer")
        if expected_peer is not None and expected_peer.role != self._peer_role:
            raise ValueError(f"the peer of a {self.role.value} is a {self._peer_role}, "
                             f"not {expected_peer.uri}")
        if host_supporter and expected_peer is None:
            raise ValueError("a supporter must say which host it means to reach (expected_peer)")
        self._password = password
        self._salt = host_salt or b""
        self._credentials = credentials
        self._ca = ca_certificate
        self._expected_peer = expected_peer
        self._expected_fp = bytes.fromhex(normalise_fingerprint(peer_fingerprint)) \
            if peer_fingerprint is not None else None
        self._own_fp = bytes.fromhex(credentials.fingerprint) if credentials else b""
        self._clock = clock

        self._state = _State.NEW
        self._buffer = bytearray()
        self._outbox = bytearray()
        self._spake: SPAKE2_A | SPAKE2_B | None = None
        self._own_hello = b""
        self._peer_hello_body = b""
        self._peer_hello: _Hello | None = None
        self._transcript = b""
        self._peer_fp_bound = b""
        self._send_aead: AESGCM | None = None
        self._recv_aead: AESGCM | None = None
        self._send_ad = self._recv_ad = b""
        self._send_counter = self._recv_counter = 0
        self._closed_local = False
        self.verification_code: str | None = None
        self.peer_identity: str | None = None
        self.failure: Failed | None = None

    # --- what the caller initiates: returns bytes to send ------------------------------------

    def start(self) -> bytes:
        """This side's hello (empty for a supporter in the host flow, which waits for the salt)."""
        if self._state is not _State.NEW:
            raise ChannelError("start() was already called")
        self._state = _State.WAIT_HELLO
        if self.mode is Mode.HOST and self.role is Role.SUPPORTER:
            return b""
        return self._begin_spake(self._password)

    def seal(self, payload: bytes) -> bytes:
        """One record carrying ``payload`` (at most ``MAX_PAYLOAD`` bytes), ready to send."""
        self._check_can_send()
        if len(payload) > MAX_PAYLOAD:
            raise ChannelError(f"a record carries at most {MAX_PAYLOAD} bytes, not {len(payload)}")
        return self._seal(_DATA, payload)

    def close(self) -> bytes:
        """The authenticated close record; nothing can be sealed after it."""
        if self._closed_local and self._state is not _State.FAILED:
            return b""
        self._check_can_send()
        self._closed_local = True
        return self._seal(_CLOSE, b"")

    def abort(self, reason: str) -> list[Event]:
        """End the channel here with ``reason`` (e.g. a supporter not on the host's allow-list);
        once keys exist the peer learns the reason from an authenticated abort record, which
        ``data_to_send`` then returns.  Returns this side's ``Failed`` (none if already ended)."""
        if self._state is _State.FAILED:
            return []
        if self._send_aead is not None and not self._closed_local:
            self._outbox += self._seal(_ABORT, _abort_reason(reason))
        return [self._fail(_Fail(FailureKind.ABORTED, f"ended here: {reason}"))]

    def data_to_send(self) -> bytes:
        """What reactions to input produced (hello, key confirmation, abort record): send it, in
        order, after every ``receive``, ``provide_password`` and ``abort`` — also after
        ``Failed``, so that the other side learns of the failure."""
        out, self._outbox = bytes(self._outbox), bytearray()
        return out

    # --- what arrives: returns events ------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the stream (any chunking).  After ``Failed`` input is ignored."""
        if self._state is _State.NEW:
            raise ChannelError("call start() before receive()")
        if self._state is _State.FAILED:
            return []
        self._buffer += data
        return self._run(self._process)

    def provide_password(self, secret: bytes) -> list[Event]:
        """Supporter, host flow: the SPAKE2 password for the salt in ``HostSaltReceived``."""
        if self._state is _State.FAILED:
            return []
        if self._state is not _State.WAIT_PASSWORD:
            raise ChannelError("provide_password() answers HostSaltReceived, which has not come")
        if not secret:
            raise ValueError("the host secret is empty")

        def handshake(events: list[Event]) -> None:
            self._outbox += self._begin_spake(secret)
            self._finish_handshake()
            self._process(events)
        return self._run(handshake)

    def eof(self) -> list[Event]:
        """The stream ended.  Anything but a clean end after the peer's close record fails."""
        state = self._state
        if state in (_State.FAILED, _State.NEW):
            return []
        if self._buffer:
            what = "handshake message" if state is _State.WAIT_HELLO else "record"
            return [self._fail(_Fail(FailureKind.TRUNCATED,
                                     f"the stream ended inside a {what} ({len(self._buffer)} bytes "
                                     f"of an incomplete frame): truncated"))]
        if state is _State.PEER_CLOSED:
            return []
        if state is _State.OPEN:
            return [self._fail(_Fail(FailureKind.TRUNCATED,
                                     "the stream ended without the peer's close record: "
                                     "truncated, or the peer went away"))]
        return [self._fail(_Fail(FailureKind.TRUNCATED,
                                 "the stream ended before key confirmation"))]

    @property
    def confirmed(self) -> bool:
        return self._state in (_State.OPEN, _State.PEER_CLOSED)

    # --- handshake --------------------------------------------------------------------------------

    def _begin_spake(self, password: bytes) -> bytes:
        context = b"%s:%s:" % (_LABEL, self.mode.value.encode())
        sid = self.session_id.encode()
        side = SPAKE2_A if self.role is Role.SUPPORTER else SPAKE2_B
        self._spake = side(password, idA=context + b"supporter:" + sid,
                           idB=context + b"peer:" + sid)
        self._password = None  # nothing keeps the password once SPAKE2 has it
        hello = _Hello(self.mode, self.role, self._spake.start(), self._salt, self._own_fp).encode()
        self._own_hello = hello
        return len(hello).to_bytes(4, "big") + hello

    def _on_hello(self, body: bytes) -> list[Event]:
        hello = _Hello.decode(body)
        if hello.mode is not self.mode:
            raise _Fail(FailureKind.PROTOCOL, f"the other side runs the {hello.mode.value} flow, "
                                              f"this side the {self.mode.value} flow")
        if hello.role is self.role:
            raise _Fail(FailureKind.PROTOCOL, f"both sides claim the {self.role.value} role")
        host_sends_salt = self.mode is Mode.HOST and hello.role is Role.PEER
        if len(hello.salt) != (SALT_BYTES if host_sends_salt else 0):
            raise _Fail(FailureKind.PROTOCOL, "the hello carries a salt where none belongs, "
                                              "or lacks the host's salt")
        if len(hello.fingerprint) != (32 if self._peer_certified else 0):
            raise _Fail(FailureKind.CERTIFICATE if self._peer_certified else FailureKind.PROTOCOL,
                        f"the {self._peer_role} announced "
                        f"{'no' if self._peer_certified else 'a'} certificate")
        self._peer_hello, self._peer_hello_body = hello, body
        if host_sends_salt and self.role is Role.SUPPORTER:
            self._state = _State.WAIT_PASSWORD
            return [HostSaltReceived(hello.salt)]
        self._finish_handshake()
        return []

    def _finish_handshake(self) -> None:
        hello = self._peer_hello
        try:
            key = self._spake.finish(hello.spake)
        except Exception as exc:  # spake2 raises assorted classes for a bad point or side
            raise _Fail(FailureKind.PROTOCOL, f"the peer's SPAKE2 message is invalid: {exc}")
        self._spake = None
        announced = hello.fingerprint
        believed = self._expected_fp if self._expected_fp is not None else announced
        self._peer_fp_bound = believed
        if self.role is Role.SUPPORTER:
            hellos, fps = (self._own_hello, self._peer_hello_body), (self._own_fp, believed)
        else:
            hellos, fps = (self._peer_hello_body, self._own_hello), (believed, self._own_fp)
        transcript = self._transcript = _transcript(self.mode, self.session_id, *hellos, *fps)
        to_peer = _hkdf(key, transcript, b"key supporter->peer")
        to_supporter = _hkdf(key, transcript, b"key peer->supporter")
        ad_to_peer, ad_to_supporter = _LABEL + b" supporter->peer", _LABEL + b" peer->supporter"
        if self.role is Role.SUPPORTER:
            self._send_aead, self._recv_aead = AESGCM(to_peer), AESGCM(to_supporter)
            self._send_ad, self._recv_ad = ad_to_peer, ad_to_supporter
        else:
            self._send_aead, self._recv_aead = AESGCM(to_supporter), AESGCM(to_peer)
            self._send_ad, self._recv_ad = ad_to_supporter, ad_to_peer
        self.verification_code = _verification_code(_hkdf(key, transcript, b"verification code", 8))
        self._state = _State.CONFIRMING
        # Sent even when the fingerprint check below fails: the other side then fails too.
        self._outbox += self._seal(_CONFIRM, self._confirmation())
        if self._expected_fp is not None and announced != self._expected_fp:
            raise _Fail(FailureKind.CERTIFICATE,
                        f"the {self._peer_role} announced certificate {announced.hex()[:16]}…, "
                        f"but {self._expected_fp.hex()[:16]}… was expected")

    def _confirmation(self) -> bytes:
        der = signature = b""
        if self._credentials is not None:
            der = self._credentials.certificate.public_bytes(serialization.Encoding.DER)
            signature = self._credentials.private_key.sign(
                _signed_message(self.role, self._transcript), ec.ECDSA(hashes.SHA256()))
        return (self._transcript + len(der).to_bytes(2, "big") + der
                + len(signature).to_bytes(2, "big") + signature)

    def _on_confirmation(self, body: bytes) -> KeyConfirmed:
        if body[:32] != self._transcript:
            raise _Fail(FailureKind.KEY_CONFIRMATION, _WRONG_KEY)
        der, at = _u16_field(body, 32, "certificate")
        signature, at = _u16_field(body, at, "signature")
        if at != len(body):
            raise _Fail(FailureKind.PROTOCOL, "the key confirmation has trailing bytes")
        peer_fp = None
        if self._peer_certified:
            if not der or not signature:
                raise _Fail(FailureKind.CERTIFICATE,
                            f"the {self._peer_role} sent no certificate and signature")
            self.peer_identity = self._check_peer(der, signature).uri
            peer_fp = self._peer_fp_bound.hex()
        elif der or signature:
            raise _Fail(FailureKind.PROTOCOL, "the customer sent a certificate it did not announce")
        self._state = _State.OPEN
        return KeyConfirmed(self.verification_code, self.peer_identity, peer_fp)

    def _check_peer(self, der: bytes, signature: bytes) -> Identity:
        def refuse(why: str) -> _Fail:
            return _Fail(FailureKind.CERTIFICATE,
                         f"the {self._peer_role}'s certificate is refused: {why}")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise refuse("it does not parse")
        if bytes.fromhex(fingerprint(cert)) != self._peer_fp_bound:
            raise refuse("it is not the certificate bound into the keys")
        try:
            cert.verify_directly_issued_by(self._ca)
        except (ValueError, TypeError, InvalidSignature):
            raise refuse("it was not issued by the pinned CA")
        now = self._clock()
        if now < cert.not_valid_before_utc:
            raise refuse(f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > cert.not_valid_after_utc:
            raise refuse(f"it expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        try:
            if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise refuse("it is a CA certificate")
        except x509.ExtensionNotFound:
            pass
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
                raise refuse("it is not a module certificate (no clientAuth usage)")
        except x509.ExtensionNotFound:
            pass
        key = cert.public_key()
        if not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)):
            raise refuse("its key is not ECDSA P-256")
        peer_role = Role.PEER if self.role is Role.SUPPORTER else Role.SUPPORTER
        try:
            key.verify(signature, _signed_message(peer_role, self._transcript),
                       ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise refuse("the transcript signature does not verify")
        try:
            identity = identity_of(cert)
        except IdentityError as exc:
            raise refuse(str(exc))
        if identity.role != self._peer_role:
            raise refuse(f"it belongs to {identity.uri}, not to a {self._peer_role}")
        if self._expected_peer is not None and identity != self._expected_peer:
            raise refuse(f"it belongs to {identity.uri}, not to {self._expected_peer.uri}")
        return identity

    # --- records ----------------------------------------------------------------------------------

    def _seal(self, kind: int, body: bytes) -> bytes:
        number = self._send_counter
        if number >= (1 << 96) - 1:
            raise ChannelError("the record counter is exhausted")
        self._send_counter = number + 1
        sealed = self._send_aead.encrypt(number.to_bytes(12, "big"), bytes((kind,)) + body,
                                         self._send_ad)
        return len(sealed).to_bytes(4, "big") + sealed

    def _check_can_send(self) -> None:
        if self._state is _State.FAILED:
            raise ChannelError(f"the channel failed: {self.failure.reason}")
        if self._state not in (_State.OPEN, _State.PEER_CLOSED):
            raise ChannelError("nothing can be sealed before KeyConfirmed")
        if self._closed_local:
            raise ChannelError("this side closed the channel")

    def _frame_length(self, limit: int, what: str) -> int | None:
        """The length of the complete frame at the head of the buffer; None if incomplete."""
        buffer = self._buffer
        if len(buffer) < 4:
            return None
        length = int.from_bytes(buffer[:4], "big")
        if length > limit:
            kind = FailureKind.PROTOCOL if what == "handshake message" else FailureKind.RECORD
            raise _Fail(kind, f"a {what} of {length} bytes exceeds the limit of {limit} bytes")
        return length if len(buffer) >= 4 + length else None

    def _next_frame(self, limit: int, what: str) -> bytes | None:
        length = self._frame_length(limit, what)
        if length is None:
            return None
        frame = bytes(self._buffer[4:4 + length])
        del self._buffer[:4 + length]
        return frame

    def _on_record(self, sealed: memoryview) -> list[Event]:
        number = self._recv_counter
        if len(sealed) <= TAG_BYTES:
            raise _Fail(FailureKind.RECORD, f"record #{number} is too short ({len(sealed)} bytes)")
        try:
            plain = self._recv_aead.decrypt(number.to_bytes(12, "big"), sealed, self._recv_ad)
        except InvalidTag:
            if self._state is _State.CONFIRMING:
                raise _Fail(FailureKind.KEY_CONFIRMATION, _WRONG_KEY)
            raise _Fail(FailureKind.RECORD, f"record #{number} failed to authenticate: tampered, "
                                            f"replayed, reordered or dropped")
        self._recv_counter = number + 1
        kind = plain[0]
        if self._state is _State.CONFIRMING and kind != _ABORT:
            if kind != _CONFIRM:
                raise _Fail(FailureKind.PROTOCOL, "the first record is not a key confirmation")
            return [self._on_confirmation(plain[1:])]
        if kind == _DATA:
            return [Record(plain[1:])]
        if kind == _CLOSE and len(plain) == 1:
            self._state = _State.PEER_CLOSED
            return [Closed()]
        if kind == _ABORT:
            reason = plain[1:1 + MAX_ABORT_REASON].decode("utf-8", "replace")
            raise _Fail(FailureKind.ABORTED, f"the {self._peer_role} ended the channel: {reason}")
        raise _Fail(FailureKind.PROTOCOL, f"record #{number} has an unexpected type {kind}")

    def _process(self, events: list[Event]) -> None:
        while True:
            state = self._state
            if state is _State.WAIT_HELLO:
                body = self._next_frame(MAX_HELLO, "handshake message")
                if body is None:
                    return
                events += self._on_hello(body)
            elif state in (_State.CONFIRMING, _State.OPEN):
                length = self._frame_length(MAX_RECORD, "record")
                if length is None:
                    return
                # decrypt straight from the buffer (one copy less per record), then drop it
                with memoryview(self._buffer) as view, view[4:4 + length] as sealed:
                    events += self._on_record(sealed)
                del self._buffer[:4 + length]
            elif state is _State.PEER_CLOSED and self._buffer:
                raise _Fail(FailureKind.PROTOCOL, "bytes arrived after the peer's close record")
            elif state is _State.WAIT_PASSWORD and len(self._buffer) > MAX_HELLO:
                raise _Fail(FailureKind.PROTOCOL, "the host sent more than its hello before the "
                                                  "supporter's hello")
            else:
                return

    def _run(self, step: Callable[[list[Event]], None]) -> list[Event]:
        events: list[Event] = []
        try:
            step(events)
        except _Fail as failure:
            events.append(self._fail(failure))
        return events

    def _fail(self, failure: _Fail) -> Failed:
        # What is queued still goes out (our key confirmation: the other side must fail the same
        # way), and while the stream is up and the keys work the reason follows in an abort record.
        if (self._send_aead is not None and not self._closed_local
                and failure.kind in (FailureKind.CERTIFICATE, FailureKind.RECORD,
                                     FailureKind.PROTOCOL)):
            self._outbox += self._seal(_ABORT, _abort_reason(failure.reason))
        self._state = _State.FAILED
        self._send_aead = self._recv_aead = None
        self._spake = None
        self._buffer.clear()
        self.failure = Failed(failure.reason, failure.kind)
        return self.failure


__all__ = [
    "SessionChannel", "Role", "Mode", "Credentials", "ChannelError", "HostKdf", "HOST_KDF",
    "derive_host_secret", "new_host_secret", "adhoc_password", "MAX_PAYLOAD", "MAX_RECORD",
    "Closed", "Failed", "FailureKind", "HostSaltReceived", "KeyConfirmed", "Record",
]
