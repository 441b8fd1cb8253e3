"""Control-plane commands spoken on the module port (Twisted AMP), defined once for both sides.

Every connection starts with ``Hello`` — or with ``OpenRelayLeg``, after which it is a raw byte
pipe of one session.  Errors carry a code (the AMP error key) and a human message; the module
shows the message as is.

Who may call what:

=====================  ==========================  =========================================
command                caller                      purpose
=====================  ==========================  =========================================
Hello                  every module, first         version check; server says who we are
Heartbeat              every module                keeps presence fresh
AllocateNameplate      supporter                   4-digit half of an ad-hoc ID
JoinAdhoc              customer (no certificate)   join by nameplate, once per connection
ListHosts              supporter                   hosts this supporter may reach
ConnectHost            supporter                   session with an unattended host
SessionReady           server → supporter          the customer joined: relay details
OfferSession           server → host               a supporter connects: relay details
OpenRelayLeg           any, first command          turn this connection into a relay leg
SessionEvent           either party of a session   one line for the session protocol
SessionEnded           server → both parties       the server ended the session, and why
HostPresenceChanged    server → supporter          a listed host came online or went offline
ServerGoingAway        server → module, last box   a clean shutdown: when to come back, spread how
RecordingStart         either party of a session   may/must I record? keys, where to resume
RecordingChunk         the recording party         file bytes at an offset (resumable, idempotent)
RecordingEnd           the recording party         the recording is closed (FINAL record sent)
=====================  ==========================  =========================================
"""

from __future__ import annotations

from twisted.protocols import amp

from . import PROTOCOL_VERSION
from .amp_adapter import BAD_REQUEST


class ControlError(Exception):
    """Base of the errors a command may answer with; ``code`` is what travels."""

    code = b"ERROR"


class BadRequest(ControlError):
    """The command itself was malformed (a missing or ill-typed argument, a name that is not
    printable ASCII); ``amp_adapter`` answers it and closes the connection."""

    code = BAD_REQUEST


class ProtocolVersionMismatch(ControlError):
    code = b"PROTOCOL_VERSION"


class NotEnrolled(ControlError):
    """The command needs a module certificate (or a different role)."""

    code = b"NOT_ENROLLED"


class WrongState(ControlError):
    """The command is not allowed at this point of the conversation."""

    code = b"WRONG_STATE"


class Forbidden(ControlError):
    code = b"FORBIDDEN"


class UnknownNameplate(ControlError):
    code = b"UNKNOWN_NAMEPLATE"


class LockedOut(ControlError):
    code = b"LOCKED_OUT"


class HostOffline(ControlError):
    code = b"HOST_OFFLINE"


class UnknownHost(ControlError):
    code = b"UNKNOWN_HOST"


class RelayRefused(ControlError):
    code = b"RELAY_REFUSED"


class NotRecordable(ControlError):
    """The server cannot write the session protocol now: no session starts unrecorded."""

    code = b"NOT_RECORDABLE"


class RecordingRefused(ControlError):
    """The server cannot take this recording (storage failed, quota, a damaged upload)."""

    code = b"RECORDING_REFUSED"


ALL_ERRORS = (BadRequest, ProtocolVersionMismatch, NotEnrolled, WrongState, Forbidden, UnknownNameplate,
              LockedOut, HostOffline, UnknownHost, RelayRefused, NotRecordable, RecordingRefused)
ERRORS = {cls: cls.code for cls in ALL_ERRORS}


def _relay_fields() -> list:
    return [
        (b"session_id", amp.Unicode()),
        (b"relay_host", amp.Unicode()),
        (b"relay_port", amp.Integer()),
        (b"relay_token", amp.Unicode()),
        # how long the relay keeps a session without a byte either way: the modules send
        # keep-alives well within it, so a quiet session that is still open is not cut
        (b"relay_idle_seconds", amp.Float(optional=True)),
    ]


class Hello(amp.Command):
    arguments = [
        (b"protocol_version", amp.Integer()),
        (b"module_version", amp.Unicode()),
        (b"module_kind", amp.Unicode()),
    ]
    response = [
        (b"server_version", amp.Unicode()),
        (b"identity", amp.Unicode()),
        (b"role", amp.Unicode()),
        (b"tenant", amp.Unicode()),
        (b"certificate_not_after", amp.Unicode()),
        (b"heartbeat_seconds", amp.Float()),
    ]
    errors = ERRORS


class Heartbeat(amp.Command):
    arguments: list = []
    response = [(b"server_time", amp.Float())]
    errors = ERRORS
    requiresAnswer = True


class AllocateNameplate(amp.Command):
    arguments: list = []
    response = [
        (b"nameplate", amp.Unicode()),
        (b"expires_in", amp.Float()),
    ]
    errors = ERRORS


class JoinAdhoc(amp.Command):
    arguments = [(b"nameplate", amp.Unicode())]
    response = _relay_fields() + [(b"supporter", amp.Unicode()), (b"terms", amp.Unicode()),
                                  (b"supporter_fingerprint", amp.Unicode())]
    errors = ERRORS


class ListHosts(amp.Command):
    arguments: list = []
    response = [(b"hosts", amp.AmpList([
        (b"host_id", amp.Unicode()),
        (b"name", amp.Unicode()),
        (b"group", amp.Unicode()),
        (b"online", amp.Boolean()),
        (b"last_seen", amp.Unicode()),
        (b"address", amp.Unicode()),
        (b"module_version", amp.Unicode()),
    ]))]
    errors = ERRORS


class ConnectHost(amp.Command):
    arguments = [(b"host", amp.Unicode())]  # host id or unique name
    response = _relay_fields() + [(b"host_id", amp.Unicode()), (b"host_name", amp.Unicode()),
                                  (b"host_fingerprint", amp.Unicode())]
    errors = ERRORS


class SessionReady(amp.Command):
    """Server → supporter: the customer joined the nameplate."""

    arguments = _relay_fields() + [(b"nameplate", amp.Unicode()), (b"peer_address", amp.Unicode())]
    response: list = []
    errors = ERRORS


class OfferSession(amp.Command):
    """Server → host: a supporter wants a session."""

    arguments = _relay_fields() + [(b"supporter", amp.Unicode()),
                                   (b"supporter_fingerprint", amp.Unicode())]
    response = [(b"accepted", amp.Boolean())]
    errors = ERRORS


class SessionEvent(amp.Command):
    """A party reports what happened in its session; the server stamps time and identity."""

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"kind", amp.Unicode()),
        (b"detail", amp.Unicode()),  # a JSON object, at most 16 KiB
    ]
    response: list = []
    errors = ERRORS


class SessionEnded(amp.Command):
    """Server → a party: the server ended (or recorded the end of) a session, and why.

    Sent before the relay legs close where the server ends the session itself (revocation, an
    unwritable protocol), so a module can name the reason instead of "the peer closed".  The
    fields are those of ``protocol.session_end.EndReason``; ``text`` is its one line.
    """

    arguments = [
        (b"session_id", amp.Unicode()),
        (b"cause", amp.Unicode()),
        (b"by", amp.Unicode()),
        (b"detail", amp.Unicode()),
        (b"text", amp.Unicode()),
    ]
    response: list = []
    errors = ERRORS
    requiresAnswer = False


#: the largest file bytes one RecordingChunk carries (an AMP value holds at most 64 KiB)
MAX_RECORDING_CHUNK = 48 * 1024


class RecordingStart(amp.Command):
    """A party asks whether to record its screen in this session (``protocol.recording``).

    ``policy`` is off, on or required; with off nothing else matters.  ``public_keys`` is a JSON
    list of PEM X25519 keys to wrap the recording key for (operator first).  A party that
    recorded before (reconnect, server restart) gets the same ``recording_id`` and the offset to
    resume at; ``stall_seconds`` is how long the server waits for a chunk before a ``required``
    session ends.  The module must not start its screen under ``required`` before this answer.

    ``presenting``: the party shows its screen now (a supporter after a direction change): the
    side that shows records, so it gets the policy even where a supporter otherwise records
    nothing.  ``resume_token`` lets this recorder continue the upload over a new control
    connection (``RecordingResume``) after a connection loss or a server restart.
    ``split_keys``: the recording key is split into one share per public key (XOR), so opening
    the recording needs every key holder (an auditor's key whose private half the server lacks).
    """

    arguments = [(b"session_id", amp.Unicode()), (b"presenting", amp.Boolean(optional=True))]
    response = [
        (b"policy", amp.Unicode()),
        (b"input", amp.Unicode()),
        (b"recording_id", amp.Unicode()),
        (b"next_offset", amp.Integer()),
        (b"public_keys", amp.Unicode()),
        (b"max_chunk", amp.Integer()),
        (b"stall_seconds", amp.Float()),
        (b"buffer_bytes", amp.Integer()),
        (b"resume_token", amp.Unicode(optional=True)),
        (b"split_keys", amp.Boolean(optional=True)),
    ]
    errors = ERRORS


class RecordingResume(amp.Command):
    """A recorder whose control connection was lost (or whose server restarted) continues its
    upload on a new connection: ``resume_token`` is what ``RecordingStart`` answered.  The answer
    is the offset the server holds; the module sends on from there (also after its session
    ended: the bytes it still holds, the FINAL record among them, then ``RecordingEnd``)."""

    arguments = [(b"recording_id", amp.Unicode()), (b"resume_token", amp.Unicode())]
    response = [(b"next_offset", amp.Integer())]
    errors = ERRORS


class RecordingChunk(amp.Command):
    """File bytes at ``offset``.  The answer is the offset the server expects next: bytes it
    already holds are skipped (a resent chunk changes nothing), a gap is not written and the
    answer tells the module where to resume."""

    arguments = [
        (b"recording_id", amp.Unicode()),
        (b"offset", amp.Integer()),
        (b"data", amp.String()),
    ]
    response = [(b"next_offset", amp.Integer())]
    errors = ERRORS


class RecordingEnd(amp.Command):
    """The module closed the recording (its FINAL record is among the bytes sent)."""

    arguments = [(b"recording_id", amp.Unicode()), (b"size", amp.Integer())]
    response = [(b"sha256", amp.Unicode()), (b"complete", amp.Boolean())]
    errors = ERRORS


class HostPresenceChanged(amp.Command):
    """Server → a supporter: a host it was shown by ``ListHosts`` came online or went offline
    (pushed, so a host list stays current without polling)."""

    arguments = [
        (b"host_id", amp.Unicode()),
        (b"online", amp.Boolean()),
        (b"last_seen", amp.Unicode()),
        (b"address", amp.Unicode()),
    ]
    response: list = []
    errors = ERRORS
    requiresAnswer = False


class ServerGoingAway(amp.Command):
    """Server → a module, the last box before a clean shutdown closes the connection: expect
    the server to listen again in ``back_in`` seconds and come back at a random moment within
    ``spread`` seconds after that, with the back-off started afresh (a planned restart is not a
    failure; thousands of hosts spread out instead of all growing their back-off)."""

    arguments = [(b"back_in", amp.Float()), (b"spread", amp.Float())]
    response: list = []
    errors = ERRORS
    requiresAnswer = False


class OpenRelayLeg(amp.Command):
    """First and only command of a relay leg; after the answer the connection is raw bytes."""

    arguments = [(b"relay_token", amp.Unicode())]
    response = [(b"session_id", amp.Unicode())]
    errors = ERRORS


__all__ = [
    "PROTOCOL_VERSION", "BadRequest", "ControlError", "ALL_ERRORS", "ERRORS", "Hello", "Heartbeat",
    "AllocateNameplate", "JoinAdhoc", "ListHosts", "ConnectHost", "SessionReady", "OfferSession",
    "OpenRelayLeg", "SessionEvent", "SessionEnded", "HostPresenceChanged", "ServerGoingAway", "ProtocolVersionMismatch", "NotEnrolled", "WrongState", "Forbidden",
    "UnknownNameplate", "LockedOut", "HostOffline", "UnknownHost", "RelayRefused", "NotRecordable",
    "RecordingRefused", "RecordingStart", "RecordingChunk", "RecordingEnd", "MAX_RECORDING_CHUNK",
]
