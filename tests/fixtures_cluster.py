"""Several server nodes on one PostgreSQL, as real processes (``tests/test_cluster*.py``).

``node_config`` writes one node's config (shared certificates, relay secret, protocol and
recordings folders; its own data folder and log file); ``Console`` is a browser's cookie sent to
whichever node; ``hosts_node`` and ``protocol_lines`` read what the nodes wrote.
"""

from __future__ import annotations

import http.client
import json
import re
import ssl
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from sqlalchemy import select

from server.db import Database
from server.db.models import Host

from .fixtures_server import ServerProcess


def node_config(tmp_path: Path, name: str, db_url: str, relay_port: int,
                relay_ports: list[int] | None = None, cluster_extra: str = "",
                extra: str = "") -> ServerProcess:
    """A node ``name``; its sessions go to the relay processes on ``relay_ports`` (default:
    ``relay_port`` alone).  ``cluster_extra`` are more ``[cluster]`` keys, ``extra`` more
    tables (``[mail]``)."""
    shared = tmp_path / "shared"
    data = tmp_path / name
    config = tmp_path / f"{name}.toml"
    external = ", ".join(f'"127.0.0.1:{port}"' for port in relay_ports or [relay_port])
    config.write_text(f"""
[server]
data_dir = "{data}"
cert_dir = "{shared}/certs"
protocol_dir = "{shared}/protocols"
recording_dir = "{shared}/recordings"

[listen]
https_port = 0
module_port = 0

[database]
url = "{db_url}"

[certificates]
revocation_poll_seconds = 0.5

[relay]
port = {relay_port}
external = [{external}]
secret_file = "{shared}/relay.secret"

[cluster]
enabled = true
node_name = "{name}"
node_timeout_seconds = 3
{cluster_extra}
{extra}
""")
    return ServerProcess(config, data, log_path=tmp_path / f"{name}.log")


class Console:
    """A browser's view of the console cookie: one cookie, sent to whichever node."""

    def __init__(self, ca_file: Path) -> None:
        self.tls = ssl.create_default_context(cafile=str(ca_file))
        self.tls.check_hostname = False  # the node is reached by address; the CA is pinned
        self.cookie = ""

    def request(self, base_url: str, method: str, path: str, form: dict | None = None):
        parts = urlsplit(base_url)
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=self.tls,
                                           timeout=30)
        headers = {"Cookie": f"hm_console={self.cookie}"} if self.cookie else {}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        page = response.read().decode(errors="replace")
        for header, value in response.getheaders():
            found = re.match(r"hm_console=([^;]*)", value) if header.lower() == "set-cookie" else None
            if found:
                self.cookie = found.group(1)
        conn.close()
        return response.status, response.getheader("Location") or "", page


def hosts_node(db: Database) -> dict[str, tuple[str | None, bool]]:
    return {name: (node, online) for name, node, online in db.call(
        lambda s: s.execute(select(Host.name, Host.node, Host.online)).all())}


def protocol_lines(tmp_path: Path, session_id: str) -> list[dict]:
    lines = []
    for path in (tmp_path / "shared" / "protocols").rglob(f"*{session_id}*.jsonl"):
        lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines
