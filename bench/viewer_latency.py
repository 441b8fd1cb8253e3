"""Screen change on the host → pixel in the supporter app's viewer, 1920x1080, against
TigerVNC's viewer (xtigervncviewer) on the same RFB source.

    python bench/viewer_latency.py                     # ~2-3 min
    python bench/viewer_latency.py --samples 40 --fps-seconds 4 --idle-seconds 5
    python bench/viewer_latency.py --pin     # x11vnc and the viewer on a core each (taskset)

The viewer is the app's own: ``RFBClientProtocol`` (modules/common/screen/rfb_client_twisted.py)
feeding ``FramebufferWidget`` (modules/common/qt/viewer.py) as a window on Qt's X11 platform
(xcb) on a second Xvfb (the *viewer display*), Twisted on the apps' Qt loop exactly as
``hausmeister-supporter gui`` runs it (``--qasync``: on qasync's own loop, as before).  It
connects over 127.0.0.1 to our RFB server (``listen_vnc`` + ``ScreenSource`` in its own
process, as a host module runs it) and to x11vnc serving the same source Xvfb.  Not included:
the session's AES-GCM channel and the relay hop (bench/channel_throughput.py and relay_throughput.py measure those).  Two ways of timing:

* **painted** (our viewer only): a paint hook fires when the widget *painted* a frame
  showing the change, within the same tolerance as the watcher's (event-driven: nothing in
  the viewer's process polls while it waits).
* **on screen** (both viewers, the same way): a separate watcher process polls the viewer
  display's pixels (XGetImage, 1x1) and stamps when the change is visible there.  TigerVNC's
  viewer (full screen, its default encodings) and ours (a frameless 1:1 window at 0,0) both
  show x11vnc's picture of the same source, so the server side is identical; ours is also
  timed this way on our own server.

Our viewer runs as the app ships it: decoding in its own thread (``--gui-loop``: on the GUI
loop, as before) and asking for the next update when one starts (``--late-request``: after it
was decoded, as before).

Figures: **latency**: a 120x120 square changes colour at a random spot (XFillRectangle +
XSync), time until its centre shows the new colour (within 24 per channel: JPEG);
**full-screen fps**: four full-screen pictures alternate as fast as each is shown completely
(two solid probe squares); **idle CPU**: our viewer process's CPU while the remote screen
stays still.  Nothing fails on timing; the last lines give the ratios against TigerVNC.
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


TOLERANCE = 24     # per channel: JPEG (Tight) may shift a flat colour a little
LOW = 200          # probes below TigerVNC's "Press F8" notice at the top of the screen


def watch_main(display: str) -> None:
    """The watcher process: for each stdin line ``x y r g b [x y r g b ...]`` poll those pixels
    of ``display`` until all match (within TOLERANCE) and print the ``perf_counter`` time (the
    parent's clock too: CLOCK_MONOTONIC), or ``timeout`` after 10 s."""
    from Xlib import X
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    root = d.screen().root
    for line in sys.stdin:
        values = [int(v) for v in line.split()]
        probes = [values[i:i + 5] for i in range(0, len(values), 5)]
        deadline = time.perf_counter() + 10
        shown = None
        while shown is None and time.perf_counter() < deadline:
            for x, y, r, g, b in probes:
                px = root.get_image(x, y, 1, 1, X.ZPixmap, 0xFFFFFFFF).data
                if max(abs(px[2] - r), abs(px[1] - g), abs(px[0] - b)) > TOLERANCE:
                    break
            else:
                shown = time.perf_counter()
                break
            time.sleep(0.0003)
        print("timeout" if shown is None else f"{shown:.6f}", flush=True)


def qt_reactor(app, stock_qasync: bool = False):
    """Twisted on the Qt loop as the apps run it (``install_reactor``: the apps' loop), or on
    qasync's own ``QEventLoop`` (``--qasync``; and a tree from before 2026-12-06 07:00,
    which has no ``install_reactor``)."""
    try:
        from modules.common.qt.app import install_reactor
    except ImportError:
        install_reactor = None
    if install_reactor is not None and not stock_qasync:
        return install_reactor(app)
    import qasync
    loop = qasync.QEventLoop(app)
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor
    asyncioreactor.install(loop)
    from twisted.internet import reactor
    return reactor


def view_main(port: int, prefer: str, decode_thread: bool, request_early: bool,
              stock_qasync: bool = False) -> None:
    """The viewer process (``--view``): the app's viewer on its own, as TigerVNC's runs in a
    process of its own, so the bench's drawing and waiting take nothing from it.
    ``RFBClientProtocol`` with the defaults of the app's ``ViewerScreen`` feeding
    ``FramebufferWidget``, Twisted on the apps' Qt loop, a frameless 1:1 window at 0,0 of $DISPLAY;
    it runs until its connection ends or it is stopped."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication
    app = QApplication(["viewer-bench", "-platform", "xcb"])
    reactor = qt_reactor(app, stock_qasync)
    from twisted.internet import endpoints

    from modules.common.qt.viewer import FramebufferWidget
    from modules.common.screen.rfb_client_twisted import RFBClientProtocol
    from protocol.rfb_client import FramebufferUpdated

    def event(e) -> None:
        if isinstance(e, FramebufferUpdated):
            widget.screen_changed([(r.x, r.y, r.width, r.height) for r in e.rects])
    protocol = RFBClientProtocol(on_event=event, encodings=encodings_for(prefer),
                                 call_in_reactor=reactor.callFromThread,
                                 **protocol_options(decode_thread, request_early))
    widget = FramebufferWidget(lambda: picture_of(protocol), lambda *a: None, lambda *a: None,
                               lambda: False, lock=protocol.framebuffer_lock)
    widget.setWindowFlags(Qt.FramelessWindowHint)
    widget.set_fit(False)
    widget.move(0, 0)
    widget.show()
    endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    protocol.ended.addBoth(lambda _: reactor.stop())
    reactor.run()


def picture_of(protocol) -> np.ndarray:
    """What the widget paints: the 4-byte picture, or the RGB one of a tree from before
    2026-12-06 04:00 (a "before" tree run with this bench file, e.g. for ``--pin``)."""
    return protocol.pixels if hasattr(protocol, "pixels") else protocol.framebuffer


def protocol_options(decode_thread: bool, request_early: bool) -> dict:
    """The viewer's options the tree under test knows (a "before" tree unpacked from an older
    commit may lack ``request_early``: it asked after each update)."""
    import inspect

    from modules.common.screen.rfb_client_twisted import RFBClientProtocol
    known = inspect.signature(RFBClientProtocol).parameters
    return {k: v for k, v in (("decode_thread", decode_thread), ("request_early", request_early))
            if k in known}


def encodings_for(prefer: str) -> tuple[int, ...]:
    from protocol.rfb_client import DEFAULT_ENCODINGS, TIGHT, ZRLE
    first = {"tight": TIGHT, "zrle": ZRLE}[prefer]
    return (first,) + tuple(e for e in DEFAULT_ENCODINGS if e != first)


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU of a process (or of its thread ``tid``) so far (/proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Watcher:
    """The bench's end of the watcher process (its answers come through the reactor, so the
    viewer in this process keeps running while we wait)."""

    def __init__(self, reactor, display: str) -> None:
        from twisted.internet import protocol
        watcher = self
        self.waiting: list = []

        class Lines(protocol.ProcessProtocol):
            buffer = b""

            def outReceived(self, data):  # noqa: N802
                self.buffer += data
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    d = watcher.waiting.pop(0)
                    d.callback(None if line == b"timeout" else float(line))
        self.process = reactor.spawnProcess(
            Lines(), sys.executable, [sys.executable, str(Path(__file__).resolve()),
                                      "--watch", display],
            env={**os.environ, "DISPLAY": display}, path=str(ROOT))

    def when_shown(self, probes):
        """A Deferred firing with the time the viewer display showed every (x, y, rgb)."""
        from twisted.internet import defer
        d = defer.Deferred()
        self.waiting.append(d)
        self.process.write((" ".join(f"{x} {y} {r} {g} {b}" for x, y, (r, g, b) in probes)
                            + "\n").encode())
        return d

    def close(self) -> None:
        self.process.closeStdin()


class Viewer:
    """The app's viewer on one RFB connection; remembers when it painted what."""

    def __init__(self, reactor, port: int, prefer: str = "tight",
                 decode_thread: bool = False, request_early: bool = True) -> None:
        from PySide6.QtCore import Qt
        from twisted.internet import endpoints

        from modules.common.qt.viewer import FramebufferWidget
        from modules.supporter.rfb_client import FramebufferUpdated
        from modules.common.screen.rfb_client_twisted import RFBClientProtocol
        self.FramebufferUpdated = FramebufferUpdated
        self.protocol = RFBClientProtocol(on_event=self._event, encodings=encodings_for(prefer),
                                          **protocol_options(decode_thread, request_early),
                                          call_in_reactor=reactor.callFromThread)
        viewer = self

        class ProbedWidget(FramebufferWidget):
            def paintEvent(self, event):  # noqa: N802
                super().paintEvent(event)
                if viewer.waiting is not None:
                    viewer._painted()
        self.reactor = reactor
        self.probes: list[tuple[int, int]] = []
        # (since, wanted probe pixels, Deferred): checked at each paint, nothing polls
        self.waiting: tuple[float, list, object] | None = None
        self.widget = ProbedWidget(lambda: picture_of(self.protocol), lambda *a: None,
                                   lambda *a: None, lambda: False,
                                   lock=self.protocol.framebuffer_lock)
        self.widget.setWindowFlags(Qt.FramelessWindowHint)
        self.widget.set_fit(False)
        self.widget.move(0, 0)
        self.widget.show()
        self.connected = endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), self.protocol)

    def _event(self, event) -> None:
        if isinstance(event, self.FramebufferUpdated):
            self.widget.screen_changed([(r.x, r.y, r.width, r.height) for r in event.rects])

    def _painted(self) -> None:
        since, want, d = self.waiting
        at = time.perf_counter()
        with self.protocol.framebuffer_lock:
            fb = self.protocol.framebuffer
            pixels = [tuple(int(v) for v in fb[y, x]) for x, y in self.probes] if fb.size else []
        if at >= since and len(pixels) == len(want) and all(
                max(abs(a - b) for a, b in zip(got, rgb)) <= TOLERANCE
                for got, rgb in zip(pixels, want)):   # lossy H.264/JPEG, as the watcher
            self.waiting = None
            self.reactor.callLater(0, d.callback, at)

    def shown(self, since: float, want: list, timeout: float):
        """A Deferred firing with the time of the first paint after ``since`` that showed
        ``want`` at the probes, or None after ``timeout`` s.  Event-driven (the paint hook),
        so the measurement takes no GIL turns from the decoder while it waits."""
        from twisted.internet import defer
        d = defer.Deferred()
        self.waiting = (since, want, d)

        def expire():
            if self.waiting is not None and self.waiting[2] is d:
                self.waiting = None
                d.callback(None)
        timer = self.reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return d


def sleep(seconds: float):
    """A pause on the reactor (the scenario is a Twisted coroutine on the Qt loop)."""
    from twisted.internet import reactor, task
    return task.deferLater(reactor, seconds, lambda: None)


async def latency(viewer: Viewer, painter: Painter, samples: int) -> list[float]:
    rnd = random.Random(7)
    out = []
    for _ in range(samples):
        await sleep(rnd.uniform(0.06, 0.12))
        x, y = rnd.randrange(0, painter.w - 120), rnd.randrange(0, painter.h - 120)
        fb = viewer.protocol.framebuffer
        while True:
            rgb = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
            old = fb[y + 60, x + 60]
            if max(abs(int(old[i]) - rgb[i]) for i in range(3)) > 3 * TOLERANCE:
                break
        viewer.probes = [(x + 60, y + 60)]
        shown = viewer.shown(0.0, [rgb], 5)     # no paint before the change shows rgb
        painter.square(x, y, 120, rgb)
        t0 = time.perf_counter()
        shown = await shown
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
        shown = viewer.shown(time.perf_counter(), want, 10)
        painter.show_picture(i)
        if await shown is None:
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


async def latency_on_screen(watcher: Watcher, painter: Painter, samples: int,
                            current: np.ndarray) -> list[float]:
    """Change → visible on the viewer display (either viewer), through the watcher process;
    ``current`` is what the source shows (kept up to date here)."""
    rnd = random.Random(11)
    out = []
    for _ in range(samples):
        await sleep(rnd.uniform(0.06, 0.12))
        x, y = rnd.randrange(0, painter.w - 120), rnd.randrange(LOW, painter.h - 120)
        while True:
            rgb = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
            old = current[y + 60, x + 60]
            if max(abs(int(old[i]) - rgb[i]) for i in range(3)) > 3 * TOLERANCE:
                break
        shown = watcher.when_shown([(x + 60, y + 60, rgb)])
        t0 = time.perf_counter()
        painter.square(x, y, 120, rgb)
        current[y:y + 120, x:x + 120] = rgb
        at = await shown
        if at is not None:
            out.append((at - t0) * 1000)
    return out


def add_probe_squares(painter: Painter, pics) -> list[tuple[int, int]]:
    """Two solid 60x60 squares per picture (bottom-left, bottom-right), a colour per picture,
    so no probe pixel sits on JPEG-blurred glyph edges; returns their centres."""
    w, h = painter.w, painter.h
    spots = [(60, h - 90), (w - 90, h - 90)]
    for i, (pix, img) in enumerate(zip(painter.pixmaps, pics)):
        for k, (x, y) in enumerate(spots):
            rgb = ((i * 83 + k * 40) % 256, 255 - i * 60, (i * 140 + 90 * k) % 256)
            painter.gc.change(foreground=(rgb[0] << 16) | (rgb[1] << 8) | rgb[2])
            pix.fill_rectangle(painter.gc, x - 30, y - 30, 60, 60)
            img[y - 30:y + 30, x - 30:x + 30] = rgb
    painter.d.sync()
    return spots


async def fps_on_screen(watcher: Watcher, painter: Painter, pics, spots,
                        seconds: float) -> float:
    frames, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = frames % len(pics)
        shown = watcher.when_shown([(x, y, tuple(int(v) for v in pics[i][y, x]))
                                    for x, y in spots])
        painter.show_picture(i)
        if await shown is None:
            break
        frames += 1
    return frames / (time.perf_counter() - start), frames


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


def main() -> None:
    if sys.argv[1:2] == ["--watch"]:
        watch_main(sys.argv[2])
        return
    if sys.argv[1:2] == ["--view"]:
        port, prefer, decode_thread, request_early = sys.argv[2:6]
        view_main(int(port), prefer, decode_thread == "1", request_early == "1",
                  sys.argv[6:7] == ["qasync"])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--fps-seconds", type=float, default=5)
    ap.add_argument("--idle-seconds", type=float, default=10)
    ap.add_argument("--max-fps", type=float, default=30, help="our server's capture rate cap")
    ap.add_argument("--prefer", choices=("tight", "zrle"), default="tight",
                    help="the encoding our viewer asks for first (the app asks for Tight)")
    ap.add_argument("--gui-loop", action="store_true",
                    help="decode on the GUI loop (before: the app decodes in a thread of its own)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="on-screen rounds, each ours then TigerVNC's (interleaved)")
    ap.add_argument("--pin", action="store_true",
                    help="x11vnc on CPU 0, each on-screen viewer on CPU 1 (taskset): the viewer "
                         "does not share a core with the server, as on two machines")
    ap.add_argument("--qasync", action="store_true",
                    help="our viewer on qasync's own QEventLoop (before: the apps' loop, "
                         "modules/common/qt/event_loop.py)")
    ap.add_argument("--late-request", action="store_true",
                    help="ask for the next update only after one is decoded (before: the app "
                         "asks when an update starts)")
    args = ap.parse_args()
    width, height = map(int, args.size.split("x"))

    def pin(cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if args.pin else []
    display = start_xvfb(args.size)
    viewer_display = start_xvfb(args.size)      # where both viewers show their window
    procs = []
    try:
        ours, x11vnc = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "screen_latency.py"), "--serve", display.name,
             str(ours), "--max-fps", str(args.max_fps)], cwd=ROOT, stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            pin(0) + ["x11vnc", "-display", display.name, "-rfbport", str(x11vnc), "-localhost",
             "-noipv6", "-nopw", "-forever", "-shared", "-quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(ours)
        wait_port(x11vnc)

        from PySide6.QtWidgets import QApplication
        app = QApplication.instance() or QApplication(
            ["viewer-bench", "-platform", "xcb", "-display", viewer_display.name])
        app.setQuitOnLastWindowClosed(False)
        reactor = qt_reactor(app, args.qasync)
        from twisted.internet import defer
        painted: dict[str, tuple] = {}
        on_screen: dict[str, tuple] = {}

        async def blank(painter) -> np.ndarray:
            painter.square(0, 0, max(width, height), (0, 0, 0))
            await sleep(1.0)                         # every viewer has caught up
            return np.zeros((height, width, 3), np.uint8)

        async def scenario():
            painter = Painter(display.name, width, height)
            pics = painter.prepare_pictures()
            spots = add_probe_squares(painter, pics)
            await blank(painter)
            watcher = Watcher(reactor, viewer_display.name)
            for name, port in (("hausmeister", ours), ("x11vnc", x11vnc)):
                viewer = Viewer(reactor, port, args.prefer, not args.gui_loop,
                                not args.late_request)
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
                painted[name] = (lat, rate, cpu, viewer.widget.frames_painted)
                viewer.protocol.transport.loseConnection()
                viewer.widget.close()
            await sleep(0.5)

            async def on_screen_run(name: str, command: list[str]) -> None:
                """One viewer process on the viewer display: latency and full-screen fps as
                the watcher sees them, and the process's CPU per full-screen frame."""
                await blank(painter)
                proc = subprocess.Popen(command, env={**os.environ, "DISPLAY": viewer_display.name},
                                        cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                procs.append(proc)
                colour = (250, 20, 200)               # on black (blank): shown = running
                ready = watcher.when_shown([(width // 2, height // 2, colour)])
                painter.square(width // 2 - 60, height // 2 - 60, 120, colour)
                if await ready is None:
                    print(f"{name}: the remote screen never showed", file=sys.stderr)
                else:
                    await sleep(1.0)
                    lat = await latency_on_screen(watcher, painter, args.samples,
                                                  await blank(painter))
                    # the viewer's process, and its main (GUI) thread: for ours behind
                    # taskset the process is the taskset's pid, exec'd in place
                    cpu0, gui0 = cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid)
                    rate, frames = await fps_on_screen(watcher, painter, pics, spots,
                                                       args.fps_seconds)
                    cpu = (cpu_seconds(proc.pid) - cpu0) / max(frames, 1)
                    gui = (cpu_seconds(proc.pid, proc.pid) - gui0) / max(frames, 1)
                    on_screen.setdefault(name, []).append(
                        (lat, rate, cpu, os.getloadavg()[0], gui))
                stop_process(proc)
                procs.remove(proc)

            ours_view = pin(1) + [sys.executable, str(Path(__file__).resolve()), "--view"]
            flags = [args.prefer, "0" if args.gui_loop else "1",
                     "0" if args.late_request else "1"] + (["qasync"] if args.qasync else [])
            await on_screen_run("hausmeister, own server", ours_view + [str(ours)] + flags)
            for _ in range(args.rounds):
                await on_screen_run("hausmeister viewer", ours_view + [str(x11vnc)] + flags)
                await on_screen_run("TigerVNC viewer", pin(1) + ["xtigervncviewer", "-FullScreen",
                                                        "-Shared", f"127.0.0.1::{x11vnc}"])
            watcher.close()
            painter.close()

        def done(result):
            if hasattr(result, "getTraceback"):
                print(f"the run stopped: {result.getErrorMessage()}", file=sys.stderr)
                result = None
            reactor.stop()
            return result
        reactor.callWhenRunning(lambda: defer.ensureDeferred(scenario()).addBoth(done))
        reactor.run()
        print(f"source {display.name}, viewer display {viewer_display.name}, {args.size}; our "
              f"viewer: the app's RFBClientProtocol + FramebufferWidget (Qt xcb; "
              f"{'qasync loop' if args.qasync else 'apps loop'}, "
              f"{'decoding on the GUI loop' if args.gui_loop else 'decoder thread'}, next "
              f"request {'after' if args.late_request else 'at the start of'} each update, "
              f"{args.prefer} first); our server's capture cap {args.max_fps:g} fps; "
              f"{'x11vnc on CPU 0, on-screen viewers on CPU 1' if args.pin else 'nothing pinned'}"
              f"; load average "
              f"{os.getloadavg()[0]:.1f}")
        print("asked of x11vnc: ours Tight, compression level 6, JPEG quality 8; TigerVNC "
              "Tight, compression level 2, quality 8 (its bandwidth auto-select on loopback; "
              "x11vnc logs both, and sends the same bytes for levels 2 and 6 here)")
        print("\npainted in our viewer's widget (paint hook), by the server behind it")
        print(f"{'server':12} {'p50 ms':>8} {'p95 ms':>8} {'n':>4} {'fps full':>9} "
              f"{'idle CPU':>9} {'paints':>7}")
        for name, (lat, rate, cpu, paints) in painted.items():
            print(f"{name:12} {pct(lat, 50):8.1f} {pct(lat, 95):8.1f} {len(lat):4d} {rate:9.1f} "
                  f"{cpu:9.1%} {paints:7d}")
        print("\non the viewer display (watcher process, XGetImage; each viewer a process of "
              "its own): both viewers on x11vnc, ours also on our server; rounds interleaved")
        print(f"{'viewer':24} {'round':>5} {'load':>5} {'p50 ms':>8} {'p95 ms':>8} {'n':>4} "
              f"{'fps full':>9} {'CPU ms/frame':>13} {'GUI thread':>11}")
        for name, runs in on_screen.items():
            for k, (lat, rate, cpu, load, gui) in enumerate(runs, 1):
                print(f"{name:24} {k:5d} {load:5.1f} {pct(lat, 50):8.1f} {pct(lat, 95):8.1f} "
                      f"{len(lat):4d} {rate:9.1f} {cpu * 1000:13.1f} {gui * 1000:11.1f}")
        if "hausmeister viewer" in on_screen and "TigerVNC viewer" in on_screen:
            pairs = list(zip(on_screen["hausmeister viewer"], on_screen["TigerVNC viewer"]))
            ratios = [o[1] / t[1] for o, t in pairs if t[1]]
            ol = [v for run in on_screen["hausmeister viewer"] for v in run[0]]
            tl = [v for run in on_screen["TigerVNC viewer"] for v in run[0]]
            print(f"\nours / TigerVNC: latency p50 {pct(ol, 50) / pct(tl, 50):.2f}x, p95 "
                  f"{pct(ol, 95) / pct(tl, 95):.2f}x (lower is better); full-screen fps by "
                  f"round {', '.join(f'{r:.2f}x' for r in ratios)}, median "
                  f"{float(np.median(ratios)) if ratios else float('nan'):.2f}x (target >= 1)")
        if "hausmeister" in painted:
            lat, rate, cpu, _ = painted["hausmeister"]
            print(f"\nour viewer + our server: latency p50 {pct(lat, 50):.1f} ms (target <= 60: "
                  f"{'met' if pct(lat, 50) <= 60 else 'NOT met'}), p95 {pct(lat, 95):.1f} ms "
                  f"(target <= 100: {'met' if pct(lat, 95) <= 100 else 'NOT met'}); viewer idle "
                  f"CPU {cpu:.1%} of a core (target <= 2 %: {'met' if cpu <= 0.02 else 'NOT met'})")
    finally:
        for p in procs:
            stop_process(p)
        viewer_display.stop()
        display.stop()


if __name__ == "__main__":
    main()
