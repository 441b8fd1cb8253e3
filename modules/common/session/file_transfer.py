"""File transfer over the session's FILE channel: a sans-I/O engine for both directions at once.

One ``FileTransfers`` per session channel.  It never touches a socket, a reactor or a clock: the
caller feeds it what arrived on ``Channel.FILE`` (``receive``), asks it for the next message to
send while the mux has room (``next_chunk``) and passes the user's decisions (``accept``,
``reject``, ``cancel``).  It does touch the disk, synchronously and in small steps: it writes
received chunks to a ``.part`` file in ``download_dir`` and reads the file being sent, one chunk
(at most 16 KiB) per call.  Hashing a whole file before offering it is the one long blocking step;
it is the module function ``prepare(path)``, which the Twisted adapter runs in the blocking pool.

Responsible for: the wire format, the state of every transfer, safe names, free space, SHA-256
checks, resume within a session and the events for the session protocol.  Not responsible for:
rights (the caller passes ``allowed``; on the presenter that is ``ConsentDriver.enforce(FILES)``,
on the viewer ``lambda attempt: True``), asking the user, nor how the mux schedules the channel.

Every method returns an ``Outcome``: messages to send on ``Channel.FILE`` (each as one
``mux.send``) and events (``FileEvent``; ``protocol_event()`` gives the session-protocol line, or
None for progress).

Wire format.  The FILE channel is a stream channel of the mux: the caller passes every
``ChannelData`` piece with its ``end`` flag and the engine reassembles one message per ``send``
(at most ``MAX_MESSAGE`` = 16 KiB, so a chunk is exactly one mux piece).  A message is one type
byte and a body (integers big-endian)::

    0x01 control   UTF-8 JSON object, at most 4 KiB, exactly these keys:
        {"type": "offer",  "id": I, "name": N, "size": S, "sha256": H}   sender -> receiver
        {"type": "accept", "id": I, "offset": O}                        receiver -> sender
        {"type": "reject", "id": I, "reason": R}                        receiver -> sender
        {"type": "done",   "id": I}          sender: every byte sent / receiver: stored, hash ok
        {"type": "cancel", "id": I, "reason": R}                        either, any time
    0x02 chunk     id:16  offset:u64  data[1 .. 16359]                   sender -> receiver

    I: 32 lowercase hex digits (16 random bytes, chosen by the sender); N: the base name (rules
    below); S: 0 .. max_size; H: 64 lowercase hex digits; O: 0 .. S (O > 0 resumes: the sender
    starts at byte O); R: 1-200 characters without control characters.

Flow: offer → accept (or reject) → chunks in order → sender's done → the receiver checks size and
SHA-256, stores the file and answers done (or cancel "SHA-256 mismatch").  Both sides report
``file_completed`` when the receiver's done is in.

Rules:

* Names are refused, never sanitised: the peer learns why and the user can rename.  A name must
  be 1-200 UTF-8 bytes, a single path component (no ``/`` or ``\\``), not ``.`` or ``..``, without
  control, format (bidi overrides, zero-width) or surrogate characters, without ``<>:"|?*``, not
  ending in a space or dot, not a Windows device name (``CON``, ``nul.txt``, ``COM1`` ...).  The
  target is checked once more with ``Path.resolve()`` to lie directly in ``download_dir``.
* An offer is refused before a byte is written when: ``allowed("file offer")`` is False, there is
  no ``download_dir``, the name is refused, the size exceeds ``max_size``, or the bytes still
  needed (plus those reserved by other accepted transfers) exceed ``free_space(dir).free``.  Space
  is checked again at ``accept``.  While receiving, ``allowed("file chunk")`` is asked for every
  chunk: a revoked right cancels the transfer and discards the partial file.
* Data goes to ``.hausmeister-<id>.part`` (created exclusively, mode 0600, no symlinks followed).
  At the end the SHA-256 of the received stream must match the offer: otherwise the partial file
  is deleted and ``file_failed`` "SHA-256 mismatch" is reported on both sides.  The file is then
  linked to its name without ever replacing an existing file: ``name``, ``stem (1).ext``, ...
* Resume within a session: a transfer cancelled by either side (not one that failed) keeps its
  partial file and hash state.  A later offer of the same name, size and SHA-256 (any id) shows
  ``resume_offset`` in ``FileOffered``, and ``accept`` answers with that offset; the full SHA-256
  is still checked at the end.  ``close()`` deletes every partial file when the session ends.
* Errors: a peer message that breaks the protocol raises ``FileTransferError``.  If it concerns a
  known transfer (a chunk before accept, an out-of-order offset, more bytes than announced, done
  too early, a bad accept offset) the engine has already cancelled that transfer and discarded
  its partial file; ``error.outcome`` holds the cancel message to send and the ``file_failed``
  event, and the session goes on (``error.fatal`` False).  Otherwise (malformed message, unknown
  type, a message for an id never seen, a reused id) ``error.fatal`` is True: the caller ends the
  session, as for ``MuxError``/``ConsentError``.  Messages for a transfer that was cancelled or
  finished are dropped silently: they crossed the cancel on the wire.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import struct
import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from modules.common.session import strict_json
from modules.common.session.consent import Role

T_CONTROL = 0x01
T_CHUNK = 0x02
CHUNK_HEADER = struct.Struct("!B16sQ")
CHUNK_HEADER_BYTES = CHUNK_HEADER.size            # 25
MAX_MESSAGE = 16 * 1024                           # one mux piece
MAX_CHUNK_DATA = MAX_MESSAGE - CHUNK_HEADER_BYTES  # 16359
MAX_CONTROL_BYTES = 4096
MAX_NAME_BYTES = 200
MAX_REASON_CHARS = 200
DEFAULT_MAX_SIZE = 64 * 1024**3
MAX_PENDING_OFFERS = 64
HASH_BLOCK = 1024 * 1024

TO_PEER = "supporter_to_peer"
TO_SUPPORTER = "peer_to_supporter"

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WINDOWS_FORBIDDEN = set('<>:"|?*')
_WINDOWS_DEVICES = ({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "CLOCK$"}
                    | {f"{p}{n}" for p in ("COM", "LPT") for n in "123456789¹²³"})


# --- why a transfer did not happen ----------------------------------------------------------------
# Reasons travel to the peer and into the session protocol in English; the apps translate them by
# these templates (``modules/common/qt/file_reasons.py``), so every reason is made from one.

CANCELLED = "cancelled"
DECLINED = "declined"
CANCELLED_BY_SUPPORTER = "cancelled by the supporter"      # the apps' buttons
CANCELLED_BY_CUSTOMER = "cancelled by the customer"
DECLINED_BY_CUSTOMER = "declined by the customer"
SESSION_ENDED = "session ended"
CANCELLED_BY_PEER = "cancelled by the other side: {reason}"
FILES_NOT_GRANTED = "the files right is not granted"
NOT_RECEIVING = "this side does not receive files"
TOO_LARGE = "larger than the limit of {limit} bytes"
TOO_MANY_OFFERS = "too many offers wait for an answer"
SHA_MISMATCH = "SHA-256 mismatch"
CHANGED_WHILE_SENT = "the file changed while it was sent"
CHANGED_SINCE_OFFERED = "the file changed since it was offered"
CANNOT_READ = "cannot read the file: {problem}"
CANNOT_CREATE = "cannot create the file: {problem}"
CANNOT_WRITE = "cannot write the file: {problem}"
CANNOT_STORE = "cannot store the file: {problem}"
CANNOT_TELL_SPACE = "cannot tell the free space: {problem}"
NO_SPACE = "not enough free space ({needed} bytes needed, {free} free)"
OUTSIDE_FOLDER = "the file would land outside the download directory"
NO_FREE_NAME = "no free name for the file"
NAME_EMPTY = "empty file name"
NAME_NOT_UNICODE = "file name is not valid Unicode"
NAME_TOO_LONG = "file name longer than {limit} bytes"
NAME_HAS_SEPARATOR = "file name contains a path separator"
NAME_IS_DOTS = "file name is . or .."
NAME_INVISIBLE = "file name contains control or invisible characters"
NAME_WINDOWS_CHARACTER = "file name contains a character Windows forbids"
NAME_TRAILING = "file name ends in a space or dot"
NAME_LEADING_SPACE = "file name starts with a space"
NAME_DEVICE = "file name is a Windows device name"

#: every template a reason is made from (what the apps translate)
REASON_TEMPLATES = (
    CANCELLED, DECLINED, CANCELLED_BY_SUPPORTER, CANCELLED_BY_CUSTOMER, DECLINED_BY_CUSTOMER,
    SESSION_ENDED, CANCELLED_BY_PEER, FILES_NOT_GRANTED, NOT_RECEIVING,
    TOO_LARGE, TOO_MANY_OFFERS, SHA_MISMATCH, CHANGED_WHILE_SENT, CHANGED_SINCE_OFFERED,
    CANNOT_READ, CANNOT_CREATE, CANNOT_WRITE, CANNOT_STORE, CANNOT_TELL_SPACE, NO_SPACE,
    OUTSIDE_FOLDER, NO_FREE_NAME, NAME_EMPTY, NAME_NOT_UNICODE, NAME_TOO_LONG,
    NAME_HAS_SEPARATOR, NAME_IS_DOTS, NAME_INVISIBLE, NAME_WINDOWS_CHARACTER, NAME_TRAILING,
    NAME_LEADING_SPACE, NAME_DEVICE)


class FileTransferError(ValueError):
    """The peer broke the file-transfer protocol.  ``fatal``: end the session; otherwise only
    ``transfer_id`` was cancelled and ``outcome`` says what to send and report."""

    def __init__(self, reason: str, transfer_id: str | None = None,
                 outcome: "Outcome | None" = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transfer_id = transfer_id
        self.outcome = outcome if outcome is not None else Outcome()

    @property
    def fatal(self) -> bool:
        return self.transfer_id is None


# --- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileEvent:
    """Something that happened to one transfer.  ``direction``: ``supporter_to_peer`` or
    ``peer_to_supporter``."""

    kind: ClassVar[str | None] = None
    id: str
    name: str
    size: int
    sha256: str
    direction: str

    def detail(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": self.size, "sha256": self.sha256,
                "direction": self.direction}

    def protocol_event(self) -> dict[str, Any] | None:
        """``{"kind", "detail"}`` for the session protocol, None if not worth a line."""
        if self.kind is None:
            return None
        return {"kind": self.kind, "detail": self.detail()}


@dataclass(frozen=True)
class FileOffered(FileEvent):
    """An offer was sent (outgoing) or arrived (incoming: the caller answers ``accept`` or
    ``reject``, unless ``auto_accept`` did).  ``resume_offset``: bytes kept from an earlier,
    cancelled attempt that ``accept`` will not ask for again."""

    kind: ClassVar[str] = "file_offered"
    resume_offset: int = 0

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "resume_offset": self.resume_offset}


@dataclass(frozen=True)
class FileAccepted(FileEvent):
    kind: ClassVar[str] = "file_accepted"
    offset: int = 0

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "offset": self.offset}


@dataclass(frozen=True)
class FileRejected(FileEvent):
    kind: ClassVar[str] = "file_rejected"
    reason: str = ""

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "reason": self.reason}


@dataclass(frozen=True)
class FileProgress(FileEvent):
    """``transferred`` of ``size`` bytes written (incoming) or handed to the mux (outgoing)."""

    transferred: int = 0


@dataclass(frozen=True)
class FileSent(FileEvent):
    """The sender handed out every byte and its done; completion waits for the receiver."""

    kind: ClassVar[str] = "file_sent"


@dataclass(frozen=True)
class FileCompleted(FileEvent):
    """Incoming: stored at ``path`` with the offered SHA-256.  Outgoing: the receiver confirmed
    it (``path`` is the source)."""

    kind: ClassVar[str] = "file_completed"
    path: Path | None = None

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "saved_as": self.path.name if self.path else None}


@dataclass(frozen=True)
class FileFailed(FileEvent):
    """The transfer ended without the file.  ``resumable``: a partial file is kept for a
    later offer of the same file in this session."""

    kind: ClassVar[str] = "file_failed"
    reason: str = ""
    resumable: bool = False

    def detail(self) -> dict[str, Any]:
        return {**super().detail(), "reason": self.reason, "resumable": self.resumable}


@dataclass
class Outcome:
    """Messages to send on the FILE channel (in order) and events (in order)."""

    messages: list[bytes] = field(default_factory=list)
    events: list[FileEvent] = field(default_factory=list)

    def extend(self, other: "Outcome") -> "Outcome":
        self.messages += other.messages
        self.events += other.events
        return self

    def __bool__(self) -> bool:
        return bool(self.messages or self.events)


@dataclass(frozen=True)
class PreparedFile:
    """A file hashed and ready to offer (``prepare``)."""

    path: Path
    name: str
    size: int
    sha256: str


# --- names ----------------------------------------------------------------------------------------

def name_problem(name: object) -> str | None:
    """Why ``name`` may not be stored as a file name (None if it may)."""
    if not isinstance(name, str) or not name:
        return NAME_EMPTY
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return NAME_NOT_UNICODE
    if len(encoded) > MAX_NAME_BYTES:
        return NAME_TOO_LONG.format(limit=MAX_NAME_BYTES)
    if "/" in name or "\\" in name:
        return NAME_HAS_SEPARATOR
    if name in (".", ".."):
        return NAME_IS_DOTS
    for c in name:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") and c != "\u200d":
            return NAME_INVISIBLE
        if c in _WINDOWS_FORBIDDEN:
            return NAME_WINDOWS_CHARACTER
    if name[-1] in " .":
        return NAME_TRAILING
    if name[0] == " ":
        return NAME_LEADING_SPACE
    if name.split(".", 1)[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return NAME_DEVICE
    return None


def _safe_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A peer- or locally-made string fit for a reason or an event (no control characters)."""
    cleaned = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in str(text))
    return cleaned.strip()[:limit] or "-"


def _display_name(name: object) -> str:
    """The name for events: as is when safe, escaped when not (a refused name is logged too)."""
    if isinstance(name, str) and name_problem(name) is None:
        return name
    return ascii(name)[:MAX_NAME_BYTES]


def _numbered(name: str, n: int) -> str:
    """``name`` with `` (n)`` before its extension(s): ``a.tar.gz`` → ``a (1).tar.gz``."""
    dot = name.find(".", 1)
    if dot == -1:
        return f"{name} ({n})"
    return f"{name[:dot]} ({n}){name[dot:]}"


# --- sender's blocking step -----------------------------------------------------------------------

def prepare(path: str | os.PathLike) -> PreparedFile:
    """Hash a regular file for an offer.  Blocking (reads the whole file): run it in a thread
    (``deferToThreadPool``).  Raises ``OSError`` if unreadable, ``ValueError`` if the file is not
    a regular file, its name would be refused by the receiver, or it changed while hashed."""
    path = Path(path)
    problem = name_problem(path.name)
    if problem:
        raise ValueError(f"{path.name!r} cannot be sent: {problem}")
    if not stat.S_ISREG(os.stat(path).st_mode):   # before open: a FIFO would block it
        raise ValueError(f"{path} is not a regular file")
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file")
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
        if size != os.fstat(f.fileno()).st_size:
            raise ValueError(f"{path} changed while it was hashed")
    return PreparedFile(path, path.name, size, digest.hexdigest())


# --- message codec --------------------------------------------------------------------------------

def _control(**fields: Any) -> bytes:
    return bytes([T_CONTROL]) + json.dumps(fields, ensure_ascii=False,
                                           separators=(",", ":")).encode("utf-8")


_SCHEMA: dict[str, tuple[str, ...]] = {
    "offer": ("type", "id", "name", "size", "sha256"),
    "accept": ("type", "id", "offset"),
    "reject": ("type", "id", "reason"),
    "done": ("type", "id"),
    "cancel": ("type", "id", "reason"),
}


def _parse_control(body: bytes, max_size: int) -> dict[str, Any]:
    if len(body) > MAX_CONTROL_BYTES:
        raise FileTransferError("control message too long")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileTransferError(f"control message is not UTF-8: {exc}") from None
    message = strict_json.loads(text, FileTransferError)
    if not isinstance(message, dict):
        raise FileTransferError("control message is not a JSON object")
    kind = message.get("type")
    keys = _SCHEMA.get(kind) if isinstance(kind, str) else None  # a list or object is unhashable
    if keys is None:
        raise FileTransferError(f"unknown control message type {ascii(message.get('type'))[:40]}")
    if set(message) != set(keys):
        raise FileTransferError(f"{message['type']} needs exactly the keys {', '.join(keys)}")
    if not isinstance(message["id"], str) or not _HEX32.fullmatch(message["id"]):
        raise FileTransferError("a transfer id is 32 lowercase hex digits")
    for key in ("size", "offset"):
        if key in message:
            value = message[key]
            if type(value) is not int or not 0 <= value < 2**63:
                raise FileTransferError(f"{key} is not a non-negative integer")
    if "sha256" in message and (not isinstance(message["sha256"], str)
                                or not _HEX64.fullmatch(message["sha256"])):
        raise FileTransferError("sha256 is 64 lowercase hex digits")
    if "name" in message and not isinstance(message["name"], str):
        raise FileTransferError("name is not a string")
    if "reason" in message:
        reason = message["reason"]
        if (not isinstance(reason, str) or not 1 <= len(reason) <= MAX_REASON_CHARS
                or any(unicodedata.category(c) in ("Cc", "Cs") for c in reason)):
            raise FileTransferError("reason is not 1-200 characters without control characters")
    return message


# --- transfers ------------------------------------------------------------------------------------

@dataclass
class _Outgoing:
    id: str
    file: PreparedFile
    state: str = "offered"          # offered → sending → sent
    position: int = 0
    handle: Any = None

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


@dataclass
class _Incoming:
    id: str
    name: str
    size: int
    sha256: str
    state: str = "offered"          # offered → receiving
    part: Path | None = None
    fd: int | None = None
    hasher: Any = None
    received: int = 0
    resume: "_Partial | None" = None
    folder: Path | None = None      # where it is stored (chosen at accept)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class _Partial:
    """What a cancelled incoming transfer leaves for a resume."""

    part: Path
    hasher: Any
    received: int
    stamp: tuple[int, int, int]     # inode, mtime_ns, size when it was closed


def _stamp(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class FileTransfers:
    """Every file transfer of one session channel, both directions.

    ``role``: this side's role (the direction in events follows from it).  ``download_dir``:
    where incoming files go (None: every offer is refused).  ``allowed(attempt)``: may the peer
    do this now ("file offer", "file chunk")?  ``free_space(dir).free``: bytes free there.
    ``auto_accept``: accept every offer that passes the checks (hosts whose policy allows files).
    ``new_id``: 16 random bytes per outgoing transfer (injected for tests)."""

    def __init__(self, download_dir: Path | None, *, role: Role,
                 allowed: Callable[[str], bool],
                 free_space: Callable[[Path], Any] = shutil.disk_usage,
                 max_size: int = DEFAULT_MAX_SIZE, auto_accept: bool = False,
                 new_id: Callable[[], bytes] = lambda: os.urandom(16)) -> None:
        self.role = Role(role)
        self.download_dir = Path(download_dir).resolve() if download_dir is not None else None
        self.allowed = allowed
        self.free_space = free_space
        self.max_size = max_size
        self.auto_accept = auto_accept
        self._new_id = new_id
        self.outgoing_direction = TO_PEER if self.role == Role.SUPPORTER else TO_SUPPORTER
        self.incoming_direction = TO_SUPPORTER if self.role == Role.SUPPORTER else TO_PEER
        self._out: OrderedDict[str, _Outgoing] = OrderedDict()
        self._in: dict[str, _Incoming] = {}
        self._sending: deque[str] = deque()   # accepted outgoing transfers, served in order
        self._closed_ids: OrderedDict[str, None] = OrderedDict()  # cancelled or finished
        self._partials: dict[tuple[str, int, str], _Partial] = {}
        self._buffer = bytearray()
        self._ended = False

    # --- sending side ---------------------------------------------------------------------------

    def offer(self, source: PreparedFile | str | os.PathLike) -> Outcome:
        """Offer a file.  Pass a ``PreparedFile`` from ``prepare`` (hashed in a thread); a path
        is hashed here, blocking (fine for small files and tests).  ``FileOffered`` carries the
        id."""
        self._check_open()
        prepared = source if isinstance(source, PreparedFile) else prepare(source)
        if prepared.size > self.max_size:
            raise ValueError(f"{prepared.name} is larger than {self.max_size} bytes")
        transfer_id = self._new_id().hex()
        if len(transfer_id) != 32 or transfer_id in self._out or transfer_id in self._in:
            raise ValueError("new_id must give 16 fresh bytes")
        self._out[transfer_id] = _Outgoing(transfer_id, prepared)
        return Outcome([_control(type="offer", id=transfer_id, name=prepared.name,
                                 size=prepared.size, sha256=prepared.sha256)],
                       [FileOffered(transfer_id, prepared.name, prepared.size, prepared.sha256,
                                    self.outgoing_direction)])

    def sending(self) -> bool:
        """Is there an accepted outgoing transfer, i.e. will ``next_chunk`` give something?"""
        return bool(self._sending)

    def next_chunk(self, max_bytes: int = MAX_MESSAGE) -> Outcome | None:
        """The next message of the oldest accepted outgoing transfer — a chunk of at most
        ``max_bytes`` (and ``MAX_MESSAGE``) bytes, or its done — or None when nothing is to be
        sent or ``max_bytes`` is too small.  Call it while ``mux.room(FILE)`` allows: that is the
        back-pressure, and it lets screen and control go first.  Reads one chunk from disk."""
        if self._ended or not self._sending:
            return None
        out = self._out[self._sending[0]]
        item = out.file
        if out.position >= item.size:
            done = _control(type="done", id=out.id)
            if len(done) > max_bytes:
                return None
            self._sending.popleft()
            out.close()
            out.state = "sent"
            return Outcome([done], [FileSent(out.id, item.name, item.size, item.sha256,
                                             self.outgoing_direction)])
        room = min(max_bytes, MAX_MESSAGE) - CHUNK_HEADER_BYTES
        if room < 1:
            return None
        want = min(room, item.size - out.position)
        try:
            data = out.handle.read(want)
        except OSError as exc:
            return self._cancel_outgoing(out, CANNOT_READ.format(problem=exc.strerror or exc))
        if len(data) != want:
            return self._cancel_outgoing(out, CHANGED_WHILE_SENT)
        message = CHUNK_HEADER.pack(T_CHUNK, bytes.fromhex(out.id), out.position) + data
        out.position += len(data)
        return Outcome([message], [FileProgress(out.id, item.name, item.size, item.sha256,
                                                self.outgoing_direction,
                                                transferred=out.position)])

    # --- receiving side: the user's decisions ---------------------------------------------------

    def accept(self, transfer_id: str, folder: str | os.PathLike | None = None) -> Outcome:
        """Accept an incoming offer (resuming a kept partial file if there is one), stored in
        ``folder`` (the person's choice for this file; default ``download_dir``).  Refuses it
        instead (``file_rejected``) if the free space no longer suffices or the file cannot be
        created."""
        self._check_open()
        inc = self._in.get(transfer_id)
        if inc is None or inc.state != "offered":
            raise ValueError(f"no incoming offer {transfer_id} waits for an answer")
        where = Path(folder).resolve() if folder is not None else self.download_dir
        if inc.resume is not None and inc.resume.part.parent != where:
            _unlink(inc.resume.part)   # kept in another folder: start again from byte 0 there
            inc.resume = None
        if where != self.download_dir:
            try:
                self._check_inside(where / inc.name, where)
            except FileTransferError as exc:
                return self.reject(transfer_id, exc.reason)
        resume_fd = self._reopen(inc.resume) if inc.resume is not None else None
        if inc.resume is not None and resume_fd is None:
            _unlink(inc.resume.part)   # changed or gone since the cancel: start from byte 0
            inc.resume = None
        offset = inc.resume.received if inc.resume else 0
        problem = self._space_problem(inc.size - offset, exclude=inc.id, where=where)
        if problem:
            if resume_fd is not None:
                os.close(resume_fd)
            return self.reject(transfer_id, problem)
        try:
            if inc.resume is not None:
                part, hasher, fd = inc.resume.part, inc.resume.hasher, resume_fd
                os.lseek(fd, offset, os.SEEK_SET)
                inc.resume = None
            else:
                part, hasher = where / f".hausmeister-{inc.id}.part", hashlib.sha256()
                self._check_inside(part, where)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | getattr(os, "O_BINARY", 0), 0o600)
        except OSError as exc:
            return self.reject(transfer_id, CANNOT_CREATE.format(problem=exc.strerror or exc))
        inc.part, inc.fd, inc.hasher, inc.received, inc.state = part, fd, hasher, offset, "receiving"
        inc.folder = where
        return Outcome([_control(type="accept", id=inc.id, offset=offset)],
                       [FileAccepted(inc.id, inc.name, inc.size, inc.sha256,
                                     self.incoming_direction, offset=offset)])

    def reject(self, transfer_id: str, reason: str) -> Outcome:
        """Refuse an incoming offer.  A kept partial file stays for a later offer."""
        self._check_open()
        inc = self._in.get(transfer_id)
        if inc is None or inc.state != "offered":
            raise ValueError(f"no incoming offer {transfer_id} waits for an answer")
        reason = _safe_text(reason)
        self._forget(inc.id)
        if inc.resume is not None:
            self._partials[(inc.name, inc.size, inc.sha256)] = inc.resume
        return Outcome([_control(type="reject", id=inc.id, reason=reason)],
                       [FileRejected(inc.id, inc.name, inc.size, inc.sha256,
                                     self.incoming_direction, reason=reason)])

    def cancel(self, transfer_id: str, reason: str = CANCELLED) -> Outcome:
        """Stop a transfer in either direction.  An incoming partial file is kept for a resume."""
        self._check_open()
        reason = _safe_text(reason)
        if transfer_id in self._out:
            return self._cancel_outgoing(self._out[transfer_id], reason, resumable=True)
        if transfer_id in self._in:
            inc = self._in[transfer_id]
            out = Outcome([_control(type="cancel", id=transfer_id, reason=reason)])
            return out.extend(self._drop_incoming(inc, reason, keep=True))
        raise ValueError(f"no transfer {transfer_id} is under way")

    # --- receiving ------------------------------------------------------------------------------

    def receive(self, data: bytes, end: bool = True) -> Outcome:
        """Feed a piece from the FILE channel (``ChannelData.payload`` and ``.end``).  Returns
        what to send in answer and the events once a whole message is in.  Raises
        ``FileTransferError`` (see the module docstring for ``fatal``)."""
        if self._ended:
            return Outcome()
        if len(self._buffer) + len(data) > MAX_MESSAGE:
            self._buffer.clear()
            raise FileTransferError(f"a file-channel message is longer than {MAX_MESSAGE} bytes")
        self._buffer += data
        if not end:
            return Outcome()
        message, self._buffer = bytes(self._buffer), bytearray()
        if not message:
            raise FileTransferError("empty file-channel message")
        if message[0] == T_CHUNK:
            return self._chunk(message)
        if message[0] == T_CONTROL:
            return self._control_message(_parse_control(message[1:], self.max_size))
        raise FileTransferError(f"unknown file-channel message type {message[0]}")

    def _control_message(self, msg: dict[str, Any]) -> Outcome:
        kind, tid = msg["type"], msg["id"]
        if kind == "offer":
            return self._offer_received(msg)
        if tid in self._closed_ids:
            return Outcome()  # crossed a cancel or a finish on the wire
        if kind == "cancel":
            reason = CANCELLED_BY_PEER.format(reason=msg["reason"])
            if tid in self._out:
                out = self._out[tid]
                return self._cancel_outgoing(out, reason, resumable=out.state != "sent",
                                             send=False)
            if tid in self._in:
                return self._drop_incoming(self._in[tid], reason, keep=True)
            raise FileTransferError(f"cancel for unknown transfer {tid}")
        if kind == "done" and tid in self._in:
            return self._done_received(self._in[tid])
        out = self._out.get(tid)
        if out is None:
            raise FileTransferError(f"{kind} for unknown transfer {tid}")
        item = out.file
        if kind == "reject" and out.state == "offered":
            self._forget(tid)
            return Outcome([], [FileRejected(tid, item.name, item.size, item.sha256,
                                             self.outgoing_direction, reason=msg["reason"])])
        if kind == "accept" and out.state == "offered":
            offset = msg["offset"]
            if offset > item.size:
                raise self._violation(out, f"accept offset {offset} beyond the size {item.size}")
            try:
                handle = open(item.path, "rb")
                if os.fstat(handle.fileno()).st_size != item.size:
                    handle.close()
                    return self._cancel_outgoing(out, CHANGED_SINCE_OFFERED)
                handle.seek(offset)
            except OSError as exc:
                return self._cancel_outgoing(out, CANNOT_READ.format(problem=exc.strerror or exc))
            out.handle, out.position, out.state = handle, offset, "sending"
            self._sending.append(tid)
            return Outcome([], [FileAccepted(tid, item.name, item.size, item.sha256,
                                             self.outgoing_direction, offset=offset)])
        if kind == "done" and out.state == "sent":
            self._forget(tid)
            return Outcome([], [FileCompleted(tid, item.name, item.size, item.sha256,
                                              self.outgoing_direction, path=item.path)])
        raise self._violation(out, f"unexpected {kind} while the transfer is {out.state}")

    def _offer_received(self, msg: dict[str, Any]) -> Outcome:
        tid, name, size, sha = msg["id"], msg["name"], msg["size"], msg["sha256"]
        if tid in self._in or tid in self._out or tid in self._closed_ids:
            raise FileTransferError(f"offer reuses the transfer id {tid}")
        shown = _display_name(name)
        pending = sum(1 for inc in self._in.values() if inc.state == "offered")
        problem = (None if self.allowed("file offer") else FILES_NOT_GRANTED)
        if problem is None and self.download_dir is None:
            problem = NOT_RECEIVING
        if problem is None:
            problem = name_problem(name)
        if problem is None and size > self.max_size:
            problem = TOO_LARGE.format(limit=self.max_size)
        if problem is None and pending >= MAX_PENDING_OFFERS:
            problem = TOO_MANY_OFFERS
        resume = self._partials.get((name, size, sha)) if problem is None else None
        if problem is None:
            problem = self._space_problem(size - (resume.received if resume else 0))
        if problem is None:
            try:
                self._check_inside(self.download_dir / name)
            except FileTransferError as exc:
                problem = exc.reason
        if problem is not None:
            problem = _safe_text(problem)
            self._remember_closed(tid)
            return Outcome([_control(type="reject", id=tid, reason=problem)],
                           [FileOffered(tid, shown, size, sha, self.incoming_direction),
                            FileRejected(tid, shown, size, sha, self.incoming_direction,
                                         reason=problem)])
        if resume is not None:
            del self._partials[(name, size, sha)]
        self._in[tid] = _Incoming(tid, name, size, sha, resume=resume)
        result = Outcome([], [FileOffered(tid, name, size, sha, self.incoming_direction,
                                          resume_offset=resume.received if resume else 0)])
        if self.auto_accept:
            result.extend(self.accept(tid))
        return result

    def _chunk(self, message: bytes) -> Outcome:
        if len(message) <= CHUNK_HEADER_BYTES:
            raise FileTransferError("chunk without data")
        _, raw_id, offset = CHUNK_HEADER.unpack_from(message)
        tid = raw_id.hex()
        if tid in self._closed_ids:
            return Outcome()
        inc = self._in.get(tid)
        if inc is None:
            raise FileTransferError(f"chunk for unknown transfer {tid}")
        if inc.state != "receiving":
            raise self._violation(inc, "chunk before the transfer was accepted")
        if not self.allowed("file chunk"):
            out = Outcome([_control(type="cancel", id=tid, reason=FILES_NOT_GRANTED)])
            return out.extend(self._drop_incoming(inc, FILES_NOT_GRANTED, keep=False))
        data = memoryview(message)[CHUNK_HEADER_BYTES:]
        if offset != inc.received:
            raise self._violation(inc, f"chunk at offset {offset}, expected {inc.received}")
        if inc.received + len(data) > inc.size:
            raise self._violation(inc, f"more bytes than the {inc.size} announced")
        try:
            while data:
                written = os.write(inc.fd, data)
                data = data[written:]
        except OSError as exc:
            reason = CANNOT_WRITE.format(problem=exc.strerror or exc)
            out = Outcome([_control(type="cancel", id=tid, reason=_safe_text(reason))])
            return out.extend(self._drop_incoming(inc, reason, keep=False))
        chunk = memoryview(message)[CHUNK_HEADER_BYTES:]
        inc.hasher.update(chunk)
        inc.received += len(chunk)
        return Outcome([], [FileProgress(tid, inc.name, inc.size, inc.sha256,
                                         self.incoming_direction, transferred=inc.received)])

    def _done_received(self, inc: _Incoming) -> Outcome:
        if inc.state != "receiving":
            raise self._violation(inc, "done before the transfer was accepted")
        if inc.received != inc.size:
            raise self._violation(inc, f"done after {inc.received} of {inc.size} bytes")
        if inc.hasher.hexdigest() != inc.sha256:
            out = Outcome([_control(type="cancel", id=inc.id, reason=SHA_MISMATCH)])
            return out.extend(self._drop_incoming(inc, SHA_MISMATCH, keep=False))
        try:
            os.fsync(inc.fd)
            inc.close()
            final = self._store(inc.part, inc.name, inc.folder or self.download_dir)
        except (OSError, FileTransferError) as exc:
            reason = CANNOT_STORE.format(problem=getattr(exc, "strerror", None) or exc)
            out = Outcome([_control(type="cancel", id=inc.id, reason=_safe_text(reason))])
            return out.extend(self._drop_incoming(inc, reason, keep=False))
        self._forget(inc.id)
        return Outcome([_control(type="done", id=inc.id)],
                       [FileCompleted(inc.id, inc.name, inc.size, inc.sha256,
                                      self.incoming_direction, path=final)])

    # --- ending ---------------------------------------------------------------------------------

    def close(self, reason: str = SESSION_ENDED) -> Outcome:
        """The session ends: close every file, delete every partial file (resume is within a
        session only) and report ``file_failed`` for what was under way.  Sends nothing."""
        if self._ended:
            return Outcome()
        reason = _safe_text(reason)
        result = Outcome()
        for out in list(self._out.values()):
            result.extend(self._cancel_outgoing(out, reason, send=False))
        for inc in list(self._in.values()):
            result.extend(self._drop_incoming(inc, reason, keep=False))
        for partial in self._partials.values():
            _unlink(partial.part)
        self._partials.clear()
        self._ended = True
        return result

    # --- helpers --------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._ended:
            raise ValueError("the file transfers of this session are closed")

    def _reopen(self, partial: _Partial) -> int | None:
        """Open a kept partial file for appending, if it is still exactly as we left it (the
        kept hash state covers the bytes we wrote, so a part file touched since is not used)."""
        try:
            fd = os.open(partial.part, os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0))
        except OSError:
            return None
        try:
            if (_stamp(fd) == partial.stamp and partial.stamp[2] == partial.received
                    and stat.S_ISREG(os.fstat(fd).st_mode)):
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def _space_problem(self, needed: int, exclude: str | None = None,
                       where: Path | None = None) -> str | None:
        where = where or self.download_dir
        reserved = sum(inc.size - inc.received for inc in self._in.values()
                       if inc.state == "receiving" and inc.id != exclude
                       and (inc.folder or self.download_dir) == where)
        try:
            free = self.free_space(where).free
        except OSError as exc:
            return CANNOT_TELL_SPACE.format(problem=exc.strerror or exc)
        if needed + reserved > free:
            return NO_SPACE.format(needed=needed, free=max(free - reserved, 0))
        return None

    def _check_inside(self, target: Path, folder: Path | None = None) -> None:
        """Lexically and after ``resolve()``: ``target`` is an entry of ``download_dir``.  An
        existing symlink there is fine: files are only ever created with O_EXCL or link(),
        which never follow one."""
        folder = folder or self.download_dir
        lexical = target.parent == folder and target.name not in ("", ".", "..")
        if lexical and not target.is_symlink():
            lexical = target.resolve().parent == folder
        if not lexical:
            raise FileTransferError(OUTSIDE_FOLDER)

    def _store(self, part: Path, name: str, folder: Path) -> Path:
        """Give the verified part file its name in ``folder`` without ever replacing a file."""
        for n in range(10_000):
            candidate = folder / (name if n == 0 else _numbered(name, n))
            self._check_inside(candidate, folder)
            try:
                os.link(part, candidate, follow_symlinks=False)
            except FileExistsError:
                continue
            except OSError:
                # no hard links here (FAT, some network shares): claim the name, then move
                try:
                    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, 0o600))
                except FileExistsError:
                    continue
                os.replace(part, candidate)
                return candidate
            _unlink(part)
            return candidate
        raise FileTransferError(NO_FREE_NAME)

    def _cancel_outgoing(self, out: _Outgoing, reason: str, *, resumable: bool = False,
                         send: bool = True) -> Outcome:
        out.close()
        if out.id in self._sending:
            self._sending.remove(out.id)
        self._forget(out.id)
        item = out.file
        messages = [_control(type="cancel", id=out.id, reason=_safe_text(reason))] if send else []
        return Outcome(messages, [FileFailed(out.id, item.name, item.size, item.sha256,
                                             self.outgoing_direction, reason=_safe_text(reason),
                                             resumable=resumable)])

    def _drop_incoming(self, inc: _Incoming, reason: str, *, keep: bool) -> Outcome:
        """End an incoming transfer; keep its partial file for a resume or delete it."""
        kept = None
        if inc.state == "receiving" and inc.part is not None and inc.fd is not None:
            try:
                kept = _Partial(inc.part, inc.hasher, inc.received, _stamp(inc.fd))
            except OSError:
                _unlink(inc.part)
        elif inc.state == "receiving" and inc.part is not None:
            _unlink(inc.part)
        elif inc.resume is not None:
            kept = inc.resume
        inc.close()
        self._forget(inc.id)
        if kept is not None:
            key = (inc.name, inc.size, inc.sha256)
            if keep and not self._ended and key not in self._partials:
                self._partials[key] = kept
            else:
                _unlink(kept.part)
                kept = None
        return Outcome([], [FileFailed(inc.id, inc.name, inc.size, inc.sha256,
                                       self.incoming_direction, reason=_safe_text(reason),
                                       resumable=kept is not None)])

    def _violation(self, transfer: _Outgoing | _Incoming, reason: str) -> FileTransferError:
        """The peer broke the protocol for one transfer: cancel it, keep nothing."""
        if isinstance(transfer, _Outgoing):
            outcome = self._cancel_outgoing(transfer, reason)
        else:
            outcome = Outcome([_control(type="cancel", id=transfer.id, reason=_safe_text(reason))])
            outcome.extend(self._drop_incoming(transfer, reason, keep=False))
        return FileTransferError(reason, transfer.id, outcome)

    def _forget(self, transfer_id: str) -> None:
        self._out.pop(transfer_id, None)
        self._in.pop(transfer_id, None)
        self._remember_closed(transfer_id)

    def _remember_closed(self, transfer_id: str) -> None:
        self._closed_ids[transfer_id] = None
        while len(self._closed_ids) > 4096:
            self._closed_ids.popitem(last=False)

    # --- inspection -----------------------------------------------------------------------------

    def pending_offers(self) -> list[FileOffered]:
        """Incoming offers that wait for ``accept`` or ``reject``."""
        return [FileOffered(i.id, i.name, i.size, i.sha256, self.incoming_direction,
                            resume_offset=i.resume.received if i.resume else 0)
                for i in self._in.values() if i.state == "offered"]


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def protocol_events(events: Iterable[FileEvent]) -> list[dict[str, Any]]:
    """The session-protocol lines of ``events`` (progress has none)."""
    return [line for line in (e.protocol_event() for e in events) if line is not None]
