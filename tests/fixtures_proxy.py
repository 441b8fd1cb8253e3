"""A real HTTP proxy (Debian's tinyproxy) on 127.0.0.1 that allows only CONNECT to the ports the
test names, with Basic auth; its log shows every tunnel it opened or refused.  Recipe:
TESTING.md section 13.  Plain HTTP through it is refused too (FilterDefaultDeny), so the only
way through is a CONNECT tunnel.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PROXY_USER = "tester"
PROXY_PASSWORD = "s3cret-proxy"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tinyproxy:
    def __init__(self, folder: Path, connect_ports: list[int]) -> None:
        if not shutil.which("tinyproxy"):
            raise AssertionError("Debian tinyproxy is missing: run `make test-system-packages`")
        self.folder = folder
        self.port = _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        # with FilterURLs a CONNECT is matched as "host:port" and a plain request by its URL:
        # only the CONNECT targets are listed, so plain HTTP is refused (FilterDefaultDeny)
        (folder / "filter").write_text("".join(f"^127\\.0\\.0\\.1:{p}$\n" for p in connect_ports))
        ports = "\n".join(f"ConnectPort {p}" for p in connect_ports)
        (folder / "tinyproxy.conf").write_text(f"""Port {self.port}
Listen 127.0.0.1
Timeout 60
MaxClients 50
LogLevel Connect
PidFile "{folder}/tinyproxy.pid"
Allow 127.0.0.1
{ports}
BasicAuth {PROXY_USER} {PROXY_PASSWORD}
DisableViaHeader Yes
Filter "{folder}/filter"
FilterURLs Yes
FilterType ere
FilterDefaultDeny Yes
""")
        self.log_path = folder / "tinyproxy.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{self.port}"

    @property
    def url_without_password(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> "Tinyproxy":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(["tinyproxy", "-d", "-c", str(self.folder / "tinyproxy.conf")],
                                        stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"tinyproxy exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"tinyproxy did not listen in {timeout} s: {self.log()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tunnels(self) -> int:
        """How many CONNECT tunnels the proxy opened (only the allowed ports can get one)."""
        return self.log().count("Established connection to host")

    def refusals(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if "Refused CONNECT" in line or "refused" in line.lower()
                or "Unauthorized" in line or "authorization" in line.lower()]
