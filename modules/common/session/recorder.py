"""The session recorder of the module that shows its screen (issue 12).

Asks the server at the start of a session whether to record (``RecordingStart``); if so it writes
the ``.hmrec`` file with ``protocol.recording.Writer`` (encrypted here, for the operator's and an
auditor's key) from what the session really sends: the RFB server→client bytes as they leave,
the client→server messages a player needs, the session events and, if the policy asks, input.
The file bytes are uploaded while the session runs, one ``RecordingChunk`` (≤ 48 KiB) in flight
at a time, from a bounded buffer of unacknowledged bytes: a slow upload never stalls the screen;
a full buffer gives the recording up (and, under ``required``, ends the session with that
reason).  The server answers every chunk with the offset it expects next, so a resend after a
reconnect is harmless.

A lost control connection (or a server restart) does not lose the recording: the recorder keeps
what was not acknowledged (the FINAL record too, once its session ended) and, when the module is
connected again (``resume_waiting``), continues with ``RecordingResume`` from the offset the
server holds.  The side that shows records: a supporter that starts showing after a direction
change asks again (``presenting``) and records from there.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any, Callable

from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.protocols import amp

from protocol import control, recording

log = Logger()

FLUSH_SECONDS = 1.0
RESUME_WAIT_SECONDS = 60.0  # how long a module about to exit waits for a cut-off recording
UPLOAD_HIGH_WATER = 512 * 1024   # flush at once when this much plaintext waits

# recorders whose control connection was lost while they held bytes the server has not
# acknowledged: they go on with the next connection the module makes (``resume_waiting``)
_away: set["SessionRecorder"] = set()
# front-ends that say when a recording waits for the next connection (the host's window)
_watchers: list[Callable[[], None]] = []


def _connection_gone(conn, failure) -> bool:
    """Did this call fail because the control connection ended (not a refusal by the server)?
    AMP fails waiting calls with the connection's end reason before the connection's ``lost``
    fires; ``ControlClient.gone`` is set before that, whatever the reason's type."""
    return bool(failure.check(error.ConnectionClosed) or getattr(conn, "gone", False))


def watch_waiting(callback: Callable[[], None]) -> Callable[[], None]:
    """``callback()`` runs whenever a recorder starts waiting for the next connection; returns
    the function that stops it."""
    _watchers.append(callback)
    return lambda: callback in _watchers and _watchers.remove(callback)


def resume_waiting(conn) -> None:
    """The module is connected again: every recorder that lost its connection resumes on it."""
    for recorder in list(_away):
        recorder.reconnected(conn)


def waiting_count() -> int:
    return len(_away)


async def all_resumed(reactor, timeout: float = RESUME_WAIT_SECONDS) -> bool:
    """Wait (bounded) until no recorder waits any more; True if every one that waited sent its
    rest, False if one gave up or the time ran out."""
    waiting = set(_away)
    await settled(reactor, timeout)
    return not _away and not any(r.failed for r in waiting)


def settled(reactor, timeout: float) -> defer.Deferred:
    """Fires once no recorder holds bytes for a later connection (all resumed and closed, or
    given up), or after ``timeout`` seconds: a module that is about to exit waits with this."""
    deadline = reactor.seconds() + timeout

    def check():
        if not _away or reactor.seconds() >= deadline:
            return None
        return task.deferLater(reactor, 0.2, check)
    return defer.maybeDeferred(check)


async def send_the_rest(reactor, connect: Callable[[], Any],
                        timeout: float = RESUME_WAIT_SECONDS) -> bool:
    """A module whose own connection does not come back by itself (the ad-hoc customer, CLI and
    app alike): ``connect()`` makes a new control connection (``hello`` done), every recorder
    that lost its connection resumes on it; the server being away is retried with back-off.
    True once nothing is left to send; bounded by ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    delay = 0.5
    waiting = set(_away)
    while _away and reactor.seconds() < deadline:
        try:
            conn = await connect()
        except Exception as exc:  # the server is not back yet: try again a little later
            log.info("recording resume: no connection yet ({why})", why=str(exc))
            await task.deferLater(reactor, min(delay, max(0.0, deadline - reactor.seconds())),
                                  lambda: None)
            delay = min(delay * 2, 5.0)
            continue
        try:
            resume_waiting(conn)
            await settled(reactor, max(0.0, deadline - reactor.seconds()))
        finally:
            if conn.transport is not None:
                conn.transport.loseConnection()
    return not _away and not any(r.failed for r in waiting)


class SessionRecorder:
    def __init__(self, reactor, conn, session_id: str, party: str, *,
                 screen_size: tuple[int, int] = (0, 0), parties: dict | None = None,
                 on_failed: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reactor = reactor
        self.conn = conn
        self.session_id = session_id
        self.party = party
        self.screen_size = screen_size
        self.parties = parties or {}
        self.on_failed = on_failed
        self.clock = clock
        self.policy: str | None = None      # None until the server answered
        self.input_mode = "off"
        self.recording_id = ""
        self.writer: recording.Writer | None = None
        self.failed: str | None = None
        self.closed = False
        self._t0 = clock()
        self._buffer = bytearray()         # bytes not yet acknowledged, from offset self._acked
        self._acked = 0
        self._in_flight = False
        self._max_chunk = control.MAX_RECORDING_CHUNK
        self._limit = 64 << 20
        self._stall = 30.0
        self._last_record = clock()
        self._ready: list[defer.Deferred] = []
        self._drained: list[defer.Deferred] = []
        self._client_stream = recording.ClientStream()
        self._loop: task.LoopingCall | None = None
        self.bytes_recorded = 0
        self.resume_token = ""
        self.split_keys = False
        self._asked_presenting = False
        self._generation = 0     # bumped per connection: answers from a lost one are ignored
        self._ended = False      # RecordingEnd answered
        self._watch(conn)

    # --- start --------------------------------------------------------------------------------

    def start(self, presenting: bool = False) -> defer.Deferred:
        args = {"session_id": self.session_id}
        if presenting:
            args["presenting"] = True
            self._asked_presenting = True
        d = defer.maybeDeferred(self.conn.callRemote, control.RecordingStart, **args)
        d.addCallbacks(self._started, self._refused)
        return d

    def starts_presenting(self) -> bool:
        """This side starts showing its screen (a supporter after a direction change): ask the
        server again as the presenter.  True if asked (``when_ready`` says when to show)."""
        if (self.policy != "off" or self._asked_presenting or self.party != "supporter"
                or self.failed or self.closed or self.conn is None):
            return False
        self.policy = None
        self.start(presenting=True)
        return True

    def _started(self, answer: dict) -> None:
        self.policy = answer["policy"]
        if self.policy == "off":
            self._fire_ready()
            return
        self.input_mode = answer["input"]
        self.recording_id = answer["recording_id"]
        self._max_chunk = min(control.MAX_RECORDING_CHUNK, max(1024, answer["max_chunk"]))
        self._limit = max(1 << 20, answer["buffer_bytes"])
        self._stall = answer["stall_seconds"]
        self.resume_token = answer.get("resume_token") or ""
        self.split_keys = bool(answer.get("split_keys"))
        try:
            recipients = [recording.load_public(pem) for pem in json.loads(answer["public_keys"])]
            header = {"session_id": self.session_id, "tenant": self.parties.get("tenant", ""),
                      "recorder": self.party, "parties": self.parties,
                      "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                      "screen": list(self.screen_size), "input": self.input_mode}
            self.writer = recording.Writer(header, recipients, split=self.split_keys)
        except (ValueError, recording.RecordingError) as exc:
            self._fail(f"the server's recording keys are unusable: {exc}")
            return
        if answer["next_offset"]:
            # the server holds bytes of an earlier recorder of this party (another process):
            # their key is lost with it, so this recording cannot continue that file
            self._fail("the server holds an earlier recording of this party that this module "
                       "cannot continue")
            return
        self._append(self.writer.start())
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(FLUSH_SECONDS, now=False)
        log.info("recording session {session_id} ({policy}), recording {rid}",
                 session_id=self.session_id, policy=self.policy, rid=self.recording_id)
        self._fire_ready()

    def _refused(self, failure) -> None:
        why = failure.getErrorMessage()
        if _connection_gone(self.conn, failure):
            # the control connection ended before the answer: the session ends with it (the
            # runner's ``control_lost``: "lost the connection to the server"); until then this
            # side cannot know the recording is not required, so the screen is not shown
            self.policy = "required"
            self._fail(f"the control connection ended before the recording started: {why}",
                       session_ends_anyway=True)
        elif failure.check(amp.UnhandledCommand):
            # a server from before recordings: it records nothing and requires nothing
            log.warn("session {session_id}: no recording: {why}", session_id=self.session_id,
                     why=why)
            self.policy = "off"
        else:
            # a refusal (under 'required' the server ends the session too), any other error
            # or a lost connection: this side cannot know the recording is not required, so
            # the screen is not shown — no session shows a screen its protocol cannot record
            self.policy = "required"
            self._fail(f"the server refused the recording: {why}")
        self._fire_ready()

    def _fire_ready(self) -> None:
        ready, self._ready = self._ready, []
        for d in ready:
            d.callback(self.may_show())

    # --- what the session asks ----------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.writer is not None and not self.failed and not self.closed

    def may_show(self) -> bool | None:
        """None: not known yet; False: the policy requires a recording that is not running."""
        if self.policy is None:
            return None
        return self.policy != "required" or self.active

    def when_ready(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self.policy is not None:
            d.callback(self.may_show())
        else:
            self._ready.append(d)
        return d

    def _t(self) -> int:
        return int((self.clock() - self._t0) * 1000)

    def rfb_out(self, data: bytes) -> None:
        if self.active:
            self.writer.add(recording.RFB_OUT, self._t(), data)
            self._maybe_flush()

    def rfb_in(self, data: bytes) -> None:
        if not self.active:
            return
        t = self._t()
        for item in self._client_stream.feed(data):
            if item[0] == "rfb_in":
                self.writer.add(recording.RFB_IN, t, item[1])
            elif self.input_mode != "off":
                if item[0] == "key":
                    key = None if self.input_mode == "masked" else item[2]
                    payload = {"key": key, "down": item[1]}
                elif item[0] == "pointer":
                    payload = {"buttons": item[1], "x": item[2], "y": item[3]}
                else:
                    payload = {"cut_text": None if self.input_mode == "masked" else item[1]}
                self.writer.add(recording.INPUT, t, json.dumps(payload).encode())

    def event(self, kind: str, detail: dict) -> None:
        if self.active:
            try:
                self.writer.event(self._t(), kind, detail)
            except (TypeError, ValueError):
                self.writer.event(self._t(), kind, {"detail": str(detail)[:2000]})

    def restart_rfb(self) -> None:
        """A new RFB stream starts (the first screen, or a new one after a direction change):
        a player starts decoding afresh here."""
        self._client_stream = recording.ClientStream()
        if self.active:
            self.writer.event(self._t(), "rfb_restart", {})

    # --- writing and uploading ----------------------------------------------------------------

    def _maybe_flush(self) -> None:
        if self.writer.pending >= UPLOAD_HIGH_WATER:
            self._append(self.writer.flush())

    def _tick(self) -> None:
        if not self.active:
            return
        if self.writer.pending or self.clock() - self._last_record > self._stall / 3:
            if not self.writer.pending:
                self.writer.add(recording.EVENT, self._t(), b'{"kind":"alive"}')
            self._append(self.writer.flush())

    def _append(self, data: bytes) -> None:
        if not data:
            return
        self._last_record = self.clock()
        self.bytes_recorded += len(data)
        self._buffer += data
        if len(self._buffer) > self._limit:
            self._fail(f"the recording upload fell {len(self._buffer) >> 20} MiB behind (the "
                       "server or the network is too slow)")
            return
        self._pump()

    def _pump(self) -> None:
        if self.conn is None:
            return  # waiting for the module's next connection
        if self._in_flight or not self._buffer or self.recording_id == "":
            if not self._buffer and not self._in_flight:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)
            return
        piece = bytes(self._buffer[:self._max_chunk])
        self._in_flight = True
        generation = self._generation
        d = defer.maybeDeferred(self.conn.callRemote, control.RecordingChunk,
                                recording_id=self.recording_id, offset=self._acked, data=piece)
        d.addCallbacks(self._acknowledged, self._chunk_failed, callbackArgs=(generation,),
                       errbackArgs=(generation,))

    def _acknowledged(self, answer: dict, generation: int = 0) -> None:
        if generation != self._generation:
            return  # the answer of a connection given up meanwhile
        self._in_flight = False
        self._take_offset(answer["next_offset"])

    def _take_offset(self, expected: int) -> None:
        if expected < self._acked or expected > self._acked + len(self._buffer):
            self._fail(f"the server lost recording bytes (it expects byte {expected}, "
                       f"{self._acked} were acknowledged)")
            return
        del self._buffer[:expected - self._acked]
        self._acked = expected
        self._pump()

    def _chunk_failed(self, failure, generation: int = 0) -> None:
        if generation != self._generation:
            return
        self._in_flight = False
        if _connection_gone(self.conn, failure):
            self._connection_lost(self.conn)  # the bytes stay: they go on the next connection
            return
        self._fail(f"the recording upload failed: {failure.getErrorMessage()}")

    # --- connection loss and resuming ---------------------------------------------------------

    def _watch(self, conn) -> None:
        lost = getattr(conn, "lost", None)
        if isinstance(lost, defer.Deferred):
            lost.addBoth(lambda result: (self._connection_lost(conn), result)[1])

    def _connection_lost(self, conn) -> None:
        if conn is not self.conn or conn is None:
            return
        self.conn = None
        self._generation += 1
        self._in_flight = False
        if self.recording_id and self.resume_token and not self.failed and not self._ended:
            _away.add(self)
            for callback in list(_watchers):
                callback()
            log.warn("session {session_id}: the control connection is gone; the recording "
                     "keeps {n} bytes for the next one", session_id=self.session_id,
                     n=len(self._buffer) + self.writer.pending if self.writer else 0)

    def reconnected(self, conn) -> None:
        """The module has a new control connection: continue the upload on it."""
        if self.failed or self._ended:
            _away.discard(self)
            return
        if self.conn is not None:
            return  # resuming on a connection already; it leaves ``_away`` once it is closed
        self.conn = conn
        self._watch(conn)
        generation = self._generation
        d = defer.maybeDeferred(conn.callRemote, control.RecordingResume,
                                recording_id=self.recording_id, resume_token=self.resume_token)

        def resumed(answer):
            if generation != self._generation:
                return
            log.info("session {session_id}: recording {rid} resumes at byte {offset}",
                     session_id=self.session_id, rid=self.recording_id,
                     offset=answer["next_offset"])
            self._take_offset(answer["next_offset"])

        def refused(failure):
            if generation != self._generation:
                return
            if _connection_gone(conn, failure):
                self._connection_lost(conn)
                return
            _away.discard(self)
            self._fail(f"the recording could not be resumed: {failure.getErrorMessage()}")
        d.addCallbacks(resumed, refused)

    def _fail(self, why: str, session_ends_anyway: bool = False) -> None:
        """Give the recording up; a ``required`` one ends the session (``on_failed``) unless
        ``session_ends_anyway`` (its control connection is gone: the runner ends it with that
        reason, which is the true one)."""
        if self.failed:
            return
        self.failed = why
        _away.discard(self)
        self._buffer.clear()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        log.error("session {session_id}: recording given up: {why}", session_id=self.session_id,
                  why=why)
        drained, self._drained = self._drained, []
        for d in drained:
            d.callback(None)
        if self.on_failed is not None and self.policy == "required" and not session_ends_anyway:
            self.on_failed(why)

    # --- end ----------------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        """Write the FINAL record, upload what is left and tell the server (``RecordingEnd``)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.active:
            self.closed = True
            return defer.succeed(None)
        # the end's time, so a still screen plays until the session really ended
        self.writer.event(self._t(), "recording_closed", {})
        self._append(self.writer.close())
        self.closed = True
        if self.failed:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._drained.append(done)
        self._pump()

        def end(_):
            if self.failed or self.conn is None:
                _away.discard(self)  # the server holds the FINAL record: it closes it itself
                return None
            d = self.conn.callRemote(control.RecordingEnd, recording_id=self.recording_id,
                                     size=self._acked)

            def ended(answer):
                self._ended = True
                _away.discard(self)
                return answer
            return d.addCallback(ended)
        done.addCallback(end)
        done.addErrback(lambda f: log.warn("recording end not confirmed: {why}",
                                           why=f.getErrorMessage()))
        return done

    def stats(self) -> dict[str, Any]:
        return {"bytes": self.bytes_recorded, "acknowledged": self._acked,
                "buffered": len(self._buffer)}


def attach(runner, conn, reactor, session_id: str) -> SessionRecorder:
    """Give a session runner a recorder and ask the server whether to record: the side that
    shows its screen records by the policy, the supporter's side too if the server says so."""
    size: tuple = (0, 0)
    offer = getattr(runner, "screen_offer", None)
    if offer is not None:
        try:
            size = tuple(offer[0].size())
        except Exception:  # a source that cannot say yet: the RFB stream holds the size anyway
            pass
    recorder = SessionRecorder(reactor, conn, session_id, runner.consent.role.value,
                               screen_size=size, on_failed=runner.recording_failed)
    runner.recorder = recorder
    recorder.start()
    return recorder
