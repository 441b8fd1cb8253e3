"""Benchmark probe, not product code: where a server's Python memory goes (tracemalloc).

Put this folder on PYTHONPATH and set MEM_PROBE_OUT to a path prefix and MEM_PROBE_AT to seconds
after start (comma-separated); a server process (``server.cli ... run``) then traces Python
allocations from its start and writes ``<prefix>.<pid>.<seconds>.txt`` at each of those moments:
traced bytes in total and the 40 largest by file and by line.  Tracing slows the server and
adds its own memory: use it for the split, not for the per-host figure.

    MEM_PROBE_OUT=/tmp/mem MEM_PROBE_AT=10,90 PYTHONPATH=bench/mem_probe:. \
        python bench/idle_hosts.py --skip-restart --hold 60
"""

import os
import sys

_prefix = os.environ.get("MEM_PROBE_OUT")
if _prefix and "run" in sys.argv and "--worker" not in sys.argv:
    import threading
    import time
    import tracemalloc

    tracemalloc.start(1)
    _t0 = time.monotonic()

    def _write(at: float) -> None:
        time.sleep(max(0.0, at - (time.monotonic() - _t0)))
        snap = tracemalloc.take_snapshot()
        with open(f"{_prefix}.{os.getpid()}.{at:g}.txt", "w") as out:
            out.write(f"traced {tracemalloc.get_traced_memory()[0]} bytes\n")
            for key in ("filename", "lineno"):
                out.write(f"--- by {key}\n")
                for stat in snap.statistics(key)[:40]:
                    frame = stat.traceback[0]
                    where = frame.filename if key == "filename" else f"{frame.filename}:{frame.lineno}"
                    out.write(f"{stat.size:12d} {stat.count:9d} {where}\n")

    for _at in os.environ.get("MEM_PROBE_AT", "").split(","):
        if _at.strip():
            threading.Thread(target=_write, args=(float(_at),), daemon=True).start()
