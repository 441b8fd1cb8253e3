"""A session's recordings in the console: listed on the session page, played in an HTML5
``<video>`` (no script: the strict CSP only gains ``media-src 'self'``).

The MP4 is made on demand from the encrypted recording with the operator's recording key
(``server.recordings.export``) and cached under ``data_dir/recording-cache`` by recording id and
SHA-256; it is served with HTTP Range requests so the browser can seek.  Admins and auditors of
the session's tenant may watch; every playback start is in the audit log.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select
from twisted.internet import defer
from twisted.python.failure import Failure

from protocol.runtime import run_blocking

from .. import accounts
from ..db.models import Recording
from ..db.models import Session as SessionRow
from ..i18n import Text
from .core import Ctx, PageError, route

PARTIES = ("host", "customer", "supporter")
MAX_PIECE = 4 << 20           # one Range answer carries at most this much
_making: dict[Path, list[defer.Deferred]] = {}


def recordings_of(session, tenant_id: int, session_id: str) -> list[dict[str, Any]]:
    rows = session.scalars(select(Recording).join(SessionRow, Recording.session_id == SessionRow.id)
                           .where(Recording.session_id == session_id,
                                  SessionRow.tenant_id == tenant_id)
                           .order_by(Recording.started_at))
    return [{"id": r.id, "party": r.party, "status": r.status, "size": r.size,
             "sha256": r.sha256 or "", "started_at": r.started_at, "ended_at": r.ended_at,
             "storage": r.storage, "location": r.location, "tenant_id": r.tenant_id}
            for r in rows]


def with_split_flags(config, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Blocking: mark recordings whose key is split with an auditor (``split``): the console
    cannot open them on its own, the auditor's private key is not on the server."""
    from protocol import recording

    from ..recordings.storage import StorageFailed, storage_named
    for rec in recs:
        rec["split"] = False
        if config is None or rec["status"] == "uploading":
            continue
        try:
            reader = recording.Reader()
            for chunk in storage_named(config, rec["storage"]).read(rec["location"], 64 << 10):
                reader.receive(chunk)
                if reader.header is not None:
                    rec["split"] = recording.is_split(reader.header.fields)
                    break
        except (StorageFailed, recording.RecordingError, OSError):
            pass  # unreadable: playing it says why
    return recs


def link_times(events: list[dict[str, Any]], recordings: list[dict[str, Any]]) -> None:
    """Each timeline event gets ``video_t`` (seconds into the first playable recording)."""
    playable = [r for r in recordings if r["status"] != "uploading" and not r.get("split")]
    if not playable:
        return
    first = playable[0]
    for e in events:
        at = e.get("at")
        if isinstance(at, dt.datetime):
            offset = (at - first["started_at"]).total_seconds()
            if offset >= 0 and (first["ended_at"] is None or at <= first["ended_at"]):
                e["video_t"] = int(offset)
                e["video_party"] = first["party"]


def _cache_path(config, rec: dict) -> Path:
    return config.server.data_dir / "recording-cache" / f"{rec['id']}-{rec['sha256'][:16] or 'x'}.mp4"


def _make_mp4(config, rec: dict, out: Path) -> Path:
    from ..recordings import keys
    from ..recordings.export import to_mp4
    from ..recordings.storage import storage_named
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    to_mp4(storage_named(config, rec["storage"]).read(rec["location"]),
           keys.unwrapper(config.server.cert_dir), out)
    return out


def mp4_for(config, rec: dict) -> defer.Deferred:
    """The cached MP4 of ``rec``, made once (concurrent requests wait for the same export)."""
    path = _cache_path(config, rec)
    if path.exists():
        return defer.succeed(path)
    if path not in _making:
        _making[path] = []

        def done(result):
            for waiter in _making.pop(path, []):
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)
        run_blocking(_make_mp4, config, rec, path).addBoth(done)
    waiter: defer.Deferred = defer.Deferred()
    _making[path].append(waiter)
    return waiter


def _read(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` → (start, end) inclusive, within the file; None if not satisfiable."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (not m[1] and not m[2]) or size == 0:
        return None
    if not m[1]:
        start, end = max(0, size - int(m[2])), size - 1
    else:
        start = int(m[1])
        end = min(int(m[2]), size - 1) if m[2] else size - 1
    if start > end or start >= size:
        return None
    return start, min(end, start + MAX_PIECE - 1)


def _vtt_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def captions(events: list[dict[str, Any]], rec: dict) -> bytes:
    """The session's protocol events as WebVTT cues at their time in the recording (the
    video's captions: what happened, for people who cannot see the screen, and for everyone)."""
    lines = ["WEBVTT", ""]
    timed = [e for e in events if isinstance(e.get("at"), dt.datetime)]
    for n, e in enumerate(timed):
        start = (e["at"] - rec["started_at"]).total_seconds()
        if start < 0 or (rec["ended_at"] is not None and e["at"] > rec["ended_at"]):
            continue
        end = start + 4.0
        text = f"{e['kind']} ({e['actor']})" + (f": {e['detail'][:160]}" if e["detail"] else "")
        text = text.replace("-->", "->").replace("\n", " ")
        lines += [str(n + 1), f"{_vtt_time(start)} --> {_vtt_time(end)}", text, ""]
    return "\n".join(lines).encode()


@route("GET", "sessions/{id}/recordings/{file}")
def recording_video(ctx: Ctx):
    m = re.fullmatch(r"(host|customer|supporter)\.(mp4|vtt)", ctx.params["file"])
    if not m:
        raise PageError(404, Text("no such recording"))
    party = m[1]
    config = ctx.console.config
    if m[2] == "vtt":
        return _captions(ctx, party)

    @defer.inlineCallbacks
    def serve():
        recs = yield ctx.run(recordings_of, ctx.session.tenant_id, ctx.params["id"])
        rec = next((r for r in recs if r["party"] == party), None)
        if rec is None:
            raise PageError(404, Text("no such recording"))
        if rec["status"] == "uploading":
            raise PageError(409, Text("the recording is still being uploaded; play it once the "
                                      "session has ended"))
        yield run_blocking(with_split_flags, config, [rec])
        if rec["split"]:
            raise PageError(409, Text("this recording's key is split with the auditor's key: "
                                      "the console cannot play it; the auditor exports it with "
                                      "their key (hausmeister-server recording export --key)"))
        try:
            path = yield mp4_for(config, rec)
        except Exception as exc:
            raise PageError(500, Text("the recording cannot be played: %(why)s", why=str(exc)[:200]))
        size = os.path.getsize(path)
        request = ctx.request
        header = request.getHeader(b"range")
        ctx.headers()
        request.setHeader(b"Content-Type", b"video/mp4")
        request.setHeader(b"Accept-Ranges", b"bytes")
        if header:
            found = parse_range(header.decode("latin-1"), size)
            if found is None:
                request.setResponseCode(416)
                request.setHeader(b"Content-Range", f"bytes */{size}".encode())
                return b""
            start, end = found
            request.setResponseCode(206)
            request.setHeader(b"Content-Range", f"bytes {start}-{end}/{size}".encode())
        else:
            start, end = 0, size - 1
        if start == 0:  # a playback starts (the browser's first request)
            yield ctx.run(_audit_play, ctx.session.user or "?", rec, ctx.source)
        body = b"" if request.method == b"HEAD" else (
            yield run_blocking(_read, path, start, end - start + 1))
        request.setHeader(b"Content-Length", str(end - start + 1).encode())
        return body
    return serve()


def _captions(ctx: Ctx, party: str):
    from .pages_sessions import _load

    def answer(found):
        facts, timeline = found

        def with_recordings(recs):
            rec = next((r for r in recs if r["party"] == party), None)
            if rec is None:
                raise PageError(404, Text("no such recording"))
            body = captions(timeline.events, rec)
            ctx.headers()
            ctx.request.setHeader(b"Content-Type", b"text/vtt; charset=utf-8")
            return body
        return ctx.run(recordings_of, ctx.session.tenant_id, facts["id"]).addCallback(with_recordings)
    return _load(ctx).addCallback(answer)


def _audit_play(session, actor: str, rec: dict, address: str) -> None:
    accounts.audit(session, actor, "recording.play",
                   f"session={rec['location'].rsplit('/', 1)[-1]} party={rec['party']} "
                   f"from={address}", tenant_id=rec["tenant_id"])
