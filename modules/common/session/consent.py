"""Rights and consent inside a session: the control-message schema and a sans-I/O state machine.

``ConsentState`` is one side's view of who shows its screen (the presenter), which rights the other
side (the viewer) holds, whether an ad-hoc customer accepted the support terms, and which
questions wait for an answer.  Every method returns an ``Outcome``: the control messages to send
(dicts; ``encode_message`` turns them into bytes for the mux's CONTROL channel) and the events
that happened.  It reads no clock: methods that start a deadline take ``now``, and ``expire(now)``
answers "no" to whatever was not answered in time.  ``ConsentDriver`` is the thin Twisted adapter
that runs a state with a ``IConsentUI`` (terminal, later GUIs), a clock and two sinks.

The module is responsible for consent and its enforcement decisions; it is not responsible for
moving screen or file bytes (the caller asks ``allows``/``enforce`` before it acts on an input
event or a file chunk) nor for the session protocol file (it only yields the events for it).

Rules:

* Roles: the supporter; the peer — an ad-hoc customer or an unattended host.  The presenter is the
  peer at first.  Rights (``view``, ``control``, ``files``) are granted by the presenter to the
  viewer, each on its own, each revocable at once, and enforced by the presenter (``allows``).
* Ad-hoc: the customer must accept the support terms before anything else.  The terms come from
  the server (``ConsentState(CUSTOMER, terms=...)``) or in a ``terms`` message from the supporter
  (the same text if both: a different one is refused).  The acceptance carries the SHA-256 of the
  text's UTF-8 bytes; a supporter that knows the text checks it.  A right requested before the
  terms were accepted is refused (denied and logged).
* Customers and supporters answer every request themselves; no answer within ``answer_timeout``
  means "no".  Unattended hosts follow their policy per right: ``allow``, ``deny`` or ``ask``
  (ask the logged-in user, same timeout).
* Direction change: either side may ask that the direction swap; the side that would show must
  consent.  A request from the would-be presenter is its own consent and is applied at once by the
  receiver; a request from the presenter is asked of the other side (a host decides by its
  ``view`` policy).  After a change the new viewer holds ``view`` (showing is being viewed) and
  nothing else.  Messages about rights carry the direction ``epoch`` (number of changes so far);
  one from an earlier epoch crossed the change on the wire and is dropped.
* The side that receives ``direction_grant`` answers ``direction_ack``: each side's SCREEN
  stream then has a marker where it switched epochs (the grant, or the ack), so bytes of the old
  screen that crossed the change on the wire are dropped (``screen_in_step``).
* Pause: the presenter may pause its screen (``pause``) and resume it; the viewer keeps the last
  picture marked "paused".  Nothing of the screen is captured or sent meanwhile (the caller's
  part); a direction change ends a pause.
* Emergency stop, from either side: every right is revoked and the session ends at once.
* Comments are the supporter's notes for the protocol: they are never sent (a ``comment`` message
  is in the schema for later multi-party sessions; today receiving one is an error).
* A state is per pair of parties (one per session channel): a presenter with several viewers
  later keeps one per viewer, each with its own grants.  The CONTROL channel carries exactly
  these messages; other layers (file transfer) frame their own on their own channels.

Control messages (UTF-8 JSON objects, at most 64 KiB; exactly these keys, no others)::

    {"type": "terms", "text": T}                          supporter -> customer   T: 1-16000 chars
    {"type": "terms_accepted", "sha256": H}               customer -> supporter   H: 64 hex digits
    {"type": "request", "right": R, "epoch": E}           viewer -> presenter     R: view|control|files
    {"type": "grant", "right": R, "epoch": E}             presenter -> viewer
    {"type": "deny", "right": R, "reason": S, "epoch": E} presenter -> viewer     S: 1-200 chars
    {"type": "revoke", "right": R, "epoch": E}            presenter -> viewer
    {"type": "emergency_stop", "who": W}                  either                  W: sender's role
    {"type": "direction_request", "epoch": E}             either
    {"type": "direction_grant", "epoch": E}               answer to direction_request
    {"type": "direction_deny", "reason": S, "epoch": E}   answer to direction_request
    {"type": "direction_ack", "epoch": E}                 answer to direction_grant  E: the new one
    {"type": "pause", "epoch": E}                         presenter -> viewer
    {"type": "resume", "epoch": E}                        presenter -> viewer
    {"type": "chat", "text": C}                           either (after terms)    C: 1-2000 chars
    {"type": "comment", "text": C}                        supporter <-> supporter only
    {"type": "bye", "reason": S}                          either
    {"type": "keepalive"}                                 either (any time)       ignored

Texts hold no control characters (``chat``/``terms`` may hold newlines and tabs), no lone
surrogates.  Anything else — unknown type, missing or extra key, wrong type, bad size, unknown
right, a message the sender may not send in this state — raises ``ConsentError``; the caller ends
the session (``ConsentDriver`` does so with a ``bye``).

Events (``Event`` subclasses) and the session-protocol kinds they yield (``protocol_event()`` →
``{"kind": ..., "detail": {...}}``; "created" and "joined" are the server's).  Both sides report
what they see; ``by`` names the role that acted::

    TermsShown        terms_shown         {"sha256", "by"}
    TermsAccepted     terms_accepted      {"sha256", "by"}
    RightRequested    right_requested     {"right", "by"}
    RightGranted      right_granted       {"right", "by"}
    RightDenied       right_denied        {"right", "by", "reason"}
    RightRevoked      right_revoked       {"right", "by", "reason"}
    RightRefused      right_refused       {"right", "attempt", "count"}  a use without the right
    DirectionRequested direction_requested {"by"}
    DirectionChanged  direction_changed   {"presenter", "epoch"}
    DirectionDenied   direction_denied    {"by", "reason"}
    ScreenPaused      screen_paused       {"by"}
    ScreenResumed     screen_resumed      {"by"}
    EmergencyStopped  emergency_stop      {"by"}
    Chat              chat                {"by", "text"}
    Comment           comment             {"by", "text"}
    SessionEnded      ended               {"by", "reason"}
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface

from modules.common.session import strict_json

log = Logger()

MAX_MESSAGE_BYTES = 64 * 1024
MAX_TERMS_CHARS = 16_000
MAX_CHAT_CHARS = 2_000
MAX_REASON_CHARS = 200
MAX_EPOCH = 2**31 - 1
DEFAULT_ANSWER_TIMEOUT = 60.0
DEFAULT_TERMS_TIMEOUT = 600.0


class ConsentError(ValueError):
    """The peer sent a control message that is malformed or not allowed now."""


class ConsentUsageError(RuntimeError):
    """This side's caller asked for something its role or the state does not allow."""


class Role(str, Enum):
    SUPPORTER = "supporter"
    CUSTOMER = "customer"
    HOST = "host"


class Right(str, Enum):
    VIEW = "view"
    CONTROL = "control"
    FILES = "files"


class Question(str, Enum):
    """What else than a right may wait for an answer."""

    TERMS = "terms"
    DIRECTION = "direction"


Key = Right | Question

POLICY_VALUES = ("allow", "deny", "ask")
DEFAULT_HOST_POLICY: Mapping[str, str] = {"view": "ask", "control": "ask", "files": "ask"}


def terms_sha256(text: str) -> str:
    """The hash recorded with an acceptance: SHA-256 of the exact text's UTF-8 bytes, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    """Something that happened; ``protocol_event()`` is its line for the session protocol."""

    kind: ClassVar[str]

    def detail(self) -> dict[str, Any]:
        raise NotImplementedError

    def protocol_event(self) -> dict[str, Any]:
        return {"kind": self.kind, "detail": self.detail()}


@dataclass(frozen=True)
class TermsShown(Event):
    """The terms are shown to the customer.  ``ask`` (customer side): the UI must show ``text``
    and call ``accept_terms``."""

    kind: ClassVar[str] = "terms_shown"
    text: str
    sha256: str
    by: Role
    ask: bool = False
    deadline: float | None = None

    def detail(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "by": self.by.value}


@dataclass(frozen=True)
class TermsAccepted(Event):
    kind: ClassVar[str] = "terms_accepted"
    sha256: str
    by: Role

    def detail(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "by": self.by.value}


@dataclass(frozen=True)
class RightRequested(Event):
    """``by`` asks for ``right``.  ``ask``: this side's user must answer (``answer``) before
    ``deadline``; otherwise it was decided already (policy, refusal) or it is our own request."""

    kind: ClassVar[str] = "right_requested"
    right: Right
    by: Role
    ask: bool = False
    deadline: float | None = None

    def detail(self) -> dict[str, Any]:
        return {"right": self.right.value, "by": self.by.value}


@dataclass(frozen=True)
class RightGranted(Event):
    kind: ClassVar[str] = "right_granted"
    right: Right
    by: Role

    def detail(self) -> dict[str, Any]:
        return {"right": self.right.value, "by": self.by.value}


@dataclass(frozen=True)
class RightDenied(Event):
    kind: ClassVar[str] = "right_denied"
    right: Right
    by: Role
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"right": self.right.value, "by": self.by.value, "reason": self.reason}


@dataclass(frozen=True)
class RightRevoked(Event):
    kind: ClassVar[str] = "right_revoked"
    right: Right
    by: Role
    reason: str = "revoked"

    def detail(self) -> dict[str, Any]:
        return {"right": self.right.value, "by": self.by.value, "reason": self.reason}


@dataclass(frozen=True)
class RightRefused(Event):
    """The viewer used ``right`` without holding it (``attempt`` says how); the presenter refused.
    Reported at the 1st, 2nd, 4th, 8th ... refusal since the right last changed."""

    kind: ClassVar[str] = "right_refused"
    right: Right
    attempt: str
    count: int

    def detail(self) -> dict[str, Any]:
        return {"right": self.right.value, "attempt": self.attempt, "count": self.count}


@dataclass(frozen=True)
class DirectionRequested(Event):
    """``by`` asks that the direction swap.  ``ask``: this side would show, its user must
    answer before ``deadline``."""

    kind: ClassVar[str] = "direction_requested"
    by: Role
    ask: bool = False
    deadline: float | None = None

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value}


@dataclass(frozen=True)
class DirectionChanged(Event):
    kind: ClassVar[str] = "direction_changed"
    presenter: Role
    epoch: int

    def detail(self) -> dict[str, Any]:
        return {"presenter": self.presenter.value, "epoch": self.epoch}


@dataclass(frozen=True)
class DirectionDenied(Event):
    kind: ClassVar[str] = "direction_denied"
    by: Role
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value, "reason": self.reason}


@dataclass(frozen=True)
class ScreenPaused(Event):
    """The presenter paused its screen: the viewer keeps the last picture, marked paused."""

    kind: ClassVar[str] = "screen_paused"
    by: Role

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value}


@dataclass(frozen=True)
class ScreenResumed(Event):
    kind: ClassVar[str] = "screen_resumed"
    by: Role

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value}


@dataclass(frozen=True)
class EmergencyStopped(Event):
    kind: ClassVar[str] = "emergency_stop"
    by: Role

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value}


@dataclass(frozen=True)
class Chat(Event):
    kind: ClassVar[str] = "chat"
    by: Role
    text: str

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value, "text": self.text}


@dataclass(frozen=True)
class Comment(Event):
    """A supporter's note: goes to the protocol only, never to the customer's screen."""

    kind: ClassVar[str] = "comment"
    by: Role
    text: str

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value, "text": self.text}


@dataclass(frozen=True)
class SessionEnded(Event):
    kind: ClassVar[str] = "ended"
    by: Role
    reason: str

    def detail(self) -> dict[str, Any]:
        return {"by": self.by.value, "reason": self.reason}


class Outcome(NamedTuple):
    """What a call produced: control messages to send (in order) and events (in order)."""

    messages: list[dict[str, Any]]
    events: list[Event]


def _nothing() -> Outcome:
    return Outcome([], [])


# --- message schema -------------------------------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _text(value: Any, field: str, max_chars: int, multiline: bool) -> str:
    if not isinstance(value, str):
        raise ConsentError(f"{field} must be text, not {type(value).__name__}")
    if not 0 < len(value) <= max_chars:
        raise ConsentError(f"{field} must be 1-{max_chars} characters, not {len(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConsentError(f"{field} holds a lone surrogate") from None
    allowed = "\n\t" if multiline else ""
    for ch in value:
        if unicodedata.category(ch) == "Cc" and ch not in allowed:
            raise ConsentError(f"{field} holds the control character {ch!r}")
    return value


def _terms_text(value: Any) -> str:
    return _text(value, "terms text", MAX_TERMS_CHARS, multiline=True)


def _chat_text(value: Any) -> str:
    return _text(value, "text", MAX_CHAT_CHARS, multiline=True)


def _reason(value: Any) -> str:
    return _text(value, "reason", MAX_REASON_CHARS, multiline=False)


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ConsentError("sha256 must be 64 lower-case hex digits")
    return value


def _right(value: Any) -> Right:
    if not isinstance(value, str):
        raise ConsentError(f"right must be text, not {type(value).__name__}")
    try:
        return Right(value)
    except ValueError:
        raise ConsentError(f"unknown right {value[:40]!r}") from None


def _role(value: Any) -> Role:
    if not isinstance(value, str):
        raise ConsentError(f"who must be text, not {type(value).__name__}")
    try:
        return Role(value)
    except ValueError:
        raise ConsentError(f"unknown role {value[:40]!r}") from None


def _epoch(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_EPOCH:
        raise ConsentError("epoch must be an integer from 0 to 2**31-1")
    return value


SCHEMA: Mapping[str, Mapping[str, Callable[[Any], Any]]] = {
    "terms": {"text": _terms_text},
    "terms_accepted": {"sha256": _sha256},
    "request": {"right": _right, "epoch": _epoch},
    "grant": {"right": _right, "epoch": _epoch},
    "deny": {"right": _right, "reason": _reason, "epoch": _epoch},
    "revoke": {"right": _right, "epoch": _epoch},
    "emergency_stop": {"who": _role},
    "direction_request": {"epoch": _epoch},
    "direction_grant": {"epoch": _epoch},
    "direction_deny": {"reason": _reason, "epoch": _epoch},
    "direction_ack": {"epoch": _epoch},
    "pause": {"epoch": _epoch},
    "resume": {"epoch": _epoch},
    "chat": {"text": _chat_text},
    "comment": {"text": _chat_text},
    "bye": {"reason": _reason},
    "keepalive": {},
}


def validate_message(message: Any) -> dict[str, Any]:
    """Check one decoded control message against ``SCHEMA``; return it with typed values
    (``Right``/``Role`` members).  Raises ``ConsentError`` with a reason."""
    if not isinstance(message, dict):
        raise ConsentError(f"a control message is a JSON object, not {type(message).__name__}")
    kind = message.get("type")
    if not isinstance(kind, str) or kind not in SCHEMA:
        raise ConsentError(f"unknown control message type {str(kind)[:40]!r}")
    fields = SCHEMA[kind]
    keys = set(message) - {"type"}
    if keys != set(fields):
        missing, extra = sorted(set(fields) - keys), sorted(str(k)[:40] for k in keys - set(fields))
        raise ConsentError(f"{kind}: missing {missing}, unexpected {extra}")
    checked: dict[str, Any] = {"type": kind}
    for name, check in fields.items():
        checked[name] = check(message[name])
    return checked


def _plain(message: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in message.items()}


def encode_message(message: Mapping[str, Any]) -> bytes:
    """A control message as UTF-8 JSON for the CONTROL channel (validated first)."""
    plain = _plain(message)
    validate_message(plain)
    data = json.dumps(plain, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ConsentError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode_message(data: bytes) -> dict[str, Any]:
    """Parse and validate one control message received on the CONTROL channel."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ConsentError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        text = bytes(data).decode("utf-8")
        message = strict_json.loads(text, ConsentError)
    except ConsentError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConsentError(f"control message is not UTF-8 JSON: {str(e)[:120]}") from None
    return validate_message(message)


# --- the state machine ----------------------------------------------------------------------------

def _safe_reason(reason: str) -> str:
    """Fit a locally made reason into the schema (no control characters, 1-200 characters)."""
    cleaned = "".join(" " if unicodedata.category(c) == "Cc" else c for c in str(reason))
    cleaned = cleaned.encode("utf-8", "replace").decode("utf-8").strip()
    return cleaned[:MAX_REASON_CHARS] or "ended"


class ConsentState:
    """One side's consent state.  ``role`` is this side; ``peer`` the other (a supporter must
    say whether it faces a customer or a host); ``presenter`` who shows first (the peer side);
    ``policy`` a host's answers per right; ``terms`` the support terms where this side knows
    them."""

    def __init__(self, role: Role | str, *, peer: Role | str | None = None,
                 presenter: Role | str | None = None, policy: Mapping[str, str] | None = None,
                 terms: str | None = None, answer_timeout: float = DEFAULT_ANSWER_TIMEOUT,
                 terms_timeout: float = DEFAULT_TERMS_TIMEOUT) -> None:
        self.role = Role(role)
        if self.role is Role.SUPPORTER:
            if peer is None or Role(peer) is Role.SUPPORTER:
                raise ValueError("a supporter's peer is a customer or a host")
            self.peer = Role(peer)
        else:
            if peer is not None and Role(peer) is not Role.SUPPORTER:
                raise ValueError(f"a {self.role.value}'s peer is the supporter")
            self.peer = Role.SUPPORTER
        self.presenter = Role(presenter) if presenter is not None else (
            self.peer if self.role is Role.SUPPORTER else self.role)
        if self.presenter not in (self.role, self.peer):
            raise ValueError(f"the presenter is one of {self.role.value} and {self.peer.value}")
        self.policy = self._check_policy(policy)
        self.adhoc = Role.CUSTOMER in (self.role, self.peer)
        if terms is not None:
            if not self.adhoc:
                raise ValueError("support terms are for ad-hoc sessions with a customer")
            try:
                _terms_text(terms)
            except ConsentError as e:
                raise ValueError(str(e)) from None
        self.terms = terms
        self.terms_accepted = not self.adhoc
        self.accepted_sha256: str | None = None
        self.answer_timeout = answer_timeout
        self.terms_timeout = terms_timeout
        self.epoch = 0
        self.peer_screen_epoch = 0   # the epoch the peer's SCREEN stream is in (its markers)
        self.paused = False          # the presenter paused its screen
        self.ended = False
        self._started = False
        self._terms_shown: str | None = None       # sha256 of the terms on screen (customer)
        self._granted: set[Right] = set()          # rights the viewer holds
        self._asked: dict[Key, float] = {}         # questions to this side, with deadlines
        self._requested: set[Key] = set()          # this side's questions to the peer
        self._refusals: dict[Right, int] = {}

    def _check_policy(self, policy: Mapping[str, str] | None) -> dict[Right, str]:
        if self.role is not Role.HOST:
            if policy is not None:
                raise ValueError("only an unattended host has a consent policy")
            return {}
        merged = dict(DEFAULT_HOST_POLICY)
        for key, value in (policy or {}).items():
            if key not in DEFAULT_HOST_POLICY:
                raise ValueError(f"unknown right {key!r} in the host policy")
            if value not in POLICY_VALUES:
                raise ValueError(f"host policy for {key}: {value!r} is not one of {POLICY_VALUES}")
            merged[key] = value
        return {Right(k): v for k, v in merged.items()}

    # --- what callers ask ---------------------------------------------------------------------

    @property
    def is_presenter(self) -> bool:
        return self.presenter is self.role

    @property
    def granted(self) -> frozenset[Right]:
        """The rights the viewer holds (granted by the presenter, whichever side this is)."""
        return frozenset(self._granted)

    def allows(self, right: Right | str) -> bool:
        """On the presenter: may the viewer use ``right`` now (view our screen, send input
        events, transfer files)?  Always False on the viewer's side and after the end."""
        return (not self.ended and self.is_presenter and self.terms_accepted
                and Right(right) in self._granted)

    def holds(self, right: Right | str) -> bool:
        """On the viewer: does this side hold ``right``?"""
        return not self.ended and not self.is_presenter and Right(right) in self._granted

    @property
    def screen_in_step(self) -> bool:
        """Do SCREEN bytes from the peer belong to the current direction?  False between our
        change and the peer's marker: they are the old screen's and must be dropped."""
        return self.peer_screen_epoch == self.epoch

    def awaiting(self) -> dict[Key, float]:
        """Questions to this side that wait for an answer, with their deadlines."""
        return dict(self._asked)

    def next_deadline(self) -> float | None:
        return min(self._asked.values(), default=None)

    # --- local actions ------------------------------------------------------------------------

    def start(self, now: float = 0.0) -> Outcome:
        """Begin the session: a customer that has the terms shows them; a supporter facing a
        customer sends the terms it has."""
        if self._started:
            raise ConsentUsageError("the consent state was started already")
        self._started = True
        if self.ended or self.terms is None:
            return _nothing()
        if self.role is Role.CUSTOMER:
            return Outcome([], [self._show_terms(self.terms, now)])
        if self.role is Role.SUPPORTER:
            sha = terms_sha256(self.terms)
            return Outcome([{"type": "terms", "text": self.terms}],
                           [TermsShown(self.terms, sha, by=self.role)])
        return _nothing()

    def accept_terms(self, yes: bool, now: float = 0.0) -> Outcome:
        """The customer's answer to the terms on screen.  "No" ends the session."""
        if self.role is not Role.CUSTOMER:
            raise ConsentUsageError("only the customer accepts the support terms")
        if self.ended or Question.TERMS not in self._asked:
            if self._terms_shown is None and not self.ended:
                raise ConsentUsageError("no terms have been shown yet")
            return _nothing()  # answered already, or too late
        del self._asked[Question.TERMS]
        if not yes:
            return self._end(self.role, "terms declined", send=True)
        sha = self._terms_shown
        self.terms_accepted = True
        self.accepted_sha256 = sha
        return Outcome([{"type": "terms_accepted", "sha256": sha}], [TermsAccepted(sha, self.role)])

    def request(self, right: Right | str, now: float = 0.0) -> Outcome:
        """The viewer asks the presenter for ``right`` (nothing if held or asked already)."""
        right = Right(right)
        if self.ended:
            return _nothing()
        self._usable("request a right")
        if self.is_presenter:
            raise ConsentUsageError("the side that shows its screen needs no rights")
        if right in self._granted or right in self._requested:
            return _nothing()
        self._requested.add(right)
        return Outcome([{"type": "request", "right": right.value, "epoch": self.epoch}],
                       [RightRequested(right, self.role)])

    def answer(self, request: RightRequested | DirectionRequested | TermsShown | Key,
               yes: bool, now: float = 0.0) -> Outcome:
        """This side's user answers a question (a late answer does nothing)."""
        key = self._key(request)
        if key is Question.TERMS:
            return self.accept_terms(yes, now)
        if self.ended or key not in self._asked:
            return _nothing()
        del self._asked[key]
        if key is Question.DIRECTION:
            return self._answer_direction(yes, "declined")
        return self._answer_right(key, yes, "declined")

    def revoke(self, right: Right | str) -> Outcome:
        """The presenter takes ``right`` back at once (nothing if it was not granted)."""
        right = Right(right)
        if self.ended:
            return _nothing()
        if not self.is_presenter:
            raise ConsentUsageError("only the side that shows its screen revokes rights")
        if right not in self._granted:
            return _nothing()
        self._granted.discard(right)
        self._refusals.pop(right, None)
        return Outcome([{"type": "revoke", "right": right.value, "epoch": self.epoch}],
                       [RightRevoked(right, self.role)])

    def request_direction(self, now: float = 0.0) -> Outcome:
        """Ask that the direction swap (this side shows if it is the viewer now)."""
        if self.ended:
            return _nothing()
        self._usable("change the direction")
        if Question.DIRECTION in self._requested:
            return _nothing()
        self._requested.add(Question.DIRECTION)
        return Outcome([{"type": "direction_request", "epoch": self.epoch}],
                       [DirectionRequested(self.role)])

    def pause(self) -> Outcome:
        """The presenter pauses its screen (nothing if paused already)."""
        return self._set_paused(True)

    def resume(self) -> Outcome:
        """The presenter shows its screen again (nothing if it is not paused)."""
        return self._set_paused(False)

    def _set_paused(self, paused: bool) -> Outcome:
        if self.ended:
            return _nothing()
        self._usable("pause the screen")
        if not self.is_presenter:
            raise ConsentUsageError("only the side that shows its screen pauses it")
        if self.paused is paused:
            return _nothing()
        self.paused = paused
        return Outcome([{"type": "pause" if paused else "resume", "epoch": self.epoch}],
                       [(ScreenPaused if paused else ScreenResumed)(self.role)])

    def emergency_stop(self) -> Outcome:
        """Revoke everything and end the session at once."""
        if self.ended:
            return _nothing()
        return self._emergency(self.role, send=True)

    def chat(self, text: str) -> Outcome:
        if self.ended:
            return _nothing()
        self._usable("chat")
        text = self._local_text(text)
        return Outcome([{"type": "chat", "text": text}], [Chat(self.role, text)])

    def keepalive(self) -> Outcome:
        """A message that means nothing: sent when the session was quiet for a while, so the
        relay (which ends a session without a byte either way for its idle timeout) keeps a
        session both people still have open."""
        if self.ended:
            return _nothing()
        return Outcome([{"type": "keepalive"}], [])

    def comment(self, text: str) -> Outcome:
        """A supporter's note for the protocol; nothing is sent to the peer."""
        if self.role is not Role.SUPPORTER:
            raise ConsentUsageError("only a supporter writes comments")
        if self.ended:
            return _nothing()
        return Outcome([], [Comment(self.role, self._local_text(text))])

    def end(self, reason: str) -> Outcome:
        """End the session (``bye``)."""
        if self.ended:
            return _nothing()
        return self._end(self.role, _safe_reason(reason), send=True)

    def enforce(self, right: Right | str, attempt: str) -> Outcome:
        """On the presenter, before acting on a use of ``right`` by the viewer (``attempt``: what
        it tried, e.g. "pointer event", "file chunk").  Empty if allowed; else a
        ``RightRefused`` event to log (at the 1st, 2nd, 4th, ... refusal)."""
        right = Right(right)
        if self.allows(right):
            return _nothing()
        count = self._refusals.get(right, 0) + 1
        self._refusals[right] = count
        if count & (count - 1):
            return _nothing()
        return Outcome([], [RightRefused(right, _safe_reason(attempt)[:80], count)])

    def expire(self, now: float) -> Outcome:
        """Answer "no" to every question whose deadline has passed."""
        messages: list[dict[str, Any]] = []
        events: list[Event] = []
        for key, deadline in sorted(self._asked.items(), key=lambda item: item[1]):
            if self.ended or deadline > now or key not in self._asked:
                continue
            del self._asked[key]
            if key is Question.TERMS:
                outcome = self._end(self.role, "terms not accepted in time", send=True)
            elif key is Question.DIRECTION:
                outcome = self._answer_direction(False, "no answer in time")
            else:
                outcome = self._answer_right(key, False, "no answer in time")
            messages += outcome.messages
            events += outcome.events
        return Outcome(messages, events)

    # --- the peer's messages ------------------------------------------------------------------

    def receive(self, data: bytes, now: float = 0.0) -> Outcome:
        """Decode one CONTROL-channel message and handle it."""
        return self.handle(decode_message(data), now)

    def handle(self, message: Any, now: float = 0.0) -> Outcome:
        """Handle one decoded control message from the peer.  Raises ``ConsentError``."""
        message = validate_message(message)
        if self.ended:
            return _nothing()  # crossed our end on the wire
        kind = message["type"]
        if not self.terms_accepted and kind not in ("terms", "terms_accepted", "request", "bye",
                                                   "emergency_stop", "keepalive"):
            raise ConsentError(f"{kind} before the support terms were accepted")
        epoch = message.get("epoch")
        # the peer's screen stream switches epochs where it sent a grant or an ack (even one
        # that is stale here because both sides asked at once)
        if kind == "direction_grant" and epoch < MAX_EPOCH:
            self.peer_screen_epoch = max(self.peer_screen_epoch, min(epoch + 1, self.epoch))
        elif kind == "direction_ack":
            self.peer_screen_epoch = max(self.peer_screen_epoch, min(epoch, self.epoch))
        if epoch is not None:
            if epoch > self.epoch:
                raise ConsentError(f"{kind} for direction epoch {epoch}, we are at {self.epoch}")
            if epoch < self.epoch:
                return _nothing()  # sent before a direction change the sender had not yet seen
        return getattr(self, "_on_" + kind)(message, now)

    def _on_terms(self, message: dict[str, Any], now: float) -> Outcome:
        if self.role is not Role.CUSTOMER:
            raise ConsentError("only a customer is sent support terms")
        text = message["text"]
        sha = terms_sha256(text)
        if self.terms is not None and terms_sha256(self.terms) != sha:
            raise ConsentError("the supporter's terms differ from the server's")
        if self._terms_shown is not None:
            if self._terms_shown != sha:
                raise ConsentError("the supporter sent different terms a second time")
            return _nothing()
        return Outcome([], [self._show_terms(text, now)])

    def _on_terms_accepted(self, message: dict[str, Any], now: float) -> Outcome:
        if self.role is not Role.SUPPORTER or self.peer is not Role.CUSTOMER:
            raise ConsentError("only a customer accepts support terms, and only a supporter "
                               "is told")
        if self.terms_accepted:
            raise ConsentError("the terms were accepted twice")
        sha = message["sha256"]
        if self.terms is not None and sha != terms_sha256(self.terms):
            raise ConsentError("the customer accepted other terms than the operator's")
        self.terms_accepted = True
        self.accepted_sha256 = sha
        return Outcome([], [TermsAccepted(sha, self.peer)])

    def _on_request(self, message: dict[str, Any], now: float) -> Outcome:
        right: Right = message["right"]
        if not self.is_presenter:
            raise ConsentError(f"request for {right.value} sent to the side that does not show")
        if right in self._granted:
            raise ConsentError(f"request for {right.value}, which was granted already")
        if right in self._asked:
            raise ConsentError(f"request for {right.value} while the last one waits for an answer")
        requested = RightRequested(right, self.peer)
        if not self.terms_accepted:
            return self._with(requested, self._deny(right, "terms not accepted"))
        decision = self.policy.get(right, "ask")
        if decision == "allow":
            return self._with(requested, self._grant(right))
        if decision == "deny":
            return self._with(requested, self._deny(right, "host policy"))
        deadline = now + self.answer_timeout
        self._asked[right] = deadline
        return Outcome([], [RightRequested(right, self.peer, ask=True, deadline=deadline)])

    def _on_grant(self, message: dict[str, Any], now: float) -> Outcome:
        right = self._answered(message)
        self._granted.add(right)
        return Outcome([], [RightGranted(right, self.peer)])

    def _on_deny(self, message: dict[str, Any], now: float) -> Outcome:
        right = self._answered(message)
        return Outcome([], [RightDenied(right, self.peer, message["reason"])])

    def _on_revoke(self, message: dict[str, Any], now: float) -> Outcome:
        right: Right = message["right"]
        if self.is_presenter:
            raise ConsentError(f"revoke of {right.value} sent to the side that shows")
        if right not in self._granted:
            raise ConsentError(f"revoke of {right.value}, which was never granted")
        self._granted.discard(right)
        return Outcome([], [RightRevoked(right, self.peer)])

    def _on_emergency_stop(self, message: dict[str, Any], now: float) -> Outcome:
        if message["who"] is not self.peer:
            raise ConsentError(f"emergency stop claims to come from {message['who'].value}")
        return self._emergency(self.peer, send=False)

    def _on_direction_request(self, message: dict[str, Any], now: float) -> Outcome:
        if Question.DIRECTION in self._asked:
            raise ConsentError("direction request while the last one waits for an answer")
        if not self.is_presenter:
            # the peer shows and asks us to show instead: only we can consent (and did, if our
            # own request to show crossed this one on the wire)
            decision = self.policy.get(Right.VIEW, "ask")
            if Question.DIRECTION in self._requested:
                decision = "allow"
            requested = DirectionRequested(self.peer)
            if decision == "allow":
                return self._with(requested, self._answer_direction(True, ""))
            if decision == "deny":
                return self._with(requested, self._answer_direction(False, "host policy"))
            deadline = now + self.answer_timeout
            self._asked[Question.DIRECTION] = deadline
            return Outcome([], [DirectionRequested(self.peer, ask=True, deadline=deadline)])
        # the peer offers to show its own screen: its request is its consent
        return self._with(DirectionRequested(self.peer), self._answer_direction(True, ""))

    def _on_direction_grant(self, message: dict[str, Any], now: float) -> Outcome:
        if Question.DIRECTION not in self._requested:
            raise ConsentError("direction_grant without a direction request")
        events = self._swap()
        self.peer_screen_epoch = self.epoch    # the grant was the peer's marker
        return Outcome([{"type": "direction_ack", "epoch": self.epoch}], events)

    def _on_direction_ack(self, message: dict[str, Any], now: float) -> Outcome:
        return _nothing()   # the marker itself is all it says (``handle`` noted it)

    def _on_pause(self, message: dict[str, Any], now: float) -> Outcome:
        return self._peer_paused(True)

    def _on_resume(self, message: dict[str, Any], now: float) -> Outcome:
        return self._peer_paused(False)

    def _peer_paused(self, paused: bool) -> Outcome:
        if self.is_presenter:
            raise ConsentError(f"{'pause' if paused else 'resume'} sent to the side that shows")
        if self.paused is paused:
            raise ConsentError(f"the screen was {'paused' if paused else 'not paused'} already")
        self.paused = paused
        return Outcome([], [(ScreenPaused if paused else ScreenResumed)(self.peer)])

    def _on_direction_deny(self, message: dict[str, Any], now: float) -> Outcome:
        if Question.DIRECTION not in self._requested:
            raise ConsentError("direction_deny without a direction request")
        self._requested.discard(Question.DIRECTION)
        return Outcome([], [DirectionDenied(self.peer, message["reason"])])

    def _on_chat(self, message: dict[str, Any], now: float) -> Outcome:
        return Outcome([], [Chat(self.peer, message["text"])])

    def _on_comment(self, message: dict[str, Any], now: float) -> Outcome:
        raise ConsentError("comments stay with the supporter and are never sent to the peer")

    def _on_bye(self, message: dict[str, Any], now: float) -> Outcome:
        return self._end(self.peer, message["reason"], send=False)

    def _on_keepalive(self, message: dict[str, Any], now: float) -> Outcome:
        return _nothing()

    # --- internals ----------------------------------------------------------------------------

    def _usable(self, what: str) -> None:
        if not self.terms_accepted:
            raise ConsentUsageError(f"cannot {what} before the customer accepted the terms")

    @staticmethod
    def _key(request: Any) -> Key:
        if isinstance(request, RightRequested):
            return request.right
        if isinstance(request, DirectionRequested):
            return Question.DIRECTION
        if isinstance(request, TermsShown):
            return Question.TERMS
        if isinstance(request, (Right, Question)):
            return request
        try:
            return Right(request)
        except ValueError:
            return Question(request)

    @staticmethod
    def _local_text(text: str) -> str:
        try:
            return _chat_text(text)
        except ConsentError as e:
            raise ConsentUsageError(str(e)) from None

    @staticmethod
    def _with(first: Event, outcome: Outcome) -> Outcome:
        return Outcome(outcome.messages, [first, *outcome.events])

    def _show_terms(self, text: str, now: float) -> TermsShown:
        sha = terms_sha256(text)
        self._terms_shown = sha
        deadline = now + self.terms_timeout
        self._asked[Question.TERMS] = deadline
        return TermsShown(text, sha, by=self.role, ask=True, deadline=deadline)

    def _answered(self, message: dict[str, Any]) -> Right:
        right: Right = message["right"]
        if self.is_presenter or right not in self._requested:
            raise ConsentError(f"{message['type']} of {right.value} that was not requested")
        self._requested.discard(right)
        return right

    def _grant(self, right: Right) -> Outcome:
        self._granted.add(right)
        self._refusals.pop(right, None)
        return Outcome([{"type": "grant", "right": right.value, "epoch": self.epoch}],
                       [RightGranted(right, self.role)])

    def _deny(self, right: Right, reason: str) -> Outcome:
        return Outcome([{"type": "deny", "right": right.value, "reason": reason,
                         "epoch": self.epoch}],
                       [RightDenied(right, self.role, reason)])

    def _answer_right(self, right: Right, yes: bool, reason: str) -> Outcome:
        return self._grant(right) if yes else self._deny(right, reason)

    def _answer_direction(self, yes: bool, reason: str) -> Outcome:
        if not yes:
            return Outcome([{"type": "direction_deny", "reason": reason, "epoch": self.epoch}],
                           [DirectionDenied(self.role, reason)])
        message = {"type": "direction_grant", "epoch": self.epoch}
        return Outcome([message], self._swap())

    def _swap(self) -> list[Event]:
        """The direction changes: new presenter, new epoch, no rights but view, no questions."""
        self.presenter = self.peer if self.is_presenter else self.role
        self.epoch += 1
        self.paused = False
        self._granted = {Right.VIEW}
        self._refusals.clear()
        self._asked = {k: d for k, d in self._asked.items() if k is Question.TERMS}
        self._requested.clear()
        return [DirectionChanged(self.presenter, self.epoch), RightGranted(Right.VIEW, self.presenter)]

    def _emergency(self, by: Role, send: bool) -> Outcome:
        revoked = [RightRevoked(r, by, "emergency stop") for r in Right if r in self._granted]
        ended = self._end(by, "emergency stop", send=False)
        messages = [{"type": "emergency_stop", "who": self.role.value}] if send else []
        return Outcome(messages, [*revoked, EmergencyStopped(by), *ended.events])

    def _end(self, by: Role, reason: str, send: bool) -> Outcome:
        self.ended = True
        self._granted.clear()
        self._asked.clear()
        self._requested.clear()
        messages = [{"type": "bye", "reason": reason}] if send else []
        return Outcome(messages, [SessionEnded(by, reason)])


# --- user interface -------------------------------------------------------------------------------

class IConsentUI(Interface):
    """What the CLI's terminal questions and later GUIs implement.  The Deferreds may be
    cancelled (the question timed out or became moot): the UI then withdraws the question."""

    def show_terms(text: str) -> Deferred:
        """Show the support terms; fire True if the person accepts them."""

    def ask(question: str, right: Right | None) -> Deferred:
        """Ask a yes/no question (``right`` None: a direction change); fire True for yes."""

    def notify(event: Event) -> None:
        """Tell the person what happened (a UI shows what matters to it; never comments to a
        customer)."""


ConsentUI = IConsentUI

_NAMES = {Role.SUPPORTER: "the supporter", Role.CUSTOMER: "the customer", Role.HOST: "the host"}
_RIGHT_QUESTIONS = {
    Right.VIEW: "Allow {who} to see your screen?",
    Right.CONTROL: "Allow {who} to control your mouse and keyboard?",
    Right.FILES: "Allow {who} to transfer files to and from this computer?",
}


def question_for(request: RightRequested | DirectionRequested) -> str:
    """The plain question a person is asked about a request from ``request.by``."""
    who = _NAMES[request.by]
    if isinstance(request, RightRequested):
        return _RIGHT_QUESTIONS[request.right].format(who=who)
    return f"{who[0].upper()}{who[1:]} asks you to show your screen instead. Show your screen?"


def describe(event: Event, me: Role | None = None) -> str | None:
    """One line for a person about ``event`` (``me``: whose screen this is), or None if it is
    nothing to show.  Comments are never described."""
    def name(role: Role) -> str:
        return "you" if role is me else _NAMES[role]

    def subject(role: Role) -> str:
        text = name(role)
        return text[0].upper() + text[1:]

    if isinstance(event, RightGranted):
        return f"{subject(event.by)} granted {event.right.value}."
    if isinstance(event, RightDenied):
        return f"{subject(event.by)} refused {event.right.value} ({event.reason})."
    if isinstance(event, RightRevoked):
        return f"{subject(event.by)} took back {event.right.value} ({event.reason})."
    if isinstance(event, DirectionChanged):
        return f"{subject(event.presenter)} now {'show' if event.presenter is me else 'shows'} " \
               f"the screen."
    if isinstance(event, DirectionDenied):
        return f"{subject(event.by)} refused to change the direction ({event.reason})."
    if isinstance(event, ScreenPaused):
        return f"{subject(event.by)} paused the screen" + (
            "; the other side sees the last picture." if event.by is me
            else "; the last picture stays until it resumes.")
    if isinstance(event, ScreenResumed):
        return f"{subject(event.by)} resumed the screen."
    if isinstance(event, EmergencyStopped):
        return f"Emergency stop by {name(event.by)}."
    if isinstance(event, Chat):
        return f"{subject(event.by)} {'write' if event.by is me else 'writes'}: {event.text}"
    if isinstance(event, SessionEnded):
        return f"Session ended by {name(event.by)}: {event.reason}."
    if isinstance(event, TermsAccepted):
        return f"{subject(event.by)} accepted the support terms."
    return None


class ConsentDriver:
    """Runs a ``ConsentState`` in the reactor: sends its messages (``send(bytes)`` puts them on
    the mux's CONTROL channel), reports its protocol events (``report(dict)``), puts its
    questions to ``ui`` and answers "no" when ``clock`` says their time is up.  ``ended`` fires
    with the ``SessionEnded`` event; the caller then flushes and closes the channel.  A bad
    control message from the peer ends the session with a ``bye`` naming the reason."""

    def __init__(self, state: ConsentState, ui: IConsentUI, clock: Any,
                 send: Callable[[bytes], None], report: Callable[[dict[str, Any]], None]) -> None:
        self.state = state
        self.ui = IConsentUI(ui)
        self.clock = clock
        self._send = send
        self._report = report
        self._questions: dict[Key, Deferred] = {}
        self._timer: Any = None
        self.ended: Deferred = Deferred()

    def start(self) -> None:
        self.apply(self.state.start(self.clock.seconds()))

    def received(self, data: bytes) -> None:
        """One message from the CONTROL channel."""
        try:
            outcome = self.state.receive(data, self.clock.seconds())
        except ConsentError as e:
            log.warn("bad control message from the peer: {reason}", reason=str(e))
            outcome = self.state.end(f"bad control message: {e}")
        self.apply(outcome)

    def request(self, right: Right | str) -> None:
        self.apply(self.state.request(right, self.clock.seconds()))

    def revoke(self, right: Right | str) -> None:
        self.apply(self.state.revoke(right))

    def request_direction(self) -> None:
        self.apply(self.state.request_direction(self.clock.seconds()))

    def emergency_stop(self) -> None:
        self.apply(self.state.emergency_stop())

    def pause(self) -> None:
        self.apply(self.state.pause())

    def resume(self) -> None:
        self.apply(self.state.resume())

    def chat(self, text: str) -> None:
        self.apply(self.state.chat(text))

    def keepalive(self) -> None:
        self.apply(self.state.keepalive())

    def comment(self, text: str) -> None:
        self.apply(self.state.comment(text))

    def end(self, reason: str) -> None:
        self.apply(self.state.end(reason))

    def enforce(self, right: Right | str, attempt: str) -> bool:
        """True if the viewer may use ``right`` now; a refusal is reported."""
        self.apply(self.state.enforce(right, attempt))
        return self.state.allows(right)

    def apply(self, outcome: Outcome) -> None:
        for message in outcome.messages:
            self._send(encode_message(message))
        for event in outcome.events:
            self._report(event.protocol_event())
            self.ui.notify(event)
            if isinstance(event, TermsShown) and event.ask:
                self._put(Question.TERMS, self.ui.show_terms(event.text))
            elif isinstance(event, RightRequested) and event.ask:
                self._put(event.right, self.ui.ask(question_for(event), event.right))
            elif isinstance(event, DirectionRequested) and event.ask:
                self._put(Question.DIRECTION, self.ui.ask(question_for(event), None))
            elif isinstance(event, SessionEnded) and not self.ended.called:
                self.ended.callback(event)
        self._tidy()

    def _put(self, key: Key, answer: Deferred) -> None:
        self._questions[key] = answer

        def answered(yes: Any) -> None:
            if self._questions.get(key) is answer:
                del self._questions[key]
            self.apply(self.state.answer(key, yes is True, self.clock.seconds()))

        def failed(failure: Any) -> None:
            if self._questions.get(key) is answer:
                del self._questions[key]
            self.apply(self.state.answer(key, False, self.clock.seconds()))

        answer.addCallbacks(answered, failed)

    def _tidy(self) -> None:
        """Withdraw questions that became moot; keep one timer for the next deadline."""
        waiting = self.state.awaiting()
        for key, answer in list(self._questions.items()):
            if key not in waiting:
                del self._questions[key]
                answer.cancel()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        deadline = self.state.next_deadline()
        if deadline is not None:
            delay = max(0.0, deadline - self.clock.seconds())
            self._timer = self.clock.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.apply(self.state.expire(self.clock.seconds()))


__all__ = [
    "Chat", "Comment", "ConsentDriver", "ConsentError", "ConsentState", "ConsentUI",
    "ConsentUsageError", "DEFAULT_HOST_POLICY", "DirectionChanged", "DirectionDenied",
    "DirectionRequested", "EmergencyStopped", "Event", "IConsentUI", "MAX_MESSAGE_BYTES",
    "Outcome", "Question", "Right", "RightDenied", "RightGranted", "RightRefused",
    "RightRequested", "RightRevoked", "Role", "SCHEMA", "ScreenPaused", "ScreenResumed",
    "SessionEnded", "TermsAccepted",
    "TermsShown", "decode_message", "describe", "encode_message", "question_for", "terms_sha256",
    "validate_message",
]
