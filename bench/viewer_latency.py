"""Screen change on the host → pixel painted in the supporter app's viewer widget, 1920x1080.

    python bench/viewer_latency.py                     # ~1 min
    python bench/viewer_latency.py --samples 40 --fps-seconds 4 --idle-seconds 5

The viewer is the app's own: ``RFBClientProtocol`` (modules/common/screen/rfb_client_twisted.py) feeding
``FramebufferWidget`` (modules/common/qt/viewer.py) on Qt's offscreen platform, Twisted on
qasync's loop exactly as ``hausmeister-supporter gui`` runs it.  It connects over 127.0.0.1 to
our RFB server (``listen_vnc`` + ``ScreenSource`` in its own process, as a host module runs it)
and, for comparison, to x11vnc serving the same Xvfb display.  Not included: the session's
AES-GCM channel and the relay hop (bench/channel_throughput.py and relay_throughput.py measure
those).  Figures:

* **latency**: a 120×120 square changes colour at a random spot (XFillRectangle + XSync); time
  until the widget has *painted* a frame showing the new colour at its centre.
* **full-screen fps**: four full-screen pictures alternate as fast as the widget paints each
  one completely (two probe pixels, top-left and bottom-right).
* **idle CPU**: the viewer process's CPU time while the remote screen stays still.

TigerVNC's viewer offers no hook to see when it painted a frame, so it is not in the table; the
x11vnc column shows what our viewer does with a C server behind it.  Nothing fails on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from screen_latency import Painter, free_port, wait_port  # noqa: E402
from tests.fixtures_x11 import start_xvfb, stop_process  # noqa: E402


class Viewer:
    """The app's viewer on one RFB connection; remembers when it painted what."""

    def __init__(self, reactor, port: int) -> None:
        from twisted.internet import endpoints

        from modules.common.qt.viewer import FramebufferWidget
        from modules.supporter.rfb_client import FramebufferUpdated
        from modules.common.screen.rfb_client_twisted import RFBClientProtocol
        self.FramebufferUpdated = FramebufferUpdated
        self.protocol = RFBClientProtocol(on_event=self._event)
        viewer = self

        class ProbedWidget(FramebufferWidget):
            def paintEvent(self, event):  # noqa: N802
                super().paintEvent(event)
                fb = viewer.protocol.framebuffer
                if fb.size:
                    viewer.painted.append((time.perf_counter(), [
                        tuple(int(v) for v in fb[y, x]) for x, y in viewer.probes]))
                    del viewer.painted[:-4]
        self.probes: list[tuple[int, int]] = []
        self.painted: list[tuple[float, list]] = []   # (time, probe pixels at paint time)
        self.widget = ProbedWidget(lambda: self.protocol.framebuffer, lambda *a: None,
                                   lambda *a: None, lambda: False)
        self.widget.resize(1920, 1080)
        self.widget.set_fit(False)
        self.widget.show()
        self.connected = endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), self.protocol)

    def _event(self, event) -> None:
        if isinstance(event, self.FramebufferUpdated):
            self.widget.screen_changed([(r.x, r.y, r.width, r.height) for r in event.rects])

    def shows(self, since: float, want: list) -> float | None:
        """When a paint after ``since`` showed ``want`` at the probes (None: not yet)."""
        for at, pixels in self.painted:
            if at >= since and pixels == want:
                return at
        return None


def sleep(seconds: float):
    """A pause on the reactor (the scenario is a Twisted coroutine on qasync's loop)."""
    from twisted.internet import reactor, task
    return task.deferLater(reactor, seconds, lambda: None)


async def until(predicate, timeout: float = 5.0):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        value = predicate()
        if value is not None and value is not False:
            return value
        await sleep(0.001)
    return None


async def latency(viewer: Viewer, painter: Painter, samples: int) -> list[float]:
    rnd = random.Random(7)
    out = []
    for _ in range(samples):
        await sleep(rnd.uniform(0.06, 0.12))
        x, y = rnd.randrange(0, painter.w - 120), rnd.randrange(0, painter.h - 120)
        fb = viewer.protocol.framebuffer
        while True:
            rgb = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
            if tuple(int(v) for v in fb[y + 60, x + 60]) != rgb:
                break
        viewer.probes = [(x + 60, y + 60)]
        viewer.painted.clear()
        painter.square(x, y, 120, rgb)
        t0 = time.perf_counter()
        shown = await until(lambda: viewer.shows(t0, [rgb]))
        if shown is not None:
            out.append((shown - t0) * 1000)
    return out


async def full_screen_fps(viewer: Viewer, painter: Painter, pics, seconds: float) -> float:
    w, h = painter.w, painter.h
    viewer.probes = [(5, 5), (w - 3, h - 9)]
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = frames % len(pics)
        want = [tuple(int(v) for v in pics[i][5, 5]), tuple(int(v) for v in pics[i][-9, -3])]
        viewer.painted.clear()
        t0 = time.perf_counter()
        painter.show_picture(i)
        if await until(lambda: viewer.shows(t0, want), timeout=10) is None:
            break
        frames += 1
    return frames / (time.perf_counter() - start)


async def idle_cpu(seconds: float) -> float:
    """Share of one core this process used while nothing changed on the remote screen."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    await sleep(seconds)
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return used / (time.perf_counter() - t0)


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--fps-seconds", type=float, default=5)
    ap.add_argument("--idle-seconds", type=float, default=10)
    ap.add_argument("--max-fps", type=float, default=30, help="our server's capture rate cap")
    args = ap.parse_args()
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    width, height = map(int, args.size.split("x"))
    display = start_xvfb(args.size)
    procs = []
    try:
        ours, x11vnc = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "screen_latency.py"), "--serve", display.name,
             str(ours), "--max-fps", str(args.max_fps)], cwd=ROOT, stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            ["x11vnc", "-display", display.name, "-rfbport", str(x11vnc), "-localhost",
             "-noipv6", "-nopw", "-forever", "-shared", "-quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(ours)
        wait_port(x11vnc)

        import qasync
        from PySide6.QtWidgets import QApplication
        app = QApplication.instance() or QApplication([])
        app.setQuitOnLastWindowClosed(False)
        loop = qasync.QEventLoop(app)
        asyncio.set_event_loop(loop)
        from twisted.internet import asyncioreactor
        asyncioreactor.install(loop)
        from twisted.internet import defer, reactor
        results: dict[str, tuple] = {}

        async def scenario():
            painter = Painter(display.name, width, height)
            pics = painter.prepare_pictures()
            painter.square(0, 0, width, (0, 0, 0))
            for name, port in (("hausmeister", ours), ("x11vnc", x11vnc)):
                viewer = Viewer(reactor, port)
                await viewer.connected
                try:
                    await viewer.protocol.first_frame
                except Exception as exc:
                    print(f"{name}: no first frame ({exc})", file=sys.stderr)
                    continue
                lat = await latency(viewer, painter, args.samples)
                rate = await full_screen_fps(viewer, painter, pics, args.fps_seconds)
                await sleep(1.0)      # the last frame settles
                cpu = await idle_cpu(args.idle_seconds)
                results[name] = (lat, rate, cpu, viewer.widget.frames_painted)
                viewer.protocol.transport.loseConnection()
                viewer.widget.close()
            painter.close()

        def done(result):
            if hasattr(result, "getTraceback"):
                print(f"the run stopped: {result.getErrorMessage()}", file=sys.stderr)
                result = None
            reactor.stop()
            return result
        reactor.callWhenRunning(lambda: defer.ensureDeferred(scenario()).addBoth(done))
        reactor.run()
        print(f"display {display.name} {args.size}; viewer: the app's RFBClientProtocol + "
              f"FramebufferWidget (Qt offscreen, qasync); our server's capture cap "
              f"{args.max_fps:g} fps")
        print(f"\n{'server':12} {'p50 ms':>8} {'p95 ms':>8} {'n':>4} {'fps full':>9} "
              f"{'idle CPU':>9} {'paints':>7}")
        for name, (lat, rate, cpu, paints) in results.items():
            print(f"{name:12} {pct(lat, 50):8.1f} {pct(lat, 95):8.1f} {len(lat):4d} {rate:9.1f} "
                  f"{cpu:9.1%} {paints:7d}")
        if "hausmeister" in results:
            lat, rate, cpu, _ = results["hausmeister"]
            print(f"\nlatency p50 {pct(lat, 50):.1f} ms (target <= 60: "
                  f"{'met' if pct(lat, 50) <= 60 else 'NOT met'}), p95 {pct(lat, 95):.1f} ms "
                  f"(target <= 100: {'met' if pct(lat, 95) <= 100 else 'NOT met'}); viewer idle "
                  f"CPU {cpu:.1%} of a core (target <= 2 %: {'met' if cpu <= 0.02 else 'NOT met'})")
    finally:
        for p in procs:
            stop_process(p)
        display.stop()


if __name__ == "__main__":
    main()
