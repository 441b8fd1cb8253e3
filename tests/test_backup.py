"""Backup while the server runs → wipe → restore: the same users, hosts, certificates and
verifiable protocols, on SQLite and PostgreSQL; damaged, encrypted-with-another-passphrase and
not-empty cases refused with one line."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.test_e2e_brokering import wait_until
from tests.test_e2e_sessions import finish, protocol_events, start_adhoc
from tests.fixtures_server import (ServerProcess, add_enrolled_supporter, run_cli,
                                   write_config)


def _second_database(request, db_url: str, tmp_path: Path) -> str:
    """An empty database of the same kind: the 'fresh install' the backup goes into."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'restored.db'}"
    import psycopg
    from sqlalchemy.engine import make_url
    url = make_url(request.getfixturevalue("postgres_url"))
    name = f"r_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(host="127.0.0.1", port=url.port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    request.addfinalizer(lambda: _drop(url.port, name))
    return url.set(database=name).render_as_string(hide_password=False)


def _drop(port: int, name: str) -> None:
    import psycopg
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr)
    return lines[0]


def test_backup_while_running_then_restore_into_a_fresh_install(request, running_server,
                                                                 db_url, tmp_path):
    srv = running_server
    add_enrolled_supporter(srv, "alice", tmp_path / "alice")
    srv.ok("group", "add", "office")
    token = srv.ok("token", "create", "--group", "office", "-q").strip()
    host_home = tmp_path / "pc1"
    enrolled = run_cli("host", "enroll", "--server", srv.url, "--ca-fingerprint", srv.fingerprint,
                       "--token", token, "--name", "pc1", "--home", str(host_home))
    assert enrolled.returncode == 0, enrolled.stderr
    # one real ad-hoc session, so there is a session row and a protocol anchored in it
    supporter, customer = start_adhoc({"alice": tmp_path / "alice", "srv": srv, "tmp": tmp_path})
    try:
        customer.wait_for_line("granted control")
        supporter.wait_for_line("granted control")
        customer.send(b"bytes of the customer")
        supporter.read_exactly(b"bytes of the customer")
        supporter.close_stdin()
        assert supporter.wait() == 0 and customer.wait() == 0
    finally:
        finish(supporter, customer)
    wait_until(lambda: [e for e in protocol_events(srv) if e["kind"] == "ended"
                        and e["actor"] == "server"], what="the session's ended line")
    sessions_before = srv.ok("session", "list", "--json")
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    users_before = srv.ok("user", "list")
    certs_before = srv.ok("cert", "list")
    ports = (int(srv.url.rstrip("/").rsplit(":", 1)[1]), srv.module_port)

    backup_dir = tmp_path / "backups"
    made = srv.cli("backup", "--keep", "2", "--passphrase-file", str(passphrase), str(backup_dir))
    assert made.returncode == 0, made.stderr
    assert "backup written" in made.stdout and "1 hosts" in made.stdout
    (encrypted,) = backup_dir.iterdir()
    assert encrypted.name.endswith(".tar.gz.enc")
    assert b"BEGIN" not in encrypted.read_bytes()  # no key in the clear
    plain = tmp_path / "plain.tar.gz"
    assert srv.cli("backup", str(plain)).returncode == 0
    assert "exists" in _one_line_error(srv.cli("backup", str(plain)))

    refused = srv.cli("restore", str(plain))  # into the very install it came from
    assert "this install is not empty" in _one_line_error(refused)
    srv.stop()

    # wipe: a fresh data folder and an empty database, the same ports
    fresh = ServerProcess(write_config(tmp_path / "fresh.toml", tmp_path / "fresh-data",
                                       _second_database(request, db_url, tmp_path)),
                          tmp_path / "fresh-data")
    text = fresh.config.read_text().replace("https_port = 0", f"https_port = {ports[0]}") \
        .replace("module_port = 0", f"module_port = {ports[1]}")
    fresh.config.write_text(text)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    assert "wrong passphrase" in _one_line_error(
        fresh.cli("restore", "--passphrase-file", str(wrong), str(encrypted)))

    restored = fresh.cli("restore", "--passphrase-file", str(passphrase), str(encrypted))
    assert restored.returncode == 0, restored.stderr
    assert f"CA fingerprint:   {srv.fingerprint}" in restored.stdout
    assert (tmp_path / "hausmeister.toml.from-backup").is_file()
    assert fresh.ok("user", "list") == users_before
    assert fresh.ok("cert", "list") == certs_before
    assert fresh.ok("session", "list", "--json") == sessions_before
    assert '"ended_at": null' not in sessions_before and "alice" in sessions_before
    verified = fresh.cli("protocol", "verify", str(fresh.data_dir / "protocols"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    fresh.start()
    try:
        assert fresh.fingerprint == srv.fingerprint
        status = run_cli("host", "status", "--home", str(host_home))  # its certificate works
        assert status.returncode == 0, status.stderr
        supporter = run_cli("supporter", "status", "--home", str(tmp_path / "alice"))
        assert supporter.returncode == 0, supporter.stderr
    finally:
        fresh.stop()


def test_damaged_or_changed_backups_are_refused(server_config, tmp_path, db_url):
    srv = server_config
    backup = tmp_path / "b.tar.gz"
    assert srv.cli("backup", str(backup)).returncode == 0, "backup failed"
    fresh = ServerProcess(write_config(tmp_path / "fresh.toml", tmp_path / "fresh-data",
                                       f"sqlite:///{tmp_path / 'fresh.db'}"),
                          tmp_path / "fresh-data")
    if not db_url.startswith("sqlite"):
        assert "PostgreSQL dump" in _one_line_error(fresh.cli("restore", str(backup)))
        return
    data = bytearray(backup.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(bytes(data))
    line = _one_line_error(fresh.cli("restore", str(damaged)))
    assert "damaged" in line or "does not match" in line or "cannot be read" in line
    assert not (tmp_path / "fresh-data" / "certs").exists()  # nothing written

    import io
    import tarfile
    changed = tmp_path / "changed.tar.gz"
    with tarfile.open(backup) as src, tarfile.open(changed, "w:gz") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            if member.name.startswith("certs/"):
                payload += b"\n"
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    assert "does not match the backup's manifest" in _one_line_error(
        fresh.cli("restore", str(changed)))
    assert "not a Hausmeister backup" in _one_line_error(fresh.cli("restore", str(srv.config)))
    shutil.rmtree(tmp_path / "fresh-data", ignore_errors=True)
    restored = fresh.cli("restore", str(backup))
    assert restored.returncode == 0, restored.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_backup_for_a_backup_key_restores_only_with_its_private_half(server_config, tmp_path):
    srv = server_config
    key = tmp_path / "backup.key"
    made = srv.cli("backup-key", "create", str(key))
    assert made.returncode == 0, made.stderr
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    backup = tmp_path / "b.tar.gz.enc"
    assert srv.cli("backup", "--recipient", f"{key}.pub", str(backup)).returncode == 0
    fresh = ServerProcess(write_config(tmp_path / "fresh.toml", tmp_path / "fresh-data",
                                       f"sqlite:///{tmp_path / 'fresh.db'}"),
                          tmp_path / "fresh-data")
    assert "pass --identity" in _one_line_error(fresh.cli("restore", str(backup)))
    other = tmp_path / "other.key"
    assert srv.cli("backup-key", "create", str(other)).returncode == 0
    assert "another backup key" in _one_line_error(
        fresh.cli("restore", "--identity", str(other), str(backup)))
    assert "not an X25519 backup key" in _one_line_error(
        fresh.cli("restore", "--identity", str(srv.cert_dir / "ca.key"), str(backup)))
    cut = tmp_path / "cut.tar.gz.enc"
    cut.write_bytes(backup.read_bytes()[:-100])
    assert "changed or cut off" in _one_line_error(
        fresh.cli("restore", "--identity", str(key), str(cut)))
    restored = fresh.cli("restore", "--identity", str(key), str(backup))
    assert restored.returncode == 0, restored.stderr
    assert fresh.ok("user", "list") == srv.ok("user", "list")


def test_database_only_snapshot_and_forced_restore_undo_a_change(server_config, tmp_path):
    """What the installer does around an upgrade: snapshot the database, put it back on failure."""
    srv = server_config
    snapshot = tmp_path / "db-snapshot"
    made = srv.cli("backup", "--database-only", str(snapshot))
    assert made.returncode == 0, made.stderr
    srv.ok("user", "add", "late", "--role", "auditor", "--generate-password")
    assert "late" in srv.ok("user", "list")
    assert "not empty" in _one_line_error(srv.cli("restore", "--database-only", str(snapshot)))
    restored = srv.cli("restore", "--database-only", "--force", str(snapshot))
    assert restored.returncode == 0, restored.stderr
    assert "late" not in srv.ok("user", "list")
    assert "admin" in srv.ok("user", "list")
