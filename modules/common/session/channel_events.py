"""What a ``SessionChannel`` reports: small immutable events, nothing else.

``HostSaltReceived`` asks the caller for the SPAKE2 password (supporter, host flow);
``KeyConfirmed`` opens the channel; ``Record`` carries one authenticated payload; ``Closed`` is the
peer's authenticated end of the session; ``Failed`` ends the channel for good (a peer's
authenticated abort, with its reason, arrives as ``Failed`` of kind ``ABORTED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FailureKind(str, Enum):
    """Why a channel failed, for callers that count or report failures (e.g. lock-out)."""

    KEY_CONFIRMATION = "key-confirmation"  # wrong code/password, or sides disagree on the binding
    CERTIFICATE = "certificate"            # the peer's certificate, signature or identity refused
    RECORD = "record"                      # a record failed to authenticate or was too large
    TRUNCATED = "truncated"                # the stream ended before the peer's close record
    PROTOCOL = "protocol"                  # malformed or unexpected handshake or record
    ABORTED = "aborted"                    # a side ended the channel with a reason (``abort``)


@dataclass(frozen=True)
class HostSaltReceived:
    """Supporter, host flow: derive the SPAKE2 password from this salt and call
    ``provide_password`` (``derive_host_secret(typed_password, salt)``, off the reactor thread)."""

    salt: bytes


@dataclass(frozen=True)
class KeyConfirmed:
    """Both sides hold the same keys; records may flow.  ``verification_code`` ("123 456") is equal
    on both sides and may be compared by phone; ``peer_identity`` is the peer certificate's
    ``hausmeister:ROLE:NAME`` (``None`` for an ad-hoc customer, which has no certificate)."""

    verification_code: str
    peer_identity: str | None
    peer_fingerprint: str | None


@dataclass(frozen=True)
class Record:
    payload: bytes


@dataclass(frozen=True)
class Closed:
    """The peer closed the channel with an authenticated close record: nothing was cut off."""


@dataclass(frozen=True)
class Failed:
    reason: str
    kind: FailureKind


Event = HostSaltReceived | KeyConfirmed | Record | Closed | Failed
