"""``hausmeister-server recording``: keygen, policy, list, show, verify, export, delete.

Export and delete go into the audit log.  Problems are one line naming what to do; nothing is
deleted or written on a wrong key or a damaged file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from sqlalchemy import select

from protocol import recording

from . import keys
from .storage import StorageFailed, storage_named


class RecordingCLIError(Exception):
    """One line for the operator; the command exits 1 (``hausmeister-server: error: ...``)."""


def _cli_error():
    return RecordingCLIError


def _one_line_errors(command):
    """Problems become one line and exit 1 here (``server.cli`` may run as ``__main__``, so its
    ``CLIError`` class is not necessarily the one ``main`` catches)."""
    import functools
    import sys

    @functools.wraps(command)
    def run(config, args) -> int:
        from ..cli import CLIError
        from ..db import DatabaseError
        try:
            return command(config, args)
        except (RecordingCLIError, CLIError, DatabaseError, keys.KeyProblem) as exc:
            print(f"hausmeister-server: error: {exc}", file=sys.stderr)
            return 1
    return run


def _db(config):
    from ..cli import _open_db
    return _open_db(config)


def rows_of(session, session_id: str | None = None, party: str | None = None, limit: int = 200):
    from ..db.models import Recording
    q = select(Recording).order_by(Recording.started_at.desc())
    if session_id:
        q = q.where(Recording.session_id.startswith(session_id))
    if party:
        q = q.where(Recording.party == party)
    return list(session.scalars(q.limit(limit)))


def _one(config, session_id: str, party: str | None):
    db = _db(config)
    try:
        with db.session() as session:
            rows = rows_of(session, session_id, party)
            for r in rows:
                session.expunge(r)
    finally:
        db.dispose()
    if not rows:
        raise _cli_error()(f"no recording of session {session_id!r}"
                           + (f" by the {party}" if party else "")
                           + ": see `hausmeister-server recording list`")
    if len(rows) > 1:
        raise _cli_error()(f"{len(rows)} recordings match {session_id!r} (" + ", ".join(
            f"{r.session_id} {r.party}" for r in rows) + "): give the whole session id and --party")
    return rows[0]


def _unwrap(config, key_file: str | None):
    try:
        extra = keys.load_key_file(Path(key_file)) if key_file else None
        if extra is None:
            keys.operator_private(config.server.cert_dir)  # a clear line if it is missing
        return keys.unwrapper(config.server.cert_dir, extra)
    except keys.KeyProblem as exc:
        raise _cli_error()(str(exc))


def _audit(config, actor: str, action: str, detail: str, tenant_id) -> None:
    from .. import accounts
    db = _db(config)
    try:
        with db.session() as session:
            accounts.audit(session, actor, action, detail, tenant_id=tenant_id)
    finally:
        db.dispose()


@_one_line_errors
def cmd_keygen(config, args) -> int:
    try:
        kid = keys.create(config.server.cert_dir, force=args.force)
    except keys.KeyProblem as exc:
        raise _cli_error()(str(exc))
    print(f"recording key {kid} written to {keys.private_path(config.server.cert_dir)} "
          f"(public half beside it); back it up: recordings cannot be opened without it")
    return 0


@_one_line_errors
def cmd_policy(config, args) -> int:
    from .. import accounts
    from ..db.models import HostGroup
    if args.policy and args.policy not in ("off", "on", "required", "inherit"):
        raise _cli_error()(f"policy {args.policy!r} is not one of off, on, required, inherit")
    db = _db(config)
    try:
        with db.session() as session:
            try:
                tenant = accounts.tenant_named(session, args.tenant)
                target = accounts.group_named(session, tenant, args.group) if args.group else tenant
            except accounts.AccountError as exc:
                raise _cli_error()(str(exc))
            what = f"group {args.group} in tenant {tenant.name}" if args.group else f"tenant {tenant.name}"
            if args.policy:
                target.recording_policy = None if args.policy == "inherit" else args.policy
                accounts.audit(session, args.actor, "recording.policy",
                               f"{what}: {args.policy}", tenant_id=tenant.id)
            lines = [f"default (recording.default_policy): {config.recording.default_policy}",
                     f"tenant {tenant.name}: {tenant.recording_policy or 'inherit'}"]
            for group in session.scalars(select(HostGroup).where(HostGroup.tenant_id == tenant.id)
                                         .order_by(HostGroup.name)):
                lines.append(f"  group {group.name}: {group.recording_policy or 'inherit'}")
    finally:
        db.dispose()
    print("\n".join(lines))
    return 0


@_one_line_errors
def cmd_list(config, args) -> int:
    db = _db(config)
    try:
        with db.session() as session:
            rows = rows_of(session, args.session, None, args.limit)
            data = [{"session_id": r.session_id, "party": r.party, "status": r.status,
                     "size": r.size, "records": r.records, "storage": r.storage,
                     "started_at": r.started_at.isoformat(), "policy": r.policy,
                     "sha256": r.sha256 or "", "location": r.location} for r in rows]
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    if not data:
        print("no recordings")
        return 0
    print(f"{'SESSION':36}  {'PARTY':9}  {'STATUS':10}  {'SIZE':>10}  {'STARTED (UTC)':19}  STORAGE")
    for d in data:
        print(f"{d['session_id']:36}  {d['party']:9}  {d['status']:10}  {d['size']:>10}  "
              f"{d['started_at'][:19].replace('T', ' '):19}  {d['storage']}")
    return 0


@_one_line_errors
def cmd_show(config, args) -> int:
    row = _one(config, args.session, args.party)
    header = {}
    try:
        reader = recording.Reader()
        for chunk in storage_named(config, row.storage).read(row.location):
            for item in reader.receive(chunk):
                if isinstance(item, recording.Header):
                    header = item.fields
            if header:
                break
    except (StorageFailed, recording.RecordingError) as exc:
        raise _cli_error()(f"recording {row.location}: {exc}")
    print(f"session:    {row.session_id}\nparty:      {row.party}\nstatus:     {row.status}\n"
          f"policy:     {row.policy}\nstorage:    {row.storage} {row.location}\n"
          f"size:       {row.size} bytes, {row.records} records\nsha256:     {row.sha256 or '-'}\n"
          f"started:    {row.started_at.isoformat()}\nended:      "
          f"{row.ended_at.isoformat() if row.ended_at else '-'}")
    if header:
        print(f"tenant:     {header.get('tenant')}\nparties:    {json.dumps(header.get('parties'))}\n"
              f"screen:     {'x'.join(str(x) for x in header.get('screen') or [])}\n"
              f"input:      {header.get('input')}\nkeys:       "
              + ", ".join(str(k.get("key_id")) for k in header.get("wrapped_keys", [])))
    return 0


def verify_row(config, row, unwrap) -> str | None:
    """None if the stored file has the recorded SHA-256 and every record authenticates."""
    digest = hashlib.sha256()

    def chunks():
        for chunk in storage_named(config, row.storage).read(row.location):
            digest.update(chunk)
            yield chunk
    sealed: list[str] = []

    def unwrap_or_framing(header: dict):
        try:
            return unwrap(header)
        except recording.RecordingError as exc:
            if not recording.is_split(header):
                raise
            sealed.append(str(exc))  # split knowledge without the other key: framing and hash
            return None
    try:
        summary = recording.scan(chunks(), unwrap=unwrap_or_framing)
    except StorageFailed as exc:
        return f"cannot be read: {exc}"
    except recording.RecordingError as exc:
        return f"damaged: {exc}"
    row._sealed = bool(sealed)  # told in the verify line: the hash held, records unopened
    if row.sha256 and digest.hexdigest() != row.sha256:
        return (f"SHA-256 {digest.hexdigest()[:16]}... differs from the one recorded at its end "
                f"({row.sha256[:16]}...): the file was changed")
    if summary.trailing:
        return f"{summary.trailing} bytes after the last whole record"
    if row.status == "complete" and not summary.complete:
        return "the final record is missing (the file was cut)"
    return None


@_one_line_errors
def cmd_verify(config, args) -> int:
    unwrap = _unwrap(config, args.key)
    db = _db(config)
    try:
        with db.session() as session:
            rows = rows_of(session, args.session, None, 100000)
            for r in rows:
                session.expunge(r)
    finally:
        db.dispose()
    if not rows:
        raise _cli_error()("no recordings to verify")
    bad = 0
    for row in rows:
        problem = verify_row(config, row, unwrap)
        if problem:
            bad += 1
            print(f"BAD  {row.session_id} {row.party}: {problem}")
        else:
            note = "" if row.status == "complete" else f" ({row.status}: up to its last record)"
            if getattr(row, "_sealed", False):
                note += " (SHA-256 and framing; the records need the auditor's key too: --key)"
            print(f"ok   {row.session_id} {row.party}{note}")
    if bad:
        raise _cli_error()(f"{bad} of {len(rows)} recordings failed verification")
    return 0


@_one_line_errors
def cmd_export(config, args) -> int:
    from .export import to_mp4
    row = _one(config, args.session, args.party)
    unwrap = _unwrap(config, args.key)
    out = Path(args.mp4)
    if out.exists() and not args.force:
        raise _cli_error()(f"{out} exists: choose another file or add --force")
    try:
        result = to_mp4(storage_named(config, row.storage).read(row.location), unwrap, out,
                        fps=args.fps)
    except (StorageFailed, recording.RecordingError, ValueError) as exc:
        Path(str(out) + ".part").unlink(missing_ok=True)
        raise _cli_error()(f"cannot export {row.session_id}: {exc}")
    _audit(config, args.actor, "recording.export",
           f"session={row.session_id} party={row.party} file={out}", row.tenant_id)
    print(f"{out}: {result.frames} frames, {result.width}x{result.height}, "
          f"{result.duration_ms / 1000:.1f} s of session in {result.seconds:.1f} s "
          f"({result.speed:.1f}x real time)"
          + ("" if result.complete else "; the recording is incomplete (cut off): exported up "
             "to its last whole record"))
    return 0


@_one_line_errors
def cmd_delete(config, args) -> int:
    from ..db.models import Recording
    row = _one(config, args.session, args.party)
    try:
        storage_named(config, row.storage).delete(row.location)
    except StorageFailed as exc:
        raise _cli_error()(f"cannot delete {row.location}: {exc}")
    db = _db(config)
    try:
        with db.session() as session:
            session.delete(session.get(Recording, row.id))
            from .. import accounts
            from ..db.models import Tenant
            accounts.audit(session, args.actor, "recording.delete",
                           f"session={row.session_id} party={row.party} sha256={row.sha256}",
                           tenant_id=row.tenant_id)
            tenant = session.get(Tenant, row.tenant_id) if row.tenant_id is not None else None
    finally:
        db.dispose()
    # the session's protocol says so too (hash-chained): protocol verify then expects no file
    from ..session_protocol import ProtocolError, SessionProtocols
    try:
        SessionProtocols(config.server.protocol_dir).record(
            tenant.name if tenant else "default", row.session_id, "recording_deleted",
            str(args.actor), None, {"recording_id": row.id, "party": row.party,
                                    "location": row.location, "sha256": row.sha256 or ""})
    except (OSError, ProtocolError) as exc:
        print(f"note: the session protocol could not say so: {exc}", file=sys.stderr)
    print(f"deleted the {row.party}'s recording of session {row.session_id}")
    return 0


def add_commands(sub) -> None:
    rec = sub.add_parser("recording", help="session recordings: list, show, verify, export, "
                         "delete, keygen, policy")
    rsub = rec.add_subparsers(dest="recording_command", metavar="ACTION", required=True)
    s = rsub.add_parser("keygen", help="create the operator's recording key (in the cert folder)")
    s.add_argument("--force", action="store_true", help="replace it (the old key is kept beside)")
    s.set_defaults(func=cmd_keygen)
    s = rsub.add_parser("policy", help="show or set the recording policy of a tenant or group")
    s.add_argument("policy", nargs="?", help="off, on, required or inherit")
    s.add_argument("--tenant", default="default")
    s.add_argument("--group", help="a host group of the tenant")
    s.set_defaults(func=cmd_policy)
    s = rsub.add_parser("list", help="list recordings, newest first")
    s.add_argument("--session", help="only this session (id or its beginning)")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    for name, func, text in (("show", cmd_show, "details of one recording"),
                             ("delete", cmd_delete, "delete a recording (audited)")):
        s = rsub.add_parser(name, help=text)
        s.add_argument("session", metavar="SESSION")
        s.add_argument("--party", help="supporter, host or customer (if both recorded)")
        s.set_defaults(func=func)
    s = rsub.add_parser("verify", help="check every recording (or one session's) against its "
                        "SHA-256 and authenticate every record")
    s.add_argument("session", metavar="SESSION", nargs="?")
    s.add_argument("--key", help="a recording key PEM file (e.g. the auditor's)")
    s.set_defaults(func=cmd_verify)
    s = rsub.add_parser("export", help="export a recording's screen as an MP4 video (audited)")
    s.add_argument("session", metavar="SESSION")
    s.add_argument("--mp4", required=True, metavar="FILE")
    s.add_argument("--party", help="supporter, host or customer (if both recorded)")
    s.add_argument("--key", help="a recording key PEM file (e.g. the auditor's)")
    s.add_argument("--fps", type=float, default=10.0)
    s.add_argument("--force", action="store_true", help="overwrite FILE")
    s.set_defaults(func=cmd_export)


def protocol_recording_problems(config, files) -> list[str]:
    """``protocol verify``: every ``recording`` line's SHA-256 against the stored recording."""
    from ..session_protocol import records
    problems = []
    for file in files:
        lines = list(records(Path(file)))
        deleted = {(r.get("detail") or {}).get("location") for _, r in lines
                   if r and r.get("kind") == "recording_deleted"}  # `recording delete`, audited
        for n, record in lines:
            if not record or record.get("kind") != "recording":
                continue
            detail = record.get("detail") or {}
            location, expected = detail.get("location"), detail.get("sha256")
            if not location or not expected or location in deleted:
                continue
            digest = hashlib.sha256()
            try:
                for chunk in storage_named(config, detail.get("storage", "folder")).read(location):
                    digest.update(chunk)
            except StorageFailed as exc:
                problems.append(f"{file} line {n}: recording {location}: {exc}")
                continue
            if digest.hexdigest() != expected:
                problems.append(f"{file} line {n}: recording {location} does not have the SHA-256 "
                                "this line recorded: the recording was changed")
    return problems
