"""Brokering a host session on one node and across two nodes: ``ConnectHost`` sent -> answered.

    python bench/cluster_brokering.py [--sessions 100]

A throwaway PostgreSQL, two ``hausmeister-server run`` nodes (``[cluster]`` on, node-a and node-b)
and one relay process on 127.0.0.1.  A supporter module (enrolled through the real HTTPS
enrollment) keeps its control connection to node A; a host module (enrolled through the real
CLI) connects first to node A, then to node B, and accepts every offer.  Each sample is one
``ConnectHost``: the broker checks the supporter's rights and lock-out, writes the session row
and its ``created`` protocol line, offers the session to the host and writes ``joined`` — on one
node the offer is a call on the host's control connection; across nodes it goes to node B and
back through PostgreSQL ``LISTEN/NOTIFY``.  The relay legs are not opened (not what is measured).
Prints p50/p99 for both and the ratio across/one.  Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ADMIN_PASSWORD, ROOT, BenchServer, Postgres, add_supporter, enroll_supporter_module,
    free_port, loadavg, machine_line, stop_process, summary_ms, workdir,
)


def node_config(w: Path, name: str, url: str, relay_port: int) -> BenchServer:
    shared = w / "shared"
    data = w / name / "data"
    data.mkdir(parents=True, exist_ok=True)
    path = w / f"{name}.toml"
    path.write_text(f"""
[server]
data_dir = "{data}"
cert_dir = "{shared}/certs"
protocol_dir = "{shared}/protocols"
recording_dir = "{shared}/recordings"

[listen]
interface = "127.0.0.1"
https_port = 0
module_port = 0

[database]
url = "{url}"

[relay]
port = {relay_port}
external = ["127.0.0.1:{relay_port}"]
secret_file = "{shared}/relay.secret"

[cluster]
enabled = true
node_name = "{name}"
node_timeout_seconds = 3

[logging]
format = "json"
""")
    return BenchServer(w / name, path, data)


async def run(reactor, args) -> int:
    from modules.common.link.connection import ServerAddress, connect, hello
    from modules.common.link.folder import ModuleFolder
    from protocol import control

    print(machine_line())
    pg = Postgres()
    url = pg.start()
    relay = None
    nodes: list[BenchServer] = []
    try:
        with workdir(args.keep, "hausmeister-bench-cluster-") as w:
            relay_port = free_port()
            a, b = node_config(w, "node-a", url, relay_port), node_config(w, "node-b", url, relay_port)
            a.cli("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
            relay_log = open(w / "relay.log", "ab")
            relay = subprocess.Popen([sys.executable, "-m", "server.cli", "-c", str(a.config_path),
                                      "run", "--role", "relay"], stdout=relay_log,
                                     stderr=subprocess.STDOUT, cwd=ROOT)
            nodes = [a.start(), b.start()]
            add_supporter(a)
            supporter_folder = ModuleFolder(enroll_supporter_module(a, w / "supporter"))
            token = a.cli("token", "create", "-q").strip()
            result = subprocess.run(
                [sys.executable, "-m", "modules.remote_host.cli", "enroll", "--server",
                 a.https_url, "--ca-fingerprint", a.info["ca_fingerprint"], "--token", token,
                 "--name", "bench-host", "--home", str(w / "host")],
                capture_output=True, text=True, timeout=120, cwd=ROOT)
            if result.returncode != 0:
                raise RuntimeError(f"host enrollment failed:\n{result.stderr}")
            host_folder = ModuleFolder(w / "host")
            host_id = json.loads((w / "host" / "module.json").read_text())["host_id"]
            ca_pem = supporter_folder.ca_path.read_bytes()
            supporter = await connect(reactor, ServerAddress("127.0.0.1", a.module_port), ca_pem,
                                      supporter_folder)
            await hello(supporter, "supporter")
            rows = []
            for label, node in (("host on the same node", a), ("host on the other node", b)):
                host = await connect(reactor, ServerAddress("127.0.0.1", node.module_port), ca_pem,
                                     host_folder)
                host.on_offer = lambda offer: True
                await hello(host, "host")
                deadline = time.monotonic() + 30  # node A learns the live nodes every second
                while True:
                    try:
                        await supporter.callRemote(control.ConnectHost, host=host_id)
                        break
                    except control.HostOffline:
                        if time.monotonic() > deadline:
                            raise
                        from twisted.internet import task
                        await task.deferLater(reactor, 0.2, lambda: None)
                for _ in range(5):  # warm-up
                    await supporter.callRemote(control.ConnectHost, host=host_id)
                samples = []
                for _ in range(args.sessions):
                    t0 = time.perf_counter()
                    await supporter.callRemote(control.ConnectHost, host=host_id)
                    samples.append(time.perf_counter() - t0)
                host.transport.loseConnection()
                rows.append((label, summary_ms(samples)))
            supporter.transport.loseConnection()
            print(f"ConnectHost -> answered, {args.sessions} sessions each, supporter on node A "
                  f"(load {loadavg()}):")
            for label, s in rows:
                print(f"  {label:24s} p50 {s['p50']:7.1f} ms   p99 {s['p99']:7.1f} ms   "
                      f"p90 {s['p90']:7.1f} ms")
            print(f"  across / one node: p50 x{rows[1][1]['p50'] / rows[0][1]['p50']:.2f}, "
                  f"p99 x{rows[1][1]['p99'] / rows[0][1]['p99']:.2f}")
    finally:
        for node in nodes:
            node.stop()
        if relay is not None:
            stop_process(relay)
        pg.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 10_000:
        print("cluster_brokering: error: --sessions must be 1-10000", file=sys.stderr)
        return 2
    from twisted.internet import defer, task
    outcome = {"code": 0}

    def go(reactor):
        async def body():
            outcome["code"] = await run(reactor, args)
        return defer.ensureDeferred(body())
    try:
        task.react(go)
    except SystemExit:
        pass
    return outcome["code"]

if __name__ == "__main__":
    sys.exit(main())
