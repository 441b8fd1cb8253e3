"""Server instructions per host registration and per ad-hoc set-up, counted by valgrind's
callgrind: a figure that does not move with the machine's load (this VM has no hardware
counters, and its wall and CPU times move by 10-50 % with other people's tests).

    python bench/registration_instructions.py [--hosts 30] [--burst 30] [--setups 8]
    python bench/registration_instructions.py --before /tmp/regcost-before   # + ratio

What happens, all on 127.0.0.1, for this tree (and with ``--before DIR`` for the tree in DIR,
which gets its own copy of this script, interleaved: this, DIR[, this, DIR ...] with
``--rounds``):

1. A server (``hausmeister-server run``, epoll reactor, SQLite in a temporary folder) starts
   normally once so a supporter module can enroll over HTTPS; ``--hosts + --burst + 4`` hosts
   are enrolled in bulk (``_common.enroll_hosts``).
2. The server is started again under ``valgrind --tool=callgrind --instr-atstart=no`` (no
   instrumentation until the first window opens; then ~50x slower — nothing is timed).  Warm-up, not counted: 4 host registrations and 2 set-ups.
3. Three counted windows, each opened and closed with ``callgrind_control -z``, ``-i on``, ``-i off``, ``--dump``
   around a fixed amount of work, the server's instructions (all its threads) divided by it:

   * ``registration``: ``--hosts`` hosts register one after the other (the real
     ``HostPresence``: mutual TLS, ``Hello``, the database marks the host online) — a ramped
     first connect, where every ``Hello`` is its own transaction;
   * ``burst``: ``--burst`` hosts start at once (a reconnect storm after a restart);
   * ``setup``: ``--setups`` ad-hoc set-ups one after the other, as ``bench/adhoc_setup.py``
     does them (nameplate, customer connection + ``Hello`` + ``JoinAdhoc``, both relay legs
     resuming their control connection's session, one byte each way, all closed).

4. ``callgrind_annotate --inclusive=yes`` per window: the script prints the instructions per
   operation of a few named parts (OpenSSL's handshake, the Python callbacks OpenSSL makes,
   session tickets, SQLite, ...) and keeps the annotations (``--keep``) for the rest.

Warm-up and window sizes are fixed, so two runs of one tree agree to ~1 %; background
timers of the server (presence flush, revocation poll) fall into the windows and are part
of the noise.  Never fails on its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: inclusive parts printed per operation: (label, callgrind function names); nested parts are
#: indented and are part of the one above
PARTS = [
    ("OpenSSL handshake (SSL_do_handshake, incl. callbacks)", r"SSL_do_handshake"),
    ("  server certificate sent (chain built per handshake before)", r"ssl3_output_cert_chain"),
    ("  client certificate chain checked", r"ssl_verify_cert_chain"),
    ("  Python callbacks from OpenSSL (verify, info)", r"general_invoke_callback"),
    ("  TLS 1.3 session tickets built", r"tls_construct_new_session_ticket"),
    ("  key share (X25519 + ML-KEM-768)", r"tls_construct_stoc_key_share"),
    ("  CertificateVerify signed (P-256)", r"tls_construct_cert_verify"),
    ("OpenSSL records (SSL_read + SSL_write)", r"SSL_read|SSL_write"),
    ("SQLite (sqlite3_step + prepare)", r"sqlite3_step|sqlite3_prepare_v2|sqlite3_prepare_v3"),
]
#: self cost by shared object: (label, pattern on the object's path)
OBJECTS = [
    ("self: Python interpreter + objects (libpython)", r"libpython"),
    ("self: OpenSSL + cryptography (_rust.abi3.so)", r"_rust\.abi3\.so"),
    ("self: libc (malloc, memcpy, ...)", r"libc\.so"),
    ("self: SQLite", r"libsqlite3"),
    ("self: cffi backend", r"_cffi_backend"),
]


# --- one tree (runs as its own process with PYTHONPATH = that tree) -------------------------------

def one_tree(args) -> dict:
    from _common import BenchServer, add_supporter, enroll_hosts, enroll_supporter_module, \
        workdir
    from idle_hosts import write_folder

    root = HERE.parent
    out: dict = {"tree": str(root)}
    with workdir(args.keep, "hausmeister-bench-reginstr-") as w:
        srv = BenchServer.create(w)
        srv.start()
        add_supporter(srv)
        sup_home = enroll_supporter_module(srv, w / "supporter")
        srv.stop()
        n_hosts = args.hosts + args.burst + 4
        creds = enroll_hosts(srv, n_hosts, processes=1)
        ca_pem = srv.ca_pem
        folders = [write_folder(w / "hosts" / c.host_id, c, ca_pem, 0, 0) for c in creds]

        # the server under callgrind (valgrind in front of BenchServer.start's command)
        cg_out = w / "callgrind.out"
        valgrind = [] if args.py_spy else [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={cg_out}"]
        srv.start(nofile=4096, timeout=600, prefix=valgrind)
        try:
            windows = drive(srv, folders, sup_home, args)
        finally:
            srv.stop(timeout=300)
        if args.py_spy:
            return {"py_spy": str(args.py_spy), **windows}
        for name, count in windows.items():
            dumps = [d for d in w.glob("callgrind.out.*") if d.suffix[1:].isdigit()]
            dump = next((d for d in dumps if _dump_label(d) == name), None)
            if dump is None:
                raise RuntimeError(f"no callgrind dump for {name}: {[d.name for d in dumps]}")
            out[name] = analyse(dump, count, args.keep_annotations and w)
        if args.keep:
            out["workdir"] = str(w)
    return out


def _dump_label(path: Path) -> str | None:
    with open(path, errors="replace") as fh:
        for line in fh:
            if line.startswith("desc: Trigger: Client Request: "):
                return line.split(": ", 3)[-1].strip()
            if line.startswith("desc: Trigger: "):
                return line.split("Trigger: ", 1)[1].strip().rsplit(" ", 1)[-1]
            if line.startswith("events:"):
                return None
    return None


def callgrind_control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True,
                   timeout=300)


def drive(srv, folders: list[Path], sup_home: Path, args) -> dict[str, int]:
    """Warm-up, then the counted windows; returns {window: operations}."""
    from twisted.internet import defer, task

    result: dict[str, int] = {}

    def go(reactor):
        return defer.ensureDeferred(_drive(reactor, srv, folders, sup_home, args, result))
    try:
        task.react(go)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"the driver failed (exit {exc.code})")
    return result


async def _drive(reactor, srv, folders, sup_home, args, result) -> None:
    from twisted.internet import defer, endpoints, task

    from modules.common.link.connection import (
        ControlClient, ResumingTLS, ServerAddress, client_tls, connect, hello, tls_session)
    from modules.common.link.folder import ModuleFolder
    from modules.common.link.session_stream import RelayLeg
    from modules.remote_host.presence import HostPresence
    from protocol import control

    pid = srv.process.pid
    address = ServerAddress("127.0.0.1", srv.module_port)
    pending = list(folders)
    presences: list[HostPresence] = []

    async def register(count: int, at_once: bool) -> None:
        started = []
        for _ in range(count):
            p = HostPresence(reactor, ModuleFolder(pending.pop()), address,
                             on_offer=lambda offer: False)
            p.start()
            presences.append(p)
            started.append(p)
            if not at_once:
                await p.registered
        await defer.gatherResults([p.registered for p in started])

    folder = ModuleFolder(sup_home)
    ca_pem = folder.ca_path.read_bytes()
    customer_tls = client_tls(address.host, ca_pem, None)
    supporter_tls = client_tls(address.host, ca_pem, folder)
    supporter = await connect(reactor, address, ca_pem, folder)
    await hello(supporter, "supporter")
    ready: dict[str, defer.Deferred] = {}
    supporter.on_session_ready = lambda ticket: ready.pop(ticket["nameplate"]).callback(ticket)

    def endpoint(tls, host, port):
        return endpoints.wrapClientTLS(tls, endpoints.TCP4ClientEndpoint(reactor, host, port,
                                                                         timeout=120))

    async def open_leg(tls, ticket, control_conn) -> RelayLeg:
        session = tls_session(control_conn)
        if session is not None:
            tls = ResumingTLS(tls, session)
        leg = await endpoints.connectProtocol(
            endpoint(tls, ticket["relay_host"], ticket["relay_port"]), RelayLeg())
        await leg.start(ticket["relay_token"])
        return leg

    async def setup() -> None:
        plate = (await supporter.callRemote(control.AllocateNameplate))["nameplate"]
        customer = await endpoints.connectProtocol(
            endpoint(customer_tls, address.host, address.port), ControlClient())
        await hello(customer, "customer")
        sup_ticket: defer.Deferred = defer.Deferred()
        ready[plate] = sup_ticket
        ticket = await customer.callRemote(control.JoinAdhoc, nameplate=plate)
        c_leg = await open_leg(customer_tls, ticket, customer)
        s_leg = await open_leg(supporter_tls, await sup_ticket, supporter)
        got_ping: defer.Deferred = defer.Deferred()
        got_pong: defer.Deferred = defer.Deferred()
        s_leg.attach(lambda data: got_ping.called or got_ping.callback(None))
        c_leg.attach(lambda data: got_pong.called or got_pong.callback(None))
        c_leg.send(b"p")
        await got_ping
        s_leg.send(b"q")
        await got_pong
        c_leg.close()
        s_leg.close()
        customer.transport.loseConnection()
        await customer.lost

    async def settle() -> None:  # the server sees the closes and finishes its writes
        await task.deferLater(reactor, args.settle, lambda: None)

    async def window(name: str, count: int, work) -> None:
        if args.py_spy:  # sampled stacks instead of counted instructions
            if args.perf:  # CPU time incl. the kernel's (system calls, loopback TCP)
                sampler = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o",
                           str(args.py_spy / f"{name}.perf.data"), "-p", str(pid)]
            else:
                sampler = ["py-spy", "record", "--format", "raw", "--rate",
                           "250", "-o", str(args.py_spy / f"{name}.txt"), "-p", str(pid)]
            spy = subprocess.Popen(sampler, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await task.deferLater(reactor, 1.0, lambda: None)  # py-spy attached
            await work()
            await settle()
            spy.send_signal(2)
            spy.wait(timeout=60)
            result[name] = count
            print(f"  {name}: {count} done", flush=True)
            return
        callgrind_control(pid, "-z")
        callgrind_control(pid, "-i", "on")
        await work()
        await settle()
        callgrind_control(pid, "-i", "off")
        callgrind_control(pid, f"--dump={name}")
        result[name] = count
        print(f"  {name}: {count} done", flush=True)

    await register(4, at_once=False)  # warm-up
    for _ in range(2):
        await setup()
    await settle()

    async def setups() -> None:
        for _ in range(args.setups):
            await setup()
    if args.hosts:
        await window("registration", args.hosts, lambda: register(args.hosts, at_once=False))
    if args.burst:
        await window("burst", args.burst, lambda: register(args.burst, at_once=True))
    if args.setups:
        await window("setup", args.setups, setups)
    for p in presences:
        p.stop()
    supporter.transport.loseConnection()


def analyse(dump: Path, count: int, keep_in) -> dict:
    """Instructions per operation: the total and PARTS, from callgrind_annotate."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                           str(dump)], capture_output=True, text=True, check=True,
                          timeout=600).stdout
    self_text = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)],
                               capture_output=True, text=True, check=True, timeout=600).stdout
    if keep_in:
        (keep_in / f"{dump.name}.inclusive.txt").write_text(text)
        (keep_in / f"{dump.name}.self.txt").write_text(self_text)
    total = _total(text)

    def rows(t: str) -> list[tuple[int, str]]:
        out = []
        for line in t.splitlines():
            m = re.match(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$", line)
            if m:
                out.append((int(m.group(1).replace(",", "")), m.group(2)))
        return out
    incl, selfs = rows(text), rows(self_text)
    parts = {}
    for label, pattern in PARTS:
        wanted = re.compile(rf"^(?:{pattern})$")
        # the largest entry of each name ('2 etc. are recursion levels, already inside it)
        best: dict[str, int] = {}
        for ir, fn in incl:
            fname = _function(fn)
            if wanted.match(fname):
                best[fname] = max(best.get(fname, 0), ir)
        parts[label] = sum(best.values())
    for label, pattern in OBJECTS:
        where = re.compile(pattern)
        parts[label] = sum(ir for ir, fn in selfs if where.search(fn.rsplit("[", 1)[-1]))
    top_self = [(ir // count, fn[-90:]) for ir, fn in selfs[:15]]
    return {"count": count, "total": total // count,
            "parts": {k: v // count for k, v in parts.items()}, "top_self": top_self}


def _function(entry: str) -> str:
    """``file:function'2 [object]`` -> ``function``."""
    return entry.rsplit(" [", 1)[0].rsplit(":", 1)[-1].split("'")[0]


def _total(text: str) -> int:
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line:
            return int(line.split()[0].replace(",", ""))
    raise RuntimeError("callgrind_annotate printed no PROGRAM TOTALS")


# --- the driver ------------------------------------------------------------------------------------

def run_tree(tree: Path, args) -> dict:
    script = tree / "bench" / Path(__file__).name
    if script.resolve() != Path(__file__).resolve():
        shutil.copy2(__file__, script)  # the other tree gets this script, as idle_hosts runs do
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(script), "--one", "--hosts", str(args.hosts), "--burst",
           str(args.burst), "--setups", str(args.setups), "--settle", str(args.settle)]
    if args.keep:
        cmd.append("--keep")
    if args.keep_annotations:
        cmd.append("--keep-annotations")
    print(f"{tree}: load {_load()}", flush=True)
    proc = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, text=True,
                          timeout=3600)
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line)
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: the run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def report(results: list[tuple[str, dict]]) -> None:
    windows = [("registration", "per registration (one after the other)"),
               ("burst", "per registration (a burst, all at once)"),
               ("setup", "per ad-hoc set-up")]
    labels = [label for label, _ in results]
    for key, title in windows:
        if not all(key in r for _, r in results):
            continue
        print(f"\nserver instructions {title}, thousands (Ir / 1000):")
        print(f"  {'':58}" + "".join(f"{lab:>14}" for lab in labels))
        print(f"  {'total':58}" + "".join(f"{r[key]['total'] / 1e3:14,.0f}" for _, r in results))
        for part in results[0][1][key]["parts"]:
            print(f"  {part[:58]:58}" + "".join(
                f"{r[key]['parts'].get(part, 0) / 1e3:14,.0f}" for _, r in results))
    this = [r for lab, r in results if lab.startswith("this")]
    before = [r for lab, r in results if lab.startswith("before")]
    if this and before:
        print()
        for key, title in windows:
            if key in this[0] and key in before[0]:
                t = sum(r[key]["total"] for r in this) / len(this)
                b = sum(r[key]["total"] for r in before) / len(before)
                print(f"RESULT {title}: this tree {t / 1e6:.3f} M instructions, before "
                      f"{b / 1e6:.3f} M: {t / b:.3f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--hosts", type=int, default=30, help="registrations one after the other")
    p.add_argument("--burst", type=int, default=30, help="registrations all at once")
    p.add_argument("--setups", type=int, default=8, help="ad-hoc set-ups one after the other")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds a window stays open after its work (closes, writes)")
    p.add_argument("--before", type=Path, help="another tree (e.g. git archive of main) to "
                                               "measure in the same run")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folders")
    p.add_argument("--keep-annotations", action="store_true",
                   help="write callgrind_annotate's output into the kept folders")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="no valgrind: sample the server's Python stacks with py-spy during each "
                        "window into DIR/<window>.txt (collapsed stacks), for this tree only")
    p.add_argument("--perf", action="store_true",
                   help="with --py-spy DIR: sample with perf (cpu-clock, kernel included) into "
                        "DIR/<window>.perf.data instead")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for n, what in ((args.hosts, "--hosts"), (args.burst, "--burst"), (args.setups, "--setups")):
        if not 0 <= n <= 2000:
            p.error(f"{what} must be between 0 and 2000")
    if args.keep_annotations:
        args.keep = True
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    if args.one or args.py_spy:
        if args.py_spy:
            args.py_spy = args.py_spy.resolve()
            args.py_spy.mkdir(parents=True, exist_ok=True)
        print(json.dumps(one_tree(args)), flush=True)
        return 0
    if args.before is not None and not (args.before / "server" / "cli.py").exists():
        print(f"--before {args.before}: no server/cli.py there; unpack a tree first, e.g. "
              f"git archive 01e0b69 | tar -x -C {args.before}", file=sys.stderr)
        return 2
    results: list[tuple[str, dict]] = []
    for r in range(args.rounds):
        results.append((f"this#{r + 1}", run_tree(HERE.parent, args)))
        if args.before is not None:
            results.append((f"before#{r + 1}", run_tree(args.before.resolve(), args)))
    print(f"\nload after the runs: {_load()}")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
