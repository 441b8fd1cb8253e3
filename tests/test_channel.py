"""The end-to-end session channel: SPAKE2, key confirmation, AES-256-GCM records, transcript
signatures — sans-I/O with plain byte strings and hypothesis, plus the Twisted adapter over a real
TCP connection on 127.0.0.1.

Argon2id runs with cheap parameters here (``CHEAP``, passed explicitly); the production defaults
are asserted once.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import os
import re
import uuid
from dataclasses import dataclass

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import protocol
from twisted.internet.defer import Deferred

from modules.common.session.channel import (HOST_KDF, MAX_HELLO, MAX_PAYLOAD, MAX_RECORD, ChannelError,
                                    Credentials, HostKdf, SessionChannel, adhoc_password,
                                    derive_host_secret, new_host_secret)
from modules.common.session.channel_events import (Closed, Failed, FailureKind, HostSaltReceived,
                                           KeyConfirmed, Record)
from modules.common.session.channel_twisted import ChannelFailure, ChannelOverPipe
from protocol.identity import Identity, make_csr
from server import pki

CHEAP = HostKdf(time_cost=1, memory_cost_kib=8, parallelism=1)
CODE = adhoc_password("1234 5678")
SID = "7d0b3f3e-6c55-4a5e-9b0f-2f8d9a7c1e01"
HOST_ID = "0c4f6a52-1f0e-4d7b-a5c1-93b2c3d4e5f6"
OTHER_HOST_ID = "5e2a9b71-8c3d-4e6f-9a0b-1c2d3e4f5a6b"
HOST_PASSWORD = "correct horse battery staple"
MARKER = b"HAUSMEISTER-PLAINTEXT-MARKER-0451"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- certificates, built with the server's PKI code (tests may import server) -------------------

def issue(ca_key, ca_cert, uri: str, days: int = 30) -> Credentials:
    key = pki.new_key()
    cert = pki.sign_module_csr(ca_key, ca_cert, make_csr(key), Identity.parse(uri), days)
    return Credentials(cert, key)


@dataclass(frozen=True)
class World:
    ca: object
    other_ca: object
    supporter: Credentials          # hausmeister:supporter:alice, our CA
    bob: Credentials                # hausmeister:supporter:bob, our CA
    host: Credentials               # hausmeister:host:HOST_ID, our CA
    other_host: Credentials         # hausmeister:host:OTHER_HOST_ID, our CA
    foreign_supporter: Credentials  # hausmeister:supporter:alice, another CA
    foreign_host: Credentials       # hausmeister:host:HOST_ID, another CA (same CA name)


@functools.cache
def world() -> World:
    ca_key, ca = pki.create_ca()
    other_key, other_ca = pki.create_ca()  # the same name "Hausmeister CA", another key
    return World(ca, other_ca,
                 issue(ca_key, ca, "hausmeister:supporter:alice"),
                 issue(ca_key, ca, "hausmeister:supporter:bob"),
                 issue(ca_key, ca, f"hausmeister:host:{HOST_ID}"),
                 issue(ca_key, ca, f"hausmeister:host:{OTHER_HOST_ID}"),
                 issue(other_key, other_ca, "hausmeister:supporter:alice"),
                 issue(other_key, other_ca, f"hausmeister:host:{HOST_ID}"))


@functools.cache
def host_secret(password: str = HOST_PASSWORD) -> tuple[bytes, bytes]:
    return new_host_secret(password, CHEAP)


# --- channels and a wire between them -------------------------------------------------------------

def adhoc_pair(supporter_code=CODE, customer_code=CODE, supporter_sid=SID, customer_sid=SID,
               supporter_creds=None, customer_kw=None):
    w = world()
    s = SessionChannel("supporter", supporter_code, supporter_sid,
                       credentials=supporter_creds or w.supporter)
    p = SessionChannel("peer", customer_code, customer_sid, ca_certificate=w.ca,
                       **(customer_kw or {}))
    return End(s), End(p)


def host_pair(typed=HOST_PASSWORD, supporter_kw=None, host_kw=None, host_creds=None,
              supporter_creds=None):
    w = world()
    salt, secret = host_secret()
    s = SessionChannel("supporter", None, SID, mode="host",
                       credentials=supporter_creds or w.supporter,
                       ca_certificate=w.ca, **({"expected_peer": f"hausmeister:host:{HOST_ID}"}
                                               | (supporter_kw or {})))
    p = SessionChannel("peer", secret, SID, mode="host", host_salt=salt,
                       credentials=host_creds or w.host, ca_certificate=w.ca, **(host_kw or {}))
    return End(s, typed), End(p)


class End:
    """One side: its channel, what it has to send, and every event it reported."""

    def __init__(self, channel: SessionChannel, typed_password: str | None = None) -> None:
        self.channel = channel
        self.typed = typed_password
        self.outbox = bytearray()
        self.events: list = []

    def start(self) -> "End":
        self.outbox += self.channel.start()
        return self

    def feed(self, data: bytes) -> None:
        self._absorb(self.channel.receive(data))

    def eof(self) -> None:
        self._absorb(self.channel.eof())

    def send(self, payload: bytes) -> None:
        self.outbox += self.channel.seal(payload)

    def close(self) -> None:
        self.outbox += self.channel.close()

    def _absorb(self, events: list) -> None:
        self.outbox += self.channel.data_to_send()
        for event in events:
            self.events.append(event)
            if isinstance(event, HostSaltReceived):
                secret = derive_host_secret(self.typed, event.salt, CHEAP)
                self._absorb(self.channel.provide_password(secret))

    def take(self) -> bytes:
        out, self.outbox = bytes(self.outbox), bytearray()
        return out

    @property
    def records(self) -> list[bytes]:
        return [e.payload for e in self.events if isinstance(e, Record)]

    @property
    def confirmed(self) -> KeyConfirmed | None:
        found = [e for e in self.events if isinstance(e, KeyConfirmed)]
        assert len(found) <= 1
        return found[0] if found else None

    @property
    def failed(self) -> Failed | None:
        found = [e for e in self.events if isinstance(e, Failed)]
        assert len(found) <= 1, found
        if found:
            assert self.events[-1] is found[0], "events after Failed"
        return found[0] if found else None


def pump(a: End, b: End, sizes=None, wire: bytearray | None = None) -> None:
    """Move bytes both ways until neither side has anything to send, in chunks of ``sizes``."""
    cut = itertools.cycle(sizes) if sizes else None
    while a.outbox or b.outbox:
        for src, dst in ((a, b), (b, a)):
            while src.outbox:
                n = next(cut) if cut else len(src.outbox)
                chunk = bytes(src.outbox[:n])
                del src.outbox[:n]
                if wire is not None:
                    wire += chunk
                dst.feed(chunk)


def connect(a: End, b: End, sizes=None, wire=None) -> tuple[End, End]:
    a.start()
    b.start()
    pump(a, b, sizes, wire)
    return a, b


def open_adhoc() -> tuple[End, End]:
    s, p = connect(*adhoc_pair())
    assert s.confirmed and p.confirmed
    return s, p


def frames_of(stream: bytes) -> list[tuple[int, int]]:
    """(start, end) of each length-prefixed frame in ``stream``."""
    spans, at = [], 0
    while at < len(stream):
        end = at + 4 + int.from_bytes(stream[at:at + 4], "big")
        spans.append((at, end))
        at = end
    return spans


def assert_failed(end: End, kind: FailureKind, *fragments: str) -> Failed:
    failed = end.failed
    assert failed is not None, f"expected Failed({kind}), got {end.events}"
    assert failed.kind is kind, failed
    for fragment in fragments:
        assert fragment in failed.reason, failed.reason
    assert end.channel.failure == failed
    return failed


# --- both roles agree ---------------------------------------------------------------------------

def test_adhoc_both_sides_confirm_and_exchange_records_both_ways():
    w = world()
    s, p = open_adhoc()
    assert s.confirmed.verification_code == p.confirmed.verification_code
    assert re.fullmatch(r"\d{3} \d{3}", s.confirmed.verification_code)
    # the customer checked the supporter's certificate; the supporter learns nothing (no cert)
    assert p.confirmed.peer_identity == "hausmeister:supporter:alice"
    assert p.confirmed.peer_fingerprint == w.supporter.fingerprint
    assert s.confirmed.peer_identity is None and s.confirmed.peer_fingerprint is None

    payloads = [b"", b"x", os.urandom(1000), os.urandom(MAX_PAYLOAD)]
    for payload in payloads:
        s.send(payload)
        p.send(payload[::-1])
    pump(s, p)
    assert p.records == payloads
    assert s.records == [x[::-1] for x in payloads]

    s.close()
    pump(s, p)
    assert p.events[-1] == Closed()
    p.send(b"after the supporter closed: still allowed one way")
    p.close()
    pump(s, p)
    assert s.records[-1] == b"after the supporter closed: still allowed one way"
    assert s.events[-1] == Closed()
    s.eof()
    p.eof()
    assert s.failed is None and p.failed is None
    with pytest.raises(ChannelError, match="closed"):
        s.channel.seal(b"too late")


@FAST
@given(sizes=st.lists(st.integers(1, 4000), min_size=1, max_size=12),
       payloads=st.lists(st.binary(max_size=5000), max_size=6),
       mode=st.sampled_from(["adhoc", "host"]))
def test_any_chunking_of_the_stream_gives_the_same_records(sizes, payloads, mode):
    s, p = adhoc_pair() if mode == "adhoc" else host_pair()
    connect(s, p, sizes)
    assert s.confirmed and p.confirmed
    assert s.confirmed.verification_code == p.confirmed.verification_code
    for payload in payloads:
        s.send(payload)
        p.send(payload)
    s.close()
    p.close()
    pump(s, p, sizes)
    assert p.records == payloads and s.records == payloads
    assert p.events[-1] == Closed() and s.events[-1] == Closed()


def test_host_flow_salt_argon2id_secret_and_both_identities():
    salt, _secret = host_secret()
    s, p = host_pair()
    s.start()
    assert s.outbox == b""  # the supporter waits for the host's salt before SPAKE2
    p.start()
    pump(s, p)
    assert s.events[0] == HostSaltReceived(salt)
    assert s.confirmed.verification_code == p.confirmed.verification_code
    assert s.confirmed.peer_identity == f"hausmeister:host:{HOST_ID}"
    assert s.confirmed.peer_fingerprint == world().host.fingerprint
    assert p.confirmed.peer_identity == "hausmeister:supporter:alice"  # for the host's allow-list
    s.send(b"screen please")
    p.send(b"here it is")
    pump(s, p)
    assert p.records == [b"screen please"] and s.records == [b"here it is"]


def test_wrong_host_password_fails_both_sides_and_the_right_one_still_works():
    s, p = connect(*host_pair(typed="correct horse battery stapler"))
    for end in (s, p):
        assert_failed(end, FailureKind.KEY_CONFIRMATION,
                      "key confirmation failed: wrong code or password")
        assert end.confirmed is None and end.records == []
    s, p = connect(*host_pair())
    assert s.confirmed and p.confirmed


def test_host_secret_uses_argon2id_with_production_parameters_by_default():
    assert HOST_KDF == HostKdf(time_cost=3, memory_cost_kib=64 * 1024, parallelism=4)
    salt, secret = new_host_secret(HOST_PASSWORD)
    assert len(salt) == 16 and len(secret) == 32
    assert derive_host_secret(HOST_PASSWORD, salt) == secret
    assert derive_host_secret(HOST_PASSWORD, salt, CHEAP) != secret
    other_salt, other = new_host_secret(HOST_PASSWORD, CHEAP)
    assert other_salt != salt
    assert derive_host_secret(HOST_PASSWORD, other_salt, CHEAP) == other
    # typed on different keyboards: composed and decomposed umlauts are the same password
    assert derive_host_secret("Hausmeister-Gr\u00fc\u00dfe", other_salt, CHEAP) == \
        derive_host_secret("Hausmeister-Gru\u0308\u00dfe", other_salt, CHEAP)
    with pytest.raises(ValueError):
        derive_host_secret("", salt, CHEAP)
    with pytest.raises(ValueError):
        derive_host_secret(HOST_PASSWORD, b"short", CHEAP)


def test_adhoc_code_normalisation():
    assert adhoc_password("1234 5678") == adhoc_password("1234-5678") == b"12345678"
    for bad in ("1234 567", "1234 56789", "abcd efgh", "１２３４５６７８"):
        with pytest.raises(ValueError):
            adhoc_password(bad)


# --- wrong codes, wrong bindings ----------------------------------------------------------------

@pytest.mark.parametrize("change", ["code", "session id"])
def test_wrong_code_or_session_fails_key_confirmation_on_both_sides(change):
    if change == "code":
        s, p = adhoc_pair(customer_code=adhoc_password("1234 5679"))
    else:
        s, p = adhoc_pair(customer_sid=str(uuid.uuid4()))
    connect(s, p)
    for end in (s, p):
        assert_failed(end, FailureKind.KEY_CONFIRMATION,
                      "key confirmation failed: wrong code or password")
        assert end.confirmed is None and end.records == []
        with pytest.raises(ChannelError, match="failed"):
            end.channel.seal(b"no plaintext fallback")


def test_expected_fingerprint_is_bound_into_the_keys():
    w = world()
    # right expectation, written the way an operator might paste it
    spelled = ":".join(w.host.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    s, p = connect(*host_pair(supporter_kw={"peer_fingerprint": spelled},
                              host_kw={"peer_fingerprint": w.supporter.fingerprint}))
    assert s.confirmed.peer_fingerprint == w.host.fingerprint
    assert p.confirmed.peer_fingerprint == w.supporter.fingerprint

    # the supporter expects another host certificate: both sides fail
    s, p = connect(*host_pair(supporter_kw={"peer_fingerprint": w.other_host.fingerprint}))
    assert_failed(s, FailureKind.CERTIFICATE, "announced certificate", "was expected")
    assert_failed(p, FailureKind.KEY_CONFIRMATION, "key confirmation failed")
    assert s.confirmed is None and p.confirmed is None

    # the host expects another supporter
    s, p = connect(*host_pair(host_kw={"peer_fingerprint": w.bob.fingerprint}))
    assert_failed(p, FailureKind.CERTIFICATE, "was expected")
    assert_failed(s, FailureKind.KEY_CONFIRMATION, "key confirmation failed")

    # an ad-hoc customer told (by the broker) which supporter certificate to expect
    s, p = connect(*adhoc_pair(customer_kw={"peer_fingerprint": w.bob.fingerprint}))
    assert_failed(p, FailureKind.CERTIFICATE)
    assert_failed(s, FailureKind.KEY_CONFIRMATION)


def test_mode_and_role_mismatches_are_refused():
    w = world()
    salt, secret = host_secret()
    s = End(SessionChannel("supporter", CODE, SID, credentials=w.supporter))
    h = End(SessionChannel("peer", secret, SID, mode="host", host_salt=salt,
                           credentials=w.host, ca_certificate=w.ca))
    connect(s, h)
    assert_failed(s, FailureKind.PROTOCOL, "the other side runs the host flow")
    assert_failed(h, FailureKind.PROTOCOL, "the other side runs the adhoc flow")

    a = End(SessionChannel("supporter", CODE, SID, credentials=w.supporter))
    b = End(SessionChannel("supporter", CODE, SID, credentials=w.bob))
    connect(a, b)
    assert_failed(a, FailureKind.PROTOCOL, "both sides claim the supporter role")
    assert_failed(b, FailureKind.PROTOCOL, "both sides claim the supporter role")


def test_verification_codes_match_within_and_differ_across_sessions():
    codes = []
    for _ in range(4):
        s, p = open_adhoc()
        assert s.confirmed.verification_code == p.confirmed.verification_code
        codes.append(s.confirmed.verification_code)
    s, p = connect(*host_pair())
    assert s.confirmed.verification_code == p.confirmed.verification_code
    codes.append(s.confirmed.verification_code)
    assert len(set(codes)) > 1  # fresh SPAKE2 keys each time (all equal: p = 1e-24)
    assert s.channel.verification_code == s.confirmed.verification_code


def test_constructor_refuses_incomplete_or_contradictory_settings():
    w = world()
    salt, secret = host_secret()
    cases = [
        # a supporter in the host flow gets its password only after the salt
        dict(role="supporter", password=b"x", mode="host", credentials=w.supporter,
             ca_certificate=w.ca, expected_peer=f"hausmeister:host:{HOST_ID}"),
        # ... and must say which host it means to reach
        dict(role="supporter", password=None, mode="host", credentials=w.supporter,
             ca_certificate=w.ca),
        # an ad-hoc customer has no certificate, and must check the supporter's
        dict(role="peer", password=CODE, credentials=w.host, ca_certificate=w.ca),
        dict(role="peer", password=CODE),
        # a supporter always has a certificate
        dict(role="supporter", password=CODE),
        # nothing to check on a customer
        dict(role="supporter", password=CODE, credentials=w.supporter, ca_certificate=w.ca),
        # the host needs its salt; nobody else has one
        dict(role="peer", password=secret, mode="host", credentials=w.host, ca_certificate=w.ca),
        dict(role="peer", password=CODE, host_salt=salt, ca_certificate=w.ca),
        # a supporter's peer is a host, a host's peer a supporter
        dict(role="peer", password=secret, mode="host", host_salt=salt, credentials=w.host,
             ca_certificate=w.ca, expected_peer=f"hausmeister:host:{OTHER_HOST_ID}"),
        dict(role="peer", password=b"", ca_certificate=w.ca),
    ]
    for case in cases:
        role, password = case.pop("role"), case.pop("password")
        with pytest.raises(ValueError):
            SessionChannel(role, password, SID, **case)
    with pytest.raises(ValueError, match="does not belong"):
        Credentials(w.host.certificate, w.supporter.private_key)


# --- what the server and the relay see ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["adhoc", "host"])
def test_the_relay_sees_only_ciphertext(mode):
    wire = bytearray()
    s, p = adhoc_pair() if mode == "adhoc" else host_pair()
    connect(s, p, wire=wire)
    for _ in range(3):
        s.send(MARKER * 40)
        p.send(b"reply " + MARKER)
    s.close()
    p.close()
    pump(s, p, sizes=[1500], wire=wire)
    assert MARKER in p.records[0] and MARKER in s.records[0]  # it did travel
    assert len(wire) > 3 * 40 * len(MARKER)
    for secret in (MARKER, MARKER[:12], MARKER[-12:], b"12345678",
                   HOST_PASSWORD.encode(), host_secret()[1],
                   s.confirmed.verification_code.replace(" ", "").encode()):
        assert secret not in wire
    # the certificates travel inside the encrypted confirmation, not in the clear
    der = world().supporter.certificate.public_bytes(serialization.Encoding.DER)
    assert der[-64:] not in wire


# --- records that were tampered with, replayed, reordered, truncated, oversized ------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_single_bit_flip_in_any_record_ends_the_channel(data):
    s, p = open_adhoc()
    payloads = [b"A" * 100, os.urandom(700), b"", b"last"]
    stream = b"".join(s.channel.seal(x) for x in payloads) + s.channel.close()
    spans = frames_of(stream)
    position = data.draw(st.integers(0, len(stream) - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    tampered = bytearray(stream)
    tampered[position] ^= 1 << bit
    cut = data.draw(st.integers(1, len(stream)), label="chunk")
    for at in range(0, len(tampered), cut):
        p.feed(bytes(tampered[at:at + cut]))
    p.eof()
    assert_failed(p, p.failed.kind if p.failed else FailureKind.RECORD)
    assert p.failed.kind in (FailureKind.RECORD, FailureKind.TRUNCATED)
    hit = next(i for i, (start, end) in enumerate(spans) if start <= position < end)
    assert p.records == payloads[:hit]  # everything before the damage, nothing from it on
    assert Closed() not in p.events


@FAST
@given(data=st.data(), mode=st.sampled_from(["adhoc", "host"]))
def test_any_single_bit_flip_in_the_handshake_prevents_confirmation(data, mode):
    s, p = adhoc_pair() if mode == "adhoc" else host_pair()
    s.start()
    p.start()
    hello_p = p.take()
    s.feed(hello_p)
    handshake = s.take()  # the supporter's hello and its key confirmation
    # the length varies (DER signatures), so draw a fraction of it: the same draws each run
    position = data.draw(st.integers(0, 2**16 - 1), label="byte") * len(handshake) // 2**16
    tampered = bytearray(handshake)
    tampered[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    p.feed(bytes(tampered))
    p.eof()
    assert p.confirmed is None and p.records == []
    assert p.failed is not None
    s.feed(p.take())
    if s.confirmed:  # only if the hello arrived intact (the damage hit the confirmation record),
        assert position >= 4 + len(s.channel._own_hello)  # so the peer derived the same keys


def test_replayed_reordered_dropped_and_reflected_records_end_the_channel():
    def stream(s: End, n: int = 4) -> list[bytes]:
        return [s.channel.seal(b"record %d" % i) for i in range(n)]

    s, p = open_adhoc()
    r = stream(s)
    p.feed(r[0] + r[1] + r[1])
    assert p.records == [b"record 0", b"record 1"]
    assert_failed(p, FailureKind.RECORD, "record #3 failed to authenticate", "replayed")
    s.feed(p.take())  # the customer tells the supporter why it ended the channel
    assert_failed(s, FailureKind.ABORTED, "the customer ended the channel: record #3 failed")

    s, p = open_adhoc()
    r = stream(s)
    p.feed(r[0] + r[2] + r[1])
    assert p.records == [b"record 0"]
    assert_failed(p, FailureKind.RECORD, "record #2 failed to authenticate")

    s, p = open_adhoc()
    r = stream(s)
    p.feed(r[0] + r[1] + r[3])  # one dropped
    assert p.records == [b"record 0", b"record 1"]
    assert_failed(p, FailureKind.RECORD)

    # the supporter's key confirmation (record #0) replayed later
    s, p = adhoc_pair()
    s.start()
    p.start()
    p.feed(s.outbox)
    s.feed(p.take())
    confirmation = s.take()[len(s.channel._own_hello) + 4:]
    p.feed(confirmation)
    assert p.confirmed
    p.feed(confirmation)
    assert_failed(p, FailureKind.RECORD)

    # a record sent back to its sender, and one from another session with the same code
    s, p = open_adhoc()
    s.feed(s.channel.seal(b"mirror"))
    assert_failed(s, FailureKind.RECORD)
    s, p = open_adhoc()
    s2, _p2 = open_adhoc()
    p.feed(s2.channel.seal(b"from another session"))
    assert_failed(p, FailureKind.RECORD)
    assert p.records == []


def test_truncation_is_detected():
    s, p = open_adhoc()
    record = s.channel.seal(b"half of this arrives")
    p.feed(record[:-1])
    p.eof()
    assert_failed(p, FailureKind.TRUNCATED, "inside a record")
    assert p.records == []

    s, p = open_adhoc()
    p.feed(s.channel.seal(b"complete"))
    p.eof()  # no close record: a relay that stops forwarding cannot fake a clean end
    assert p.records == [b"complete"]
    assert_failed(p, FailureKind.TRUNCATED, "without the peer's close record")

    s, p = open_adhoc()
    p.feed(s.channel.seal(b"complete") + s.channel.close())
    p.eof()
    assert p.failed is None and p.events[-1] == Closed()

    s, p = adhoc_pair()
    s.start()
    p.start()
    p.feed(s.outbox[:20])
    p.eof()
    assert_failed(p, FailureKind.TRUNCATED, "inside a handshake message")

    s, p = adhoc_pair()
    s.start()
    p.start()
    p.feed(s.take())
    p.eof()
    assert_failed(p, FailureKind.TRUNCATED, "before key confirmation")

    s, p = open_adhoc()
    p.feed(s.channel.close() + b"\x00")  # anything after the close record
    assert_failed(p, FailureKind.PROTOCOL, "after the peer's close record")


def test_records_over_64_kib_are_refused():
    s, p = open_adhoc()
    biggest = s.channel.seal(os.urandom(MAX_PAYLOAD))
    assert len(biggest) == 4 + MAX_RECORD == 4 + 64 * 1024
    p.feed(biggest)
    assert len(p.records[0]) == MAX_PAYLOAD
    with pytest.raises(ChannelError, match=str(MAX_PAYLOAD)):
        s.channel.seal(bytes(MAX_PAYLOAD + 1))
    # a length prefix over 64 KiB ends the channel at once, before any of the body arrives
    p.feed((MAX_RECORD + 1).to_bytes(4, "big"))
    assert_failed(p, FailureKind.RECORD, "65537 bytes exceeds the limit of 65536")

    s, p = open_adhoc()
    p.feed((2**32 - 1).to_bytes(4, "big"))
    assert_failed(p, FailureKind.RECORD, "exceeds")

    _s, p = adhoc_pair()
    p.start()
    p.feed((MAX_HELLO + 1).to_bytes(4, "big"))
    assert_failed(p, FailureKind.PROTOCOL, "handshake message", "exceeds")


@FAST
@given(garbage=st.binary(min_size=1, max_size=3000), role=st.sampled_from(["supporter", "peer"]),
       cut=st.integers(1, 3000))
def test_garbage_before_keys_fails_and_never_confirms(garbage, role, cut):
    s, p = adhoc_pair()
    end = s if role == "supporter" else p
    end.start()
    for at in range(0, len(garbage), cut):
        end.feed(garbage[at:at + cut])
    end.eof()
    assert end.failed is not None
    assert end.confirmed is None and end.records == []


def test_a_stray_protocol_is_refused_at_once():
    _s, p = adhoc_pair()
    p.start()
    p.feed(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
    assert_failed(p, FailureKind.PROTOCOL, "exceeds")
    _s, p = adhoc_pair()
    p.start()
    p.feed((12).to_bytes(4, "big") + b"SSH-2.0-oops")
    assert_failed(p, FailureKind.PROTOCOL, "not a Hausmeister channel hello")


def test_after_failure_the_channel_refuses_everything():
    s, p = open_adhoc()
    good = [s.channel.seal(b"one"), s.channel.seal(b"two")]
    bad = bytearray(good[0])
    bad[-1] ^= 0x80
    p.feed(bytes(bad))
    assert_failed(p, FailureKind.RECORD)
    assert p.channel.receive(good[0]) == [] and p.channel.receive(good[1]) == []
    assert p.channel.eof() == []
    assert p.channel.data_to_send() == b""
    for attempt in (lambda: p.channel.seal(b"x"), p.channel.close):
        with pytest.raises(ChannelError, match="failed"):
            attempt()
    assert p.records == []


def test_nothing_is_sealed_before_key_confirmation():
    s, p = adhoc_pair()
    with pytest.raises(ChannelError):
        s.channel.receive(b"before start")
    s.start()
    with pytest.raises(ChannelError, match="before KeyConfirmed"):
        s.channel.seal(b"too early")
    with pytest.raises(ChannelError):
        s.channel.close()
    with pytest.raises(ChannelError):
        s.channel.start()


# --- transcript signatures and certificates -------------------------------------------------------

def test_host_certificate_from_another_ca_is_refused():
    s, p = connect(*host_pair(host_creds=world().foreign_host))
    assert_failed(s, FailureKind.CERTIFICATE, "not issued by the pinned CA")
    assert s.confirmed is None and s.records == []


def test_host_with_another_host_id_is_refused():
    s, p = connect(*host_pair(host_creds=world().other_host))
    assert_failed(s, FailureKind.CERTIFICATE, f"belongs to hausmeister:host:{OTHER_HOST_ID}",
                  f"not to hausmeister:host:{HOST_ID}")
    assert s.confirmed is None
    # the host confirmed the keys, then learns why the supporter went (an authenticated abort)
    assert p.confirmed is not None
    assert_failed(p, FailureKind.ABORTED, "the supporter ended the channel: the host's "
                                          "certificate is refused")


def test_host_refuses_a_supporter_after_confirmation_with_a_reason():
    s, p = connect(*host_pair())
    assert p.confirmed.peer_identity == "hausmeister:supporter:alice"
    reason = "hausmeister:supporter:alice is not on this host's allow-list"
    [failed] = p.channel.abort(reason)
    assert failed == Failed(f"ended here: {reason}", FailureKind.ABORTED)
    p.outbox += p.channel.data_to_send()
    pump(s, p)
    assert_failed(s, FailureKind.ABORTED, f"the host ended the channel: {reason}")
    with pytest.raises(ChannelError):
        s.channel.seal(b"x")
    assert p.channel.abort("twice") == []


def test_supporter_certificate_from_another_ca_is_refused_by_host_and_customer():
    s, p = connect(*host_pair(supporter_creds=world().foreign_supporter))
    assert_failed(p, FailureKind.CERTIFICATE, "not issued by the pinned CA")
    assert p.confirmed is None
    s, p = connect(*adhoc_pair(supporter_creds=world().foreign_supporter))
    assert_failed(p, FailureKind.CERTIFICATE, "not issued by the pinned CA")
    assert p.confirmed is None
    assert_failed(s, FailureKind.ABORTED, "the customer ended the channel: the supporter's "
                                          "certificate is refused: it was not issued by")


def test_customer_checks_the_supporter_role_identity_and_validity():
    w = world()
    s, p = connect(*adhoc_pair(customer_kw={"expected_peer": "hausmeister:supporter:bob"}))
    assert_failed(p, FailureKind.CERTIFICATE, "belongs to hausmeister:supporter:alice")
    # a host certificate posing as a supporter
    s, p = connect(*adhoc_pair(supporter_creds=w.host))
    assert_failed(p, FailureKind.CERTIFICATE, "not to a supporter")
    # expired, seen from a customer whose clock is 60 days ahead (the certificate lasts 30)
    later = lambda: dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=60)  # noqa: E731
    s, p = connect(*adhoc_pair(customer_kw={"clock": later}))
    assert_failed(p, FailureKind.CERTIFICATE, "expired")


class FlippedSignature(SessionChannel):
    """A peer whose transcript signature was altered (e.g. by a buggy or hostile module)."""

    def _confirmation(self) -> bytes:
        body = bytearray(super()._confirmation())
        body[-3] ^= 0x01
        return bytes(body)


def test_tampered_transcript_signature_is_refused():
    w = world()
    salt, secret = host_secret()
    s = End(SessionChannel("supporter", None, SID, mode="host", credentials=w.supporter,
                           ca_certificate=w.ca, expected_peer=f"hausmeister:host:{HOST_ID}"),
            HOST_PASSWORD)
    h = End(FlippedSignature("peer", secret, SID, mode="host", host_salt=salt,
                             credentials=w.host, ca_certificate=w.ca))
    connect(s, h)
    assert_failed(s, FailureKind.CERTIFICATE, "transcript signature does not verify")
    assert s.confirmed is None

    s = End(FlippedSignature("supporter", CODE, SID, credentials=w.supporter))
    c = End(SessionChannel("peer", CODE, SID, ca_certificate=w.ca))
    connect(s, c)
    assert_failed(c, FailureKind.CERTIFICATE, "transcript signature does not verify")


def test_a_certificate_without_its_key_is_refused():
    """A host that presents another host's certificate (it has only its own key)."""
    w = world()
    stolen = object.__new__(Credentials)  # bypasses the key check a real module would fail
    object.__setattr__(stolen, "certificate", w.host.certificate)
    object.__setattr__(stolen, "private_key", w.other_host.private_key)
    s, h = connect(*host_pair(host_creds=stolen))
    assert_failed(s, FailureKind.CERTIFICATE, "transcript signature does not verify")


def test_a_certificate_other_than_the_announced_one_is_refused():
    w = world()
    s, h = host_pair(host_creds=w.other_host)
    h.channel._own_fp = bytes.fromhex(w.host.fingerprint)  # announce one, present another
    connect(s, h)
    assert_failed(s, FailureKind.CERTIFICATE, "not the certificate bound into the keys")


# --- the Twisted adapter over a real TCP connection on 127.0.0.1 ---------------------------------

class TcpPipe(protocol.Protocol):
    """A RelayLeg-shaped pipe: send, attach, ended, close."""

    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.made: Deferred = Deferred()
        self.first_bytes: Deferred = Deferred()
        self._sink = None
        self._early: list[bytes] = []
        self.wire = bytearray()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.wire += data
        if not self.first_bytes.called:
            self.first_bytes.callback(None)
        if self._sink is None:
            self._early.append(data)
        else:
            self._sink(data)

    def connectionLost(self, reason) -> None:
        self.ended.callback(reason.getErrorMessage())

    def attach(self, sink) -> None:
        self._sink = sink
        for chunk in self._early:
            sink(chunk)
        self._early = []

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()


async def tcp_pair() -> tuple[TcpPipe, TcpPipe]:
    from twisted.internet import reactor
    server_side = TcpPipe()
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: server_side),
                             interface="127.0.0.1")
    client_side = TcpPipe()
    protocol.ClientCreator(reactor, lambda: client_side).connectTCP(
        "127.0.0.1", port.getHost().port)
    await client_side.made
    await server_side.made
    await port.stopListening()
    return client_side, server_side


@pytest_twisted.ensureDeferred
async def test_adapter_over_loopback_tcp_adhoc_records_and_clean_close():
    w = world()
    a, b = await tcp_pair()
    got_s, got_p = [], []
    sup = ChannelOverPipe(a, SessionChannel("supporter", CODE, SID, credentials=w.supporter),
                          got_s.append)
    await b.first_bytes  # the supporter's hello waits in the customer's pipe (a RelayLeg keeps it)
    cus = ChannelOverPipe(b, SessionChannel("peer", CODE, SID, ca_certificate=w.ca), got_p.append)
    ks, kp = await sup.confirmed, await cus.confirmed
    assert ks.verification_code == kp.verification_code
    assert kp.peer_identity == "hausmeister:supporter:alice"
    big = MARKER * 1000
    sup.send_record(big[:MAX_PAYLOAD])
    cus.send_record(b"thanks")
    sup.close()
    assert await cus.ended == Closed() and await sup.ended == Closed()
    assert got_p == [big[:MAX_PAYLOAD]] and got_s == [b"thanks"]
    await a.ended
    await b.ended
    assert MARKER not in a.wire and MARKER not in b.wire


@pytest_twisted.ensureDeferred
async def test_adapter_host_flow_derives_off_the_reactor_and_wrong_password_fails_both():
    w = world()
    salt, secret = host_secret()

    async def attempt(typed: str):
        a, b = await tcp_pair()
        sup = ChannelOverPipe(
            a, SessionChannel("supporter", None, SID, mode="host", credentials=w.supporter,
                              ca_certificate=w.ca, expected_peer=f"hausmeister:host:{HOST_ID}"),
            lambda payload: None, host_password=typed, kdf=CHEAP)
        host = ChannelOverPipe(
            b, SessionChannel("peer", secret, SID, mode="host", host_salt=salt,
                              credentials=w.host, ca_certificate=w.ca), lambda payload: None)
        return sup, host, a, b

    sup, host, a, b = await attempt(HOST_PASSWORD)
    ks, kh = await sup.confirmed, await host.confirmed
    assert ks.peer_identity == f"hausmeister:host:{HOST_ID}"
    assert kh.peer_identity == "hausmeister:supporter:alice"
    host.close()
    assert await sup.ended == Closed() and await host.ended == Closed()

    sup, host, a, b = await attempt("wrong")
    for side in (sup, host):
        with pytest.raises(ChannelFailure) as caught:
            await side.confirmed
        assert caught.value.failed.kind is FailureKind.KEY_CONFIRMATION
        assert isinstance(await side.ended, Failed)
    await a.ended
    await b.ended

    with pytest.raises(ValueError, match="typed host password"):
        ChannelOverPipe(a, SessionChannel("supporter", None, SID, mode="host",
                                          credentials=w.supporter, ca_certificate=w.ca,
                                          expected_peer=f"hausmeister:host:{HOST_ID}"),
                        lambda payload: None)
