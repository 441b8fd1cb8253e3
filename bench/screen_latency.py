"""Screen change → pixel at the client: our RFB server against x11vnc on one Xvfb display.

    python bench/screen_latency.py                      # 1920x1080, ~1 min
    python bench/screen_latency.py --samples 50 --workload 5   # quick look

Everything runs on 127.0.0.1 and a private Xvfb.  Both servers serve the same display; the client
is the test suite's independent decoder (``tests/rfb_decoder.py``, blocking socket, ZRLE +
CopyRect, lossless, 32bpp), the same for both.  Three figures per server:

* **latency**: a 120×120 square changes colour at a random spot (XFillRectangle, then XSync);
  time until the client's framebuffer shows the new colour at its centre.  The client always has
  an incremental request pending (it sends the next one as soon as an update arrived, like
  viewers do); changes come 60-120 ms apart.  p50/p95 over ``--samples`` changes.
* **full-screen frames per second**: four prepared full-screen pictures (text-like blocks on
  coloured bands, copied from server-side pixmaps) alternate as fast as the client shows them.
* **bytes for a scripted workload**: an xterm printing lines (scrolling) for ``--workload``
  seconds while both servers serve it *at the same time*, each to its own client; bytes received
  by each client.

Our server runs as its own process (``listen_vnc`` on the reactor, ``ScreenSource`` capture
through the blocking pool), exactly as a module would.  Nothing fails on timing.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures_x11 import start_xvfb, stop_process, wait_for_window  # noqa: E402
from tests.rfb_decoder import COPYRECT, ZRLE, BlockingRFBClient  # noqa: E402

ENCODINGS = [ZRLE, COPYRECT]


def serve(display: str, port: int, max_fps: float) -> None:
    """--serve: our RFB server for ``display`` on 127.0.0.1:port (runs until killed)."""
    from twisted.internet import reactor

    from modules.common.screen.rfb_twisted import listen_vnc
    from modules.common.screen.capture_x11 import ScreenSource
    listen_vnc(reactor, f"127.0.0.1:{port}", ScreenSource(display), max_fps=max_fps)
    print("ready", flush=True)
    reactor.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(12).startswith(b"RFB"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"no RFB server on port {port}")


class Painter:
    """Draws on a full-screen window of the display (python-xlib, server-side operations)."""

    def __init__(self, display: str, width: int, height: int):
        from Xlib import X
        from Xlib import display as xdisplay
        self.X = X
        self.d = xdisplay.Display(display)
        screen = self.d.screen()
        self.w, self.h = width, height
        self.win = screen.root.create_window(0, 0, width, height, 0, screen.root_depth,
                                             override_redirect=True,
                                             background_pixel=screen.black_pixel)
        self.win.map()
        self.gc = self.win.create_gc()
        self.d.sync()
        self.pixmaps = []

    def square(self, x: int, y: int, size: int, rgb: tuple[int, int, int]) -> None:
        self.gc.change(foreground=(rgb[0] << 16) | (rgb[1] << 8) | rgb[2])
        self.win.fill_rectangle(self.gc, x, y, size, size)
        self.d.sync()

    def prepare_pictures(self, n: int = 4) -> list[np.ndarray]:
        """Full-screen pictures in server-side pixmaps (copying one is a single fast request)."""
        rng = np.random.default_rng(1)
        pics = []
        for i in range(n):
            img = np.zeros((self.h, self.w, 3), np.uint8)
            bands = rng.integers(0, 256, (12, 3))
            for b in range(12):
                img[b * self.h // 12:(b + 1) * self.h // 12] = bands[b]
            glyphs = rng.random((self.h // 16, self.w // 8)) < 0.45
            mask = np.kron(glyphs, np.ones((16, 8), bool))
            mask[::16] = False
            img[:mask.shape[0], :mask.shape[1]][mask] = (255 - 40 * i, 255, 255)
            img[0:40, 0:40] = (i * 60, 255 - i * 60, 128)          # probe spot: differs per i
            pix = self.win.create_pixmap(self.w, self.h, self.d.screen().root_depth)
            bgrx = np.zeros((self.h, self.w, 4), np.uint8)
            bgrx[..., :3] = img[..., ::-1]
            rows = 32
            for y in range(0, self.h, rows):
                chunk = bgrx[y:y + rows]
                pix.put_image(self.gc, 0, y, self.w, chunk.shape[0], self.X.ZPixmap, 24, 0,
                              chunk.tobytes())
            self.pixmaps.append(pix)
            pics.append(img)
        self.d.sync()
        return pics

    def show_picture(self, i: int) -> None:
        self.win.copy_area(self.gc, self.pixmaps[i], 0, 0, self.w, self.h, 0, 0)
        self.d.sync()

    def close(self) -> None:
        self.win.destroy()
        self.d.close()


def connect(port: int) -> BlockingRFBClient:
    client = BlockingRFBClient("127.0.0.1", port, ENCODINGS, timeout=20)
    client.request(False)
    client.next_update()
    client.request(True)
    return client


def wait_pixel(client: BlockingRFBClient, x: int, y: int, rgb, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tuple(int(v) for v in client.decoder.fb[y, x]) == tuple(rgb):
            return True
        client.next_update()
        client.request(True)
    return False


def latency(port: int, painter: Painter, samples: int) -> list[float]:
    client = connect(port)
    rnd = random.Random(port)
    out = []
    try:
        for i in range(samples):
            time.sleep(rnd.uniform(0.06, 0.12))
            x, y = rnd.randrange(0, painter.w - 120), rnd.randrange(0, painter.h - 120)
            while True:     # a colour the client does not show there yet
                rgb = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
                if tuple(int(v) for v in client.decoder.fb[y + 60, x + 60]) != rgb:
                    break
            painter.square(x, y, 120, rgb)
            t0 = time.perf_counter()
            if wait_pixel(client, x + 60, y + 60, rgb):
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        client.close()
    return out


def fps(port: int, painter: Painter, pics: list[np.ndarray], seconds: float) -> tuple[float, float]:
    """(frames per second, MB per frame) over ``seconds`` of alternating full-screen pictures."""
    client = connect(port)
    try:
        frames = 0
        start = time.perf_counter()
        received0 = client.received
        while time.perf_counter() - start < seconds:
            i = frames % len(pics)
            painter.show_picture(i)
            want = pics[i]
            # the whole picture (probe spot and bottom-right corner) must have arrived
            if not wait_pixel(client, 5, 5, want[5, 5]):
                break
            if not wait_pixel(client, painter.w - 3, painter.h - 9, want[-9, -3]):
                break
            frames += 1
        elapsed = time.perf_counter() - start
        return frames / elapsed, (client.received - received0) / max(frames, 1) / 1e6
    finally:
        client.close()


def workload_bytes(ports: dict[str, int], display, seconds: float) -> dict[str, tuple]:
    """Both servers, one client each, while an xterm scrolls text: (bytes, updates, share of
    pixels the client shows wrong at the end) per server."""
    clients = {name: connect(port) for name, port in ports.items()}
    stop = threading.Event()
    result: dict[str, tuple[int, int]] = {}

    def run(name: str, client: BlockingRFBClient) -> None:
        base, updates = client.received, 0
        try:
            while not stop.is_set():
                client.next_update()
                client.request(True)
                updates += 1
        finally:
            result[name] = (client.received - base, updates, client.decoder.fb.copy())

    script = ("import sys, time\n"
              "t = time.time()\n"
              "i = 0\n"
              f"while time.time() - t < {seconds}:\n"
              "    print(f'{i:07d} the quick brown fox jumps over the lazy dog ' * 3)\n"
              "    sys.stdout.flush(); i += 1; time.sleep(0.004)\n")
    threads = [threading.Thread(target=run, args=item, daemon=True) for item in clients.items()]
    for t in threads:
        t.start()
    term = display.xterm("workload", geometry="200x70+0+0",
                         extra=("-e", sys.executable, "-c", script))
    term.proc.wait(seconds + 30)
    time.sleep(1.5)                 # the last changes reach the clients
    import mss
    with mss.MSS(display=display.name) as sct:
        screen = np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1]
    stop.set()
    painter = Painter(display.name, 64, 64)     # one more change so blocked readers return
    painter.square(0, 0, 64, (1, 2, 3))
    for t in threads:
        t.join(5)
    painter.close()
    for c in clients.values():
        c.close()
    # was the client's picture right at the end (outside the 64x64 wake-up square)?
    out = {}
    for name, (nbytes, updates, fb) in result.items():
        mism = (fb != screen).any(axis=2)
        mism[:64, :64] = False
        out[name] = (nbytes, updates, float(mism.mean()))
    return out


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1920x1080")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--fps-seconds", type=float, default=5)
    ap.add_argument("--workload", type=float, default=10, help="seconds of scrolling text")
    ap.add_argument("--max-fps", type=float, default=30, help="our server's capture rate cap")
    ap.add_argument("--serve", nargs=2, metavar=("DISPLAY", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.max_fps)
        return

    width, height = map(int, args.size.split("x"))
    display = start_xvfb(args.size)
    procs = []
    try:
        ours_port, x11vnc_port = free_port(), free_port()
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--serve", display.name, str(ours_port),
             "--max-fps", str(args.max_fps)], cwd=ROOT, stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen(
            ["x11vnc", "-display", display.name, "-rfbport", str(x11vnc_port), "-localhost",
             "-noipv6", "-nopw", "-forever", "-shared", "-quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(ours_port)
        wait_port(x11vnc_port)
        ports = {"hausmeister": ours_port, "x11vnc": x11vnc_port}
        print(f"display {display.name} {args.size}; client: tests/rfb_decoder.py, encodings "
              f"ZRLE+CopyRect; our capture cap {args.max_fps:g} fps")

        painter = Painter(display.name, width, height)
        lat = {name: latency(port, painter, args.samples) for name, port in ports.items()}
        pics = painter.prepare_pictures()
        rates = {name: fps(port, painter, pics, args.fps_seconds) for name, port in ports.items()}
        painter.close()
        work = workload_bytes(ports, display, args.workload)

        print(f"\n{'':12} {'p50 ms':>8} {'p95 ms':>8} {'n':>4} {'fps full':>9} {'MB/frame':>9} "
              f"{'workload bytes':>15} {'updates':>8} {'wrong px':>9}")
        for name in ports:
            f, mb = rates[name]
            b, u, wrong = work.get(name, (0, 0, float("nan")))
            print(f"{name:12} {pct(lat[name], 50):8.1f} {pct(lat[name], 95):8.1f} "
                  f"{len(lat[name]):4d} {f:9.1f} {mb:9.2f} {b:15,d} {u:8d} {wrong:9.2%}")
        ours, ref = "hausmeister", "x11vnc"
        p50 = pct(lat[ours], 50)
        print(f"\nlatency p50 {p50:.1f} ms (target <= 60 ms: {'met' if p50 <= 60 else 'NOT met'}); "
              f"vs x11vnc p50 {p50 / pct(lat[ref], 50):.2f}x")
        print(f"full-screen fps {rates[ours][0]:.1f} vs x11vnc {rates[ref][0]:.1f} "
              f"({rates[ours][0] / max(rates[ref][0], 1e-9):.2f}x)")
        if work.get(ref, (0,))[0]:
            ratio = work[ours][0] / work[ref][0]
            print(f"workload bytes {ratio:.2f}x x11vnc (target <= 1.0x: "
                  f"{'met' if ratio <= 1.0 else 'NOT met'})")
    finally:
        for p in procs:
            stop_process(p)
        display.stop()


if __name__ == "__main__":
    main()
