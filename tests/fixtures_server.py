"""A real Hausmeister server process on loopback, and the module CLIs as real processes.

The server runs ``hausmeister-server run`` with a config written for the test (ports 0, data in
tmp_path, the database the ``db_url`` fixture gives) and is stopped by its PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.state import read_state

CLIS = {
    "server": "server.cli",
    "supporter": "modules.supporter.cli",
    "host": "modules.remote_host.cli",
    "customer": "modules.customer.cli",
}

ADMIN_PASSWORD = "admin-password-123"
SUPPORTER_PASSWORD = "supporter-pass-456"


def run_cli(kind: str, *args: str, stdin: str | None = None, env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run one of the four console commands as its own process (same code as the entry point)."""
    return subprocess.run([sys.executable, "-m", CLIS[kind], *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def write_config(path: Path, data_dir: Path, db_url: str, extra: str = "") -> Path:
    path.write_text(f"""
[server]
data_dir = "{data_dir}"

[listen]
https_port = 0
module_port = 0

[database]
url = "{db_url}"

[certificates]
revocation_poll_seconds = 0.2

[security]
lockout_free_attempts = 2
lockout_base_seconds = 30
{extra}
""")
    return path


@dataclass
class ServerProcess:
    config: Path
    data_dir: Path
    process: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return self.info["https_url"]

    @property
    def fingerprint(self) -> str:
        return self.info["ca_fingerprint"]

    @property
    def module_port(self) -> int:
        return self.info["module_port"]

    @property
    def cert_dir(self) -> Path:
        return self.data_dir / "certs"

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return run_cli("server", "-c", str(self.config), *args, stdin=stdin)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.cli(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self, timeout: float = 30) -> "ServerProcess":
        self.log_path = self.log_path or self.data_dir.parent / "server.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "-c", str(self.config), "--log-level", "debug", "run"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            info = read_state(self.data_dir, self.process.pid)
            if info is not None:
                self.info = info
                return self
            time.sleep(0.05)
        raise AssertionError(f"server did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_with_external_relay(tmp_path: Path, db_url: str) -> tuple[ServerProcess, int]:
    """An initialised (not yet running) server whose sessions go through a separate relay
    process on the returned port (the caller starts that process)."""
    relay_port = free_port()
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "h.toml", data, db_url, extra=f"""
[relay]
port = {relay_port}
external = ["127.0.0.1:{relay_port}"]
""")
    srv = ServerProcess(cfg, data)
    result = srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return srv, relay_port


@pytest.fixture
def server_config(tmp_path, db_url) -> ServerProcess:
    """An initialised but not yet running server (admin password fixed)."""
    data = tmp_path / "data"
    srv = ServerProcess(write_config(tmp_path / "hausmeister.toml", data, db_url), data)
    result = srv.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return srv


@pytest.fixture
def running_server(server_config):
    server_config.start()
    yield server_config
    server_config.stop()


def add_enrolled_supporter(srv: ServerProcess, name: str, home: Path) -> Path:
    """A supporter user ``name`` whose module the real CLI enrolls in ``home``."""
    srv.ok("user", "add", name, "--role", "supporter", "--password-stdin",
           stdin=SUPPORTER_PASSWORD + "\n")
    result = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                     srv.fingerprint, "--user", name, "--password-stdin", "--home", str(home),
                     stdin=SUPPORTER_PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    return home


def add_enrolled_host(srv: ServerProcess, name: str, home: Path, password: str) -> Path:
    """A host ``name`` that the real CLI enrolls with a fresh token into ``home`` and gives the
    host password ``password``."""
    token = srv.ok("token", "create", "-q").strip()
    result = run_cli("host", "enroll", "--server", srv.url, "--ca-fingerprint", srv.fingerprint,
                     "--token", token, "--name", name, "--home", str(home))
    assert result.returncode == 0, result.stderr
    result = run_cli("host", "set-password", "--password-stdin", "--home", str(home),
                     stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    return home


@pytest.fixture
def enrolled_supporter(running_server, tmp_path):
    """A supporter user ``alice`` whose module is enrolled in ``tmp_path/alice``."""
    return add_enrolled_supporter(running_server, "alice", tmp_path / "alice")


@pytest.fixture
def enrolled_host(running_server, tmp_path):
    running_server.ok("group", "add", "office")
    token = running_server.ok("token", "create", "--group", "office", "-q").strip()
    home = tmp_path / "pc1"
    result = run_cli("host", "enroll", "--server", running_server.url, "--ca-fingerprint",
                     running_server.fingerprint, "--token", token, "--name", "pc1",
                     "--home", str(home))
    assert result.returncode == 0, result.stderr
    return home
