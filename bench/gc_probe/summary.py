"""Print the garbage-collector pauses that ``sitecustomize.py`` recorded (see there), start-up
included; each pause over 5 ms is listed with when it happened (start-up, serving, shutdown)."""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        pauses = data["pauses"]
        first = pauses[0][3] if pauses else 0.0
        print(f"{path}: thresholds {tuple(data['threshold'])}, {data['frozen']:,} frozen objects, "
              f"{len(pauses)} collections")
        for gen in (0, 1, 2):
            ms = sorted(p[1] * 1000 for p in pauses if p[0] == gen)
            if ms:
                print(f"  generation {gen}: {len(ms):4d} collections, total {sum(ms):7.1f} ms, "
                      f"median {ms[len(ms) // 2]:6.2f} ms, max {ms[-1]:6.1f} ms")
        long = [p for p in pauses if p[1] > 0.005]
        for gen, seconds, collected, at in long:
            print(f"  > 5 ms: generation {gen}, {seconds * 1000:.1f} ms, {collected} collected, "
                  f"{at - first:.1f} s after the first collection, {data['exit'] - at:.1f} s "
                  "before exit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
