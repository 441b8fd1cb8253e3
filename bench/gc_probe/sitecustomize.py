"""Benchmark probe, not product code: records every garbage-collector pause of a process.

Put this folder on PYTHONPATH and set GC_PROBE_OUT to a path prefix; every Python process started
with ``--role`` on its command line (the relay, ``run --role relay``) then writes
``<prefix>.<pid>.json`` at exit: one [generation, seconds, objects collected, wall time] per
collection, the thresholds and the number of frozen objects.  ``summary.py`` prints them.

    GC_PROBE_OUT=/tmp/gc PYTHONPATH=bench/gc_probe python bench/sessions_180kbps.py --steps 500,750
    python bench/gc_probe/summary.py /tmp/gc.*.json
"""

import atexit
import gc
import json
import os
import sys
import time

_prefix = os.environ.get("GC_PROBE_OUT")
if _prefix and "--role" in sys.argv:
    _started: list[float] = [0.0]
    _pauses: list[tuple[int, float, int, float]] = []

    def _on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            _pauses.append((info["generation"], time.perf_counter() - _started[0],
                            info.get("collected", 0), time.time()))

    def _write() -> None:
        with open(f"{_prefix}.{os.getpid()}.json", "w") as out:
            json.dump({"exit": time.time(), "threshold": gc.get_threshold(),
                       "frozen": gc.get_freeze_count(), "pauses": _pauses}, out)

    gc.callbacks.append(_on_gc)
    atexit.register(_write)
