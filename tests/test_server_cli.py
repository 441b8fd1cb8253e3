"""``hausmeister-server`` as an operator uses it: set-up, users, own CA, refusals.

Each refusal is one line on stderr, exit code ≠ 0, and nothing already stored changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import json
from pathlib import Path

import pytest

from server import pki

from .fixtures_server import ADMIN_PASSWORD, ServerProcess, run_cli, write_config


def one_line_error(result) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hausmeister-server: error: ")
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_help_on_every_command():
    for args in ([], ["init"], ["run"], ["check"], ["cert"], ["cert", "install"], ["user"],
                 ["user", "add"], ["token", "create"], ["group"], ["tenant"], ["migrate"]):
        result = run_cli("server", *args, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
    for kind in ("supporter", "host", "customer"):
        assert run_cli(kind, "--help").returncode == 0


def test_init_prints_admin_and_refuses_a_non_empty_data_folder(server_config):
    srv = server_config
    before = snapshot(srv.cert_dir)
    error = one_line_error(srv.cli("init"))
    assert "not empty" in error and "--force" in error
    assert snapshot(srv.cert_dir) == before
    forced = srv.cli("init", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "kept existing" in forced.stdout and "already present" in forced.stdout
    assert snapshot(srv.cert_dir) == before  # the CA is never overwritten


def test_first_start_sets_itself_up_and_prints_the_admin(tmp_path, db_url):
    data = tmp_path / "data"
    srv = ServerProcess(write_config(tmp_path / "h.toml", data, db_url), data).start()
    try:
        # the state file says "listening" a moment before the summary lines are flushed
        deadline = time.monotonic() + 20
        while "Press Ctrl+C" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = srv.log()
        assert "First start" in out and "Admin password:" in out and "Module port:" in out
        assert (data / "certs" / "ca.key").stat().st_mode & 0o077 == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("body, key", [
    ("[listen]\nhttps_port = 'x'\n", "listen.https_port"),
    ("[listen]\nmodule_port = 70000\n", "listen.module_port"),
    ("[nonsense]\n", "[nonsense]"),
    ("[server]\ndata_dir = 5\n", "server.data_dir"),
    ("[logging]\nlevel = 'loud'\n", "logging.level"),
    ("this is not toml", "not valid TOML"),
])
def test_broken_config_is_one_line_naming_the_key(tmp_path, body, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    result = run_cli("server", "-c", str(cfg), "check")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and key in line


def test_missing_config_file_says_so(tmp_path):
    result = run_cli("server", "-c", str(tmp_path / "nope.toml"), "init")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_commands_before_init_say_to_run_init(tmp_path, db_url):
    cfg = write_config(tmp_path / "h.toml", tmp_path / "data", db_url)
    error = one_line_error(run_cli("server", "-c", str(cfg), "user", "list"))
    assert "hausmeister-server init" in error


def test_user_administration(server_config):
    srv = server_config
    out = srv.ok("user", "add", "erin", "--role", "auditor", "--generate-password")
    assert "password:" in out
    assert "erin" in srv.ok("user", "list") and "auditor" in srv.ok("user", "list")
    srv.ok("user", "role", "erin", "supporter")
    srv.ok("user", "disable", "erin")
    assert "disabled" in srv.ok("user", "list")
    srv.ok("user", "disable", "erin", "--enable")
    srv.ok("user", "passwd", "erin", "--password-stdin", stdin="another-password-1\n")
    assert "already exists" in one_line_error(
        srv.cli("user", "add", "erin", "--role", "supporter", "--generate-password"))
    assert "role 'boss' is unknown" in one_line_error(
        srv.cli("user", "add", "frank", "--role", "boss", "--generate-password"))
    assert "too short" in one_line_error(
        srv.cli("user", "add", "frank", "--role", "supporter", "--password-stdin", stdin="short\n"))
    assert "does not exist" in one_line_error(srv.cli("user", "disable", "nobody"))
    assert "tenant 'acme' does not exist" in one_line_error(
        srv.cli("user", "add", "gina", "--role", "supporter", "--tenant", "acme", "--generate-password"))
    srv.ok("tenant", "add", "acme")
    srv.ok("user", "add", "gina", "--role", "admin", "--tenant", "acme", "--generate-password")
    assert "acme" in srv.ok("user", "list")


def test_check_reports_egress_refusals(server_config):
    srv = server_config
    out = srv.ok("check")
    assert "egress refusals:   0" in out and "schema current" in out
    assert "mail:              off" in out and "Gravatar:          off" in out
    refusals = srv.data_dir / "egress-refusals.jsonl"
    refusals.write_text(json.dumps({"address": "127.0.0.2", "port": 9}) + "\n")
    assert "egress refusals:   1" in srv.ok("check")


# --- an operator's own CA ------------------------------------------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_install_own_ca_and_server_certificate(tmp_path, server_config):
    srv = server_config
    ca_key, ca_cert = pki.create_ca("Operator Root")
    srv_key, srv_cert = pki.issue_server_cert(ca_key, ca_cert, ("localhost",), ("127.0.0.1",))
    files = {
        "ca.crt": _write(tmp_path / "op-ca.crt", pki.cert_pem(ca_cert)),
        "ca.key": _write(tmp_path / "op-ca.key", pki.key_pem(ca_key)),
        "srv.crt": _write(tmp_path / "op-srv.crt", pki.cert_pem(srv_cert)),
        "srv.key": _write(tmp_path / "op-srv.key", pki.key_pem(srv_key)),
    }
    before = snapshot(srv.cert_dir)
    # A key that does not match its certificate: refused, nothing changed.
    wrong = _write(tmp_path / "wrong.key", pki.key_pem(pki.new_key()))
    error = one_line_error(srv.cli("cert", "install", "--ca-cert", str(files["ca.crt"]),
                                   "--ca-key", str(files["ca.key"]), "--server-cert",
                                   str(files["srv.crt"]), "--server-key", str(wrong), "--replace-ca"))
    assert "does not match" in error and "nothing was installed" in error
    assert snapshot(srv.cert_dir) == before
    # A server certificate from another CA: refused.
    other_key, other_ca = pki.create_ca("Other")
    o_key, o_cert = pki.issue_server_cert(other_key, other_ca, ("localhost",), ())
    error = one_line_error(srv.cli(
        "cert", "install", "--ca-cert", str(files["ca.crt"]), "--server-cert",
        str(_write(tmp_path / "o.crt", pki.cert_pem(o_cert))), "--server-key",
        str(_write(tmp_path / "o.key", pki.key_pem(o_key))), "--replace-ca"))
    assert "not issued by the given CA" in error
    # Replacing the CA needs --replace-ca.
    error = one_line_error(srv.cli("cert", "install", "--ca-cert", str(files["ca.crt"]),
                                   "--ca-key", str(files["ca.key"])))
    assert "--replace-ca" in error
    assert snapshot(srv.cert_dir) == before
    # The right set installs, and the server then serves the operator's certificate.
    out = srv.ok("cert", "install", "--ca-cert", str(files["ca.crt"]), "--ca-key",
                 str(files["ca.key"]), "--server-cert", str(files["srv.crt"]), "--server-key",
                 str(files["srv.key"]), "--replace-ca")
    assert "installed CA" in out
    srv.start()
    try:
        from protocol.identity import fingerprint
        assert srv.fingerprint == fingerprint(ca_cert)
    finally:
        srv.stop()


def test_install_ca_without_key_cannot_enroll_but_says_why(tmp_path, server_config):
    srv = server_config
    ca_key, ca_cert = pki.create_ca("Operator Root")
    srv_key, srv_cert = pki.issue_server_cert(ca_key, ca_cert, ("localhost",), ("127.0.0.1",))
    srv.ok("cert", "install", "--ca-cert", str(_write(tmp_path / "c.crt", pki.cert_pem(ca_cert))),
           "--server-cert", str(_write(tmp_path / "s.crt", pki.cert_pem(srv_cert))),
           "--server-key", str(_write(tmp_path / "s.key", pki.key_pem(srv_key))), "--replace-ca")
    assert not (srv.cert_dir / "ca.key").exists()
    srv.ok("user", "add", "hank", "--role", "supporter", "--password-stdin",
           stdin=ADMIN_PASSWORD + "\n")
    srv.start()
    try:
        result = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                         srv.fingerprint, "--user", "hank", "--password-stdin",
                         "--home", str(tmp_path / "hank"), stdin=ADMIN_PASSWORD + "\n")
        assert result.returncode == 1 and "cannot issue module certificates" in result.stderr
    finally:
        srv.stop()


def test_mail_goes_only_through_the_configured_relay(tmp_path, db_url):
    """A real SMTP server (aiosmtpd) on 127.0.0.1: `mail test` queues, the server delivers."""
    from aiosmtpd.controller import Controller

    from .fixtures_server import free_port

    class Store:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append(envelope)
            return "250 OK"

    # Without a relay there is no mail at all.
    quiet = ServerProcess(write_config(tmp_path / "quiet.toml", tmp_path / "quiet", db_url),
                          tmp_path / "quiet")
    assert quiet.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
    error = one_line_error(quiet.cli("mail", "test", "ops@example.org"))
    assert "no SMTP relay" in error

    port = free_port()
    store = Store()
    relay = Controller(store, hostname="127.0.0.1", port=port)
    relay.start()
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "h.toml", data, db_url, extra=f"""
[mail]
smtp_host = "127.0.0.1"
smtp_port = {port}
security = "none"
from_address = "hausmeister@example.org"
""")
    srv = ServerProcess(cfg, data)
    try:
        assert srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n").returncode == 0
        assert "queued" in srv.ok("mail", "test", "ops@example.org")
        assert "queued: 1" in srv.ok("mail", "status")
        srv.start()
        deadline = time.monotonic() + 30
        while not store.messages and time.monotonic() < deadline:
            time.sleep(0.1)
        assert store.messages and store.messages[0].rcpt_tos == ["ops@example.org"]
        assert "sent: 1" in srv.ok("mail", "status")
        # delivered from the blocking pool: the server runs Twisted's epoll reactor, no asyncio
        # (with the JSON log without the log context per socket event: server.reactor)
        assert "reactor ServerEPollReactor" in srv.log(), srv.log()[-3000:]
    finally:
        srv.stop()
        relay.stop()


@pytest.mark.parametrize("kind, fragment", [
    ("latin-1", "is not UTF-8 text (byte 0xe4 on line 2): save it as UTF-8"),
    ("binary", "is not UTF-8 text"),
    ("folder", "cannot be read: it is a folder; pass --config with the TOML file itself"),
    ("unreadable", "cannot be read: permission denied; make it readable"),
])
def test_unreadable_config_is_one_line_and_exit_2(tmp_path, kind, fragment):
    cfg = tmp_path / "bad.toml"
    command = [sys.executable, "-m", "server.cli", "-c", str(cfg), "check"]
    if kind == "latin-1":
        cfg.write_bytes("[server]\ndata_dir = '/srv/M\u00e4rz'\n".encode("latin-1"))
    elif kind == "binary":
        cfg.write_bytes(bytes(range(128, 256)) * 8)
    elif kind == "folder":
        cfg.mkdir()
    else:
        cfg.write_text("[server]\n")
        cfg.chmod(0o600)
        if os.getuid() == 0:  # root reads anything: someone else's file, root without DAC override
            os.chown(cfg, 65534, 65534)
            command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hausmeister-server: error: config file {cfg} ") and fragment in lines[0]
