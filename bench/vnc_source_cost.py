"""What taking the screen from a local VNC server costs the module, against the built-in X11
capture of the same display in the same run (issue 16 part 1).

    python bench/vnc_source_cost.py                 # 1920x1080, 20 s per source
    python bench/vnc_source_cost.py --seconds 5     # quick look

A private Xvfb; a drawing process (its own, so its CPU is not counted) paints a moving 640x360
block of noise 15 times a second (video-like) and a line of text-like bars 10 times a second;
x11vnc serves the display on 127.0.0.1.  Each source is captured the way the module's RFB server
does it (``capture(tracker)`` from a worker thread, at most 30 times a second) for ``--seconds``:

* **X11**: ``capture_x11.ScreenSource`` (mss + tile damage);
* **VNC source**: ``capture_vnc.VncSource`` connected to x11vnc (RFB client on the reactor
  thread decoding Raw rects on loopback, copy + tile damage in the worker).

Figures: captures with damage per second, the module process's CPU (% of one core, all its
threads), for the VNC source also x11vnc's own CPU; the ratio VNC source / X11 of the module's
CPU.  Nothing fails on timing; everything stops by itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures_x11 import require, start_xvfb, stop_process  # noqa: E402

DRAWER = r"""
import os, sys, time, random
from Xlib import X, display
d = display.Display(sys.argv[1]); root = d.screen().root; seconds = float(sys.argv[2])
w, h = root.get_geometry().width, root.get_geometry().height
gc = root.create_gc(foreground=0x204060)
rnd = random.Random(7)
noise = [os.urandom(640 * 40 * 4) for _ in range(9)]
end = time.monotonic() + seconds; frame = 0
while time.monotonic() < end:
    x = (frame * 16) % (w - 640); y = 200
    for band in range(9):                       # 640x360 of noise, in 40-row bands
        root.put_image(gc, x, y + band * 40, 640, 40, X.ZPixmap, 24, 0, noise[(band + frame) % 9])
    if frame % 3 == 0:                          # a "typed" line: bars across the top
        gc.change(foreground=rnd.getrandbits(24))
        root.fill_rectangle(gc, 10 + (frame * 7) % (w - 400), 40 + (frame // 50) % 20 * 16, 8, 14)
    d.sync(); frame += 1
    time.sleep(max(0.0, 1 / 15 - 0.002))
"""


def cpu_seconds_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def capture_loop(source, seconds: float) -> tuple[int, int]:
    """(captures, captures with damage) at most 30 a second, like ``RFBServerProtocol``."""
    from modules.common.screen.capture_x11 import DamageTracker
    tracker = DamageTracker(True)
    captures = changed = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        cap = source.capture(tracker)
        captures += 1
        changed += bool(cap.damage or cap.moves)
        time.sleep(max(0.0, 1 / 30 - (time.monotonic() - started)))
    return captures, changed


def drawer(display: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRAWER, display, str(seconds)])


def measure_x11(display: str, seconds: float) -> dict:
    from modules.common.screen.capture_x11 import ScreenSource
    source = ScreenSource(display)
    draw = drawer(display, seconds + 1)
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        captures, changed = capture_loop(source, seconds)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    finally:
        stop_process(draw)
        source.close()
    return {"captures": captures, "changed": changed, "cpu": cpu, "wall": wall}


def measure_vnc(display: str, seconds: float) -> dict:
    import socket

    from twisted.internet import reactor, threads

    from modules.common.screen.capture_vnc import VncAddress, VncSource
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x11vnc = subprocess.Popen([require("x11vnc"), "-display", display, "-rfbport", str(port),
                               "-localhost", "-noipv6", "-nopw", "-forever", "-shared",
                               "-quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict = {}

    def run():
        source = VncSource(VncAddress("127.0.0.1", port))
        draw = None

        def connected(_):
            nonlocal draw
            draw = drawer(display, seconds + 1)
            vnc0 = cpu_seconds_of(x11vnc.pid)
            cpu0, t0 = time.process_time(), time.monotonic()


            def done(counts):
                result.update(captures=counts[0], changed=counts[1],
                              cpu=time.process_time() - cpu0, wall=time.monotonic() - t0,
                              server_cpu=cpu_seconds_of(x11vnc.pid) - vnc0)
            return threads.deferToThread(capture_loop, source, seconds).addCallback(done)

        def connect(attempt=0):
            d = source.connect()
            if attempt < 50:   # x11vnc needs a moment to listen
                d.addErrback(lambda _: __import__("twisted.internet.task", fromlist=["x"])
                             .deferLater(reactor, 0.1, connect, attempt + 1))
            return d
        d = connect()
        d.addCallback(connected)
        d.addErrback(lambda f: result.update(error=f.getErrorMessage()))
        d.addBoth(lambda _: (source.disconnect(), draw and stop_process(draw), reactor.stop()))
    try:
        reactor.callWhenRunning(run)
        reactor.run()
    finally:
        stop_process(x11vnc)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--size", default="1920x1080")
    args = parser.parse_args()
    xvfb = start_xvfb(args.size)
    try:
        x11 = measure_x11(xvfb.name, args.seconds)
        vnc = measure_vnc(xvfb.name, args.seconds)
    finally:
        xvfb.stop()
    if "error" in vnc:
        print(f"VNC source failed: {vnc['error']}")
        return
    print(f"display {args.size}, {args.seconds:g} s per source, a 640x360 noise block at 15 fps "
          f"plus text-like bars; captures at most 30/s from a worker thread")
    for name, r in (("X11 capture (mss)", x11), ("VNC source (x11vnc, Raw)", vnc)):
        line = (f"{name:26s} {r['captures'] / r['wall']:5.1f} captures/s, "
                f"{r['changed'] / r['wall']:5.1f} with changes/s, module CPU "
                f"{100 * r['cpu'] / r['wall']:5.1f} % of a core")
        if "server_cpu" in r:
            line += f"; x11vnc itself {100 * r['server_cpu'] / r['wall']:.1f} %"
        print(line)
    print(f"ratio module CPU VNC source / X11 capture: {vnc['cpu'] / vnc['wall'] / (x11['cpu'] / x11['wall']):.2f}")


if __name__ == "__main__":
    main()
