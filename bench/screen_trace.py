"""Record the chunk sizes and timing of a real screen session, for ``sessions_180kbps.py --trace``.

    python bench/screen_trace.py                       # 60 s office workload -> bench/traces/office_1080p.csv
    python bench/screen_trace.py --seconds 20 --out /tmp/t.csv

A private 1920x1080 Xvfb runs the office workload of ``recording_cost.py`` (two overlapping
xterms, one typing ~10 characters a second, one printing a listing every 3 s, the windows
raised in turn every 5 s).  Our RFB server (``listen_vnc`` + ``ScreenSource``, capture capped at
30 fps, as a host module runs it) serves it to the supporter's RFB client (``protocol.rfb_client``,
ZRLE/Tight as it negotiates, always one incremental request pending) on 127.0.0.1.  Every write
the RFB server makes — what a module hands to the session's SCREEN channel, i.e. what becomes
one sealed record (or several, above 64 KiB) on the relay leg — is logged with its time.

The trace is a small CSV: ``ms,bytes`` per write, milliseconds since the first write, plus
comment lines saying how it was made.  Bounded in time, loopback only, never fails on a figure.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

DEFAULT_OUT = HERE / "traces" / "office_1080p.csv"


def serve(display: str, port: int, log_path: str) -> None:
    """--serve: our RFB server with every write logged as (monotonic ns, bytes)."""
    from twisted.internet import reactor

    from modules.common.screen import rfb_twisted
    from modules.common.screen.capture_x11 import ScreenSource

    log = open(log_path, "w", buffering=1)
    original = rfb_twisted.RFBServerProtocol._write

    def logged_write(self, data: bytes) -> None:
        if data:  # an empty write (nothing changed) sends nothing
            log.write(f"{time.monotonic_ns()} {len(data)}\n")
        original(self, data)

    rfb_twisted.RFBServerProtocol._write = logged_write
    rfb_twisted.listen_vnc(reactor, f"127.0.0.1:{port}", ScreenSource(display), max_fps=30)
    print("ready", flush=True)
    reactor.run()


class Viewer(threading.Thread):
    """The supporter's RFB client on a blocking socket: reads, keeps one request pending."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        from protocol.rfb_client import FramebufferUpdated, RFBClient
        self.updated = FramebufferUpdated
        self.client = RFBClient()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.running = True
        self.bytes = 0
        self.updates = 0

    def run(self) -> None:
        client, sock = self.client, self.sock
        sock.settimeout(0.5)
        sock.sendall(client.data_to_send())
        asked = False
        while self.running:
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                break
            self.bytes += len(data)
            out = b""
            for event in client.receive(data):
                if isinstance(event, self.updated):
                    self.updates += 1
                    out += client.request_update(True)
            out = client.data_to_send() + out
            if client.initialised and not asked:
                asked = True
                out += client.request_update(False)
            if out:
                sock.sendall(out)
        sock.close()


def record(seconds: float, out: Path) -> dict:
    import recording_cost as rc
    from tests.fixtures_x11 import start_xvfb, stop_process

    disp = start_xvfb(f"{rc.SIZE[0]}x{rc.SIZE[1]}")
    server = None
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".raw")
    err_path = out.with_suffix(".err")
    try:
        t1 = disp.xterm("typing", geometry="140x50+0+0", extra=(
            "-e", sys.executable, "-c", rc.typing_script(seconds + 5)))
        t2 = disp.xterm("listing", geometry="140x50+500+200", bg="darkblue", extra=(
            "-e", sys.executable, "-c", rc.listing_script(seconds + 5)))
        port = rc.free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", disp.name, str(port),
                                   str(log_path)], stdout=subprocess.PIPE,
                                  stderr=open(err_path, "wb"))
        if server.stdout.readline().strip() != b"ready":
            server.kill()
            raise RuntimeError("the RFB server did not start: "
                               + err_path.read_text(errors="replace")[-2000:])
        viewer = Viewer(port)
        viewer.start()
        switcher = threading.Thread(target=rc.switch_windows,
                                    args=(disp.name, [t1.window, t2.window], seconds),
                                    daemon=True)
        switcher.start()
        time.sleep(seconds)
        viewer.running = False
        viewer.join(10)
        switcher.join(10)
    finally:
        if server is not None:
            stop_process(server)
        disp.stop()
    rows = [line.split() for line in log_path.read_text().splitlines() if line.strip()]
    log_path.unlink()
    err_path.unlink(missing_ok=True)
    t0 = int(rows[0][0])
    writes = [((int(t) - t0) / 1e6, int(n)) for t, n in rows if int(n)]
    total = sum(n for _, n in writes)
    span = max(seconds, writes[-1][0] / 1000)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write("# RFB server writes of a recorded screen session (bench/screen_trace.py)\n")
        f.write(f"# workload: office (recording_cost.py), 1920x1080 Xvfb, {seconds:g} s, "
                f"capture capped at 30 fps; {len(writes)} writes, {total} bytes, "
                f"viewer updates {viewer.updates}; recorded {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
        f.write(f"# duration_s={span:.3f}\n")
        f.write("ms,bytes\n")
        for ms, n in writes:
            f.write(f"{ms:.1f},{n}\n")
    return {"writes": len(writes), "bytes": total, "seconds": span, "updates": viewer.updates}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the workload (60)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"trace file ({DEFAULT_OUT})")
    args = p.parse_args(argv)
    if not 5 <= args.seconds <= 600:
        p.error("--seconds must be between 5 and 600")
    got = record(args.seconds, args.out)
    rate = got["bytes"] * 8 / got["seconds"] / 1000
    print(f"{got['writes']} writes, {got['bytes']:,} bytes in {got['seconds']:.1f} s = "
          f"{rate:.1f} kb/s mean, {got['updates']} updates -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
