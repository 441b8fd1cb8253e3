"""Takes recording uploads over the module port and enforces the recording policy.

``RecordingStart`` resolves the policy (host group, else tenant, else ``recording.default_policy``)
and opens (or resumes) the recording; ``RecordingChunk`` writes file bytes at the end of what is
stored, after checking their framing with ``protocol.recording.Reader`` (no key needed);
``RecordingEnd`` and the end of the session finalise it: the trailing part of a cut-off upload is
dropped, the file's SHA-256 goes into the ``recordings`` row and, as a ``recording`` line, into
the session protocol's hash chain.

Under ``required`` a watchdog ends the session (``recording_failed``, both parties told) when no
recording has started, or an upload has been silent, for ``recording.stall_seconds``, and when
storage fails or the tenant's quota is used up (under ``on`` only the recording stops there).

An upload outlives its control connection and the server process: ``RecordingStart`` hands the
module a resume token (an HMAC of the recording id under the server's secret), and with it
``RecordingResume`` continues the upload over a new connection, also after the session ended and
after a server restart (the stored bytes are re-read and framed).  An upload whose recorder does
not come back within ``recording.resume_seconds`` is closed as incomplete: its last whole record
is kept, its hash goes into the protocol (after the ``ended`` line when the session is over).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from sqlalchemy import func, or_, select
from twisted.internet import defer, task
from twisted.logger import Logger

from protocol import control, recording
from protocol.runtime import run_blocking
from protocol.session_end import EndCause, EndReason

from ..db.models import Host, HostGroup, Recording, Session, Tenant
from . import keys
from .nodes import RecordingNodeCalls, RemoteUpload, session_facts
from .storage import FolderStorage, StorageFailed, location_of

log = Logger()

POLICIES = ("off", "on", "required")
END_GRACE_SECONDS = 3.0


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Upload:
    """One recording being uploaded."""

    id: str
    session_id: str
    tenant: str
    party: str
    policy: str
    location: str
    size: int
    reader: recording.Reader
    last_chunk: float
    lock: defer.DeferredLock = field(default_factory=defer.DeferredLock)
    ended: bool = False
    failed: str | None = None
    finished: defer.Deferred | None = None
    owner: Any = None  # the control connection (or its identity) that uploads it
    owner_gone: bool = False  # that connection was lost: the recorder may come back (resume)
    tenant_id: int | None = None
    #: several nodes: the node that set the session up and writes its protocol (None: this one)
    session_node: str | None = None
    told_at: float = 0.0  # when that node last heard the upload moves (``rec_alive``)


@dataclass
class Watch:
    """A live session whose policy is known."""

    policy: str
    since: float


class RecordingReceiver(RecordingNodeCalls):
    def __init__(self, db, config, storage: FolderStorage, broker, reactor,
                 blocking: Callable[..., defer.Deferred] = run_blocking,
                 resume_secret: bytes | None = None) -> None:
        self.db = db
        self.config = config
        self.storage = storage
        self.broker = broker
        self.reactor = reactor
        self.blocking = blocking
        self.uploads: dict[str, Upload] = {}
        self.watched: dict[str, Watch] = {}
        self._resolving: set[str] = set()
        self._loop: task.LoopingCall | None = None
        self.stall_seconds = config.recording.stall_seconds
        self.resume_seconds = config.recording.resume_seconds
        self.quota_bytes = int(config.recording.quota_mib * (1 << 20))
        # a secret that survives a restart (the relay token secret file), so a token stays good
        self._resume_key = hmac.new(resume_secret or os.urandom(32),
                                    b"hausmeister recording resume v1", hashlib.sha256).digest()
        self._usage: dict[int, int] = {}     # tenant id -> recording bytes stored (quota)
        self._started_at = reactor.seconds()
        self._orphans_closed = False
        # several nodes on one database: this node closes only what its own sessions left open
        self.node = config.cluster.node_name if config.cluster.enabled else None
        self.bus = None  # server.cluster.NodeBus (``attach_bus``)
        #: uploads other nodes store for this node's sessions (``server.recordings.nodes``)
        self.remote: dict[str, RemoteUpload] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        keys.ensure(self.config.server.cert_dir)
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.reactor
        self._loop.start(min(1.0, self.stall_seconds / 4), now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    # --- RecordingStart -------------------------------------------------------------------------

    def resume_token(self, recording_id: str) -> str:
        return hmac.new(self._resume_key, recording_id.encode(), hashlib.sha256).hexdigest()

    @defer.inlineCallbacks
    def start_recording(self, conn, session_id: str, presenting: bool = False):
        live = self.broker.sessions.get(session_id)
        party = live.party_of(conn) if live is not None else None
        session_node, tenant = None, live.tenant if live is not None else ""
        if party is None:
            # several nodes: a party connected here of a session another node set up (the
            # host or customer; the supporter is always on the session's node)
            remote = self.broker.remote_parties.get(session_id)
            facts = None
            if self.bus is not None and remote is not None and remote[1] is conn:
                facts = yield self.db.run(session_facts, session_id)
            if facts is None:
                raise control.Forbidden("you are not a party of this live session")
            session_node, tenant = remote[0], facts["tenant"]
            party = "customer" if facts["kind"] == "adhoc" else "host"
        policy, tenant_id = yield self.db.run(_policy_of, session_id,
                                              self.config.recording.default_policy)
        if session_node is None:  # the session's node watches it (there: ``rec_line``)
            self.watched.setdefault(session_id, Watch(policy, self.reactor.seconds()))
            self.watched[session_id].policy = policy
        if party == "supporter" and not self.config.recording.supporter_records and not presenting:
            policy = "off"  # the side that shows records; the supporter only if configured
        answer = {"policy": policy, "input": self.config.recording.input, "recording_id": "",
                  "next_offset": 0, "public_keys": "[]", "max_chunk": control.MAX_RECORDING_CHUNK,
                  "stall_seconds": self.stall_seconds,
                  "buffer_bytes": self.config.recording.module_buffer_mib << 20}
        if policy == "off":
            return answer
        problem = yield self.blocking(self._storage_problem, tenant_id)
        public: list = []
        if problem is None:
            try:
                public = keys.public_keys(self.config.server.cert_dir,
                                          self.config.recording.auditor_key)
            except keys.KeyProblem as exc:
                problem = str(exc)
        if problem is not None:
            yield self._refuse(session_id, session_node, policy, problem)
            if policy != "required":  # 'on': the session goes on unrecorded (logged above)
                return {**answer, "policy": "off"}
            raise control.RecordingRefused(f"the server cannot store recordings: {problem}")
        existing = next((u for u in self.uploads.values()
                         if u.session_id == session_id and u.party == party and not u.ended), None)
        if existing is None:
            row = yield self.db.run(_find, session_id, party)
            if row is not None and row["status"] == "uploading":
                existing = yield self._resume(row, tenant)
            elif row is not None:  # closed already (its recorder went silent): not reopened
                why = f"the {party}'s recording of this session was already closed ({row['status']})"
                yield self._refuse(session_id, session_node, policy, why)
                if policy != "required":
                    return {**answer, "policy": "off"}
                raise control.RecordingRefused(why)
        if existing is None:
            now = utcnow()
            upload = Upload(str(uuid.uuid4()), session_id, tenant, party, policy,
                            location_of(tenant, session_id, party, now), 0,
                            recording.Reader(), self.reactor.seconds(), tenant_id=tenant_id,
                            session_node=session_node)
            yield self.db.run(_create, upload, tenant_id, self.storage.kind,
                              recording.key_id(public[0]), now)
            self.uploads[upload.id] = upload
            started = self.line(session_id, tenant, session_node, "recording_started", {
                "recording_id": upload.id, "party": party, "policy": policy,
                "key_id": recording.key_id(public[0]),
                "auditor_key_id": recording.key_id(public[1]) if len(public) > 1 else ""})
            if self.elsewhere(session_node):
                # the session's node writes the line (and watches the upload from now on):
                # a recording its protocol cannot name is not taken
                try:
                    yield started
                except Exception as exc:
                    why = f"the session's server node could not record the recording's start: {exc}"
                    yield upload.lock.run(self._give_up, upload, why)
                    if policy != "required":
                        return {**answer, "policy": "off"}
                    raise control.RecordingRefused(why)
            else:
                started.addErrback(lambda f: log.failure("could not write recording_started", f))
            log.info("session {session_id}: the {party} records ({policy}), recording {rid}"
                     "{where}", session_id=session_id, party=party, policy=policy, rid=upload.id,
                     where=f" for node {session_node}" if session_node else "")
            existing = upload
        existing.last_chunk = self.reactor.seconds()
        existing.owner, existing.owner_gone = conn, False
        self.tell_alive(existing, force=True)
        answer.update(recording_id=existing.id, next_offset=existing.size,
                      public_keys=json.dumps([recording.public_pem(k) for k in public]),
                      resume_token=self.resume_token(existing.id), split_keys=len(public) > 1)
        return answer

    def _quota_text(self) -> str:
        return (f"the tenant's recording quota ({self.config.recording.quota_mib:g} MiB) is used "
                "up: raise recording.quota_mib or delete old recordings")

    def _storage_problem(self, tenant_id: int | None) -> str | None:
        problem = self.storage.probe()
        if problem is None and self.quota_bytes and tenant_id is not None:
            used = self.db.call(_tenant_usage, tenant_id)
            self._usage[tenant_id] = used
            if used >= self.quota_bytes:
                problem = self._quota_text()
        return problem

    # --- RecordingResume ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def resume(self, conn, recording_id: str, token: str):
        """The recorder of ``recording_id`` is back on a new control connection (after a
        connection loss or a server restart): it sends on from the offset answered."""
        if not hmac.compare_digest(self.resume_token(recording_id), str(token)):
            raise control.Forbidden("this resume token is not the one of that recording")
        upload = self.uploads.get(recording_id)
        if upload is None:
            row = yield self.db.run(_find_by_id, recording_id)
            if row is None:
                raise control.WrongState("unknown recording")
            if row["status"] != "uploading":
                raise control.RecordingRefused(f"the recording was closed already ({row['status']}) "
                                               "while its recorder was away")
            upload = self.uploads.get(recording_id)  # resumed meanwhile by another call
            if upload is None:
                upload = yield self._resume(row, row["tenant"])
                if upload is None:
                    raise control.RecordingRefused("the stored part of the recording cannot be read")
                # several nodes: a node that held it lets it go; if this node set the session
                # up, the upload is its own again
                self.tell_moved(upload.id)
                self.remote.pop(upload.id, None)
            if self.quota_bytes and row["tenant_id"] is not None:
                self._usage[row["tenant_id"]] = yield self.db.run(_tenant_usage, row["tenant_id"])
        if upload.ended:
            raise control.RecordingRefused("the recording was closed already while its recorder "
                                           "was away")
        if upload.failed:
            raise control.RecordingRefused(upload.failed)
        upload.owner, upload.owner_gone = conn, False
        upload.last_chunk = self.reactor.seconds()
        self.tell_alive(upload, force=True)
        log.info("recording {rid} of session {session_id}: its recorder is back; resuming at byte "
                 "{size}", rid=upload.id, session_id=upload.session_id, size=upload.size)
        return {"next_offset": upload.size}

    def owner_lost(self, conn) -> None:
        """A control connection closed: its uploads wait ``resume_seconds`` for their recorder."""
        now = self.reactor.seconds()
        for upload in self.uploads.values():
            if upload.owner is conn and not upload.ended:
                upload.owner_gone = True
                upload.last_chunk = now

    @defer.inlineCallbacks
    def _resume(self, row: dict, tenant: str):
        """A recording the server was taking before it restarted: its stored bytes, re-framed.
        A record cut off at the end stays: it is a prefix of what the recorder sends on (the
        recorder resends from the stored size); finalising without it drops it."""
        reader = recording.Reader()
        size = 0
        try:
            for chunk in (yield self.blocking(lambda: list(self.storage.read(row["location"])))):
                reader.receive(chunk)
                size += len(chunk)
        except (StorageFailed, recording.RecordingError) as exc:
            log.warn("recording {rid} cannot be resumed ({why})", rid=row["id"], why=str(exc))
            return None
        upload = Upload(row["id"], row["session_id"], tenant, row["party"], row["policy"],
                        row["location"], size, reader, self.reactor.seconds(),
                        tenant_id=row["tenant_id"], session_node=row.get("session_node"))
        self.uploads[upload.id] = upload
        log.info("recording {rid} resumes at byte {size}", rid=upload.id, size=upload.size)
        return upload

    def _refuse(self, session_id: str, session_node: str | None, policy: str,
                problem: str) -> defer.Deferred:
        log.error("session {session_id}: recording refused: {problem}",
                  session_id=session_id, problem=problem)
        if policy != "required":
            return defer.succeed(None)
        if self.elsewhere(session_node):
            return self.end_elsewhere(session_id, session_node, problem)
        return self.broker.end_by_server(
            session_id, EndReason(EndCause.RECORDING_FAILED, "server", problem[:160]))

    @defer.inlineCallbacks
    def _give_up(self, upload: Upload, why: str):
        """A recording that could not start: its row is closed, nothing goes on."""
        upload.ended, upload.failed = True, why
        self.uploads.pop(upload.id, None)
        yield self.db.run(_close, upload.id, "incomplete", None, 0, 0, utcnow())
        log.error("recording {rid} of session {session_id} not taken: {why}", rid=upload.id,
                  session_id=upload.session_id, why=why)

    # --- RecordingChunk ---------------------------------------------------------------------------

    def chunk(self, conn, recording_id: str, offset: int, data: bytes) -> defer.Deferred:
        upload = self._own(conn, recording_id)
        if len(data) > control.MAX_RECORDING_CHUNK:
            raise control.WrongState(f"a recording chunk holds at most "
                                     f"{control.MAX_RECORDING_CHUNK} bytes")
        return upload.lock.run(self._write, upload, offset, data)

    @defer.inlineCallbacks
    def _write(self, upload: Upload, offset: int, data: bytes):
        if upload.failed:
            raise control.RecordingRefused(upload.failed)
        if upload.ended:
            raise control.WrongState("this recording is closed")
        if offset < 0 or offset > upload.size:
            return {"next_offset": upload.size}  # a gap: the module resends from here
        new = data[upload.size - offset:]
        upload.last_chunk = self.reactor.seconds()
        self.tell_alive(upload)
        if not new:
            return {"next_offset": upload.size}
        used = self._usage.get(upload.tenant_id) if upload.tenant_id is not None else None
        if self.quota_bytes and used is not None and used + len(new) > self.quota_bytes:
            why = self._quota_text()
            yield self._fail(upload, why)
            raise control.RecordingRefused(why)
        try:
            upload.reader.receive(new)
        except recording.RecordingError as exc:
            why = f"the uploaded recording is damaged at {exc}"
            yield self._fail(upload, why)
            raise control.RecordingRefused(why)
        try:
            yield self.blocking(self.storage.append, upload.location, upload.size, new)
        except StorageFailed as exc:
            yield self._fail(upload, str(exc))
            raise control.RecordingRefused(f"storage failed: {exc}")
        upload.size += len(new)
        if used is not None:
            self._usage[upload.tenant_id] = used + len(new)
        self.db.run(_progress, upload.id, upload.size, upload.reader.next_counter, utcnow()
                    ).addErrback(lambda f: log.failure("could not note recording progress", f))
        return {"next_offset": upload.size}

    def _own(self, conn, recording_id: str) -> Upload:
        upload = self.uploads.get(recording_id)
        if upload is None:
            raise control.WrongState("unknown recording: ask RecordingStart again")
        if conn is not upload.owner:  # also after the relay closed, until it is finalised
            raise control.Forbidden("this recording is not yours")
        return upload

    def _fail(self, upload: Upload, why: str) -> defer.Deferred:
        upload.failed = why
        log.error("recording {rid} of session {session_id} failed: {why}", rid=upload.id,
                  session_id=upload.session_id, why=why)
        if self.elsewhere(upload.session_node):
            if upload.policy != "required":
                return defer.succeed(None)
            return self.end_elsewhere(upload.session_id, upload.session_node, why)
        if self._policy(upload.session_id) == "required" and upload.session_id in self.broker.sessions:
            return self.broker.end_by_server(upload.session_id, EndReason(
                EndCause.RECORDING_FAILED, "server", why[:160]))
        return defer.succeed(None)

    def _policy(self, session_id: str) -> str:
        watch = self.watched.get(session_id)
        return watch.policy if watch else "off"

    # --- RecordingEnd and the session's end -------------------------------------------------------

    def end(self, conn, recording_id: str, size: int) -> defer.Deferred:
        upload = self._own(conn, recording_id)
        return upload.lock.run(self._finish, upload).addCallback(
            lambda row: {"sha256": row["sha256"] or "", "complete": row["status"] == "complete"})

    def session_ended(self, session_id: str) -> defer.Deferred:
        """The relay closed the session: give uploads a moment to finish, then finalise them (before
        the protocol's ``ended`` line is written).  An upload whose recorder lost its control
        connection stays open for ``resume_seconds``: the recorder may come back with the rest."""
        self.watched.pop(session_id, None)
        open_uploads = [u for u in self.uploads.values() if u.session_id == session_id]
        if not open_uploads:
            return defer.succeed(None)

        def waiting_for_resume(u: Upload) -> bool:
            return u.owner_gone and not u.reader.final and not u.ended

        def finalise(_=None):
            return defer.DeferredList([u.lock.run(self._finish, u) for u in open_uploads
                                       if not waiting_for_resume(u)], consumeErrors=True)

        @defer.inlineCallbacks
        def wait_then_finalise():
            # the recorder's last chunks and RecordingEnd may still be on their way
            deadline = self.reactor.seconds() + END_GRACE_SECONDS
            while (self.reactor.seconds() < deadline
                   and not all(u.reader.final or u.ended or waiting_for_resume(u)
                               for u in open_uploads)):
                yield task.deferLater(self.reactor, 0.1, lambda: None)
            yield finalise()
        return wait_then_finalise()

    @defer.inlineCallbacks
    def _finish(self, upload: Upload):
        if upload.ended:
            row = yield self.db.run(_find, upload.session_id, upload.party)
            return row
        upload.ended = True
        complete = upload.reader.final
        sha256, size = None, upload.size
        try:
            if upload.reader.trailing():
                yield self.blocking(self.storage.truncate, upload.location, upload.reader.whole_end)
            sha256, size = yield self.blocking(self.storage.finish, upload.location)
        except StorageFailed as exc:
            log.error("recording {rid}: {why}", rid=upload.id, why=str(exc))
            upload.failed = upload.failed or str(exc)
        status = "complete" if complete and not upload.failed else "incomplete"
        row = yield self.db.run(_close, upload.id, status, sha256, size,
                                upload.reader.next_counter, utcnow())
        self.uploads.pop(upload.id, None)
        detail = {"recording_id": upload.id, "party": upload.party, "status": status,
                  "sha256": sha256 or "", "size": size, "records": upload.reader.next_counter,
                  "storage": self.storage.kind, "location": upload.location}
        if upload.failed:
            detail["problem"] = upload.failed[:200]
        try:
            yield self.line(upload.session_id, upload.tenant, upload.session_node, "recording",
                            detail)
        except Exception as exc:
            log.error("recording {rid}: its hash could not go into the protocol: {why}",
                      rid=upload.id, why=str(exc))
        log.info("recording {rid} of session {session_id}: {status}, {size} bytes, sha256 {sha}",
                 rid=upload.id, session_id=upload.session_id, status=status, size=size,
                 sha=sha256)
        return row

    # --- the watchdog -----------------------------------------------------------------------------

    def check(self) -> None:
        """Periodic: under ``required``, a session without a live recording ends."""
        now = self.reactor.seconds()
        for session_id, live in list(self.broker.sessions.items()):
            watch = self.watched.get(session_id)
            if watch is None:
                if session_id not in self._resolving:
                    self._resolving.add(session_id)
                    d = self.db.run(_policy_of, session_id, self.config.recording.default_policy)
                    d.addCallback(lambda found, sid=session_id: self.watched.setdefault(
                        sid, Watch(found[0], now)))
                    d.addErrback(lambda f: log.failure("could not read a recording policy", f))
                    d.addBoth(lambda _, sid=session_id: self._resolving.discard(sid))
                continue
            if watch.policy != "required" or live.end is not None:
                continue
            uploads = [u for u in self.uploads.values() if u.session_id == session_id]
            uploads += self.remote_of(session_id)  # stored by other nodes (``rec_alive``)
            if not uploads:
                if now - watch.since > self.stall_seconds:
                    self._end(session_id, f"no recording started within {self.stall_seconds:g} s")
                continue
            for upload in uploads:
                if not upload.ended and now - upload.last_chunk > self.stall_seconds:
                    self._end(session_id, f"the {upload.party}'s recording upload stalled for "
                                          f"{now - upload.last_chunk:.0f} s")
                    break
        for session_id in list(self.watched):
            if session_id not in self.broker.sessions:
                self.watched.pop(session_id, None)
        self.take_over_orphans(now)
        self.forget_remote()
        # a recorder silent far beyond its keep-alives is gone (killed, or its session ended on
        # a separate relay process), and one whose connection was lost did not come back within
        # resume_seconds: what arrived is kept, marked incomplete
        silent_limit = max(60.0, 4 * self.stall_seconds)
        for upload in list(self.uploads.values()):
            away = upload.owner_gone or (upload.session_id not in self.broker.sessions
                                         and upload.session_id not in self.broker.remote_parties)
            limit = self.resume_seconds if away else silent_limit
            if not upload.ended and now - upload.last_chunk > limit:
                upload.lock.run(self._close_silent, upload, now).addErrback(
                    lambda f: log.failure("could not close a silent recording", f))
        if not self._orphans_closed and now - self._started_at > self.resume_seconds:
            self._orphans_closed = True
            self._close_orphans().addErrback(
                lambda f: log.failure("could not close recordings left open by the last run", f))

    @defer.inlineCallbacks
    def _close_silent(self, upload: Upload, now: float):
        if upload.ended or upload.id not in self.uploads:
            return None
        row = yield self.db.run(_find_by_id, upload.id)
        if row is not None and row["status"] == "uploading" and row["size"] != upload.size:
            # its recorder came back on another server node, which writes it now
            log.info("recording {rid} goes on at another node; this one lets it go", rid=upload.id)
            self.uploads.pop(upload.id, None)
            return None
        log.warn("recording {rid}: nothing for {s:.0f} s: closed as incomplete",
                 rid=upload.id, s=now - upload.last_chunk)
        return (yield self._finish(upload))

    @defer.inlineCallbacks
    def _close_orphans(self):
        """Uploads the last server run left open whose recorder did not come back within
        ``resume_seconds`` of this start: kept to their last whole record, incomplete."""
        # silent that long: an upload another node takes for one of this node's sessions moves
        rows = yield self.db.run(_open_rows, self.node,
                                 utcnow() - dt.timedelta(seconds=self.resume_seconds))
        for row in rows:
            if row["id"] in self.uploads:
                continue
            upload = yield self._resume(row, row["tenant"])
            if upload is None:
                yield self.db.run(_close, row["id"], "incomplete", None, row["size"],
                                  row["records"], utcnow())
                continue
            log.warn("recording {rid} of session {session_id}: its recorder did not come back "
                     "after the restart: closed as incomplete", rid=upload.id,
                     session_id=upload.session_id)
            yield upload.lock.run(self._finish, upload)

    @defer.inlineCallbacks
    def take_over(self, entry: RemoteUpload):
        """Close an upload a dead node stored for one of this node's sessions (unless it moved
        within ``resume_seconds``: its recorder went on somewhere)."""
        row = yield self.db.run(_find_by_id, entry.id)
        if row is None or row["status"] != "uploading":
            return None
        moved = row["last_chunk_at"] or row["started_at"]
        if moved > utcnow() - dt.timedelta(seconds=self.resume_seconds):
            entry.ended, entry.last_chunk = False, self.reactor.seconds()
            return None
        upload = yield self._resume(row, row["tenant"])
        if upload is None:
            yield self.db.run(_close, row["id"], "incomplete", None, row["size"], row["records"],
                              utcnow())
            return None
        log.warn("recording {rid} of session {session_id}: node {node}, which stored it, is gone "
                 "and its recorder did not come back: closed here as incomplete", rid=upload.id,
                 session_id=upload.session_id, node=entry.node)
        return (yield upload.lock.run(self._finish, upload))

    def _end(self, session_id: str, why: str) -> defer.Deferred:
        """Fires once the reason is in the session's row (what a relay process reads)."""
        log.error("session {session_id} ends: {why} (recording policy 'required')",
                  session_id=session_id, why=why)
        self.watched.pop(session_id, None)
        return self.broker.end_by_server(session_id, EndReason(EndCause.RECORDING_FAILED,
                                                               "server", why))


# --- database work ------------------------------------------------------------------------------

def _policy_of(session, session_id: str, default: str) -> tuple[str, int | None]:
    row = session.get(Session, session_id)
    if row is None:
        return default, None
    if row.host_id:
        host = session.get(Host, row.host_id)
        if host is not None and host.group_id is not None:
            group = session.get(HostGroup, host.group_id)
            if group is not None and group.recording_policy:
                return group.recording_policy, row.tenant_id
    if row.tenant_id is not None:
        tenant = session.get(Tenant, row.tenant_id)
        if tenant is not None and tenant.recording_policy:
            return tenant.recording_policy, row.tenant_id
    return default, row.tenant_id


def _as_dict(row: Recording) -> dict:
    return {c: getattr(row, c) for c in ("id", "session_id", "tenant_id", "party", "storage",
                                         "location", "key_id", "policy", "status", "size",
                                         "records", "sha256", "started_at", "ended_at",
                                         "last_chunk_at")}


def _with_tenant(session, row: Recording) -> dict:
    tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
    owner = session.get(Session, row.session_id)
    return {**_as_dict(row), "tenant": tenant.name if tenant else "default",
            "session_node": owner.node if owner is not None else None}


def _find_by_id(session, recording_id: str) -> dict | None:
    row = session.get(Recording, recording_id)
    return None if row is None else _with_tenant(session, row)


def _open_rows(session, node: str | None = None,
               silent_since: dt.datetime | None = None) -> list[dict]:
    query = select(Recording).where(Recording.status == "uploading")
    if silent_since is not None:  # no chunk (or no start) since then
        query = query.where(func.coalesce(Recording.last_chunk_at, Recording.started_at)
                            < silent_since)
    if node is not None:  # only what this node's sessions left open
        query = query.join(Session, Recording.session_id == Session.id).where(
            or_(Session.node == node, Session.node.is_(None)))
    return [_with_tenant(session, row) for row in session.scalars(query).all()]


def _find(session, session_id: str, party: str) -> dict | None:
    row = session.scalar(select(Recording).where(Recording.session_id == session_id,
                                                 Recording.party == party))
    return None if row is None else _as_dict(row)


def _create(session, upload: Upload, tenant_id, storage: str, key_id: str, now) -> None:
    session.add(Recording(id=upload.id, session_id=upload.session_id, tenant_id=tenant_id,
                          party=upload.party, storage=storage, location=upload.location,
                          key_id=key_id, policy=upload.policy, status="uploading", size=0,
                          records=0, started_at=now))


def _progress(session, recording_id: str, size: int, records: int, now) -> None:
    row = session.get(Recording, recording_id)
    if row is not None and row.status == "uploading":
        row.size, row.records, row.last_chunk_at = size, records, now


def _close(session, recording_id: str, status: str, sha256, size: int, records: int, now) -> dict:
    row = session.get(Recording, recording_id)
    row.status, row.sha256, row.size, row.records, row.ended_at = status, sha256, size, records, now
    return _as_dict(row)


def _tenant_usage(session, tenant_id: int) -> int:
    return session.scalar(select(func.coalesce(func.sum(Recording.size), 0))
                          .where(Recording.tenant_id == tenant_id)) or 0
