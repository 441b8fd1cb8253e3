"""N idle enrolled hosts on one server: server memory per host, and how fast all come back after
a server restart.

    python bench/idle_hosts.py [--hosts 2000] [--workers 2] [--heartbeat 60]
    python bench/idle_hosts.py --hosts 20000          # the target size (see RLIMIT note below)

What happens, all on 127.0.0.1:

1. A server (``hausmeister-server run``, epoll reactor, SQLite in a temporary folder unless
   ``--database-url``) on fixed ports, so a restart comes back where the hosts know it.
2. ``--hosts`` hosts are enrolled in bulk: key, CSR and certificate from the server's CA and a
   ``Host`` row, as the enrollment endpoint does after its token check; each gets a real module
   folder (key.pem, cert.pem, ca.pem, module.json).
3. ``--workers`` client processes run the real ``modules.remote_host.presence.HostPresence`` for
   their share of the hosts (Twisted epoll reactor): mutual TLS, ``Hello``, a ``Heartbeat`` every
   ``--heartbeat`` s (the server's ``presence.heartbeat_seconds``), reconnect with full jitter
   capped at 60 s.  First connections are ramped at ``--ramp`` per second.
4. Server RSS (/proc/PID/status VmRSS) before any host connects and after all N are registered
   and ``--hold`` s have passed (a heartbeat round and a presence flush): (after - before) / N.
5. The server is stopped (SIGTERM) and started again on the same ports; we time until every
   host is registered again: the hosts' own count (``Hello`` answered, so the server has written
   ``online``) and the database's ``hosts.online`` count must both reach N.  10 s later the
   restarted server's RSS is read again: bytes per host after a reconnect storm (against the
   first server's RSS without hosts), where thousands of connections were accepted at once.

Targets: 20,000 hosts at <= 40 KB each (40,000 bytes); all back <= 60 s after a restart.

File descriptors: the server needs one per host plus ~40.  This script raises the soft
RLIMIT_NOFILE of the server and the workers up to the hard limit; if the hard limit is too small
for ``--hosts`` it says so and runs with as many hosts as fit.  Never fails on timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BenchServer, Postgres, cpu_seconds, db_scalar, enroll_hosts, loadavg, machine_line, netstat_counters,
    nofile_limits, raise_nofile, rss_kib, workdir,
)

SERVER_SPARE_FDS = 60  # listening ports, epoll, database, log, thread pool, pipes


# --- the client worker (a separate process) ------------------------------------------------------

def worker_main(args) -> int:
    folders = [Path(line) for line in Path(args.folders_from).read_text().split()]
    raise_nofile(len(folders) + 200)
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner

    from modules.common.link.connection import ServerAddress
    from modules.common.link.folder import ModuleFolder
    from modules.remote_host.presence import HostPresence

    from collections import Counter

    from twisted.logger import formatEvent
    warnings = {"n": 0}
    kinds: Counter = Counter()

    def observer(event):  # keep Twisted's log quiet, but count the warnings and their kinds
        level = event.get("log_level")
        if level is not None and level.name in ("warn", "error", "critical"):
            warnings["n"] += 1
            text = re.sub(r"[0-9a-f-]{16,}|\d+(\.\d+)?", "N", formatEvent(event))
            kinds[text.splitlines()[0][:100] if text else "?"] += 1
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)

    address = ServerAddress("127.0.0.1", args.port)
    presences: list[HostPresence] = []
    pending = list(folders)
    per_tick = max(1, int(args.ramp / 20))

    def start_some():
        for _ in range(min(per_tick, len(pending))):
            presence = HostPresence(reactor, ModuleFolder(pending.pop()), address,
                                    on_offer=lambda offer: False)
            presence.start()
            presences.append(presence)
        if not pending and starter.running:
            starter.stop()

    def status():
        online = sum(1 for p in presences if p.state == "heartbeating")
        regs = sum(p.registered_count for p in presences)
        print(json.dumps({"online": online, "registrations": regs, "started": len(presences),
                          "warnings": warnings["n"], "kinds": dict(kinds.most_common(4)),
                          "t": time.monotonic()}), flush=True)

    starter = task.LoopingCall(start_some)
    starter.start(0.05)
    task.LoopingCall(status).start(0.25)
    reactor.run()
    return 0


# --- the driver ------------------------------------------------------------------------------------

class Workers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.status: dict[int, dict] = {}
        self.lock = threading.Lock()

    def spawn(self, folder_lists: list[Path], port: int, ramp: float) -> None:
        for i, lst in enumerate(folder_lists):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--folders-from", str(lst),
                 "--port", str(port), "--ramp", str(ramp / len(folder_lists))],
                stdout=subprocess.PIPE, stderr=open(lst.with_suffix(".log"), "wb"), text=True)
            self.procs.append(proc)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.status[i] = data

    def total(self, key: str) -> int:
        with self.lock:
            return sum(s.get(key, 0) for s in self.status.values())

    def fresh(self, since: float) -> bool:
        """Every worker has reported after ``since`` (time.monotonic)."""
        with self.lock:
            return len(self.status) == len(self.procs) and all(
                s.get("t", 0) > since for s in self.status.values())

    def warning_kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with self.lock:
            for st in self.status.values():
                for k, v in st.get("kinds", {}).items():
                    out[k] = out.get(k, 0) + v
        return out

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs if p.poll() is None)

    def rss_kib(self) -> int:
        return sum(rss_kib(p.pid) for p in self.procs if p.poll() is None)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_all_online(srv: BenchServer, workers: Workers, n: int, regs_before: int,
                    timeout: float, started: float, label: str) -> dict:
    """Poll until the hosts' count and the database's count both say all N are online."""
    t_clients = t_db = None
    deadline = started + timeout
    last_print = 0.0
    while time.monotonic() < deadline:
        now = time.monotonic()
        online = workers.total("online")
        regs = workers.total("registrations") - regs_before
        try:
            db_online = db_scalar(srv, "SELECT count(*) FROM hosts WHERE online")
        except Exception:  # the database file is busy or being reset; try again
            db_online = -1
        if t_clients is None and online >= n and regs >= n and workers.fresh(started):
            t_clients = now - started
        if t_db is None and db_online >= n and regs >= n and workers.fresh(started):
            t_db = now - started
        if now - last_print >= 5:
            last_print = now
            try:
                fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
            except OSError:
                fds = -1
            print(f"  {label} +{now - started:5.1f} s: hosts registered {online:6d}/{n} "
                  f"(db online {db_online:6d}); server CPU {cpu_seconds(srv.pid):6.1f} s, "
                  f"{fds} fds; client warnings {workers.total('warnings')}; load "
                  f"{loadavg()}", flush=True)
        if t_clients is not None and t_db is not None:
            break
        if not workers.alive():
            print("  a client worker died: see its log")
            break
        time.sleep(0.2)
    return {"clients_s": t_clients, "db_s": t_db, "online": workers.total("online"),
            "db_online": db_online}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--hosts", type=int, default=2000, help="enrolled hosts (default 2000)")
    p.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--heartbeat", type=float, default=60.0,
                   help="server's presence.heartbeat_seconds (default 60, the server's default)")
    p.add_argument("--ramp", type=float, default=200.0,
                   help="first connections per second, all workers together (default 200)")
    p.add_argument("--hold", type=float, default=None,
                   help="seconds all hosts stay idle before RSS is read (default heartbeat + 5)")
    p.add_argument("--idle-baseline", type=float, default=20.0,
                   help="seconds the server's CPU is measured with no host connected (default 20)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up waiting for all hosts after this many seconds (default 300)")
    p.add_argument("--database-url", default="",
                   help="server database (default: SQLite in the temporary folder)")
    p.add_argument("--postgres", action="store_true",
                   help="start a throwaway PostgreSQL (Debian binaries, fsync on) and use it")
    p.add_argument("--skip-restart", action="store_true",
                   help="measure memory only, no restart")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folders-from", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    hold = args.heartbeat + 5 if args.hold is None else args.hold
    n = args.hosts
    soft, hard = nofile_limits()
    fit = (hard if hard > 0 else 1 << 20) - SERVER_SPARE_FDS
    print(machine_line())
    if n > fit:
        print(f"note: the server needs ~{n + SERVER_SPARE_FDS} file descriptors for {n} hosts but "
              f"the hard RLIMIT_NOFILE here is {hard} (raising it needs CAP_SYS_RESOURCE): "
              f"running with {fit} hosts")
        n = fit
    workers_n = max(1, min(args.workers, n))
    print(f"{n} hosts in {workers_n} client processes, heartbeat {args.heartbeat:g} s, "
          f"first-connect ramp {args.ramp:g}/s, hold {hold:g} s")

    workers = Workers()
    with workdir(args.keep, "hausmeister-bench-hosts-") as w:
        database_url = args.database_url
        pg = None
        if args.postgres:
            pg = Postgres()
            database_url = pg.start()
        try:
            return measure(args, w, n, workers_n, hold, database_url, workers)
        finally:
            if pg is not None:
                pg.stop()


def measure(args, w: Path, n: int, workers_n: int, hold: float, database_url: str,
            workers: "Workers") -> int:
    print(f"database: {'SQLite in the temporary folder' if not database_url else database_url}")
    srv = BenchServer.create(w, fixed_ports=True, database_url=database_url, extra=f"""
[presence]
heartbeat_seconds = {args.heartbeat}

[limits]
# every simulated host connects from 127.0.0.1; in the field each has its own address
pending_per_address = {n + 100}
""")
    t = time.monotonic()
    creds = enroll_hosts(srv, n)
    enroll_s = time.monotonic() - t
    ca_pem = srv.ca_pem
    config = srv.config()
    module_port = config.listen.module_port
    lists = [w / f"worker-{i}.txt" for i in range(workers_n)]
    names: list[list[str]] = [[] for _ in lists]
    for i, cred in enumerate(creds):
        names[i % workers_n].append(str(write_folder(
            w / "hosts" / cred.host_id, cred, ca_pem, config.listen.https_port, module_port)))
    for lst, entries in zip(lists, names):
        lst.write_text("\n".join(entries))
    print(f"enrolled {n} hosts (certificates, database rows, module folders) in "
          f"{time.monotonic() - t:.1f} s ({enroll_s:.1f} s of it keys, certificates, rows)")

    srv.start(nofile=n + SERVER_SPARE_FDS + 100)
    try:
        time.sleep(3)
        rss0 = rss_kib(srv.pid)
        print(f"server pid {srv.pid}, module port {srv.module_port}: RSS {rss0 / 1024:.1f} MiB "
              "with no host connected")
        # its own timers (revocation poll, protocol probe, flushes) cost CPU without hosts too:
        # measured apart, so the heartbeats' share can be extrapolated to other host counts
        cpu_empty0, t_empty0 = cpu_seconds(srv.pid), time.monotonic()
        time.sleep(args.idle_baseline)
        empty_cpu = (cpu_seconds(srv.pid) - cpu_empty0) / max(1e-9, time.monotonic() - t_empty0)
        print(f"server CPU with no host connected: {empty_cpu * 100:.2f} % of a core "
              f"({args.idle_baseline:g} s; load {loadavg()})")
        net0 = netstat_counters()
        cpu_first0 = cpu_seconds(srv.pid)
        t0 = time.monotonic()
        workers.spawn(lists, srv.module_port, args.ramp)
        first = wait_all_online(srv, workers, n, 0, args.timeout, t0, "first connect")
        cpu_first = cpu_seconds(srv.pid) - cpu_first0
        print(f"first connect (ramped at {args.ramp:g}/s): hosts registered after "
              f"{fmt_s(first['clients_s'])}, database all online after {fmt_s(first['db_s'])}; "
              f"server CPU {cpu_first:.1f} s = {cpu_first / n * 1e3:.1f} ms per host")
        if first["clients_s"] is None:
            print("not every host registered: no memory figure; see the logs (--keep)")
            return 0
        cpu_idle0, t_idle0 = cpu_seconds(srv.pid), time.monotonic()
        time.sleep(hold)
        idle_cpu = (cpu_seconds(srv.pid) - cpu_idle0) / (time.monotonic() - t_idle0)
        rss1 = rss_kib(srv.pid)
        per_host = (rss1 - rss0) * 1024 / n
        still = workers.total("online")
        print(f"after {hold:g} s idle: server RSS {rss1 / 1024:.1f} MiB, {still}/{n} hosts "
              f"registered; server CPU while idle {idle_cpu * 100:.1f} % of a core; client "
              f"processes RSS {workers.rss_kib() / 1024:.0f} MiB")
        beats = n / args.heartbeat
        per_beat = max(0.0, idle_cpu - empty_cpu) / beats
        at_20k = empty_cpu + per_beat * 20000 / args.heartbeat
        idle_line = (f"RESULT: idle server CPU {idle_cpu * 100:.2f} % of a core with {n} hosts, "
              f"{empty_cpu * 100:.2f} % with none: {per_beat * 1e6:.0f} us per heartbeat "
              f"({beats:.0f}/s); at 20,000 hosts every {args.heartbeat:g} s that is "
              f"{at_20k * 100:.1f} % of a core; target <= 5 %: {at_20k * 100 / 5:.2f}x -> "
              f"{'MET' if at_20k <= 0.05 else 'NOT MET'} (load {loadavg()})")
        print(idle_line)

        kb = per_host / 1000
        memory = (f"RESULT: {n} idle hosts: server RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} "
                  f"MiB = {per_host:,.0f} bytes per host ({kb:.1f} KB); target <= 40 KB: "
                  f"{kb / 40:.2f}x -> {'MET' if kb <= 40 else 'NOT MET'}")
        if args.skip_restart:
            print()
            print(memory)
            print(idle_line)
            return 0

        # --- restart ---
        regs_before = workers.total("registrations")
        net1 = netstat_counters()
        t_stop = time.monotonic()
        stop_s = srv.stop()
        srv.start(nofile=n + SERVER_SPARE_FDS + 100)
        t_listen = time.monotonic()
        cpu_r0 = cpu_seconds(srv.pid)
        back = wait_all_online(srv, workers, n, regs_before, args.timeout, t_listen, "restart")
        restart_cpu = cpu_seconds(srv.pid) - cpu_r0
        # memory after the reconnect storm: every connection of the restarted server was
        # accepted within seconds of the others (the first connect was ramped)
        rss_storm = None
        if back["clients_s"] is not None:
            time.sleep(10)  # the last Hellos' batches and a presence flush
            rss_storm = rss_kib(srv.pid)
        net2 = netstat_counters()
        down_s = t_listen - t_stop
        print(f"restart: SIGTERM -> exit {stop_s:.1f} s, -> listening again "
              f"{down_s:.1f} s; all {n} hosts registered {fmt_s(back['clients_s'])} after the "
              f"server listened again (database: {fmt_s(back['db_s'])}); server CPU "
              f"{restart_cpu:.1f} s in that time ({restart_cpu / n * 1e3:.1f} ms per host)")
        overflow = {k: net2.get(k, 0) - net1.get(k, 0) for k in net2}
        overflow0 = {k: net1.get(k, 0) - net0.get(k, 0) for k in net1}
        print(f"kernel TCP counters (whole machine): first connect {overflow0}, restart "
              f"{overflow}")
        kinds = workers.warning_kinds()
        if kinds:
            print("warnings the hosts logged (all phases): " + "; ".join(
                f"{v} x {k!r}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        print(f"server log: {srv.count_log('missed') } missed-heartbeat drops, "
              f"{srv.count_log('newest connection wins')} replaced connections")

        print()
        print(memory)
        if rss_storm is not None:
            storm = (rss_storm - rss0) * 1024 / n
            print(f"RESULT: after the restart (all {n} back, +10 s): server RSS {rss_storm / 1024:.1f} "
                  f"MiB = {storm:,.0f} bytes per host ({storm / 1000:.1f} KB) against the first "
                  f"server's RSS without hosts")
        print(idle_line)
        print(f"RESULT: server CPU per registration: {cpu_first / n * 1e3:.2f} ms at first "
              f"connect, {restart_cpu / n * 1e3:.2f} ms after the restart; target <= 1.5 ms")
        if back["clients_s"] is not None and back["db_s"] is not None:
            total = max(back["clients_s"], back["db_s"])
            print(f"RESULT: after a restart all {n} hosts were back {total:.1f} s after the "
                  f"server listened again ({total + down_s:.1f} s after SIGTERM); target <= 60 s: "
                  f"{total / 60:.2f}x -> {'MET' if total <= 60 else 'NOT MET'}")
        else:
            print(f"RESULT: after a restart only {back['online']}/{n} hosts (database "
                  f"{back['db_online']}) were back within {args.timeout:g} s: target NOT MET")
        if n < args.hosts:
            print(f"(run with {n} instead of {args.hosts} hosts: file descriptor limit)")
    finally:
        workers.stop()
        srv.stop()
    return 0


def write_folder(path: Path, cred, ca_pem: bytes, https_port: int, module_port: int) -> Path:
    """The module folder ``ModuleFolder.save`` writes (key.pem 0600, cert.pem, ca.pem,
    module.json), minus its fsync per file: 80,000 fsyncs would make 20,000 hosts slow to set up."""
    path.mkdir(parents=True, mode=0o700)
    fd = os.open(path / "key.pem", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(cred.key_pem)
    (path / "cert.pem").write_bytes(cred.cert_pem)
    (path / "ca.pem").write_bytes(ca_pem)
    (path / "module.json").write_text(json.dumps({
        "server": f"https://127.0.0.1:{https_port}", "identity": f"hausmeister:host:{cred.host_id}",
        "tenant": "default", "module_host": "127.0.0.1", "module_port": module_port,
        "renew_before_days": 30, "host_id": cred.host_id}, indent=1))
    return path


def fmt_s(value: float | None) -> str:
    return "never (timeout)" if value is None else f"{value:.1f} s"


if __name__ == "__main__":
    sys.exit(main())
