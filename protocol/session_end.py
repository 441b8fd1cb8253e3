"""Why a session ended: one reason, named the same in the protocol, `session list`, the CSV, the
console and both modules' windows.

A reason says *who* ended the session and *why*.  The party that ends a session reports its
reason to the server before it closes its relay leg (``SessionEvent`` of kind ``ending``); the
server keeps the first reason it hears and writes it into the ``ended`` protocol line when the
relay closes.  When the server itself ends a session (revocation, an unwritable protocol, a
restart) it tells both parties with ``SessionEnded`` on their control connections.  A relay
that sees a leg vanish without a reported reason records ``connection_lost`` for that party.

Wire form (the ``ending`` event's detail and ``SessionEnded``'s arguments)::

    {"cause": "emergency_stop", "by": "customer", "detail": "..."}
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

MAX_DETAIL_CHARS = 200


class EndCause(str, enum.Enum):
    EMERGENCY_STOP = "emergency_stop"        # a party pressed the emergency stop
    ENDED = "ended"                          # a party ended the session normally
    RIGHT_WITHDRAWN = "right_withdrawn"      # the showing side withdrew the right to view
    DECLINED = "declined"                    # terms or the session were declined
    KEY_FAILED = "key_confirmation_failed"   # wrong code or host password
    IDLE_TIMEOUT = "idle_timeout"            # no bytes either way for the relay's idle timeout
    PAIR_TIMEOUT = "pair_timeout"            # the partner never reached the relay
    REVOKED = "revoked"                      # certificate revoked, user disabled, host removed
    PROTOCOL_UNWRITABLE = "protocol_unwritable"  # the session protocol could not be written
    RECORDING_FAILED = "recording_failed"    # a required recording could not be made or stored
    CONNECTION_LOST = "connection_lost"      # a party's connection vanished without a word
    SERVER_SHUTDOWN = "server_shutdown"      # the server or relay stopped in order
    SERVER_CRASHED = "server_crashed"        # found unfinished at start-up after a crash
    SERVER_LOST = "server_lost"              # a module lost its control connection to the server
    ERROR = "error"                          # a protocol error inside the session


PARTIES = ("supporter", "customer", "host", "server", "relay")

_TEXT = {
    EndCause.EMERGENCY_STOP: "emergency stop by the {by}",
    EndCause.ENDED: "ended by the {by}",
    EndCause.RIGHT_WITHDRAWN: "the {by} withdrew the right to view",
    EndCause.DECLINED: "declined by the {by}",
    EndCause.KEY_FAILED: "key confirmation failed (wrong ID or password)",
    EndCause.IDLE_TIMEOUT: "idle timeout",
    EndCause.PAIR_TIMEOUT: "the {by} did not reach the relay in time",
    EndCause.REVOKED: "access revoked",
    EndCause.PROTOCOL_UNWRITABLE: "the session protocol could not be written",
    EndCause.RECORDING_FAILED: "the required session recording could not be made",
    EndCause.CONNECTION_LOST: "the connection to the {by} was lost",
    EndCause.SERVER_SHUTDOWN: "the server shut down",
    EndCause.SERVER_CRASHED: "server stopped unexpectedly",
    EndCause.SERVER_LOST: "lost the connection to the server",
    EndCause.ERROR: "error in the {by}'s session",
}


class BadEndReason(ValueError):
    """A reported end reason does not follow the wire form."""


@dataclass(frozen=True)
class EndReason:
    cause: EndCause
    by: str = "server"
    detail: str = ""

    def text(self) -> str:
        """One line for people: ``emergency stop by the customer``, ``access revoked: …``."""
        line = _TEXT[self.cause].format(by=self.by)
        return f"{line}: {self.detail}" if self.detail else line

    def fields(self) -> dict[str, str]:
        return {"cause": self.cause.value, "by": self.by, "detail": self.detail}

    @classmethod
    def from_fields(cls, data: Any) -> "EndReason":
        """Parse a party's or the server's report; raises ``BadEndReason`` with the problem."""
        if not isinstance(data, dict):
            raise BadEndReason("an end reason must be an object")
        try:
            cause = EndCause(data.get("cause"))
        except ValueError:
            raise BadEndReason(f"unknown end cause {str(data.get('cause'))[:40]!r}") from None
        by = data.get("by", "server")
        if by not in PARTIES:
            raise BadEndReason(f"unknown party {str(by)[:40]!r}")
        detail = data.get("detail", "")
        if not isinstance(detail, str):
            raise BadEndReason("an end reason's detail must be text")
        detail = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in detail)
        return cls(cause, by, detail[:MAX_DETAIL_CHARS])

    @property
    def abnormal(self) -> bool:
        """Whether a module that sees this end should exit non-zero."""
        return self.cause not in (EndCause.ENDED, EndCause.DECLINED)


__all__ = ["EndCause", "EndReason", "BadEndReason", "PARTIES", "MAX_DETAIL_CHARS"]
