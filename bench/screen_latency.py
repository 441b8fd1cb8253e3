"""Screen change → pixel at the client: our RFB server against x11vnc on one Xvfb display.

    python bench/screen_latency.py                      # 1920x1080, ~2 min
    python bench/screen_latency.py --samples 50 --workload 5   # quick look
    python bench/screen_latency.py --rows h264,x11vnc   # only these rows

Everything runs on 127.0.0.1 and a private Xvfb.  Both servers serve the same display.  Rows:

* ``zrle`` (our server) and ``x11vnc``: the test suite's independent decoder
  (``tests/rfb_decoder.py``, blocking socket, ZRLE + CopyRect, lossless, 32bpp), the same for
  both — the figures issue 14 started from;
* ``tight``: our server to the supporter's own decoder (``protocol.rfb_client.RFBClient`` on a
  blocking socket), lossless Tight + CopyRect;
* ``h264``: the same client also announcing Open H.264 (50): full-screen and moving-picture
  changes arrive as H.264 (lossy; pixels are compared within ``--tolerance``), the rest as Tight.

Figures per row:

* **latency**: a 120×120 square changes colour at a random spot (XFillRectangle, then XSync);
  time until the client's framebuffer shows the new colour at its centre.  The client always has
  an incremental request pending (it sends the next one as soon as an update arrived, like
  viewers do); changes come 60-120 ms apart.  p50/p95 over ``--samples`` changes.
* **full-screen frames per second**: four prepared full-screen pictures (text-like blocks on
  coloured bands, copied from server-side pixmaps) alternate as fast as the client shows them.
  Closed loop: the next picture is shown when the client showed the last one, so this is
  1 / (full-screen change → pixel latency).  With it: CPU per frame of the server, of this
  client and of Xvfb (``/proc``, user + system, all threads; they do not depend on the
  machine's load the way wall time does), and ``fps/core``: 1000 / their sum.
* **video frames per second** (open loop): eight full-screen frames of a smooth moving picture
  with a frame number in a corner are shown at ``--video-fps`` whatever the client does, for
  ``--fps-seconds``; how many different frames the client showed per second.
* **bytes for a scripted workload**: an xterm printing lines (scrolling) for ``--workload``
  seconds while all rows are served *at the same time*, each by its own client; bytes received
  by each client.

Our server runs as its own process (``listen_vnc`` on the reactor, ``ScreenSource`` capture
through the blocking pool), exactly as a module would.  Nothing fails on timing.  The load
average is printed at the start and the end: the fps and latency figures are wall-clock.
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
H264 = 50
TIGHT = 7
# the supporter's client without JPEG (a quality level would make Tight lossy too)
OUR_TIGHT = (TIGHT, COPYRECT, -239, -223, -224)
OUR_H264 = (TIGHT, H264, COPYRECT, -239, -223, -224)
ALL_ROWS = ("zrle", "tight", "h264", "x11vnc")


class OurClient:
    """The supporter's decoder (``protocol.rfb_client.RFBClient``) on a blocking socket, with
    the interface of ``BlockingRFBClient`` that this benchmark uses."""

    def __init__(self, port: int, encodings, timeout: float = 20):
        from protocol.rfb_client import FramebufferUpdated, RFBClient
        self._updated = FramebufferUpdated
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfb = RFBClient(encodings=encodings)
        self.received = 0
        self.pending_updates = 0
        self.decoder = self             # ``client.decoder.fb`` as in BlockingRFBClient
        while not self.rfb.initialised:
            self._pump()

    @property
    def fb(self) -> np.ndarray:
        return self.rfb.framebuffer

    def _pump(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.received += len(data)
        events = self.rfb.receive(data)
        out = self.rfb.data_to_send()
        if out:
            self.sock.sendall(out)
        self.pending_updates += sum(isinstance(e, self._updated) for e in events)

    def request(self, incremental: bool = True) -> None:
        self.sock.sendall(self.rfb.request_update(incremental))

    def next_update(self) -> None:
        while not self.pending_updates:
            self._pump()
        self.pending_updates -= 1

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
            img[-40:, -40:] = (255 - i * 60, 128, i * 60)           # and one at the other end
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

    def prepare_video(self, n: int = 8, step: int = 12) -> list[np.ndarray]:
        """Frames of a smooth colourful pattern panning ``step`` pixels a frame (video-like),
        each with its number as the colour of a 48×48 probe at the bottom right; appended to
        the pixmaps after the pictures (``show_picture(first + i)``)."""
        yy, xx = np.mgrid[0:self.h, 0:self.w + n * step].astype(np.float32)
        base = np.stack([128 + 100 * np.sin(xx / 97 + yy / 151), 128 + 100 * np.sin(xx / 61),
                         128 + 100 * np.cos(yy / 83 - xx / 211)], axis=2).astype(np.uint8)
        frames = []
        for i in range(n):
            img = np.ascontiguousarray(base[:, i * step:i * step + self.w])
            img[-48:, -48:] = video_probe(i)
            self._upload(img)
            frames.append(img)
        return frames

    def _upload(self, img: np.ndarray) -> None:
        pix = self.win.create_pixmap(self.w, self.h, self.d.screen().root_depth)
        bgrx = np.zeros((self.h, self.w, 4), np.uint8)
        bgrx[..., :3] = img[..., ::-1]
        for y in range(0, self.h, 32):
            chunk = bgrx[y:y + 32]
            pix.put_image(self.gc, 0, y, self.w, chunk.shape[0], self.X.ZPixmap, 24, 0,
                          chunk.tobytes())
        self.pixmaps.append(pix)
        self.d.sync()

    def close(self) -> None:
        self.win.destroy()
        self.d.close()


def video_probe(i: int) -> tuple[int, int, int]:
    return ((i * 97) % 256, 255 - (i * 53) % 256, (i * 151 + 64) % 256)


class Row:
    """One row of the table: which server, which client, and how close a pixel must be."""

    def __init__(self, name: str, port: int, pid: int, tolerance: int = 0):
        self.name, self.port, self.pid, self.tolerance = name, port, pid, tolerance

    def connect(self):
        if self.name in ("zrle", "x11vnc"):
            client = BlockingRFBClient("127.0.0.1", self.port, ENCODINGS, timeout=20)
        else:
            client = OurClient(self.port, OUR_H264 if self.name == "h264" else OUR_TIGHT)
        client.request(False)
        client.next_update()
        client.request(True)
        return client


def same(client, x: int, y: int, rgb, tolerance: int) -> bool:
    got = client.decoder.fb[y, x]
    return all(abs(int(g) - int(w)) <= tolerance for g, w in zip(got, rgb))


def wait_pixel(client, x: int, y: int, rgb, timeout: float = 5, tolerance: int = 0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if same(client, x, y, rgb, tolerance):
            return True
        client.next_update()
        client.request(True)
    return False


def latency(row: Row, painter: Painter, samples: int) -> list[float]:
    client = row.connect()
    rnd = random.Random(row.port)
    out = []
    try:
        for i in range(samples):
            time.sleep(rnd.uniform(0.06, 0.12))
            x, y = rnd.randrange(0, painter.w - 120), rnd.randrange(0, painter.h - 120)
            while True:     # a colour the client does not show there yet
                rgb = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
                if not same(client, x + 60, y + 60, rgb, max(row.tolerance, 0) * 2 + 1):
                    break
            painter.square(x, y, 120, rgb)
            t0 = time.perf_counter()
            if wait_pixel(client, x + 60, y + 60, rgb, tolerance=row.tolerance):
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        client.close()
    return out


def fps(row: Row, painter: Painter, pics: list[np.ndarray], seconds: float,
        xvfb_pid: int) -> tuple[float, float, float, float, float]:
    """(frames per second, MB per frame, and CPU ms per frame of the server, the client and
    Xvfb) over ``seconds`` of alternating full-screen pictures."""
    client = row.connect()
    try:
        frames = 0
        start = time.perf_counter()
        received0 = client.received
        cpu0 = cpu_seconds(row.pid)
        client_cpu0 = time.process_time()
        x_cpu0 = cpu_seconds(xvfb_pid)
        tol = row.tolerance
        while time.perf_counter() - start < seconds:
            i = frames % len(pics)
            painter.show_picture(i)
            want = pics[i]
            # the whole picture (probe spots at both ends) must have arrived
            if not wait_pixel(client, 5, 5, want[5, 5], tolerance=tol):
                break
            if not wait_pixel(client, painter.w - 20, painter.h - 20, want[-20, -20],
                              tolerance=tol):
                break
            frames += 1
        elapsed = time.perf_counter() - start
        per_frame = 1000 / max(frames, 1)
        return (frames / elapsed, (client.received - received0) / max(frames, 1) / 1e6,
                (cpu_seconds(row.pid) - cpu0) * per_frame,
                (time.process_time() - client_cpu0) * per_frame,
                (cpu_seconds(xvfb_pid) - x_cpu0) * per_frame)
    finally:
        client.close()


def video_fps(row: Row, painter: Painter, first: int, n: int, seconds: float,
              rate: float) -> tuple[float, float]:
    """(different frames the client showed per second, MB per second) while the display plays
    ``n`` video frames in a loop at ``rate`` frames per second (open loop)."""
    client = row.connect()
    stop = threading.Event()

    def play() -> None:
        i, t = 0, time.perf_counter()
        while not stop.is_set():
            painter.show_picture(first + i % n)
            i += 1
            t += 1 / rate
            time.sleep(max(0.0, t - time.perf_counter()))

    player = threading.Thread(target=play, daemon=True)
    probes = np.array([video_probe(i) for i in range(n)], int)
    tol = max(row.tolerance, 8)
    try:
        player.start()
        shown, last = 0, None
        start = time.perf_counter()
        received0 = client.received
        while time.perf_counter() - start < seconds:
            client.next_update()
            client.request(True)
            px = client.decoder.fb[painter.h - 24, painter.w - 24].astype(int)
            # the nearest probe colour within the tolerance (probes 1 and 6, 2 and 7 are 27
            # apart: "every probe within 40" counted none of those four frames for h264)
            distance = np.abs(probes - px).max(axis=1)
            nearest = int(np.argmin(distance))
            if distance[nearest] <= tol and nearest != last:
                shown += 1
                last = nearest
        elapsed = time.perf_counter() - start
        return shown / elapsed, (client.received - received0) / elapsed / 1e6
    finally:
        stop.set()
        player.join(5)
        client.close()


def workload_bytes(rows: list[Row], display, seconds: float) -> dict[str, tuple]:
    """All rows, one client each, while an xterm scrolls text: (bytes, updates, share of
    pixels the client shows wrong at the end) per row."""
    clients = {row.name: row.connect() for row in rows}
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
    ap.add_argument("--video-fps", type=float, default=30, help="frame rate of the video phase")
    ap.add_argument("--workload", type=float, default=10, help="seconds of scrolling text")
    ap.add_argument("--max-fps", type=float, default=30, help="our server's capture rate cap")
    ap.add_argument("--rows", default=",".join(ALL_ROWS),
                    help=f"comma-separated, of {', '.join(ALL_ROWS)}")
    ap.add_argument("--tolerance", type=int, default=40,
                    help="per-channel difference a pixel of the lossy h264 row may show")
    ap.add_argument("--serve", nargs=2, metavar=("DISPLAY", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.max_fps)
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = set(names) - set(ALL_ROWS)
    if unknown or not names:
        ap.error(f"--rows: unknown {', '.join(sorted(unknown)) or 'nothing'}; "
                 f"choose from {', '.join(ALL_ROWS)}")

    width, height = map(int, args.size.split("x"))
    display = start_xvfb(args.size)
    procs = []
    load_start = os.getloadavg()
    try:
        ours_port, x11vnc_port = free_port(), free_port()
        ours = subprocess.Popen(
            [sys.executable, __file__, "--serve", display.name, str(ours_port),
             "--max-fps", str(args.max_fps)], cwd=ROOT, stdout=subprocess.DEVNULL)
        procs.append(ours)
        x11vnc = subprocess.Popen(
            ["x11vnc", "-display", display.name, "-rfbport", str(x11vnc_port), "-localhost",
             "-noipv6", "-nopw", "-forever", "-shared", "-quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(x11vnc)
        wait_port(ours_port)
        wait_port(x11vnc_port)
        rows = [Row(n, x11vnc_port, x11vnc.pid) if n == "x11vnc"
                else Row(n, ours_port, ours.pid, args.tolerance if n == "h264" else 0)
                for n in names]
        print(f"display {display.name} {args.size}; rows {', '.join(names)}; our capture cap "
              f"{args.max_fps:g} fps; load average {load_start[0]:.1f} {load_start[1]:.1f} "
              f"{load_start[2]:.1f}")

        painter = Painter(display.name, width, height)
        lat = {row.name: latency(row, painter, args.samples) for row in rows}
        pics = painter.prepare_pictures()
        rates = {row.name: fps(row, painter, pics, args.fps_seconds, display.proc.pid)
                 for row in rows}
        painter.prepare_video()
        video = {row.name: video_fps(row, painter, len(pics), 8, args.fps_seconds,
                                     args.video_fps) for row in rows}
        painter.close()
        work = workload_bytes(rows, display, args.workload)
        load_end = os.getloadavg()

        print(f"\n{'':8} {'p50 ms':>7} {'p95 ms':>7} {'n':>4} {'fps full':>8} {'MB/frame':>8} "
              f"{'CPU ms/frame: server client Xvfb':>33} {'fps/core':>8} {'video fps':>9} "
              f"{'video MB/s':>10} {'workload bytes':>14} {'updates':>7} {'wrong px':>8}")
        for row in rows:
            n = row.name
            f, mb, cpu, client_cpu, x_cpu = rates[n]
            vf, vmb = video[n]
            b, u, wrong = work.get(n, (0, 0, float("nan")))
            per_core = 1000 / max(cpu + client_cpu + x_cpu, 1e-9)
            print(f"{n:8} {pct(lat[n], 50):7.1f} {pct(lat[n], 95):7.1f} {len(lat[n]):4d} "
                  f"{f:8.1f} {mb:8.2f} {cpu:19.1f} {client_cpu:6.1f} {x_cpu:6.1f} "
                  f"{per_core:8.1f} {vf:9.1f} {vmb:10.2f} {b:14,d} {u:7d} {wrong:8.2%}")
        print("fps/core: full-screen frames a second if one core did nothing but this row's "
              "server, client and Xvfb work (1000 / their CPU ms per frame; load-independent)")
        print(f"load average at the end {load_end[0]:.1f} {load_end[1]:.1f} {load_end[2]:.1f}")
        if "x11vnc" in names:
            ref = "x11vnc"
            for n in names:
                if n == ref:
                    continue
                line = (f"{n} vs x11vnc: latency p50 {pct(lat[n], 50) / pct(lat[ref], 50):.2f}x, "
                        f"full-screen fps {rates[n][0] / max(rates[ref][0], 1e-9):.2f}x, "
                        f"video fps {video[n][0] / max(video[ref][0], 1e-9):.2f}x, "
                        f"bytes/frame {rates[n][1] / max(rates[ref][1], 1e-9):.2f}x")
                if work.get(ref, (0,))[0]:
                    line += f", workload bytes {work[n][0] / work[ref][0]:.2f}x"
                print(line)
        if "h264" in names:
            f = rates["h264"][0]
            print(f"target: >= 25 full-screen frames/s at 1080p: h264 row {f:.1f} "
                  f"({'met' if f >= 25 else 'NOT met'}); video {video['h264'][0]:.1f} frames/s")
    finally:
        for p in procs:
            stop_process(p)
        display.stop()


if __name__ == "__main__":
    main()
