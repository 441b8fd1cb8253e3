"""Server instructions per heartbeat, counted by valgrind (callgrind): the load-independent figure
of the idle-hosts row (issue 14), for this tree and, with ``--before DIR``, another in the same run.

    python bench/heartbeat_instructions.py [--hosts 200] [--rounds 5] [--before /tmp/before]
    python bench/heartbeat_instructions.py --before /tmp/t9e --tree /tmp/t669   # two other trees

This machine has no hardware performance counters and its CPU time moves by ±10 % with other
people's tests; the number of instructions the server executes for the same work does not.

Per tree, all on 127.0.0.1 in a temporary folder:

1. ``hausmeister-server init``, ``--hosts`` hosts enrolled in bulk (``_common.enroll_hosts``), all
   with that tree's code (``PYTHONPATH`` and working directory = the tree).
2. The server (``python -m server.cli run``, SQLite, log level info as ``idle_hosts.py``) under
   ``valgrind --tool=callgrind --instr-atstart=no``: nothing is counted (and it runs ~5x slower
   only) until the client switches instrumentation on.  ``presence.heartbeat_seconds`` is 3600
   (no heartbeat by timer: the client sends them), ``flush_seconds`` ``--flush``.
3. A client process with the tree's module code (``modules.common.link.connection.connect`` and
   ``hello``: the tree's TLS offer, certificate, cipher list) connects every host over mutual TLS
   and says ``Hello``; it prints what TLS negotiated.  After the Hello's presence flush:
   * heartbeat window: ``callgrind_control -i on``; ``--rounds`` x ``--hosts`` ``Heartbeat``
     commands, one at a time (each waits for the answer of the one before: one ready socket per
     loop turn, as 333 heartbeats a second at 20,000 hosts mostly are), then ``--flush`` + 1 s
     so the batched presence write of those heartbeats runs inside the window; ``-i off``, dump;
   * base window of the same wall time with all hosts connected and silent (the server's
     timers: guard sweep, expiry scan, revocation poll): ``-i on``, wait, ``-i off``, dump.
   Instructions per heartbeat = (heartbeat window's Ir - base window's Ir) / heartbeats.  The
   base is small (printed); the net figure is what the 19,940-host bench's "µs per heartbeat
   above the base" measures, without the load.  Threads are counted apart
   (``--separate-threads``): the reactor thread's share is the heartbeat path itself; the
   rest is the blocking pool's presence flush, whose count per window (one every ``--flush``
   s) moves the total by ~1-3 % from run to run.

``--annotate`` keeps the dumps and prints ``callgrind_annotate``'s top functions per tree; the
files stay in ``--out`` (default a temporary folder, printed with ``--keep``) for comparing
functions between trees (``callgrind_annotate --inclusive=yes FILE``).  Instruction counts are
not time: a cache miss costs no instruction.  Never fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# --- helpers run inside a tree's interpreter ------------------------------------------------------

def _use_tree(tree: str) -> None:
    """Import ``server``/``modules``/``protocol`` from ``tree``; ``_common`` (this bench's) is
    imported after, and must not put this checkout in front again."""
    root = str(ROOT)
    sys.path[:] = [p for p in sys.path if p not in (root, "", ".")]
    sys.path.insert(0, tree)
    sys.path.append(root)  # present, so _common does not insert it at the front


def prepare_main(args) -> int:
    """Enroll ``--hosts`` hosts into the server in ``--workdir``; write their folders."""
    _use_tree(args.tree)
    from _common import BenchServer, enroll_hosts
    from idle_hosts import write_folder
    w = Path(args.workdir)
    srv = BenchServer(w, w / "hausmeister.toml", w / "data")
    config = srv.config()
    creds = enroll_hosts(srv, args.hosts, processes=1)
    ca_pem = srv.ca_pem
    folders = [str(write_folder(w / "hosts" / c.host_id, c, ca_pem, config.listen.https_port,
                                config.listen.module_port)) for c in creds]
    (w / "folders.txt").write_text("\n".join(folders))
    return 0


def client_main(args) -> int:
    """Connect the hosts, Hello, then the two measured windows (see the module's docstring)."""
    _use_tree(args.tree)
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import defer, reactor, task
    from twisted.internet.threads import deferToThread

    from modules.common.link.connection import ServerAddress, connect, hello
    from modules.common.link.folder import ModuleFolder
    from protocol import control

    folders = [ModuleFolder(Path(p)) for p in Path(args.folders).read_text().split()]
    address = ServerAddress("127.0.0.1", args.port)
    out: dict = {}

    def control_call(*what: str) -> defer.Deferred:
        return deferToThread(subprocess.run, [args.callgrind_control, *what, str(args.server_pid)],
                             check=True, capture_output=True, timeout=300)

    def sleep(seconds: float) -> defer.Deferred:
        return task.deferLater(reactor, seconds, lambda: None)

    async def run() -> None:
        conns = []
        sem = defer.DeferredSemaphore(8)

        async def one(folder):
            conn = await connect(reactor, address, folder.ca_path.read_bytes(), folder, timeout=120)
            await hello(conn, "host")
            conns.append(conn)
        await defer.gatherResults([defer.Deferred.fromCoroutine(
            _limited(sem, one, f)) for f in folders], consumeErrors=True)
        handle = conns[0].transport.getHandle()
        group = getattr(handle, "get_group_name", lambda: None)()
        out["tls"] = {"version": handle.get_protocol_version_name(),
                      "cipher": handle.get_cipher_name(), "group": group}
        await sleep(args.flush + 1.0)  # the Hellos' presence flush, outside the windows
        # heartbeat window
        await control_call("-i", "on")
        t0 = time.monotonic()
        beats = 0
        for _ in range(args.rounds):
            for conn in conns:
                await conn.callRemote(control.Heartbeat)
                beats += 1
        beat_s = time.monotonic() - t0
        await sleep(args.flush + 1.0)
        window = time.monotonic() - t0
        await control_call("-i", "off")
        await control_call("--dump=heartbeats")
        # base window: same wall time, nothing sent
        await control_call("-i", "on")
        t1 = time.monotonic()
        await sleep(window)
        base_window = time.monotonic() - t1
        await control_call("-i", "off")
        await control_call("--dump=base")
        out.update(beats=beats, beat_s=beat_s, window_s=window, base_s=base_window,
                   lost=sum(1 for conn in conns if conn.transport is None))
        for conn in conns:
            if conn.transport is not None:
                conn.transport.loseConnection()

    async def _limited(sem, fn, arg):
        await sem.acquire()
        try:
            await fn(arg)
        finally:
            sem.release()

    d = defer.Deferred.fromCoroutine(run())
    failures = []
    d.addErrback(lambda f: failures.append(f.getTraceback()))
    d.addBoth(lambda _: reactor.callLater(0.5, reactor.stop))
    reactor.run()
    if failures:
        print(failures[0], file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


# --- the driver --------------------------------------------------------------------------------

def _tree_env(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def _read_totals(path: Path) -> dict[str, int]:
    """The event totals of one callgrind dump (its last "totals:" line; "summary:" stays 0 when
    instrumentation was switched on and off): {"Ir": ..., with --cache-sim also "DLmr", ...}."""
    events, found = ["Ir"], None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:"):
            found = [int(v) for v in line.split()[1:]]
    if found is None:
        raise RuntimeError(f"no totals line in {path}")
    return dict(zip(events, found))


def measure_tree(tree: Path, label: str, args, out_dir: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from _common import free_port, write_config
    w = Path(tempfile.mkdtemp(prefix=f"hausmeister-bench-hbir-{label}-"))
    try:
        https, module = free_port(), free_port()
        cfg = write_config(w / "hausmeister.toml", w / "data", https, module, extra=f"""
[presence]
heartbeat_seconds = 3600
flush_seconds = {args.flush}

[limits]
pending_per_address = {args.hosts + 100}
tls_handshake_seconds = 120
first_command_seconds = 120
""")
        env = _tree_env(tree)
        py = sys.executable
        r = subprocess.run([py, "-m", "server.cli", "-c", str(cfg), "init", "--password-stdin"],
                           input="bench-admin-password-1\n", capture_output=True, text=True,
                           cwd=tree, env=env, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"init failed in {tree}:\n{r.stderr[-2000:]}")
        r = subprocess.run([py, __file__, "--prepare", "--tree", str(tree), "--workdir", str(w),
                            "--hosts", str(args.hosts)], capture_output=True, text=True,
                           cwd=tree, env=env, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"enrollment failed in {tree}:\n{r.stderr[-2000:]}")
        dump_base = out_dir / f"callgrind.{label}"
        log = open(w / "server.log", "wb")
        cache = ["--cache-sim=yes", f"--LL={args.ll}"] if args.cache_sim else []
        server = subprocess.Popen(
            [args.valgrind, "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
             *cache,
             f"--callgrind-out-file={dump_base}.%p", py, "-m", "server.cli", "-c", str(cfg),
             "--log-level", "info", "run"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tree, env=env)
        try:
            deadline = time.monotonic() + 600
            state = w / "data" / "server.json"
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"server exited:\n{(w / 'server.log').read_text()[-3000:]}")
                if state.exists():
                    try:
                        if json.loads(state.read_text()).get("pid") == server.pid:
                            break
                    except ValueError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server under valgrind did not start within 600 s")
                time.sleep(0.2)
            r = subprocess.run(
                [py, __file__, "--client", "--tree", str(tree), "--folders",
                 str(w / "folders.txt"), "--port", str(module), "--server-pid", str(server.pid),
                 "--rounds", str(args.rounds), "--flush", str(args.flush),
                 "--callgrind-control", args.callgrind_control],
                capture_output=True, text=True, cwd=tree, env=env, timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"client failed:\n{r.stderr[-3000:]}")
            result = json.loads(r.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()
        # --separate-threads: one file per thread and dump, callgrind.LABEL.PID.DUMP-THREAD;
        # thread 01 is the reactor's, the others the blocking pool's (the presence flush)
        per_dump: dict[int, dict[int, Path]] = {}
        for path in out_dir.glob(f"callgrind.{label}.{server.pid}.*-*"):
            dump, thread = path.name.rsplit(".", 1)[1].split("-")
            per_dump.setdefault(int(dump), {})[int(thread)] = path
        if len(per_dump) < 2:
            raise RuntimeError(f"expected two callgrind dumps, found {sorted(per_dump)}")
        first, second = sorted(per_dump)[:2]

        def totals(dump: int, reactor_only: bool) -> dict[str, int]:
            out: dict[str, int] = {}
            for thread, path in per_dump[dump].items():
                if reactor_only and thread != 1:
                    continue
                for k, v in _read_totals(path).items():
                    out[k] = out.get(k, 0) + v
            return out
        hb, base = totals(first, False), totals(second, False)
        hb_reactor, base_reactor = totals(first, True), totals(second, True)
        scale = result["window_s"] / max(1e-9, result["base_s"])
        net = {k: (hb[k] - base.get(k, 0) * scale) / result["beats"] for k in hb}
        result.update(label=label, tree=str(tree), hb_ir=hb["Ir"], base_ir=base["Ir"],
                      dump=str(per_dump[first][1]), per_beat=net["Ir"], events=net,
                      reactor_per_beat=(hb_reactor["Ir"] - base_reactor.get("Ir", 0) * scale)
                      / result["beats"],
                      gross_per_beat=hb["Ir"] / result["beats"])
        return result
    finally:
        if not args.keep:
            shutil.rmtree(w, ignore_errors=True)
        else:
            print(f"(kept {w})")


def annotate(dump: str, args, top: int = 25) -> str:
    r = subprocess.run([args.callgrind_annotate, "--threshold=99", dump], capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if re.match(r"\s*[\d,]+ ", ln)]
    return "\n".join(lines[:top])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--hosts", type=int, default=200, help="connected hosts (default 200)")
    p.add_argument("--rounds", type=int, default=5,
                   help="heartbeats per host in the measured window (default 5)")
    p.add_argument("--flush", type=float, default=2.0,
                   help="server's presence.flush_seconds (default 2)")
    p.add_argument("--tree", default=str(ROOT), help="the tree measured as 'now' (default: this)")
    p.add_argument("--before", default="",
                   help="another tree (e.g. `git archive REV | tar -x -C DIR`) measured in the "
                        "same run; printed with the ratio now/before")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per tree, interleaved now, before, before, now, ... (default 1)")
    p.add_argument("--annotate", action="store_true",
                   help="print callgrind_annotate's top functions of each heartbeat window")
    p.add_argument("--cache-sim", action="store_true",
                   help="also simulate the caches (callgrind --cache-sim=yes): misses per "
                        "heartbeat in the first level (D1mr/D1mw) and the last (DLmr/DLmw)")
    p.add_argument("--ll", default="33554432,16,64",
                   help="the simulated last-level cache for --cache-sim: size,ways,line "
                        "(default 32 MiB; the VM reports a 300 MiB L3 shared with other guests)")
    p.add_argument("--out", default="", help="folder for the callgrind dumps (kept)")
    p.add_argument("--keep", action="store_true", help="keep the temporary server folders")
    p.add_argument("--valgrind", default=shutil.which("valgrind") or "/usr/bin/valgrind")
    p.add_argument("--callgrind-control", default=shutil.which("callgrind_control")
                   or "/usr/bin/callgrind_control")
    p.add_argument("--callgrind-annotate", default=shutil.which("callgrind_annotate")
                   or "/usr/bin/callgrind_annotate")
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--folders", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        return prepare_main(args)
    if args.client:
        return client_main(args)

    if not (os.path.exists(args.valgrind) and os.path.exists(args.callgrind_control)):
        print("valgrind / callgrind_control not found: apt-get install valgrind (nothing measured)")
        return 0
    sys.path.insert(0, str(HERE))
    from _common import loadavg, machine_line
    print(machine_line())
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="hausmeister-hbir-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    trees = [("now", Path(args.tree).resolve())]
    if args.before:
        trees.append(("before", Path(args.before).resolve()))
    order = []
    for i in range(args.repeat):
        order.extend(trees if i % 2 == 0 else list(reversed(trees)))
    print(f"{args.hosts} hosts x {args.rounds} heartbeats, one at a time; flush "
          f"{args.flush:g} s; dumps in {out_dir}")
    results: dict[str, list[dict]] = {}
    for n, (label, tree) in enumerate(order):
        res = measure_tree(tree, f"{label}{n}", args, out_dir)
        results.setdefault(label, []).append(res)
        print(f"{label:6s} {tree}: {res['per_beat']:,.0f} Ir per heartbeat net, "
              f"{res['reactor_per_beat']:,.0f} of them in the reactor thread "
              f"({res['gross_per_beat']:,.0f} gross; window {res['window_s']:.1f} s with "
              f"{res['beats']} heartbeats in {res['beat_s']:.1f} s; base {res['base_ir']:,} Ir in "
              f"{res['base_s']:.1f} s); TLS {res['tls']}; {res['lost']} connections lost; load "
              f"{loadavg()}", flush=True)
        if args.cache_sim:
            print("        per heartbeat, net: " + ", ".join(
                f"{k} {v:,.0f}" for k, v in res["events"].items()), flush=True)
        if args.annotate:
            print(annotate(res["dump"], args))
    print()
    med = {label: sorted(r["per_beat"] for r in rs)[len(rs) // 2] for label, rs in results.items()}
    med_reactor = {label: sorted(r["reactor_per_beat"] for r in rs)[len(rs) // 2]
                   for label, rs in results.items()}
    for label, tree in trees:
        print(f"RESULT: {label} ({tree}): {med[label]:,.0f} instructions per heartbeat, "
              f"{med_reactor[label]:,.0f} in the reactor thread (medians of "
              f"{len(results[label])})")
    if "before" in med:
        print(f"RESULT: now/before = {med['now'] / med['before']:.3f} "
              f"(reactor thread {med_reactor['now'] / med_reactor['before']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
