"""Session protocols: one hash-chained JSON-lines file per session in the operator's folder.

Layout under ``server.protocol_dir``::

    <tenant>/YYYY/MM/<session_id>.jsonl     one line per event (YYYY/MM of the first event)
    <tenant>/sessions.csv                   one row per ended session, for billing

Each line is canonical JSON (sorted keys, no spaces, ASCII only, ``\\n`` at the end)::

    {"actor":"hausmeister:supporter:alice","address":"192.0.2.7","detail":{...},
     "hash":"<sha256 of this line's canonical JSON without the hash key>","kind":"joined",
     "prev":"<sha256 of the previous line's bytes, its \\n included>","seq":2,
     "session":"<session id>","time":"2025-01-31T23:59:59.500Z"}

``prev`` of line 1 is the SHA-256 of ``GENESIS + session id``, which binds the first line to its
session.  ``prev`` chains the lines (a line removed, inserted or moved breaks it), ``hash`` and
the canonical form make any edit show on the edited line itself, and ``seq`` counts from 1.
``sed -n 6p FILE | sha256sum`` gives the ``prev`` of line 7.  A chain without a secret shows
accidents and casual edits; someone who rewrites a whole file from the edit onwards (or drops the
last lines) is caught only by comparing with another copy (the supporter's, or a backup) - the
``ended`` line the server writes last at least shows whether a file is complete.

Everything here blocks (disk, fsync): on the reactor thread, call it through
``protocol.runtime.run_blocking`` (``SessionProtocols.record_async`` / ``ended_async`` do).
Appends to one file are serialised by a lock per session in this process and by ``flock`` across
processes; the file itself is the only state (its last line gives the next ``seq`` and ``prev``),
so a restart or a second writer cannot fork a chain.
"""

from __future__ import annotations

import collections
import csv
import datetime as dt
import hashlib
import io
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

try:
    import fcntl
except ImportError:  # pragma: no cover - the server runs on Linux
    fcntl = None  # type: ignore[assignment]

Clock = Callable[[], dt.datetime]

GENESIS = b"hausmeister session protocol v1\n"
FIELDS = frozenset({"seq", "time", "session", "kind", "actor", "address", "detail", "prev", "hash"})
EVENT_FIELDS = frozenset({"kind", "actor", "address", "detail"})
#: A protocol line is at most this long; a bigger event (a huge chat message) is refused.
MAX_LINE_BYTES = 64 * 1024
#: The kind the server writes last (``finish``); with actor ``server`` only ``finish`` writes it.
ENDED = "ended"
SERVER = "server"
CSV_NAME = "sessions.csv"
CSV_HEADER = ("session_id", "kind", "start", "end", "duration_s", "supporter", "customer_or_host",
              "bytes_to_peer", "bytes_to_supporter", "end_reason")
FILE_MODE = 0o640
DIR_MODE = 0o750

_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_YEAR = re.compile(r"\d{4}\Z")
_MONTH = re.compile(r"(0[1-9]|1[0-2])\Z")


class ProtocolError(ValueError):
    """An event or a request the protocol cannot take, worded as one line."""


class UnknownSession(ProtocolError):
    """No protocol file for the session id."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# --- format ---------------------------------------------------------------------------------

def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def genesis(session_id: str) -> str:
    """``prev`` of a file's first line."""
    return hashlib.sha256(GENESIS + session_id.encode("ascii")).hexdigest()


def line_hash(record: dict) -> str:
    """``hash`` of a record: SHA-256 of its canonical JSON without the ``hash`` key."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"})).hexdigest()


def format_time(when: dt.datetime) -> str:
    if when.tzinfo is None:
        raise ProtocolError("naive datetime given; the protocol needs UTC-aware times")
    return when.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_session_id(session_id: str) -> str:
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        raise ProtocolError(f"{session_id!r} is not a session id (letters, digits, '.', '_', '-'; "
                            "at most 100 characters)")
    return session_id


def tenant_folder(tenant: str) -> str:
    """A tenant name as one safe, distinct folder name (percent-encoded; never ``..`` or ``/``)."""
    if not isinstance(tenant, str) or not tenant:
        raise ProtocolError("a session protocol needs a tenant name")
    name = quote(tenant, safe="")  # keeps only letters, digits, "_.-~"
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > 200:  # file names stop at 255 bytes; keep distinct names distinct
        name = name[:180] + "~" + hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return name


def tenant_name(folder: str) -> str:
    """The tenant name a folder stands for (best effort for shortened names)."""
    return unquote(folder)


def _clean_event(event: dict) -> dict:
    if not isinstance(event, dict):
        raise ProtocolError("an event is a mapping with kind, actor, address and detail")
    unknown = set(event) - EVENT_FIELDS
    if unknown:
        raise ProtocolError(f"an event may not set {', '.join(sorted(unknown))} (the server "
                            "stamps seq, time, session and the chain)")
    kind, actor = event.get("kind"), event.get("actor")
    address, detail = event.get("address"), event.get("detail") or {}
    if not isinstance(kind, str) or not 0 < len(kind) <= 50:
        raise ProtocolError(f"event kind {kind!r}: expected text of 1 to 50 characters")
    if not isinstance(actor, str) or not 0 < len(actor) <= 255:
        raise ProtocolError(f"event actor {actor!r}: expected text of 1 to 255 characters")
    if address is not None and (not isinstance(address, str) or len(address) > 255):
        raise ProtocolError(f"event address {address!r}: expected text of at most 255 characters")
    if not isinstance(detail, dict):
        raise ProtocolError("event detail must be a mapping")
    try:  # plain JSON values only, and canonical(loads(canonical(x))) == canonical(x)
        detail = json.loads(canonical(detail))
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"event detail is not plain JSON: {exc}") from None
    return {"kind": kind, "actor": actor, "address": address, "detail": detail}


# --- locks ----------------------------------------------------------------------------------

class _KeyedLocks:
    """One lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[Any, list] = {}  # key -> [lock, users]

    def hold(self, key: Any) -> "_Held":
        return _Held(self, key)

    def _acquire(self, key: Any) -> None:
        with self._mutex:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        entry[0].acquire()

    def _release(self, key: Any) -> None:
        with self._mutex:
            entry = self._locks[key]
            entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]


class _Held:
    def __init__(self, locks: _KeyedLocks, key: Any) -> None:
        self.locks, self.key = locks, key

    def __enter__(self) -> None:
        self.locks._acquire(self.key)

    def __exit__(self, *exc: Any) -> None:
        self.locks._release(self.key)


def _flock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_files(opened: list[tuple[int, int]], outcomes: list) -> None:
    """A group commit's files made durable, (outcome index, fd) each: a file that cannot be
    fsynced makes its session's outcome that error, the others stand."""
    for index, fd in opened:
        try:
            os.fsync(fd)
        except OSError as exc:
            outcomes[index] = exc


def _close_files(opened: list[tuple[int, int]]) -> None:
    for _, fd in opened:
        os.close(fd)


def _fsync_new_folders(new_in: dict[Path, list[int]], outcomes: list) -> None:
    """Every folder that got a new file fsynced once; if that fails, every session whose file
    is new there fails (its file's name may not survive a crash)."""
    for folder, indices in new_in.items():
        try:
            _fsync_dir(folder)
        except OSError as exc:
            for index in indices:
                outcomes[index] = exc


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_append(path: Path) -> tuple[int, bool]:
    """Open ``path`` for appending (created with mode 0640); returns (fd, created)."""
    flags = os.O_RDWR | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return os.open(path, flags), False
    os.fchmod(fd, FILE_MODE)  # exactly 0640, whatever the umask
    return fd, True


def _make_dir(folder: Path) -> None:
    """Create ``folder`` and missing parents with mode 0750 (existing folders keep theirs)."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        try:
            created.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(created, DIR_MODE)
        _fsync_dir(created.parent)


# --- the writer -----------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionSummary:
    """What ``finish`` records about an ended session (protocol ``ended`` line and CSV row)."""

    session_id: str
    kind: str
    started_at: dt.datetime | None
    ended_at: dt.datetime
    supporter: str | None
    customer_or_host: str | None
    bytes_to_peer: int = 0
    bytes_to_supporter: int = 0
    end_reason: str = ""
    #: ``protocol.session_end``: the cause and the party that ended the session
    end_cause: str = ""
    ended_by: str = ""

    @property
    def duration_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return max(0.0, (self.ended_at - self.started_at).total_seconds())

    @classmethod
    def from_row(cls, row: Any, now: Clock = utcnow) -> "SessionSummary":
        """From a ``server.db.models.Session`` row (after ``record_session_end`` wrote it)."""
        peer = row.peer_identity or (f"customer@{row.peer_address}" if row.peer_address else None)
        return cls(session_id=row.id, kind=row.kind, started_at=row.started_at or row.created_at,
                   ended_at=row.ended_at or now(), supporter=row.supporter_identity,
                   customer_or_host=peer, bytes_to_peer=row.bytes_to_peer or 0,
                   bytes_to_supporter=row.bytes_to_supporter or 0,
                   end_reason=row.end_reason or "",
                   end_cause=getattr(row, "end_cause", None) or "",
                   ended_by=getattr(row, "ended_by", None) or "")


def csv_text(value: Any) -> str:
    """A CSV cell that a spreadsheet shows as text, never runs as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class ProtocolWriter:
    """Appends events to session protocol files under ``protocol_dir`` (blocking calls)."""

    def __init__(self, protocol_dir: Path, clock: Clock = utcnow, index_size: int = 10_000) -> None:
        self.protocol_dir = Path(protocol_dir)
        self.clock = clock
        self.index_size = index_size
        self._index: collections.OrderedDict[tuple[str, str], Path] = collections.OrderedDict()
        self._index_lock = threading.Lock()
        self._locks = _KeyedLocks()  # one per (tenant folder, session id)
        self._csv_locks = _KeyedLocks()  # one per tenant folder

    # -- where a session's file is

    def locate(self, tenant: str, session_id: str) -> Path | None:
        """The protocol file of a session, or None if it has none yet."""
        check_session_id(session_id)
        return self._find(tenant_folder(tenant), session_id, self.clock())

    def _remember(self, key: tuple[str, str], path: Path) -> None:
        with self._index_lock:
            self._index[key] = path
            self._index.move_to_end(key)
            while len(self._index) > self.index_size:
                self._index.popitem(last=False)

    def _find(self, folder: str, session_id: str, now: dt.datetime) -> Path | None:
        """Memory first; then this month, last month, and every month on disk (newest first)."""
        key = (folder, session_id)
        with self._index_lock:
            known = self._index.get(key)
        if known is not None and known.exists():
            return known
        base = self.protocol_dir / folder
        name = f"{session_id}.jsonl"
        now = now.astimezone(dt.timezone.utc)
        last_month = now.replace(day=1) - dt.timedelta(days=1)
        likely = [(f"{now:%Y}", f"{now:%m}"), (f"{last_month:%Y}", f"{last_month:%m}")]
        for year, month in likely + [m for m in self._months(base) if m not in likely]:
            candidate = base / year / month / name
            if candidate.is_file():
                self._remember(key, candidate)
                return candidate
        return None

    @staticmethod
    def _months(base: Path) -> list[tuple[str, str]]:
        months = []
        try:
            years = [e.name for e in os.scandir(base) if e.is_dir() and _YEAR.match(e.name)]
        except FileNotFoundError:
            return []
        for year in years:
            months += [(year, e.name) for e in os.scandir(base / year)
                       if e.is_dir() and _MONTH.match(e.name)]
        return sorted(months, reverse=True)

    def _path(self, folder: str, session_id: str, now: dt.datetime) -> Path:
        found = self._find(folder, session_id, now)
        if found is not None:
            return found
        return self._new_path(folder, session_id, now)

    def _new_path(self, folder: str, session_id: str, now: dt.datetime) -> Path:
        now = now.astimezone(dt.timezone.utc)
        path = self.protocol_dir / folder / f"{now:%Y}" / f"{now:%m}" / f"{session_id}.jsonl"
        _make_dir(path.parent)
        return path

    # -- appending

    def append(self, tenant: str, session_id: str, event: dict) -> dict:
        """Append one event (kind, actor, address, detail) to the session's protocol.

        Returns the record as written (with seq, time, session, prev and hash).  The line is on
        disk (fsynced) when this returns.
        """
        return self.append_many(tenant, session_id, [event])[0]

    def append_many(self, tenant: str, session_id: str, events: list[dict]) -> list[dict]:
        """Append several events in order with one write and one fsync: all of them are on disk
        when this returns, or (an error) none was written.  A session's first lines (created,
        joined) cost one fsync instead of one each."""
        check_session_id(session_id)
        folder = tenant_folder(tenant)
        clean = [_clean_event(event) for event in events]
        if any(c["kind"] == ENDED and c["actor"] == SERVER for c in clean):
            raise ProtocolError("the server's 'ended' line is written by finish(), once per session")
        if not clean:
            return []
        with self._locks.hold((folder, session_id)):
            now = self.clock()
            path = self._path(folder, session_id, now)
            records = self._append_to(path, session_id, clean, now)
            self._remember((folder, session_id), path)
            return records

    def _append_to(self, path: Path, session_id: str, events: list[dict],
                   now: dt.datetime) -> list[dict]:
        fd, created, records = self._write_lines(path, session_id, events, now)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(path.parent)
        return records

    def _write_lines(self, path: Path, session_id: str, events: list[dict],
                     now: dt.datetime) -> tuple[int, bool, list[dict]]:
        """Write the events' lines (not yet fsynced); returns the still open file (its ``flock``
        held until it is closed), whether it was created, and the records."""
        fd, created = _open_append(path)
        try:
            _flock(fd)
            seq, prev, unterminated = _tail_state(fd, session_id)
            records, lines = [], [b"\n"] if unterminated else []
            for event in events:
                record = {"seq": seq, "time": format_time(now), "session": session_id, **event,
                          "prev": prev}
                record["hash"] = line_hash(record)
                line = canonical(record) + b"\n"
                if len(line) > MAX_LINE_BYTES:
                    raise ProtocolError(f"event {event['kind']!r} is {len(line)} bytes as a "
                                        f"protocol line; at most {MAX_LINE_BYTES} are allowed")
                records.append(record)
                lines.append(line)
                seq, prev = seq + 1, hashlib.sha256(line).hexdigest()
            # a line cut off by a crash stays as it is (verify reports it); the chain goes on
            _write_all(fd, b"".join(lines))
        except BaseException:
            os.close(fd)
            raise
        return fd, created, records

    def append_batch(self, batch: list[tuple[str, str, list[dict]]],
                     fresh: bool = False) -> list[list[dict] | Exception]:
        """Several sessions' events, (tenant, session id, events) each: a group commit.
        ``fresh``: the sessions were created just now (their first lines), so their files
        belong in this month's folder and no other month is searched for them.

        Every file's lines are written first, then every file is fsynced and every folder that
        got a new file is fsynced once (the first fsync's journal commit carries the others'
        metadata; one folder fsync covers all new files in it).  Returns per session its records,
        or the exception that kept its lines from being written or made durable — a session
        whose outcome is an exception must not start (its lines may or may not be on disk).
        When this returns, the lines of every session with records are on disk."""
        outcomes: list[list[dict] | Exception] = []
        opened: list[tuple[int, int]] = []  # (index in outcomes, fd)
        new_in: dict[Path, list[int]] = {}
        try:
            for tenant, session_id, events in batch:
                try:
                    check_session_id(session_id)
                    folder = tenant_folder(tenant)
                    clean = [_clean_event(event) for event in events]
                    if any(c["kind"] == ENDED and c["actor"] == SERVER for c in clean):
                        raise ProtocolError("the server's 'ended' line is written by finish(), "
                                            "once per session")
                    with self._locks.hold((folder, session_id)):
                        now = self.clock()
                        path = (self._new_path(folder, session_id, now) if fresh
                                else self._path(folder, session_id, now))
                        fd, created, records = self._write_lines(path, session_id, clean, now)
                        self._remember((folder, session_id), path)
                except Exception as exc:
                    outcomes.append(exc)
                    continue
                opened.append((len(outcomes), fd))
                if created:
                    new_in.setdefault(path.parent, []).append(len(outcomes))
                outcomes.append(records)
            _fsync_files(opened, outcomes)
        finally:
            _close_files(opened)
        _fsync_new_folders(new_in, outcomes)
        return outcomes

    # -- ending

    def finish(self, tenant: str, session: SessionSummary | Any, by: str | None = None) -> dict:
        """Record a session's end: an ``ended`` line (actor ``server``) and a ``sessions.csv`` row.

        ``session`` is a ``SessionSummary`` or a ``sessions`` row; ``by`` says who ended it (an
        identity, ``relay``, ...), the summary's ``end_reason`` why.  Calling it again for the
        same session adds nothing (returns the ``ended`` record already written).
        """
        summary = session if isinstance(session, SessionSummary) else SessionSummary.from_row(
            session, self.clock)
        check_session_id(summary.session_id)
        folder = tenant_folder(tenant)
        with self._locks.hold((folder, summary.session_id)):
            now = self.clock()
            path = self._path(folder, summary.session_id, now)
            existing = _server_ended(path)
            if existing is None:
                record, = self._append_to(path, summary.session_id,
                                          [_ended_event(summary, by)], now)
                self._remember((folder, summary.session_id), path)
            else:
                record = existing
            # a crash between the two writes leaves the row missing: a repeated finish adds it
            self._csv_row(folder, summary, check_first=existing is not None)
        return record

    def finish_batch(self, batch: list[tuple[str, SessionSummary, str | None]]
                     ) -> list[tuple[dict, str] | Exception]:
        """``finish`` for several sessions, (tenant, summary, by) each, as a group commit: every
        ``ended`` line written, then each file fsynced, then each tenant's CSV rows in one write
        and one fsync.  Returns per session its ``ended`` record and its file relative to the
        protocol folder, or the exception that kept its end from being recorded."""
        outcomes: list[tuple[dict, str] | Exception] = []
        opened: list[tuple[int, int]] = []
        new_in: dict[Path, list[int]] = {}
        rows: dict[str, list[tuple[int, SessionSummary, bool]]] = {}
        try:
            for tenant, summary, by in batch:
                try:
                    check_session_id(summary.session_id)
                    folder = tenant_folder(tenant)
                    with self._locks.hold((folder, summary.session_id)):
                        now = self.clock()
                        path = self._path(folder, summary.session_id, now)
                        existing = _server_ended(path)
                        if existing is None:
                            fd, created, (record,) = self._write_lines(
                                path, summary.session_id, [_ended_event(summary, by)], now)
                            self._remember((folder, summary.session_id), path)
                            opened.append((len(outcomes), fd))
                            if created:
                                new_in.setdefault(path.parent, []).append(len(outcomes))
                        else:
                            record = existing
                except Exception as exc:
                    outcomes.append(exc)
                    continue
                rows.setdefault(folder, []).append((len(outcomes), summary, existing is not None))
                outcomes.append((record, str(path.relative_to(self.protocol_dir))))
            _fsync_files(opened, outcomes)
        finally:
            _close_files(opened)
        _fsync_new_folders(new_in, outcomes)
        for folder, entries in rows.items():
            # a crash between the two writes leaves rows missing: a repeated finish adds them
            entries = [e for e in entries if not isinstance(outcomes[e[0]], Exception)]
            try:
                self._csv_rows(folder, [(summary, again) for _, summary, again in entries])
            except OSError as exc:
                for index, _, _ in entries:
                    outcomes[index] = exc
        return outcomes

    def _csv_row(self, folder: str, summary: SessionSummary, check_first: bool) -> None:
        self._csv_rows(folder, [(summary, check_first)])

    def _csv_rows(self, folder: str, summaries: list[tuple[SessionSummary, bool]]) -> None:
        """Append the billing rows of ended sessions (``check_first``: only if not there yet,
        for a repeated finish) with one write and one fsync."""
        if not summaries:
            return
        path = self.protocol_dir / folder / CSV_NAME
        with self._csv_locks.hold(folder):
            _make_dir(path.parent)
            fd, created = _open_append(path)
            try:
                _flock(fd)
                size = os.fstat(fd).st_size
                out = io.StringIO()
                writer = csv.writer(out)
                if size == 0:
                    writer.writerow(CSV_HEADER)
                for summary, check_first in summaries:
                    if check_first and size and _csv_has(fd, summary.session_id):
                        continue
                    writer.writerow([
                        summary.session_id, csv_text(summary.kind),
                        format_time(summary.started_at) if summary.started_at else "",
                        format_time(summary.ended_at), f"{summary.duration_s:.3f}",
                        csv_text(summary.supporter), csv_text(summary.customer_or_host),
                        int(summary.bytes_to_peer), int(summary.bytes_to_supporter),
                        csv_text(summary.end_reason)])
                data = out.getvalue().encode("utf-8")
                if not data:
                    return
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(path.parent)


def _ended_event(summary: SessionSummary, by: str | None) -> dict:
    """The server's ``ended`` line of a session (``ProtocolWriter.finish``)."""
    return {"kind": ENDED, "actor": SERVER, "address": None, "detail": {
        "by": by, "reason": summary.end_reason, "kind": summary.kind,
        **({"cause": summary.end_cause, "ended_by": summary.ended_by}
           if summary.end_cause else {}),
        "started": format_time(summary.started_at) if summary.started_at else None,
        "ended": format_time(summary.ended_at),
        "duration_s": round(summary.duration_s, 3),
        "bytes_to_peer": summary.bytes_to_peer,
        "bytes_to_supporter": summary.bytes_to_supporter,
        "supporter": summary.supporter, "customer_or_host": summary.customer_or_host,
    }}


def _tail_state(fd: int, session_id: str) -> tuple[int, str, bool]:
    """(next seq, prev for the next line, whether the file ends inside a line) of an open file."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 1, genesis(session_id), False
    chunk, end, data = 64 * 1024, size, b""
    while end > 0:  # read backwards until the last line is whole
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start) + data
        end = start
        if b"\n" in data[:-1]:  # the start of the last line is in
            break
    unterminated = not data.endswith(b"\n")
    body = data if unterminated else data[:-1]
    last = body[body.rfind(b"\n") + 1:]
    prev = hashlib.sha256(last + b"\n").hexdigest()
    seq = None
    try:
        parsed = json.loads(last)
        if isinstance(parsed, dict) and type(parsed.get("seq")) is int:
            seq = parsed["seq"] + 1
    except ValueError:
        pass
    if seq is None:  # a damaged last line: number on by counting the lines
        lines = 0
        offset = 0
        while offset < size:
            block = os.pread(fd, 1 << 20, offset)
            lines += block.count(b"\n")
            offset += len(block)
        seq = lines + (2 if unterminated else 1)
    return seq, prev, unterminated


def _server_ended(path: Path) -> dict | None:
    """The ``ended`` record ``finish`` wrote into this file, if any."""
    if not path.exists():
        return None
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") == ENDED and record.get("actor") == SERVER:
                return record
    return None


def _csv_has(fd: int, session_id: str) -> bool:
    with os.fdopen(os.dup(fd), "r", encoding="utf-8", newline="") as fh:
        fh.seek(0)
        return any(row and row[0] == session_id for row in csv.reader(fh))


# --- verifying ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    file: Path
    line: int  # 0: the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{self.file}: {where}{self.message}"


@dataclass
class VerifyResult:
    files: int = 0
    events: int = 0
    problems: list[Problem] = field(default_factory=list)
    #: intact files without the server's ``ended`` line (running sessions, or a cut-off tail)
    unended: list[Path] = field(default_factory=list)
    #: files whose end was checked against the database's record of it
    anchored: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        if self.ok:
            anchored = f", {self.anchored} ends match the database" if self.anchored else ""
            return f"{self.files} files, {self.events} events, chains intact{anchored}"
        more = len(self.problems) - 1
        return str(self.first) + (f" (and {more} more bad file{'s' if more > 1 else ''})" if more else "")


_EDITED = "the line was edited after it was written"


def _check_record(n: int, raw: bytes, session: str | None, prev: str) -> tuple[dict | None, str | None]:
    """Check line ``n`` (bytes without its ``\\n``); (record, None) or (None, what is wrong)."""
    if not raw:
        return None, "empty line (the file was edited after it was written)"
    try:
        record = json.loads(raw)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        return None, f"not valid JSON ({reason}; {_EDITED})"
    if not isinstance(record, dict):
        return None, f"not a JSON object ({_EDITED})"
    missing, extra = FIELDS - set(record), set(record) - FIELDS
    if missing or extra:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unexpected {', '.join(sorted(extra))}"] if extra else [])
        return None, f"fields wrong: {'; '.join(parts)} ({_EDITED})"
    types_ok = (type(record["seq"]) is int and all(isinstance(record[k], str) for k in (
        "time", "session", "kind", "actor", "prev", "hash")) and isinstance(record["detail"], dict)
        and (record["address"] is None or isinstance(record["address"], str)))
    if not types_ok:
        return None, f"a field has the wrong type ({_EDITED})"
    try:
        form = canonical(record)
    except ValueError:
        form = b""
    if form != raw:
        return None, f"not in the canonical form the server writes ({_EDITED})"
    if not _SESSION_ID.match(record["session"]):
        return None, f"session {record['session']!r} is not a session id ({_EDITED})"
    if session is not None and record["session"] != session:
        return None, f"session is {record['session']}, the file's is {session} (a line of another file)"
    if record["hash"] != line_hash(record):
        return None, f"content does not match its hash ({_EDITED})"
    if record["seq"] != n:
        return None, (f"seq is {record['seq']}, expected {n} "
                      "(a line was removed, inserted or moved after it was written)")
    expected = genesis(record["session"]) if n == 1 else prev
    if record["prev"] != expected:
        if n == 1:
            return None, "prev is not the start of a chain (the file was edited after it was written)"
        return None, (f"prev does not match the hash of line {n - 1} "
                      "(the file was edited after it was written)")
    return record, None


def verify_file(path: Path) -> tuple[int, Problem | None, bool]:
    """(events, first problem or None, whether the server's ``ended`` line is there)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return 0, Problem(path, 0, f"cannot be read: {exc.strerror or exc}"), False
    if not data:
        return 0, Problem(path, 1, "missing: the file is empty (a protocol has at least one line)"), False
    lines = data.split(b"\n")
    complete = lines[:-1]  # the element after the last "\n" is b"" for an intact file
    session, prev, ended, count = None, "", False, 0
    for n, raw in enumerate(complete, 1):
        record, problem = _check_record(n, raw, session, prev)
        if problem:
            return count, Problem(path, n, problem), ended
        session, prev, count = record["session"], hashlib.sha256(raw + b"\n").hexdigest(), n
        ended = ended or (record["kind"] == ENDED and record["actor"] == SERVER)
    if lines[-1]:
        n = len(lines)
        return count, Problem(path, n, "incomplete: the line has no end (the file was truncated "
                                       "or a write was cut off)"), ended
    return count, None, ended


def _walk(path: Path) -> tuple[list[Path], list[Problem]]:
    """Every ``*.jsonl`` below a folder, and the folders that could not be read."""
    unreadable: list[Problem] = []
    files = []

    def failed(exc: OSError) -> None:
        unreadable.append(Problem(Path(exc.filename or path), 0,
                                  f"folder cannot be read: {exc.strerror or exc}"))

    for folder, _dirs, names in os.walk(path, onerror=failed):
        files += [Path(folder, n) for n in names if n.endswith(".jsonl")]
    return sorted(f for f in files if f.is_file()), unreadable


def protocol_files(path: Path) -> list[Path]:
    """A protocol file itself, or every ``*.jsonl`` below a folder."""
    path = Path(path)
    return _walk(path)[0] if path.is_dir() else [path]


def check_anchor(path: Path, seq: int, expected_hash: str) -> Problem | None:
    """Compare the file with the end the database recorded (``sessions.protocol_end_*``).

    The chain alone cannot tell a file whose last lines were cut off, or rewritten with a fresh
    chain from some line on, from an intact one; the recorded ``ended`` line can.
    """
    count = 0
    for n, record in records(Path(path)):
        count = n
        if n == seq:
            if record is None or record.get("hash") != expected_hash:
                return Problem(Path(path), seq, "is not the line the database recorded as the "
                               "session's end: the file was rewritten from here or earlier")
            return None
    return Problem(Path(path), 0, f"ends after line {count}, but the database recorded line {seq} "
                   "as the session's end: lines were removed from the end of the file")


def verify(path: Path, anchors: dict[str, tuple[int, str]] | None = None) -> VerifyResult:
    """Check one protocol file, or every ``*.jsonl`` below a folder; ``anchors`` (session id →
    recorded ``ended`` seq and hash, from the database) also checks how each file ends."""
    result = VerifyResult()
    path = Path(path)
    if not path.exists():
        result.problems.append(Problem(path, 0, "does not exist"))
        return result
    files, unreadable = _walk(path) if path.is_dir() else ([path], [])
    result.problems += unreadable
    for file in files:
        events, problem, ended = verify_file(file)
        result.files += 1
        result.events += events
        anchor = (anchors or {}).get(file.stem)
        if problem is None and anchor is not None:
            problem = check_anchor(file, *anchor)
            result.anchored += 1
        if problem:
            result.problems.append(problem)
        elif not ended:
            result.unended.append(file)
    return result


# --- reading --------------------------------------------------------------------------------

def find_session(protocol_dir: Path, session_id: str) -> list[Path]:
    """Every protocol file of a session id under the protocol folder (one per tenant)."""
    check_session_id(session_id)
    base = Path(protocol_dir)
    return sorted(p for p in base.glob(f"*/[0-9][0-9][0-9][0-9]/[0-9][0-9]/{session_id}.jsonl")
                  if p.is_file())


def _safe(text: str) -> str:
    """Text a terminal shows as it is: control characters (ESC, CSI, line breaks) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def display_value(value: Any, limit: int = 80) -> str:
    if isinstance(value, str):
        text = value if value and not re.search(r"[\s\"=]", value) else json.dumps(value, ensure_ascii=False)
    else:
        text = json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    text = _safe(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def records(path: Path) -> Iterator[tuple[int, dict | None]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            yield n, record if isinstance(record, dict) else None


#: detail keys shown first in a timeline (the rest follow alphabetically)
FIRST_KEYS = ("by", "reason", "right", "direction", "name", "size", "sha256", "code", "text")


def render(path: Path) -> str:
    """A readable timeline of one protocol file, with the result of verifying it."""
    path = Path(path)
    rows = []
    for n, record in records(path):
        if record is None:
            rows.append((str(n), "", "", "(unreadable line)", ""))
            continue
        actor = str(record.get("actor", ""))
        address = record.get("address")
        if address and address not in actor:
            actor += f" ({address})"
        time = str(record.get("time", "")).replace("T", " ").rstrip("Z")
        detail = record.get("detail") if isinstance(record.get("detail"), dict) else {}
        keys = [k for k in FIRST_KEYS if k in detail] + [k for k in detail if k not in FIRST_KEYS]
        details = " ".join(f"{_safe(k)}={display_value(detail[k])}" for k in keys
                           if detail[k] not in (None, ""))
        rows.append((_safe(str(record.get("seq", n))), _safe(time), _safe(actor),
                     _safe(str(record.get("kind", ""))), details))
    parents = path.resolve().parents
    in_layout = (len(parents) > 3 and _MONTH.match(parents[0].name)
                 and _YEAR.match(parents[1].name))
    folder = parents[2].name if in_layout else ""
    head = _safe(f"Session {path.stem}" + (f"  tenant {tenant_name(folder)}" if folder else "")
                 + f"  ({path})")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(
        ("#", "TIME (UTC)", "ACTOR", "EVENT"))]
    widths[2] = min(widths[2], 48)
    lines = [head, "  ".join(h.ljust(w) for h, w in zip(("#", "TIME (UTC)", "ACTOR", "EVENT"), widths))
             + "  DETAILS"]
    for row in rows:
        lines.append("  ".join([row[0].rjust(widths[0]), row[1].ljust(widths[1]),
                                row[2].ljust(widths[2]), row[3].ljust(widths[3]), row[4]]).rstrip())
    events, problem, ended = verify_file(path)
    if problem:
        lines.append(f"CHAIN BROKEN at line {problem.line}: {problem.message}" if problem.line
                     else f"CHAIN NOT CHECKED: {problem.message}")
    else:
        lines.append(f"{events} events, chain intact" + ("" if ended else ", session not ended yet"))
    return "\n".join(lines) + "\n"


def show(protocol_dir: Path, session_id: str) -> str:
    """The timeline of a session (``protocol show SESSION``); UnknownSession if it has no file."""
    files = find_session(protocol_dir, session_id)
    if not files:
        raise UnknownSession(f"no protocol for session {session_id} in {protocol_dir}")
    return "\n".join(render(path) for path in files)


# --- the server's entry point ---------------------------------------------------------------

class SessionProtocols:
    """What the server uses: record events, end sessions, find files.  Blocking calls (the
    ``*_async`` variants run them in the blocking pool and return Deferreds)."""

    def __init__(self, protocol_dir: Path, clock: Clock = utcnow) -> None:
        self.protocol_dir = Path(protocol_dir)
        self.writer = ProtocolWriter(self.protocol_dir, clock)

    def record(self, tenant: str, session_id: str, kind: str, actor: str,
               address: str | None = None, detail: dict | None = None) -> dict:
        """Append an event; ``actor`` is the sender's certificate identity, ``customer@<address>``
        or ``server``.  ProtocolError for an event the protocol cannot take."""
        return self.writer.append(tenant, session_id, {"kind": kind, "actor": actor,
                                                       "address": address, "detail": detail or {}})

    def record_many(self, tenant: str, session_id: str,
                    events: list[tuple[str, str, str | None, dict]]) -> list[dict]:
        """Append (kind, actor, address, detail) events with one fsync (see ``append_many``)."""
        return self.writer.append_many(tenant, session_id, [
            {"kind": kind, "actor": actor, "address": address, "detail": detail or {}}
            for kind, actor, address, detail in events])

    def record_batch(self, batch: list[tuple[str, str, list[tuple[str, str, str | None, dict]]]],
                     fresh: bool = False) -> list[list[dict] | Exception]:
        """(tenant, session id, events) for several sessions as one group commit (see
        ``ProtocolWriter.append_batch``; ``fresh``: sessions created just now); per session its
        records or its exception."""
        return self.writer.append_batch([
            (tenant, session_id, [{"kind": kind, "actor": actor, "address": address,
                                   "detail": detail or {}}
                                  for kind, actor, address, detail in events])
            for tenant, session_id, events in batch], fresh=fresh)

    def ended_batch(self, batch: list[tuple[str, SessionSummary, str | None]]
                    ) -> list[tuple[dict, str] | Exception]:
        """``ended`` for several sessions as one group commit (``ProtocolWriter.finish_batch``):
        per session its ``ended`` record and file (relative to the folder), or its exception."""
        return self.writer.finish_batch(batch)

    def ended(self, tenant: str, session: SessionSummary | Any, by: str | None = None) -> dict:
        """The session's ``ended`` line and CSV row (once; see ``ProtocolWriter.finish``)."""
        return self.writer.finish(tenant, session, by)

    def file_of(self, tenant: str, session_id: str) -> str | None:
        """The session's file relative to the protocol folder (for ``sessions.protocol_file``)."""
        path = self.writer.locate(tenant, session_id)
        return None if path is None else str(path.relative_to(self.protocol_dir))

    def record_async(self, *args: Any, **kwargs: Any):
        from protocol.runtime import run_blocking
        return run_blocking(self.record, *args, **kwargs)

    def ended_async(self, *args: Any, **kwargs: Any):
        from protocol.runtime import run_blocking
        return run_blocking(self.ended, *args, **kwargs)

    def verify(self, path: Path | None = None,
               anchors: dict[str, tuple[int, str]] | None = None) -> VerifyResult:
        return verify(self.protocol_dir if path is None else path, anchors)

    def show(self, session_id: str) -> str:
        return show(self.protocol_dir, session_id)


__all__ = ["ProtocolWriter", "SessionProtocols", "SessionSummary", "ProtocolError",
           "UnknownSession", "VerifyResult", "Problem", "verify", "verify_file", "show", "render",
           "find_session", "tenant_folder", "genesis", "canonical", "line_hash"]
