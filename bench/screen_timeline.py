"""Where a full-screen frame's wall time goes: ``screen_latency.py``'s ``h264`` row with our
server's timeline logged, frame by frame.

    python bench/screen_timeline.py                   # ~40 s
    python bench/screen_timeline.py --fps-seconds 8 --log /tmp/timeline.txt

Runs ``screen_latency.py --rows h264`` (short latency and workload phases) with the server
process wrapped so that it writes one line per event: the client's request arriving, X DAMAGE
reported, a capture started and its cost, an update decided and its encoding's cost, an update
written.  Then prints, for the H.264 frames of the full-screen phase: the median and 90th
percentile of the frame cycle (write to next write), the capture and encode wall times, and
how often the client's next request came more than 30 ms after an update was written (a
delayed ACK holding the update's last segment shows as 40 ms there).  The log stays at
``--log`` for a closer look.  Nothing fails on a number.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIG_UPDATE = 100_000        # bytes: a full-screen H.264 frame of the text-like pictures


def log_timeline(path: str) -> None:
    """In the server process: wrap ``RFBServerProtocol`` and ``ScreenSource`` to log events."""
    from modules.common.screen import rfb_server, rfb_twisted
    from modules.common.screen.capture_x11 import ScreenSource
    out = open(path, "a", buffering=1)
    lock = threading.Lock()

    def log(event: str, value: float = 0.0) -> None:
        with lock:
            out.write(f"{time.perf_counter():.6f} {event} {value:.1f}\n")

    def wrap(cls, name, before=None, cost=None):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            if before:
                log(before, len(args[0]) if args and isinstance(args[0], bytes) else 0)
            t0 = time.perf_counter()
            result = original(self, *args, **kwargs)
            if cost:
                log(cost, (time.perf_counter() - t0) * 1e3)
            return result
        setattr(cls, name, wrapper)

    protocol = rfb_twisted.RFBServerProtocol
    wrap(protocol, "dataReceived", before="request")
    wrap(protocol, "_change_reported", before="damage")
    wrap(protocol, "_capture", before="capture")
    wrap(protocol, "_write", before="write")
    wrap(ScreenSource, "capture", cost="capture_ms")
    wrap(rfb_server.PreparedUpdate, "encode", cost="encode_ms")


def summary(path: str) -> None:
    events = []
    with open(path) as f:
        for line in f:
            t, event, value = line.split()
            events.append((float(t), event, float(value)))
    cycles, gaps, captures, encodes = [], [], [], []
    last_write = None
    waiting_since = None
    for i, (t, event, value) in enumerate(events):
        if event == "write" and value > BIG_UPDATE:
            if last_write is not None and t - last_write < 0.5:
                cycles.append((t - last_write) * 1e3)
            last_write = waiting_since = t
            previous = [e for e in events[max(0, i - 8):i]]
            captures += [v for _t, e, v in previous if e == "capture_ms"][-1:]
            encodes += [v for _t, e, v in previous if e == "encode_ms"][-1:]
        elif event == "request" and waiting_since is not None:
            gaps.append((t - waiting_since) * 1e3)
            waiting_since = None

    def pct(values, p):
        values = sorted(values)
        return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")
    late = sum(g > 30 for g in gaps)
    print(f"\nfull-screen H.264 frames: {len(gaps)}; frame cycle median {pct(cycles, 0.5):.1f} ms, "
          f"p90 {pct(cycles, 0.9):.1f} ms")
    print(f"capture wall median {pct(captures, 0.5):.1f} ms, encode wall median "
          f"{pct(encodes, 0.5):.1f} ms, write -> next request median {pct(gaps, 0.5):.1f} ms")
    print(f"next request more than 30 ms after the write: {late} of {len(gaps)} frames "
          f"({late / max(len(gaps), 1):.0%})")


def main() -> None:
    if os.environ.get("SCREEN_TIMELINE_LOG") and "--serve" in sys.argv:
        log_timeline(os.environ["SCREEN_TIMELINE_LOG"])
        import bench.screen_latency as latency
        sys.argv = [latency.__file__] + sys.argv[1:]
        latency.main()
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fps-seconds", type=float, default=6)
    ap.add_argument("--log", default=None, help="where the timeline goes (default: a temp file)")
    args = ap.parse_args()
    path = args.log or tempfile.mkstemp(prefix="screen-timeline-", suffix=".txt")[1]
    open(path, "w").close()
    import bench.screen_latency as latency
    latency.__file__ = os.path.abspath(__file__)       # its server process: this script
    os.environ["SCREEN_TIMELINE_LOG"] = path
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; timeline in {path}")
    sys.argv = [latency.__file__, "--rows", "h264", "--samples", "3", "--fps-seconds",
                str(args.fps_seconds), "--workload", "1"]
    latency.main()
    summary(path)


if __name__ == "__main__":
    main()
