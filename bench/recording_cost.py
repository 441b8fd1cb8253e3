"""What a session recording costs: bytes per hour, recorder CPU, MP4 export speed (issue 12).

    python bench/recording_cost.py                  # 1920x1080, office + video-like, 60 s each
    python bench/recording_cost.py --seconds 20     # quick look

Everything runs on a private Xvfb and 127.0.0.1.  Our RFB server (the one a module runs, as its
own process) serves the display to the supporter's RFB client (``protocol.rfb_client``) in this
process; every byte the client receives goes through the recorder's ``protocol.recording.Writer``
(encrypted records flushed once a second), exactly what a host module records and uploads.

Workloads (each ``--seconds`` long, bounded):

* **office**: two xterms side by side; one "types" a line of text at ~10 characters a second and
  scrolls, the other prints a listing every few seconds; every 5 s the other window is raised
  (switching windows);
* **video-like**: a 640x360 window showing moving, noisy pictures at 15 frames a second beside
  the xterms.

Figures: recording bytes per hour (target ≤ 100 MB/h office), compared in the same run with
``ffmpeg -f x11grab`` + libx264 (veryfast, CRF 23, 15 fps) on the same display if ffmpeg is
installed; the recorder's CPU (framing + AES-GCM, measured around its calls, as % of one core;
target ≤ 10 %); MP4 export of the recording (``server.recordings.export``) in times real time
(target ≥ 4x).  Nothing fails on timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures_x11 import start_xvfb, stop_process, wait_for_window  # noqa: E402

SIZE = (1920, 1080)


def serve(display: str, port: int) -> None:
    """--serve: our RFB server for ``display`` on 127.0.0.1:port (runs until killed)."""
    from twisted.internet import reactor

    from modules.common.screen.rfb_twisted import listen_vnc
    from modules.common.screen.capture_x11 import ScreenSource
    listen_vnc(reactor, f"127.0.0.1:{port}", ScreenSource(display), max_fps=30)
    print("ready", flush=True)
    reactor.run()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingViewer(threading.Thread):
    """The supporter's RFB client on a blocking socket, recording what it receives."""

    def __init__(self, port: int, writer, out_path: Path) -> None:
        super().__init__(daemon=True)
        from protocol.rfb_client import FramebufferUpdated, RFBClient
        self.FramebufferUpdated = FramebufferUpdated
        self.client = RFBClient()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.writer = writer
        self.out = open(out_path, "wb")
        self.stop_at = 0.0
        self.t0 = time.monotonic()
        self.cpu = 0.0           # seconds of this thread's CPU spent in the recorder
        self.rfb_bytes = 0
        self.running = True
        self._record(writer.start())

    def _record(self, data: bytes) -> None:
        self.out.write(data)

    def run(self) -> None:
        client, sock = self.client, self.sock
        sock.settimeout(0.5)
        last_flush = time.monotonic()
        sock.sendall(client.data_to_send())
        while self.running:
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                data = b""
            if data:
                self.rfb_bytes += len(data)
                c0 = time.thread_time()
                self.writer.add(1, int((time.monotonic() - self.t0) * 1000), data)
                self.cpu += time.thread_time() - c0
                events = client.receive(data)
                out = client.data_to_send()
                for e in events:
                    if isinstance(e, self.FramebufferUpdated):
                        out += client.request_update(True)
                if client.initialised and not getattr(self, "_asked", False):
                    self._asked = True
                    out += client.request_update(False)
                if out:
                    sock.sendall(out)
            if time.monotonic() - last_flush >= 1.0:
                c0 = time.thread_time()
                chunk = self.writer.flush()
                self.cpu += time.thread_time() - c0
                self._record(chunk)
                last_flush = time.monotonic()
        c0 = time.thread_time()
        self._record(self.writer.flush() + self.writer.close())
        self.cpu += time.thread_time() - c0
        self.out.close()
        sock.close()


def typing_script(seconds: float) -> str:
    return ("import sys,time,random\n"
            f"end=time.time()+{seconds}\n"
            "words='the quarterly report shows that the support desk closed most tickets within a day'.split()\n"
            "while time.time()<end:\n"
            " line=' '.join(random.choice(words) for _ in range(12))\n"
            " for ch in line:\n"
            "  sys.stdout.write(ch); sys.stdout.flush(); time.sleep(0.1)\n"
            "  if time.time()>=end: break\n"
            " sys.stdout.write('\\n'); sys.stdout.flush()\n")


def listing_script(seconds: float) -> str:
    return ("import os,time\n"
            f"end=time.time()+{seconds}\n"
            "while time.time()<end:\n"
            " for n in sorted(os.listdir('/usr/bin'))[:60]: print(n)\n"
            " time.sleep(3)\n")


def switch_windows(display: str, windows: list[int], seconds: float) -> None:
    from Xlib import X
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        d.create_resource_object("window", windows[i % len(windows)]).configure(
            stack_mode=X.Above)
        d.sync()
        i += 1
        time.sleep(5)
    d.close()


def video_like(display: str, seconds: float) -> None:
    """A 640x360 window with moving noisy pictures at 15 fps."""
    from Xlib import X
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    screen = d.screen()
    w, h = 640, 360
    win = screen.root.create_window(1200, 600, w, h, 0, screen.root_depth, override_redirect=True,
                                    background_pixel=screen.black_pixel)
    win.map()
    gc = win.create_gc()
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:h, 0:w]
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        t = n / 15
        img = np.zeros((h, w, 4), np.uint8)
        img[..., 0] = ((xx + t * 80) % 256).astype(np.uint8)
        img[..., 1] = ((yy + t * 40) % 256).astype(np.uint8)
        img[..., 2] = (128 + 100 * np.sin(t + xx / 50)).astype(np.uint8)
        img[..., :3] = np.clip(img[..., :3].astype(np.int16)
                               + rng.integers(-12, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        for y in range(0, h, 60):
            win.put_image(gc, 0, y, w, 60, X.ZPixmap, 24, 0, img[y:y + 60].tobytes())
        d.sync()
        n += 1
        time.sleep(max(0.0, (n / 15) - (time.monotonic() - (end - seconds))))
    win.destroy()
    d.close()


def run_workload(name: str, seconds: float, video: bool, tmp: Path) -> dict:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from protocol import recording
    disp = start_xvfb(f"{SIZE[0]}x{SIZE[1]}")
    server = None
    ffmpeg = None
    try:
        # overlapping windows, so raising one (every 5 s) redraws what the other covered
        t1 = disp.xterm("typing", geometry="140x50+0+0", extra=(
            "-e", sys.executable, "-c", typing_script(seconds + 5)))
        t2 = disp.xterm("listing", geometry="140x50+500+200", bg="darkblue", extra=(
            "-e", sys.executable, "-c", listing_script(seconds + 5)))
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", disp.name, str(port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert server.stdout.readline().strip() == b"ready"
        key = X25519PrivateKey.generate()
        writer = recording.Writer({"session_id": name, "tenant": "bench", "recorder": "host",
                                   "screen": list(SIZE)}, [key.public_key()])
        rec_path = tmp / f"{name}.hmrec"
        viewer = RecordingViewer(port, writer, rec_path)
        mp4_ffmpeg = tmp / f"{name}-ffmpeg.mp4"
        if shutil.which("ffmpeg"):
            ffmpeg = subprocess.Popen(
                ["ffmpeg", "-loglevel", "error", "-y", "-f", "x11grab", "-video_size",
                 f"{SIZE[0]}x{SIZE[1]}", "-framerate", "15", "-i", disp.name, "-t", str(seconds),
                 "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                 str(mp4_ffmpeg)], stdin=subprocess.DEVNULL)
        started = time.monotonic()
        viewer.start()
        helpers = [threading.Thread(target=switch_windows, args=(disp.name, [t1.window, t2.window],
                                                                 seconds), daemon=True)]
        if video:
            helpers.append(threading.Thread(target=video_like, args=(disp.name, seconds),
                                            daemon=True))
        for h in helpers:
            h.start()
        time.sleep(seconds)
        viewer.running = False
        viewer.join(30)
        wall = time.monotonic() - started
        for h in helpers:
            h.join(10)
        if ffmpeg is not None:
            try:
                ffmpeg.wait(timeout=60)
            except subprocess.TimeoutExpired:
                ffmpeg.kill()
        size = rec_path.stat().st_size
        from server.recordings.export import to_mp4
        export = to_mp4(recording.file_chunks(rec_path),
                        lambda header: recording.unwrap_key(header, key), tmp / f"{name}.mp4")
        return {"name": name, "seconds": wall, "bytes": size, "rfb_bytes": viewer.rfb_bytes,
                "cpu": viewer.cpu, "export": export,
                "ffmpeg_bytes": mp4_ffmpeg.stat().st_size if mp4_ffmpeg.exists() else None}
    finally:
        if ffmpeg is not None and ffmpeg.poll() is None:
            ffmpeg.kill()
        if server is not None:
            stop_process(server)
        disp.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--serve", nargs=2, metavar=("DISPLAY", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    seconds = max(5.0, min(args.seconds, 600.0))
    print(f"recording cost at {SIZE[0]}x{SIZE[1]}, {seconds:.0f} s per workload; ffmpeg: "
          f"{shutil.which('ffmpeg') or 'not installed (no comparison)'}")
    with tempfile.TemporaryDirectory(prefix="hm-rec-bench-") as tmp:
        for name, video in (("office", False), ("video-like", True)):
            r = run_workload(name, seconds, video, Path(tmp))
            per_hour = r["bytes"] / r["seconds"] * 3600 / 1e6
            line = (f"{name:10}  recording {per_hour:8.1f} MB/h  (RFB {r['rfb_bytes'] / 1e6:.2f} MB, "
                    f"file {r['bytes'] / 1e6:.2f} MB in {r['seconds']:.0f} s)")
            if r["ffmpeg_bytes"] is not None:
                line += f"  | ffmpeg x11grab+libx264 {r['ffmpeg_bytes'] / r['seconds'] * 3600 / 1e6:8.1f} MB/h"
            print(line)
            e = r["export"]
            print(f"{'':10}  recorder CPU {100 * r['cpu'] / r['seconds']:.2f} % of a core "
                  f"(target <= 10 %);  MP4 export {e.frames} frames in {e.seconds:.1f} s = "
                  f"{e.speed:.1f}x real time (target >= 4x)"
                  + ("" if name != "office" else f";  office target <= 100 MB/h: "
                     f"{'met' if per_hour <= 100 else 'NOT met'}"))


if __name__ == "__main__":
    main()
