"""The viewer's decode cost per full-screen frame, offline: x11vnc's bytes for the full-screen
changes of ``viewer_latency.py`` recorded once, then fed to ``RFBClient.receive`` (CPU time,
best of 5), for this tree and optionally other trees in the same run.

    python bench/viewer_decode_replay.py                          # this tree
    python bench/viewer_decode_replay.py --compare /tmp/before    # and a tree unpacked there

The recording is what ``viewer_latency.py`` shows the viewers (four text-like 1920x1080
pictures alternating, asked for as our viewer asks: Tight, compression 6, JPEG quality 8);
``--keep FILE`` saves it, ``--stream FILE`` replays a saved one.  Only the decoding is timed:
no socket, no thread, no paint.  Nothing fails on timing.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FRAMES = 24

# run in a fresh interpreter per tree, so each tree's own protocol package is the one timed
TIMER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from protocol.rfb_client import RFBClient, FramebufferUpdated
data = open(sys.argv[2], "rb").read()
def run():
    client, updates = RFBClient(), 0
    t0 = time.process_time()
    for i in range(0, len(data), 65536):
        updates += sum(isinstance(e, FramebufferUpdated) for e in client.receive(data[i:i + 65536]))
    return time.process_time() - t0, updates, sum(client.decoded.values())
cpu, updates, rects = min(run() for _ in range(5))
print(cpu, updates, rects)
"""


def record(path: Path) -> None:
    """x11vnc's answer to a viewer that asks for each change as it is shown (the handshake,
    one full update, then ``FRAMES`` full-screen changes)."""
    from protocol.rfb_client import (DEFAULT_ENCODINGS, FramebufferUpdated, RFBClient,
                                     ServerInit)
    from screen_latency import Painter, free_port, wait_port
    from tests.fixtures_x11 import start_xvfb, stop_process
    display = start_xvfb("1920x1080")
    port = free_port()
    server = subprocess.Popen(["x11vnc", "-display", display.name, "-rfbport", str(port),
                               "-localhost", "-noipv6", "-nopw", "-forever", "-shared", "-quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        painter = Painter(display.name, 1920, 1080)
        pictures = painter.prepare_pictures()
        client = RFBClient(encodings=DEFAULT_ENCODINGS)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        recorded = bytearray()

        def until(done) -> None:
            while True:
                data = sock.recv(1 << 20)
                if not data:
                    raise SystemExit("x11vnc closed the connection")
                recorded.extend(data)
                events = client.receive(data)
                out = client.data_to_send()
                if out:
                    sock.sendall(out)
                if any(done(e) for e in events):
                    return
        until(lambda e: isinstance(e, ServerInit))
        sock.sendall(client.request_update(False))
        until(lambda e: isinstance(e, FramebufferUpdated))
        for i in range(FRAMES):
            want = pictures[i % len(pictures)]
            painter.show_picture(i % len(pictures))
            for _ in range(200):                        # bounded: a frame is a few updates
                sock.sendall(client.request_update(True))
                until(lambda e: isinstance(e, FramebufferUpdated))
                fb = client.framebuffer
                if (fb[5, 5] == want[5, 5]).all() and (fb[-9, -3] == want[-9, -3]).all():
                    break
        sock.close()
        painter.close()
        path.write_bytes(bytes(recorded))
    finally:
        stop_process(server)
        display.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="append", default=[], metavar="TREE",
                    help="another source tree to time on the same bytes (repeatable)")
    ap.add_argument("--stream", help="replay this recorded stream instead of recording one")
    ap.add_argument("--keep", help="save the recorded stream here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(args.stream) if args.stream else Path(args.keep or Path(tmp) / "x11vnc.rfb")
        if not args.stream:
            record(stream)
        size = stream.stat().st_size
        print(f"x11vnc's stream: {size:,} bytes for the handshake, one full update and "
              f"{FRAMES} full-screen changes; load average {os.getloadavg()[0]:.1f}")
        results = {}
        for tree in [str(ROOT)] + args.compare:
            out = subprocess.run([sys.executable, "-c", TIMER, tree, str(stream)],
                                 capture_output=True, text=True, check=True).stdout.split()
            cpu, updates, rects = float(out[0]), int(out[1]), int(out[2])
            results[tree] = cpu
            print(f"{tree}: {cpu * 1000 / FRAMES:.2f} ms CPU per full-screen frame "
                  f"({updates} updates, {rects} rects decoded)")
        for tree in args.compare:
            print(f"this tree / {tree}: {results[str(ROOT)] / results[tree]:.2f}x the CPU")


if __name__ == "__main__":
    main()
