"""GUI-thread CPU per socket read and per ``callFromThread`` for Twisted on the apps' Qt loop
(modules/common/qt/event_loop.py) against qasync's own ``QEventLoop``, in the same run.

    python bench/qt_loop_reads.py                 # 3 rounds, ~1 min
    python bench/qt_loop_reads.py --rounds 5 --chunks 3000

Each variant runs in a process of its own (Qt's offscreen platform, Twisted's asyncio reactor
on the loop, as ``run_app`` sets it up): a sender process writes ``--chunks`` chunks of
``--size`` bytes over TCP on 127.0.0.1, one every ``--gap`` ms, so each arrives as a read of
its own (as x11vnc's rects reach the viewer: ~27 reads per full-screen frame); then a thread
of the receiver calls ``reactor.callFromThread`` as often, one every ``--gap`` ms (as the
viewer's decoder thread hands over its results).  Figures are the receiver's main-thread CPU
(``time.thread_time``) divided by the reads (``dataReceived`` calls) and by the calls: CPU,
not wall time, so they move little with the machine's load.  Nothing fails on a figure."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ("qasync", "apps", "epoll")


def receive_main(variant: str, chunks: int, size: int, gap: float) -> None:
    """The receiver process: print the port, take the sender's bytes, then the thread's
    calls; print one JSON line of figures."""
    import asyncio
    if variant == "epoll":                    # the floor: Twisted's own reactor, no Qt
        from twisted.internet import epollreactor
        epollreactor.install()
    else:
        from PySide6.QtWidgets import QApplication
        app = QApplication(["qt-loop-bench", "-platform", "offscreen"])
        if variant == "qasync":
            import qasync
            loop = qasync.QEventLoop(app)
        else:
            from modules.common.qt.event_loop import QtEventLoop
            loop = QtEventLoop(app)
        asyncio.set_event_loop(loop)
        from twisted.internet import asyncioreactor
        asyncioreactor.install(loop)
    from twisted.internet import protocol, reactor

    result: dict = {"variant": variant}
    total = chunks * size

    class Count(protocol.Protocol):
        reads = 0
        got = 0
        started = 0.0

        def connectionMade(self):  # noqa: N802
            Count.started = time.thread_time()

        def dataReceived(self, data):  # noqa: N802
            Count.reads += 1
            Count.got += len(data)
            if Count.got >= total:
                result["reads"] = Count.reads
                result["read_us"] = (time.thread_time() - Count.started) / Count.reads * 1e6
                self.transport.loseConnection()
                reactor.callLater(0.2, calls_phase)

    calls = {"n": 0}

    def called() -> None:
        calls["n"] += 1
        if calls["n"] == chunks:
            result["call_us"] = (time.thread_time() - calls["started"]) / chunks * 1e6
            reactor.stop()

    def calls_phase() -> None:
        calls["started"] = time.thread_time()

        def post() -> None:
            for _ in range(chunks):
                reactor.callFromThread(called)
                time.sleep(gap)
        threading.Thread(target=post, daemon=True).start()

    factory = protocol.Factory.forProtocol(Count)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.callLater(120, reactor.stop)          # bounded, whatever happens
    reactor.run()
    print(json.dumps(result), flush=True)


def send(port: int, chunks: int, size: int, gap: float) -> None:
    chunk = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(chunks):
            s.sendall(chunk)
            time.sleep(gap)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)                                 # the receiver closes


def one_run(variant: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, __file__, "--receive", variant, str(args.chunks),
                             str(args.size), str(args.gap / 1000)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        port = int(proc.stdout.readline())
        send(port, args.chunks, args.size, args.gap / 1000)
        line = proc.stdout.readline()
        proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return json.loads(line)


def main() -> None:
    if sys.argv[1:2] == ["--receive"]:
        variant, chunks, size, gap = sys.argv[2:6]
        receive_main(variant, int(chunks), int(size), float(gap))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--size", type=int, default=1600, help="bytes per chunk (x11vnc: ~1.6 KB)")
    ap.add_argument("--gap", type=float, default=1.0, help="ms between chunks and calls")
    args = ap.parse_args()
    rows = {v: [] for v in VARIANTS}
    print(f"{'round':>5} {'loop':8} {'load':>5} {'reads':>6} {'us CPU/read':>12} "
          f"{'us CPU/callFromThread':>22}")
    for k in range(1, args.rounds + 1):
        for variant in (VARIANTS if k % 2 else VARIANTS[::-1]):
            r = one_run(variant, args)
            r["load"] = os.getloadavg()[0]
            rows[variant].append(r)
            print(f"{k:5d} {variant:8} {r['load']:5.1f} {r.get('reads', 0):6d} "
                  f"{r.get('read_us', float('nan')):12.1f} "
                  f"{r.get('call_us', float('nan')):22.1f}", flush=True)
    med = {v: (statistics.median(r["read_us"] for r in rows[v]),
               statistics.median(r["call_us"] for r in rows[v])) for v in VARIANTS}
    print(f"\nmedian GUI-thread CPU: per read {med['apps'][0]:.1f} us (apps' loop) vs "
          f"{med['qasync'][0]:.1f} us (qasync) = {med['apps'][0] / med['qasync'][0]:.2f}x; per "
          f"callFromThread {med['apps'][1]:.1f} vs {med['qasync'][1]:.1f} us = "
          f"{med['apps'][1] / med['qasync'][1]:.2f}x (lower is better); Twisted's epoll "
          f"reactor without Qt: {med['epoll'][0]:.1f} / {med['epoll'][1]:.1f} us")


if __name__ == "__main__":
    main()
