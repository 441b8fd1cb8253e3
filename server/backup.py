"""Backup and restore of one server: database, CA and server keys, config, protocols, recordings.

``hausmeister-server backup DEST`` works while the server runs.  The database comes first and
consistent (SQLite's online backup API; ``pg_dump`` for PostgreSQL), the files after it: a
protocol may then hold lines the database copy does not know yet, never the other way round (the
database anchors a protocol's last line), and a protocol line being written during the copy is
left out whole, so every copied chain verifies.  The archive is a tar.gz with ``MANIFEST.json``
listing every member's SHA-256; with a passphrase or for a backup key the whole archive is
encrypted (scrypt, or X25519 + HKDF-SHA256, then AES-256-GCM in 1 MiB chunks whose order and end
are authenticated).  A backup key's private half stays off the server, so a stolen server cannot
read its own backups.

``restore SRC`` checks every hash (and that nothing unlisted is inside) before it writes
anything, refuses an install that already has a CA or users unless ``--force``, puts the files
and the database back, runs the migrations (a backup of an older release) and says what came back.
The backed-up config is written beside the current one (``*.from-backup``), never over it.
"""

from __future__ import annotations

import base64
import datetime as dt
import glob
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from sqlalchemy import text

from protocol.identity import fingerprint

from . import pki
from .config import Config
from .db import Database

FORMAT = 1
MAGIC = b"HAUSMEISTER-BACKUP-ENCRYPTED-1\n"
CHUNK = 1 << 20
NAME_PREFIX = "hausmeister-backup-"
SQLITE_NAME = "database/hausmeister.sqlite3"
PGDUMP_NAME = "database/postgresql.pgdump"
COUNTED_TABLES = ("tenants", "users", "hosts", "certificates", "sessions")


class BackupError(Exception):
    """One line for the operator: what is wrong and what to do."""


# --- encryption: scrypt + AES-256-GCM, chunked (STREAM construction) ------------------------

def _kdf(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=2 ** 15, r=8, p=1).derive(passphrase)


def _nonce(base: bytes, index: int) -> bytes:
    return base[:4] + (int.from_bytes(base[4:], "big") ^ index).to_bytes(8, "big")


@dataclass
class Secret:
    """How a backup is encrypted: a passphrase, or an X25519 key (public to write, private to read)."""
    passphrase: bytes | None = None
    recipient: X25519PublicKey | None = None
    identity: X25519PrivateKey | None = None

    def __bool__(self) -> bool:
        return bool(self.passphrase or self.recipient or self.identity)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _hkdf(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient,
                info=b"hausmeister-backup-1").derive(shared)


def _new_file_key(secret: Secret) -> tuple[dict, bytes]:
    if secret.passphrase:
        salt = os.urandom(16)
        return ({"kdf": "scrypt", "n": 2 ** 15, "r": 8, "p": 1,
                 "salt": base64.b64encode(salt).decode()}, _kdf(secret.passphrase, salt))
    ephemeral = X25519PrivateKey.generate()
    eph_raw, rec_raw = _raw(ephemeral.public_key()), _raw(secret.recipient)
    return ({"kdf": "x25519", "ephemeral": base64.b64encode(eph_raw).decode(),
             "recipient": base64.b64encode(rec_raw).decode()},
            _hkdf(ephemeral.exchange(secret.recipient), eph_raw, rec_raw))


def _file_key(params: dict, secret: Secret) -> bytes:
    if params.get("kdf") == "scrypt":
        if not secret.passphrase:
            raise BackupError("this backup is encrypted with a passphrase: pass --passphrase-file FILE")
        return _kdf(secret.passphrase, base64.b64decode(params["salt"]))
    if params.get("kdf") == "x25519":
        if secret.identity is None:
            raise BackupError("this backup is encrypted for a backup key: pass --identity "
                              "PRIVATE_KEY_FILE")
        eph_raw, rec_raw = base64.b64decode(params["ephemeral"]), base64.b64decode(params["recipient"])
        if _raw(secret.identity.public_key()) != rec_raw:
            raise BackupError("this backup is encrypted for another backup key than --identity")
        shared = secret.identity.exchange(X25519PublicKey.from_public_bytes(eph_raw))
        return _hkdf(shared, eph_raw, rec_raw)
    raise BackupError(f"unknown backup encryption {params.get('kdf')!r}")


def encrypt_file(source: Path, dest: BinaryIO, secret: Secret) -> None:
    params, key = _new_file_key(secret)
    base = os.urandom(12)
    params.update(nonce=base64.b64encode(base).decode(), chunk=CHUNK)
    header = MAGIC + json.dumps(params, sort_keys=True).encode() + b"\n"
    aead = AESGCM(key)
    dest.write(header)
    with open(source, "rb") as fh:
        index, chunk = 0, fh.read(CHUNK)
        while True:
            following = fh.read(CHUNK)
            final = not following
            sealed = aead.encrypt(_nonce(base, index), chunk,
                                  header + struct.pack(">QB", index, final))
            dest.write(struct.pack(">I", len(sealed)) + sealed)
            if final:
                return
            index, chunk = index + 1, following


def decrypt_file(source: BinaryIO, dest: BinaryIO, secret: Secret) -> None:
    magic = source.readline()
    line = source.readline(65536)
    try:
        params = json.loads(line)
        base = base64.b64decode(params["nonce"])
        key = _file_key(params, secret)
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"the backup's encryption header is damaged ({exc})")
    header = magic + line
    aead = AESGCM(key)
    index, pending = 0, source.read(4)
    while pending:
        (size,) = struct.unpack(">I", pending.rjust(4, b"\0"))
        if size > CHUNK + 16:
            raise BackupError("the encrypted backup is damaged (a chunk is larger than written)")
        sealed = source.read(size)
        pending = source.read(4)
        try:
            dest.write(aead.decrypt(_nonce(base, index), sealed,
                                    header + struct.pack(">QB", index, not pending)))
        except InvalidTag:
            raise BackupError("wrong passphrase or key, or the backup file was changed or cut off")
        index += 1
    if index == 0:
        raise BackupError("the encrypted backup is empty: it was cut off")


def create_backup_key(path: Path) -> Path:
    """A new X25519 backup key: PATH (private, 0600, keep it off this server) and PATH.pub."""
    if path.exists():
        raise BackupError(f"{path} exists: a backup key is never overwritten")
    key = X25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    public = path.with_name(path.name + ".pub")
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def _load_key(path: str | None, private: bool):
    if not path:
        return None
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (OSError, ValueError, TypeError) as exc:
        raise BackupError(f"cannot read the backup key {path}: {exc}; create one with "
                          "`hausmeister-server backup-key create FILE`")
    wanted = X25519PrivateKey if private else X25519PublicKey
    if not isinstance(key, wanted):
        raise BackupError(f"{path} is not an X25519 backup key (`hausmeister-server backup-key "
                          "create FILE` makes one)")
    return key


def read_passphrase(path: str | None) -> bytes | None:
    path = path or os.environ.get("HAUSMEISTER_BACKUP_PASSPHRASE_FILE")
    if not path:
        return None
    try:
        value = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise BackupError(f"cannot read the passphrase file {path}: {exc.strerror}")
    if len(value) < 8:
        raise BackupError(f"the passphrase in {path} is shorter than 8 characters")
    return value


# --- what a backup holds -----------------------------------------------------------------------

def _is_sqlite(url: str) -> Path | None:
    for head in ("sqlite:///", "sqlite+pysqlite:///"):
        if url.startswith(head):
            return Path(url[len(head):].split("?")[0])
    return None


def _libpq_url(url: str) -> str:
    return "postgresql://" + url.split("://", 1)[1]


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise BackupError(f"{name} is not installed: install postgresql-client to back up or "
                          "restore a PostgreSQL database")
    return candidates[-1]


def _run_pg(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise BackupError(f"{what} failed: {last}")


def _copy_database(config: Config, dest: Path) -> str:
    """A consistent copy of the database into ``dest``; returns its archive name."""
    db_file = _is_sqlite(config.database_url)
    if db_file is not None:
        if not db_file.exists():
            raise BackupError(f"no database at {db_file}: run `hausmeister-server init` first")
        source, target = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True), sqlite3.connect(dest)
        try:
            with target:
                source.backup(target)
        finally:
            source.close()
            target.close()
        return SQLITE_NAME
    _run_pg([_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(dest),
             "--dbname", _libpq_url(config.database_url)], "pg_dump")
    return PGDUMP_NAME


def _schema_and_counts(url: str) -> tuple[str | None, dict[str, int]]:
    db = Database(url)
    try:
        with db.engine.connect() as conn:
            revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                      for t in COUNTED_TABLES}
        return revision, counts
    finally:
        db.dispose()


def _complete_lines(path: Path) -> bytes:
    """A protocol file up to its last full line: a line being written now is left out whole."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1] if path.suffix in (".jsonl", ".csv") else data


def _tree(folder: Path, skip: tuple[Path, ...]) -> Iterator[tuple[str, Path]]:
    """(name relative to ``folder``, path) of the regular files below it, outside ``skip``."""
    folder = folder.resolve()
    skip = tuple(p.resolve() for p in skip)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        if path.is_file() and not path.is_symlink():
            yield path.relative_to(folder).as_posix(), path


@dataclass
class BackupResult:
    path: Path
    files: int
    size: int
    counts: dict[str, int]
    schema: str | None


def create(config: Config, config_path: str | None, dest: Path, *, database_only: bool = False,
           recordings: bool = True, secret: Secret | None = None, keep: int | None = None
           ) -> BackupResult:
    s = config.server
    if not pki.CertStore(s.cert_dir).exists():
        raise BackupError(f"no server is set up in {s.data_dir}: nothing to back up")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    secret = secret or Secret()
    if secret.passphrase and secret.recipient:
        raise BackupError("choose --passphrase-file or --recipient, not both")
    suffix = ".tar.gz.enc" if secret else ".tar.gz"
    if dest.is_dir() or keep is not None:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = dest / f"{NAME_PREFIX}{stamp}{suffix}"
        backups = (dest.resolve(),)  # a backup folder inside the data folder is not backed up
    else:
        target, backups = dest, ()
    if target.exists():
        raise BackupError(f"{target} exists: a backup never overwrites a file; choose a new name")
    target.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": FORMAT, "created": stamp, "files": {}, "recordings_left_out": {}}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as tmp:
        db_copy = Path(tmp) / "database"
        db_name = _copy_database(config, db_copy)
        if db_name == SQLITE_NAME:
            manifest["schema"], manifest["counts"] = _schema_and_counts(f"sqlite:///{db_copy}")
        else:
            manifest["schema"], manifest["counts"] = _schema_and_counts(config.database_url)
        archive = Path(tmp) / "backup.tar.gz"
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            def add(name: str, data: bytes | None = None, path: Path | None = None) -> None:
                if data is None:
                    data = path.read_bytes()
                manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(),
                                           "size": len(data)}
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o600, int(dt.datetime.now().timestamp())
                tar.addfile(info, io.BytesIO(data))

            add(db_name, path=db_copy)
            if not database_only:
                outside = backups + (Path(tmp).resolve(),)
                skip = (s.cert_dir, s.protocol_dir, s.recording_dir, s.downloads_dir) + outside
                for folder, prefix in ((s.cert_dir, "certs"), (s.protocol_dir, "protocols"),
                                       (s.downloads_dir, "downloads")):
                    for rel, path in _tree(folder, outside):
                        add(f"{prefix}/{rel}", data=_complete_lines(path))
                for rel, path in _tree(s.recording_dir, outside):
                    name = f"recordings/{rel}"
                    if recordings:
                        add(name, path=path)
                    else:
                        data = path.read_bytes()
                        manifest["recordings_left_out"][name] = {
                            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                db_file = _is_sqlite(config.database_url)
                for rel, path in _tree(s.data_dir, skip):
                    if db_file is not None and path.name.startswith(db_file.name):
                        continue  # the database itself (and -wal/-shm) came from the backup API
                    if path.name in ("state.json", "egress-refusals.jsonl"):
                        continue
                    add(f"data/{rel}", path=path)
                if config_path and Path(config_path).is_file():
                    add("config/hausmeister.toml", path=Path(config_path))
            manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
            info = tarfile.TarInfo("MANIFEST.json")
            info.size, info.mode = len(manifest_bytes), 0o600
            tar.addfile(info, io.BytesIO(manifest_bytes))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            if secret:
                encrypt_file(archive, out, secret)
            else:
                with open(archive, "rb") as fh:
                    shutil.copyfileobj(fh, out)
            out.flush()
            os.fsync(out.fileno())
    if keep is not None:
        _prune(target.parent, keep)
    return BackupResult(target, len(manifest["files"]), target.stat().st_size,
                        manifest["counts"], manifest["schema"])


def _prune(folder: Path, keep: int) -> None:
    backups = sorted(p for p in folder.glob(f"{NAME_PREFIX}*") if p.is_file())
    for old in backups[:-keep] if keep > 0 else []:
        old.unlink()


# --- restore -------------------------------------------------------------------------------------

def _open_archive(src: Path, secret: Secret, tmp: Path) -> Path:
    try:
        with open(src, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as exc:
        raise BackupError(f"cannot read {src}: {exc.strerror}")
    if head != MAGIC:
        return src
    plain = tmp / "backup.tar.gz"
    with open(src, "rb") as fh, open(plain, "wb") as out:
        decrypt_file(fh, out, secret)
    return plain


def _safe_name(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and ".." not in parts and "" not in parts


def _unpack_checked(archive: Path, staging: Path) -> dict:
    """Every member into ``staging``, each checked against the manifest; returns the manifest."""
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{archive} is not a Hausmeister backup (not a readable tar.gz: {exc})")
    with tar:
        try:
            members = tar.getmembers()
            manifest_member = tar.getmember("MANIFEST.json")
            manifest = json.loads(tar.extractfile(manifest_member).read())
        except (KeyError, ValueError, tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise BackupError(f"{archive}: damaged or not a Hausmeister backup ({exc})")
        if manifest.get("format") != FORMAT:
            raise BackupError(f"backup format {manifest.get('format')} is not one this release reads")
        listed = manifest["files"]
        seen = set()
        for member in members:
            if member.name == "MANIFEST.json":
                continue
            if not member.isfile() or not _safe_name(member.name) or member.name not in listed:
                raise BackupError(f"the backup holds {member.name!r}, which its manifest does not "
                                  "list: refusing to restore a changed backup")
            try:
                data = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise BackupError(f"{member.name}: cannot be read from the backup ({exc})")
            if hashlib.sha256(data).hexdigest() != listed[member.name]["sha256"]:
                raise BackupError(f"{member.name}: its SHA-256 does not match the backup's "
                                  "manifest; the backup is damaged")
            path = staging / member.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            seen.add(member.name)
        missing = set(listed) - seen
        if missing:
            raise BackupError(f"the backup lacks {sorted(missing)[0]} (and {len(missing) - 1} more "
                              "files) its manifest lists; it is incomplete")
    return manifest


def _install_is_empty(config: Config) -> str | None:
    """None when nothing would be overwritten, else what is there."""
    if pki.CertStore(config.server.cert_dir).exists():
        return f"a CA in {config.server.cert_dir}"
    db = Database(config.database_url)
    try:
        if db.is_initialised():
            with db.engine.connect() as conn:
                users = conn.execute(text("SELECT count(*) FROM users")).scalar()
            if users:
                return f"{users} users in the database"
    finally:
        db.dispose()
    return None


def _restore_database(config: Config, staged: Path, name: str) -> None:
    db_file = _is_sqlite(config.database_url)
    if name == SQLITE_NAME:
        if db_file is None:
            raise BackupError("this backup holds a SQLite database, but this server is configured "
                              "for PostgreSQL: restore into an install with [database] url = \"\"")
        db_file.parent.mkdir(parents=True, exist_ok=True)
        for extra in ("-wal", "-shm"):
            Path(f"{db_file}{extra}").unlink(missing_ok=True)
        source, target = sqlite3.connect(staged), sqlite3.connect(db_file)
        try:
            with target:
                source.backup(target)
        finally:
            source.close()
            target.close()
        return
    if db_file is not None:
        raise BackupError("this backup holds a PostgreSQL dump, but this server is configured for "
                          "SQLite: set [database] url to the PostgreSQL database first")
    _run_pg([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
             "--dbname", _libpq_url(config.database_url), str(staged)], "pg_restore")


@dataclass
class RestoreResult:
    files: int
    counts: dict[str, int]
    schema_before: str | None
    schema_now: str | None
    ca_fingerprint: str | None
    config_copy: Path | None
    recordings_left_out: int


def restore(config: Config, config_path: str | None, src: Path, *, force: bool = False,
            database_only: bool = False, secret: Secret | None = None) -> RestoreResult:
    s = config.server
    with tempfile.TemporaryDirectory(prefix="hausmeister-restore-") as tmp:
        archive = _open_archive(src, secret or Secret(), Path(tmp))
        staging = Path(tmp) / "staging"
        manifest = _unpack_checked(archive, staging)
        if not force:
            present = _install_is_empty(config)
            if present:
                raise BackupError(f"this install is not empty ({present}): restore only into a "
                                  "fresh install, or pass --force to replace what is there")
        db_name = SQLITE_NAME if SQLITE_NAME in manifest["files"] else PGDUMP_NAME
        _restore_database(config, staging / db_name, db_name)
        config_copy = None
        if not database_only:
            for prefix, folder, mode in (("certs", s.cert_dir, 0o700),
                                         ("protocols", s.protocol_dir, 0o750),
                                         ("recordings", s.recording_dir, 0o750),
                                         ("downloads", s.downloads_dir, 0o755),
                                         ("data", s.data_dir, 0o700)):
                base = staging / prefix
                if not base.is_dir():
                    continue
                folder.mkdir(parents=True, exist_ok=True, mode=mode)
                for path in sorted(p for p in base.rglob("*") if p.is_file()):
                    target = folder / path.relative_to(base)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
                    os.chmod(target, 0o600 if prefix in ("certs", "data") else 0o640)
            if (staging / "config" / "hausmeister.toml").is_file():
                place = Path(config_path).parent if config_path else s.data_dir
                config_copy = place / "hausmeister.toml.from-backup"
                shutil.copyfile(staging / "config" / "hausmeister.toml", config_copy)
                os.chmod(config_copy, 0o640)
    db = Database(config.database_url)
    try:
        db.migrate()
    finally:
        db.dispose()
    schema_now, counts = _schema_and_counts(config.database_url)
    store = pki.CertStore(s.cert_dir)
    return RestoreResult(len(manifest["files"]), counts, manifest.get("schema"), schema_now,
                         fingerprint(store.ca_cert()) if store.exists() else None, config_copy,
                         len(manifest.get("recordings_left_out", {})))


# --- the two commands (registered in server/cli.py) ---------------------------------------------

def _say_error(exc: Exception) -> int:
    import sys
    print(f"hausmeister-server: error: {exc}", file=sys.stderr)
    return 2


def cmd_backup(config: Config, args) -> int:
    try:
        result = create(config, config.source, Path(args.dest),
                        database_only=args.database_only, recordings=not args.no_recordings,
                        secret=Secret(passphrase=read_passphrase(args.passphrase_file),
                                      recipient=_load_key(args.recipient, private=False)),
                        keep=args.keep)
    except BackupError as exc:
        return _say_error(exc)
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    print(f"backup written: {result.path} ({result.size / 2**20:.1f} MiB, {result.files} files, "
          f"schema {result.schema}; {counts})")
    return 0


def cmd_restore(config: Config, args) -> int:
    try:
        result = restore(config, config.source, Path(args.src), force=args.force,
                         database_only=args.database_only,
                         secret=Secret(passphrase=read_passphrase(args.passphrase_file),
                                       identity=_load_key(args.identity, private=True)))
    except BackupError as exc:
        return _say_error(exc)
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    print(f"restored {result.files} files from {args.src}: {counts}")
    print(f"schema:           {result.schema_before} in the backup, {result.schema_now} now")
    if result.ca_fingerprint:
        print(f"CA fingerprint:   {result.ca_fingerprint}")
    if result.config_copy:
        print(f"config:           the backed-up config is in {result.config_copy}; compare it "
              "with the current one")
    if result.recordings_left_out:
        print(f"recordings:       {result.recordings_left_out} were left out of this backup "
              "(only their hashes are in its manifest)")
    return 0


def cmd_backup_key_create(config: Config, args) -> int:
    try:
        public = create_backup_key(Path(args.path))
    except BackupError as exc:
        return _say_error(exc)
    print(f"backup key: {args.path} (private: keep it off this server, you need it to restore)")
    print(f"public key: {public} (pass it to `backup --recipient`)")
    return 0


def add_commands(sub) -> None:
    """``backup`` and ``restore`` on the ``hausmeister-server`` parser."""
    s = sub.add_parser("backup", help="back up database, CA and keys, config, protocols and "
                       "recordings (works while the server runs)")
    s.add_argument("dest", metavar="DEST", help="backup file, or a folder for a timestamped one")
    s.add_argument("--keep", type=int, metavar="N", help="DEST is a folder: keep the newest N")
    s.add_argument("--passphrase-file", metavar="FILE", help="encrypt with the passphrase in "
                   "FILE (default: $HAUSMEISTER_BACKUP_PASSPHRASE_FILE)")
    s.add_argument("--recipient", metavar="PUBLIC_KEY", help="encrypt for this backup key "
                   "(X25519 PEM from `backup-key create`); only its private half can restore")
    s.add_argument("--no-recordings", action="store_true",
                   help="leave recordings out; the manifest keeps their hashes")
    s.add_argument("--database-only", action="store_true", help="only the database")
    s.set_defaults(func=cmd_backup)
    s = sub.add_parser("restore", help="restore a backup into a fresh install (checks every "
                       "hash first)")
    s.add_argument("src", metavar="SRC")
    s.add_argument("--passphrase-file", metavar="FILE")
    s.add_argument("--identity", metavar="PRIVATE_KEY", help="the backup key's private half")
    s.add_argument("--force", action="store_true",
                   help="replace the CA, users and data of a non-empty install")
    s.add_argument("--database-only", action="store_true", help="only the database")
    s.set_defaults(func=cmd_restore)
    s = sub.add_parser("backup-key", help="a key pair for backups only its private half can read")
    ksub = s.add_subparsers(dest="backup_key_command", metavar="ACTION", required=True)
    s = ksub.add_parser("create", help="write FILE (private, keep it off this server) and FILE.pub")
    s.add_argument("path", metavar="FILE")
    s.set_defaults(func=cmd_backup_key_create)
