"""A module CLI running as its own process, with its session stream on stdin/stdout (``--pipe``).

Reader threads collect stdout bytes and stderr lines so a test can wait for an event ("ad-hoc
ID: ...", "online") or for bytes, each with a deadline — never a blind sleep.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time

from .fixtures_server import CLIS


class ModuleProcess:
    def __init__(self, kind: str, *args: str, env: dict | None = None,
                 module: str | None = None) -> None:
        """``kind`` names one of the CLIs; ``module`` runs another ``python -m`` module instead."""
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", module or CLIS[kind], *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        self._out = bytearray()
        self._err: list[str] = []
        self._err_done = False
        self._cond = threading.Condition()
        threading.Thread(target=self._pump_out, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump_out(self) -> None:
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            with self._cond:
                self._out += chunk
                self._cond.notify_all()

    def _pump_err(self) -> None:
        for raw in self.proc.stderr:
            with self._cond:
                self._err.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._err_done = True
            self._cond.notify_all()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self._err)

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._err:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or self._err_done:
                    raise AssertionError(f"no stderr line matching {pattern!r} "
                                         f"(exit {self.proc.poll()}):\n" + "\n".join(self._err))
                self._cond.wait(min(left, 0.2))

    def wait_for_output(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first stdout text (from what was not read yet) matching ``pattern``; stdout up
        to the end of that match is consumed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._out.decode(errors="replace"))
                if match:
                    del self._out[:len(match.string[:match.end()].encode())]
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no stdout matching {pattern!r} (exit "
                                         f"{self.proc.poll()}): {bytes(self._out)[-2000:]!r}"
                                         "\nstderr:\n" + "\n".join(self._err))
                self._cond.wait(min(left, 0.2))

    def read_exactly(self, expected: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._out) < len(expected):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"got {bytes(self._out)[:200]!r}, wanted {expected[:200]!r}"
                                         f"\nstderr:\n" + "\n".join(self._err))
                self._cond.wait(min(left, 0.2))
            got = bytes(self._out[:len(expected)])
            del self._out[:len(expected)]
        assert got == expected

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        self.proc.stdin.close()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
