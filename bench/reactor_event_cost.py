"""What one ready socket costs Twisted's epoll reactor and its asyncio reactor, alone.

    python bench/reactor_event_cost.py [--connections 2000] [--rate 333] [--seconds 10] [--rounds 2]

A child process runs only a reactor (``epoll`` = Twisted's default on Linux, which
``hausmeister-server run`` installs; ``asyncio`` = ``asyncioreactor``, what it ran before) with
a TCP listener on 127.0.0.1 whose connections answer every read with one ``send`` on the socket
(as the module port answers a heartbeat, without Twisted's write buffer).  This script opens
``--connections`` plain sockets to it and, from its own process, writes one byte at a time to
them in turn at ``--rate`` per second for ``--seconds``, reading the answers.  The child's CPU
time (``/proc/PID/task/*/schedstat``) over the phase divided by the bytes answered is the cost
of one wake-up for one ready socket: the poll, the reactor's dispatch to ``doRead``, the
``recv``, the protocol's call and the answer's ``send``.  At the default rate (333 a second:
the heartbeats of 20,000 hosts every 60 s) nearly every loop turn finds one ready socket, so
the reactor's cost per turn counts in full; at a high rate several share a turn.  Everything
but the reactor is the same in both, so the difference is the reactor's own Python.  The two
reactors alternate (epoll, asyncio, asyncio, epoll, ...) so both see the same minutes; the
child's CPU depends on the machine's load much less than wall-clock figures do.

Only 127.0.0.1; the load is bounded by ``--rate`` x ``--seconds`` and stops itself.
Never fails on a figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

CHILD = "--child"


def child(reactor_name: str) -> int:
    """The measured process: a reactor and a listener whose connections answer each read."""
    if reactor_name == "asyncio":
        from twisted.internet import asyncioreactor
        asyncioreactor.install()
    else:
        from twisted.internet import default
        default.install()
    from twisted.internet import protocol, reactor

    class Answer(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.socket.send(b"y")  # one system call, no writer registration

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Answer), backlog=4096,
                             interface="127.0.0.1")
    sys.stdout.write(f"{port.getHost().port} {type(reactor).__name__}\n")
    sys.stdout.flush()
    from twisted.internet import stdio

    class Stop(protocol.Protocol):
        def connectionLost(self, reason=None) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Stop())  # the child ends when the parent closes its stdin
    reactor.run()
    return 0


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads in nanoseconds' resolution (``schedstat``), not
    ``/proc/PID/stat``'s 10 ms ticks: a run uses only a few tenths of a second."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
            total += int(fh.read().split()[0])
    return total / 1e9


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(wanted, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def one_run(reactor_name: str, connections: int, rate: float, seconds: float) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, CHILD, reactor_name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: raise_nofile(connections + 100))
    try:
        port_text, actual = proc.stdout.readline().split()
        socks = []
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", int(port_text)))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
        for sock in socks:  # every connection accepted and answering before the clock starts
            sock.sendall(b"x")
        for sock in socks:
            assert sock.recv(1) == b"y"
        for sock in socks:
            sock.setblocking(False)
        time.sleep(0.5)
        idle_before = cpu_seconds(proc.pid)
        time.sleep(1.0)
        idle = cpu_seconds(proc.pid) - idle_before
        before = cpu_seconds(proc.pid)
        started = time.monotonic()
        sent = answered = 0
        interval = 1.0 / rate
        next_at = started
        while True:
            now = time.monotonic()
            if now - started >= seconds:
                break
            if now < next_at:
                time.sleep(min(next_at - now, 0.001))
                continue
            sock = socks[sent % connections]
            sock.send(b"x")
            sent += 1
            next_at += interval
            prev = socks[(sent - 2) % connections] if sent > 1 else None
            for candidate in (prev, sock):  # collect answers as they come, never block
                if candidate is None:
                    continue
                try:
                    answered += len(candidate.recv(64))
                except BlockingIOError:
                    pass
        deadline = time.monotonic() + 10
        while answered < sent and time.monotonic() < deadline:
            for sock in socks:
                try:
                    answered += len(sock.recv(64))
                except BlockingIOError:
                    pass
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        used = cpu_seconds(proc.pid) - before
        for sock in socks:
            sock.close()
        return {"reactor": actual, "sent": sent, "answered": answered, "cpu": used,
                "elapsed": elapsed, "idle_cpu_per_s": idle,
                "us_per_event": used / max(answered, 1) * 1e6}
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD]:
        return child(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--connections", type=int, default=2000,
                        help="connections held open (default 2000)")
    parser.add_argument("--rate", type=float, default=333.0,
                        help="single-byte writes per second, each to the next connection "
                             "(default 333)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of epoll, asyncio, asyncio, epoll (default 2)")
    args = parser.parse_args(argv)
    for name, value in (("--connections", args.connections), ("--rate", args.rate),
                        ("--seconds", args.seconds), ("--rounds", args.rounds)):
        if value <= 0:
            print(f"{name} {value}: expected a number above 0", file=sys.stderr)
            return 2
    raise_nofile(args.connections + 100)
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"machine: {os.cpu_count()} CPUs, load average {load}; {args.connections} connections, "
          f"{args.rate:.0f} ready sockets a second for {args.seconds:.0f} s per run")
    results: dict[str, list[float]] = {"epoll": [], "asyncio": []}
    for _ in range(args.rounds):
        for name in ("epoll", "asyncio", "asyncio", "epoll"):
            r = one_run(name, args.connections, args.rate, args.seconds)
            results[name].append(r["us_per_event"])
            load = " ".join(open("/proc/loadavg").read().split()[:3])
            print(f"  {name:8} ({r['reactor']}): {r['answered']}/{r['sent']} answered in "
                  f"{r['elapsed']:.1f} s, child CPU {r['cpu']:.2f} s = "
                  f"{r['us_per_event']:.1f} us per ready socket (idle {r['idle_cpu_per_s'] * 100:.1f} "
                  f"% of a core); load {load}", flush=True)
    epoll, asyncio_ = statistics.median(results["epoll"]), statistics.median(results["asyncio"])
    print(f"RESULT: one ready socket (poll, dispatch, recv, protocol, send): epoll reactor "
          f"{epoll:.1f} us, asyncio reactor {asyncio_:.1f} us (medians of {args.rounds * 2}); "
          f"epoll/asyncio {epoll / asyncio_:.2f}x, {asyncio_ - epoll:.1f} us less per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
