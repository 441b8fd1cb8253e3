"""A bounded flood of idle and half-finished handshakes against the module port (issue 10, #3).

Starts a real server in a temporary folder on 127.0.0.1, enrolls a supporter and a host with the
real CLIs, then lets worker processes open ``--connections`` TCP connections from loopback
addresses 127.0.1.x that never send a ClientHello (a ``--half`` share sends the first 40 bytes
of one and stops).  Connections the server closes are reopened (``--reconnect``, at most
``--max-attempts`` in all), so the pressure holds for ``--hold`` seconds; then the workers close
everything.  While the flood is held, the enrolled host and supporter run ``status`` and a
browser's request goes to the console.

Prints: connections held (most open at once, open at the end of the hold), how fast the server
closed them (at once over a cap, or at the handshake deadline), whether the host, the supporter
and the console got in during the flood and how long it took, and the server's RSS before,
at its peak during, and after the flood (with what ``malloc_trim`` gave back, from the log).

Loopback only, bounded in count and time; nothing fails on a number.

    python bench/handshake_flood.py                       # 20,000 connections, 20 s, ~1 min
    python bench/handshake_flood.py --connections 5000 --hold 10
    HAUSMEISTER_FLOOD_RELEASE=nothing python bench/handshake_flood.py   # A/B: collect, trim or not
    python bench/handshake_flood.py --server-tree /tmp/old  # an older checkout's server
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import selectors
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import (SUPPORTER_PASSWORD, BenchServer, machine_line,  # noqa: E402
                     netstat_counters, percentile, rss_kib, workdir)

ROOT = _common.ROOT
CLIS = {"supporter": "modules.supporter.cli", "host": "modules.remote_host.cli"}


# --- the flood: one worker process ---------------------------------------------------------------

def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def worker_main(args) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sources = [f"127.0.1.{i}" for i in range(args.first_source, args.first_source + args.sources)]
    half_hello = client_hello()[:40]
    sel = selectors.DefaultSelector()
    target, max_attempts = args.connections, args.max_attempts
    started = time.monotonic()
    stop_at = started + args.hold
    attempts = connected = failed = 0
    delays: list[float] = []        # connected -> closed by the server, seconds
    open_now = most_open = 0
    last_report = 0.0

    def open_one(n: int) -> None:
        nonlocal attempts, failed
        attempts += 1
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind((sources[n % len(sources)], 0))
            s.connect_ex(("127.0.0.1", args.port))
        except OSError:
            failed += 1
            s.close()
            return
        half = (n % 1000) < args.half * 1000
        sel.register(s, selectors.EVENT_WRITE, [None, half])

    live = 0  # registered sockets (connecting or open)
    while time.monotonic() < stop_at:
        batch = 0
        while live < target and attempts < max_attempts and batch < 500:
            if attempts >= target and not args.reconnect:
                break
            open_one(attempts)
            live = len(sel.get_map())
            batch += 1
        for key, events in sel.select(0.05):
            s, state = key.fileobj, key.data
            now = time.monotonic()
            if state[0] is None:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    failed += 1
                    sel.unregister(s)
                    s.close()
                    continue
                state[0] = now
                connected += 1
                open_now += 1
                most_open = max(most_open, open_now)
                if state[1]:
                    try:
                        s.send(half_hello)
                    except OSError:
                        pass
                sel.modify(s, selectors.EVENT_READ, state)
                continue
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data:
                continue
            delays.append(now - state[0])
            open_now -= 1
            sel.unregister(s)
            s.close()
        live = len(sel.get_map())
        if time.monotonic() - last_report >= 0.5:
            last_report = time.monotonic()
            print(json.dumps({"open": open_now, "attempts": attempts}), flush=True)
    open_at_end = open_now
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    print(json.dumps({"final": True, "attempts": attempts, "connected": connected,
                      "failed": failed, "delays": delays, "most_open": most_open,
                      "open_at_end": open_at_end}), flush=True)
    return 0


class Flood:
    """The worker processes and their progress lines."""

    def __init__(self, args, port: int) -> None:
        self.procs: list[subprocess.Popen] = []
        self.open: list[int] = []
        self.final: list[dict] = []
        self._threads = []
        per = args.connections // args.workers
        sources_each = max(1, args.sources // args.workers)
        for i in range(args.workers):
            cmd = [sys.executable, __file__, "--worker", "--port", str(port),
                   "--connections", str(per), "--hold", str(args.hold),
                   "--max-attempts", str(args.max_attempts // args.workers),
                   "--half", str(args.half), "--sources", str(sources_each),
                   "--first-source", str(1 + i * sources_each)]
            if args.reconnect:
                cmd.append("--reconnect")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            self.open.append(0)
            t = threading.Thread(target=self._read, args=(i, proc), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            data = json.loads(line)
            if data.get("final"):
                self.final.append(data)
            else:
                self.open[i] = data["open"]

    def held(self) -> int:
        return sum(self.open)

    def wait(self, timeout: float) -> None:
        for proc in self.procs:
            proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=5)


# --- the run --------------------------------------------------------------------------------------

def module_cli(kind: str, *args: str, stdin: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    # the modules always come from this checkout (they are the clients)
    return subprocess.run([sys.executable, "-m", CLIS[kind], *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)


def enroll(srv: BenchServer, w: Path) -> tuple[Path, Path]:
    srv.cli("user", "add", "alice", "--role", "supporter", "--password-stdin",
            stdin=SUPPORTER_PASSWORD + "\n")
    fp = srv.info["ca_fingerprint"]
    supporter = w / "alice"
    r = module_cli("supporter", "enroll", "--server", srv.https_url, "--ca-fingerprint", fp,
                   "--user", "alice", "--password-stdin", "--home", str(supporter),
                   stdin=SUPPORTER_PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    srv.cli("group", "add", "office")
    token = srv.cli("token", "create", "--group", "office", "-q").strip()
    host = w / "pc1"
    r = module_cli("host", "enroll", "--server", srv.https_url, "--ca-fingerprint", fp,
                   "--token", token, "--name", "pc1", "--home", str(host))
    assert r.returncode == 0, r.stderr
    return supporter, host


def probe_status(kind: str, home: Path) -> tuple[bool, float, str]:
    started = time.monotonic()
    r = module_cli(kind, "status", "--home", str(home), "--no-renew", timeout=90)
    took = time.monotonic() - started
    return r.returncode == 0, took, (r.stderr.strip().splitlines() or [""])[-1]


def probe_console(srv: BenchServer) -> tuple[bool, float, str]:
    ctx = ssl.create_default_context(cadata=srv.ca_pem.decode())
    started = time.monotonic()
    try:
        with urllib.request.urlopen(srv.https_url + "/console/login", context=ctx,
                                    timeout=60) as resp:
            return resp.status == 200, time.monotonic() - started, f"HTTP {resp.status}"
    except Exception as exc:  # noqa: BLE001 - a figure, not a failure
        return False, time.monotonic() - started, f"{type(exc).__name__}: {exc}"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=20000, help="flood size (all workers)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sources", type=int, default=20, help="loopback source addresses 127.0.1.x")
    p.add_argument("--half", type=float, default=0.25,
                   help="share of connections that send half a ClientHello")
    p.add_argument("--hold", type=float, default=20.0, help="seconds the flood is held")
    p.add_argument("--reconnect", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-attempts", type=int, default=0, help="default: 5 x connections")
    p.add_argument("--deadline", type=float, default=None,
                   help="[limits] tls_handshake_seconds (default: the server's default)")
    p.add_argument("--server-tree", type=Path, default=None,
                   help="run the server from another checkout (e.g. git archive of an older commit)")
    p.add_argument("--keep", action="store_true")
    # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--first-source", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)
    args.connections = max(1, min(args.connections, 60000))
    args.hold = max(1.0, min(args.hold, 120.0))
    args.max_attempts = args.max_attempts or 5 * args.connections
    if args.server_tree is not None:
        _common.ROOT = args.server_tree.resolve()  # BenchServer runs server.cli from there
    extra = ""
    if args.deadline is not None:
        extra = f"\n[limits]\ntls_handshake_seconds = {args.deadline}\n"

    print(machine_line())
    with workdir(args.keep, prefix="hausmeister-flood-") as w:
        srv = BenchServer.create(w, extra=extra)
        srv.start(nofile=1 << 20)
        try:
            return run(args, srv, w)
        finally:
            srv.stop()


def run(args, srv: BenchServer, w: Path) -> int:
    supporter, host = enroll(srv, w)
    limits_line = [line for line in srv.log_tail(100000).splitlines()
                   if "connection limits:" in line]
    print(f"server: pid {srv.pid}, module port {srv.module_port}, "
          f"{'checkout ' + str(_common.ROOT) if args.server_tree else 'this checkout'}")
    if limits_line:
        print("server says: " + json.loads(limits_line[-1]).get("msg", limits_line[-1]))
    for probe in (lambda: probe_status("host", host), lambda: probe_status("supporter", supporter),
                  lambda: probe_console(srv)):
        probe()  # warm-up: every path has run once before RSS is measured
    rss_before = rss_kib(srv.pid)
    fds_before = open_fds(srv.pid)
    overflows_before = netstat_counters()
    print(f"flood: {args.connections} connections from {args.sources} addresses "
          f"(127.0.1.1-{args.sources}), {args.half:.0%} send half a ClientHello, held "
          f"{args.hold:g} s, reconnect {'on' if args.reconnect else 'off'} "
          f"(at most {args.max_attempts} attempts)")

    peak, fds_peak = [rss_before], [fds_before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            try:
                peak[0] = max(peak[0], rss_kib(srv.pid))
                fds_peak[0] = max(fds_peak[0], open_fds(srv.pid))
            except OSError:
                return
            time.sleep(0.2)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    flood = Flood(args, srv.module_port)
    # let it ramp up: until the held count stops growing (at most a third of the hold)
    held_seen, last_growth = 0, time.monotonic()
    while time.monotonic() - started < args.hold / 3:
        held = flood.held()
        if held > held_seen * 1.02:
            held_seen, last_growth = held, time.monotonic()
        elif time.monotonic() - last_growth > 1.5 and held_seen:
            break
        time.sleep(0.2)
    held_at_probe = flood.held()
    fds_at_probe = open_fds(srv.pid) - fds_before
    probes = {"host status": probe_status("host", host),
              "supporter status": probe_status("supporter", supporter),
              "console": probe_console(srv)}
    held_after_probe = flood.held()
    rss_during = rss_kib(srv.pid)
    flood.wait(timeout=args.hold + 60)
    ended = time.monotonic()
    sampling.set()
    sampler.join(timeout=2)
    finals = flood.final
    # after: give the guard a sweep to notice the flood has drained, then measure twice
    time.sleep(3)
    rss_after = rss_kib(srv.pid)
    time.sleep(7)
    rss_after_10s = rss_kib(srv.pid)
    time.sleep(10)
    rss_after_20s = rss_kib(srv.pid)
    after_probe = probe_status("supporter", supporter)

    delays = sorted(d for f in finals for d in f["delays"])
    at_once = sum(1 for d in delays if d < 1.0)
    attempts = sum(f["attempts"] for f in finals)
    connected = sum(f["connected"] for f in finals)
    print()
    print(f"connections: {attempts} attempts, {connected} connected, "
          f"{sum(f['failed'] for f in finals)} failed to connect")
    overflows = {k: v - overflows_before.get(k, 0) for k, v in netstat_counters().items()}
    print(f"held by the server (its open files above the {fds_before} before): at most "
          f"{fds_peak[0] - fds_before}, {fds_at_probe} when the probes ran")
    print(f"open as the clients saw it: at most {sum(f['most_open'] for f in finals)}, "
          f"{held_at_probe} when the probes ran, {sum(f['open_at_end'] for f in finals)} at the "
          f"end after {ended - started:.1f} s (includes connections still in the kernel's accept "
          f"queue and SYN-cookie handshakes the server never saw); kernel: "
          + ", ".join(f"{k} +{v}" for k, v in overflows.items()))
    if delays:
        late = [d for d in delays if d >= 1.0]
        print(f"closed by the server: {len(delays)}; {at_once} within 1 s of connecting (over a cap, or "
              f"displaced by a newer one); {len(late)} later: "
              + (f"p50 {percentile(late, 50):.1f} s, p90 {percentile(late, 90):.1f} s, "
                 f"max {late[-1]:.1f} s" if late else "none"))
    else:
        print("closed by the server: none")
    for name, (ok, took, detail) in probes.items():
        print(f"during the flood: {name}: {'got in' if ok else 'FAILED'} in {took:.2f} s"
              + ("" if ok else f" ({detail})"))
    print(f"after the flood: supporter status: {'got in' if after_probe[0] else 'FAILED'} "
          f"in {after_probe[1]:.2f} s")
    print(f"server RSS: before {mib(rss_before)}, during {mib(rss_during)} "
          f"(peak {mib(peak[0])}), after it {mib(rss_after)} (3 s), {mib(rss_after_10s)} (10 s), "
          f"{mib(rss_after_20s)} (20 s)")
    trims = [json.loads(line).get("msg", line) for line in srv.log_tail(10**7).splitlines()
             if "has drained" in line]
    print("after the flood: " + ("; ".join(trims) if trims else "not run (or not in this server)"))
    summaries = srv.count_log("more connections in the last")
    singles = sum(srv.count_log(n) for n in ("connection from 127.0.1.",))
    print(f"log: {singles} lines about single flood connections, {summaries} summary lines")
    print(f"server process still running: {srv.process.poll() is None}; held after the probes: "
          f"{held_after_probe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
