"""Ad-hoc session set-up: customer ``JoinAdhoc`` sent -> both relay legs paired; p50/p99 and
set-ups per second.

    python bench/adhoc_setup.py [--setups 200] [--concurrency 8] [--throughput-setups 400]

A real server process (``hausmeister-server run``, epoll reactor, SQLite, the relay inside
the server process as by default) on 127.0.0.1, and this script as the modules, using the
modules' own code (``ControlClient``, ``hello``, ``session_stream.RelayLeg``) on Twisted:

* a supporter module, enrolled through the real HTTPS enrollment, keeps its control connection
  (mutual TLS) and asks ``AllocateNameplate`` for each session;
* a customer connects anew for each session (TLS without a certificate, ``Hello``) and then —
  clock starts — sends ``JoinAdhoc`` with the nameplate.  The server checks the lock-out, writes
  the session row, hands both sides a relay token (``SessionReady`` to the supporter, the
  answer to the customer);
* each side then opens its relay leg like the modules do: a new TLS connection to the module port
  (the supporter's with its certificate) that offers the side's control-connection TLS session
  (the server resumes it; ``--full-handshakes``: no session offered) and says ``OpenRelayLeg``.  The relay pairs the legs when
  the second one arrives and answers it in the same step, so "paired" = the later of the two
  ``OpenRelayLeg`` answers.  One byte each way then proves the legs are spliced;
* both legs and the customer connection are closed (the relay records the session's end).

Phase 1 runs ``--setups`` sessions one after another (latency); phase 2 runs
``--throughput-setups`` with ``--concurrency`` supporter connections working in parallel
(set-ups per second, latency under load).  Target: join -> paired p50 <= 50 ms.

The modules' TLS client settings are built once per module and reused (a real module builds
them once at start, not per session).  The ad-hoc lock-out counts only failed joins: every join
here uses a live nameplate, so none fails and the lock-out never trips (a join refused with
LOCKED_OUT or UNKNOWN_NAMEPLATE would be reported as broken, exit 1).  Never fails on timing.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BenchServer, add_supporter, cpu_seconds, enroll_supporter_module, loadavg, machine_line,
    summary_ms, workdir,
)


class BrokenBench(RuntimeError):
    pass


def rusage_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(reactor, args) -> int:
    from OpenSSL.SSL import _lib  # SSL_session_reused
    from twisted.internet import defer, endpoints, task

    from modules.common.link.connection import (
        ControlClient, ResumingTLS, ServerAddress, client_tls, connect, hello, tls_session)
    from modules.common.link.folder import ModuleFolder
    from modules.common.link.session_stream import RelayLeg
    from protocol import control

    print(machine_line())
    with workdir(args.keep, "hausmeister-bench-adhoc-") as w:
        srv = BenchServer.create(w)
        srv.start()
        try:
            add_supporter(srv)
            folder = ModuleFolder(enroll_supporter_module(srv, w / "supporter"))
            ca_pem = folder.ca_path.read_bytes()
            address = ServerAddress("127.0.0.1", srv.module_port)
            print(f"server pid {srv.pid}, module port {srv.module_port} (in-process relay)")
            customer_tls = client_tls(address.host, ca_pem, None)
            supporter_tls = client_tls(address.host, ca_pem, folder)

            def endpoint(tls, host: str, port: int):
                return endpoints.wrapClientTLS(
                    tls, endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=15))

            legs = [0, 0]  # relay legs opened, of them resumed

            async def open_leg(tls, ticket: dict, control: ControlClient) -> RelayLeg:
                # as session_runner.open_session: offer the control connection's TLS session
                session = None if args.full_handshakes else tls_session(control)
                if session is not None:
                    tls = ResumingTLS(tls, session)
                leg = await endpoints.connectProtocol(
                    endpoint(tls, ticket["relay_host"], ticket["relay_port"]), RelayLeg())
                await leg.start(ticket["relay_token"])  # answered: the handshake is done
                legs[0] += 1
                legs[1] += bool(_lib.SSL_session_reused(leg.transport.getHandle()._ssl))
                return leg

            class Supporter:
                def __init__(self, conn: ControlClient) -> None:
                    self.conn = conn
                    self.waiting: dict[str, defer.Deferred] = {}
                    conn.on_session_ready = self.session_ready

                def session_ready(self, ticket: dict) -> None:
                    # what the supporter module does: open its leg at once
                    d = defer.ensureDeferred(open_leg(supporter_tls, ticket, self.conn))
                    d.addCallback(lambda leg: (leg, time.perf_counter()))
                    waiter = self.waiting.pop(ticket["nameplate"], None)
                    if waiter is None:
                        raise BrokenBench(f"SessionReady for unknown nameplate {ticket['nameplate']}")
                    d.chainDeferred(waiter)

            async def new_supporter() -> Supporter:
                conn = await connect(reactor, address, ca_pem, folder)
                await hello(conn, "supporter")
                return Supporter(conn)

            async def one_setup(sup: Supporter) -> dict:
                plate = (await sup.conn.callRemote(control.AllocateNameplate))["nameplate"]
                customer = await endpoints.connectProtocol(
                    endpoint(customer_tls, address.host, address.port), ControlClient())
                await hello(customer, "customer")
                supporter_leg: defer.Deferred = defer.Deferred()
                sup.waiting[plate] = supporter_leg
                t0 = time.perf_counter()
                try:
                    ticket = await customer.callRemote(control.JoinAdhoc, nameplate=plate)
                except control.ControlError as exc:
                    raise BrokenBench(f"JoinAdhoc with a live nameplate was refused: {exc!r}")
                t_answer = time.perf_counter()
                c_leg = await open_leg(customer_tls, ticket, customer)
                t_c = time.perf_counter()
                s_leg, t_s = await supporter_leg
                t_paired = max(t_c, t_s)
                got_ping: defer.Deferred = defer.Deferred()
                got_pong: defer.Deferred = defer.Deferred()
                s_leg.attach(lambda data: got_ping.called or got_ping.callback(time.perf_counter()))
                c_leg.attach(lambda data: got_pong.called or got_pong.callback(time.perf_counter()))
                c_leg.send(b"p")
                t_ping = await got_ping
                s_leg.send(b"q")
                t_pong = await got_pong
                c_leg.close()
                s_leg.close()
                customer.transport.loseConnection()
                return {"answer": t_answer - t0, "paired": t_paired - t0, "ping": t_ping - t0,
                        "pong": t_pong - t0}

            async def phase(count: int, concurrency: int) -> tuple[list[dict], float, float, float]:
                sups = [await new_supporter() for _ in range(concurrency)]
                results: list[dict] = []
                remaining = [count]

                async def worker(sup: Supporter) -> None:
                    while remaining[0] > 0:
                        remaining[0] -= 1
                        results.append(await one_setup(sup))
                for sup in sups:  # warm-up, not counted
                    await one_setup(sup)
                cpu_srv, cpu_me, t = cpu_seconds(srv.pid), rusage_cpu(), time.perf_counter()
                await defer.gatherResults([defer.ensureDeferred(worker(s)) for s in sups],
                                          consumeErrors=True)
                wall = time.perf_counter() - t
                srv_cpu = (cpu_seconds(srv.pid) - cpu_srv) / wall  # share of a core
                my_cpu = (rusage_cpu() - cpu_me) / wall
                for sup in sups:
                    sup.conn.transport.loseConnection()
                return results, wall, srv_cpu, my_cpu

            def show(label: str, results: list[dict], wall: float, srv_cpu: float,
                     my_cpu: float) -> dict:
                rate = len(results) / wall
                per_setup = srv_cpu * wall / len(results)
                print(f"{label}: {len(results)} set-ups in {wall:.1f} s = {rate:.1f} set-ups/s; "
                      f"server CPU {srv_cpu * 100:.0f} %, this script (both modules) "
                      f"{my_cpu * 100:.0f} % of a core; load {loadavg()}")
                # load-independent: the server's utime + stime (/proc) over the phase, per set-up
                print(f"  server CPU per set-up {per_setup * 1e3:.2f} ms "
                      f"(= {1 / per_setup:.0f} set-ups/s per core at most)")
                out = {}
                for key, what in (("answer", "join -> JoinAdhoc answered"),
                                  ("paired", "join -> both relay legs paired"),
                                  ("ping", "join -> first byte customer->supporter"),
                                  ("pong", "join -> first byte back")):
                    s = summary_ms(r[key] for r in results)
                    out[key] = s
                    print(f"  {what:40} p50 {s['p50']:7.2f} ms  p90 {s['p90']:7.2f}  "
                          f"p99 {s['p99']:7.2f}  max {s['max']:7.2f}")
                return {"rate": rate, "cpu_per_setup": per_setup, **out}

            async def connections_only(count: int, concurrency: int) -> float:
                """Server CPU of a bare customer connection: TLS handshake, Hello, close."""
                async def one() -> None:
                    conn = await endpoints.connectProtocol(
                        endpoint(customer_tls, address.host, address.port), ControlClient())
                    await hello(conn, "customer")
                    conn.transport.loseConnection()
                    await conn.lost
                remaining = [count]

                async def worker() -> None:
                    while remaining[0] > 0:
                        remaining[0] -= 1
                        await one()
                await one()
                cpu_srv = cpu_seconds(srv.pid)
                await defer.gatherResults([defer.ensureDeferred(worker())
                                           for _ in range(concurrency)], consumeErrors=True)
                await task.deferLater(reactor, 0.5, lambda: None)  # the server sees the closes
                return (cpu_seconds(srv.pid) - cpu_srv) / count

            seq = show("sequential", *(await phase(args.setups, 1)))
            par = show(f"concurrency {args.concurrency}",
                       *(await phase(args.throughput_setups, args.concurrency)))
            if args.connections:
                per_conn = await connections_only(args.connections, args.concurrency)
                print(f"bare customer connections ({args.connections}, {args.concurrency} at once: "
                      f"TLS handshake, Hello, close): server CPU {per_conn * 1e3:.2f} ms each; a "
                      f"set-up opens three connections (customer control, two relay legs)")
            print(f"relay legs that resumed their control connection's TLS session: "
                  f"{legs[1]} of {legs[0]}")
            locked = srv.count_log("LOCKED_OUT") + srv.count_log("unknown or expired nameplate")
            print()
            p50 = seq["paired"]["p50"]
            print(f"RESULT: join -> paired p50 {p50:.1f} ms, p99 {seq['paired']['p99']:.1f} ms "
                  f"(sequential, {args.setups} set-ups); under concurrency {args.concurrency}: "
                  f"p50 {par['paired']['p50']:.1f} ms, p99 {par['paired']['p99']:.1f} ms at "
                  f"{par['rate']:.1f} set-ups/s")
            print(f"target p50 <= 50 ms: {p50 / 50:.2f}x of the limit -> "
                  f"{'MET' if p50 <= 50 else 'NOT MET'}")
            per_core = 1 / par["cpu_per_setup"]
            print(f"issue 14 target >= 200 set-ups/s on one core: server CPU "
                  f"{par['cpu_per_setup'] * 1e3:.2f} ms per set-up = {per_core:.0f}/s per core at most "
                  f"({per_core / 200:.2f}x) -> {'MET' if per_core >= 200 else 'NOT MET'}; p99 <= 50 ms "
                  f"under concurrency: {par['paired']['p99']:.1f} ms -> "
                  f"{'MET' if par['paired']['p99'] <= 50 else 'NOT MET'}")
            if locked:
                print(f"BROKEN: the server log shows {locked} lock-out/unknown-nameplate lines")
                return 1
            return 0
        finally:
            srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--setups", type=int, default=200, help="sequential set-ups (default 200)")
    p.add_argument("--throughput-setups", type=int, default=400,
                   help="set-ups in the concurrent phase (default 400)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="supporters setting up sessions at the same time (default 8)")
    p.add_argument("--connections", type=int, default=0,
                   help="also measure N bare customer connections (TLS, Hello, close): the "
                        "server CPU a connection costs, the floor under a set-up's three")
    p.add_argument("--full-handshakes", action="store_true",
                   help="relay legs offer no TLS session (as modules did before 2026-12-06): "
                        "every leg a full handshake")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    args = p.parse_args(argv)

    from twisted.internet import defer, task
    outcome = {"code": 0}

    def go(reactor):
        async def body():
            try:
                outcome["code"] = await run(reactor, args)
            except BrokenBench as exc:
                print(f"BROKEN: {exc}")
                outcome["code"] = 1
        return defer.ensureDeferred(body())
    try:
        task.react(go)
    except SystemExit:
        pass
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main())
