"""Real X displays for screen tests: Xvfb on a free display number, xterm windows on it.

Xvfb is started with ``-displayfd`` (it picks a free display and writes its number when ready) and
``-noreset``; the pipe's read end stays open until Xvfb has exited (Xvfb writes the number again on
a server reset and dies if nobody reads).  Stale lock files of dead servers are removed first.
Every process is stopped by its PID.  A missing Xvfb is a failure, not a skip: ``make test``
installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `make test` (it installs the X11 test "
                    "packages: xvfb xterm x11vnc vncsnapshot tigervnc-viewer)")
    return path


def remove_stale_locks() -> None:
    """Remove /tmp/.X<n>-lock files (and sockets) whose server process is gone."""
    for lock in Path("/tmp").glob(".X*-lock"):
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            number = lock.name[2:-5]
            lock.unlink(missing_ok=True)
            Path(f"/tmp/.X11-unix/X{number}").unlink(missing_ok=True)
        except (ValueError, OSError):
            continue


@dataclass
class XDisplay:
    number: int
    proc: subprocess.Popen
    read_fd: int
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f":{self.number}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.name}

    def spawn(self, args: list[str], **kwargs) -> subprocess.Popen:
        """Start a client of this display; it is stopped (by PID) with the display."""
        proc = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, **kwargs)
        self.children.append(proc)
        return proc

    def xterm(self, title: str, *, geometry: str = "80x24+0+0", bg: str = "black",
              fg: str = "white", extra: tuple[str, ...] = ()) -> "XTerm":
        """An xterm running a plain shell (or ``extra``'s ``-e`` command), mapped (waits until
        its window is viewable)."""
        proc = self.spawn([require("xterm"), "-T", title, "-n", title, "-geometry", geometry,
                           "-bg", bg, "-fg", fg, "+sb", *extra,
                           *(() if "-e" in extra else ("-e", "/bin/sh"))], cwd="/tmp")
        window = wait_for_window(self.name, title)
        return XTerm(proc, window, title)

    def stop(self) -> None:
        for child in reversed(self.children):
            stop_process(child)
        self.children.clear()
        stop_process(self.proc)
        os.close(self.read_fd)


@dataclass
class XTerm:
    proc: subprocess.Popen
    window: int
    title: str


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mss_grab_buffers() -> int:
    """How many of mss's X shared-memory grab buffers this process has mapped (each screen
    source holds one while it holds its display)."""
    with open("/proc/self/maps") as maps:
        return maps.read().count("mss-shm-buf")


def start_xvfb(size: str = "1024x768", depth: int = 24) -> XDisplay:
    xvfb = require("Xvfb")
    remove_stale_locks()
    r, w = os.pipe()
    proc = subprocess.Popen([xvfb, "-screen", "0", f"{size}x{depth}", "-nolisten", "tcp",
                             "-noreset", "-displayfd", str(w)], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(r, 32)
        if not chunk:
            proc.wait(5)
            os.close(r)
            pytest.fail(f"Xvfb exited before it was ready (status {proc.returncode})")
        data += chunk
    return XDisplay(int(data.strip()), proc, r)


def wait_for_window(display: str, title: str, timeout: float = 10) -> int:
    """The id of the viewable window (top-level or its child) whose WM_NAME is ``title``."""
    from Xlib import X
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for top in d.screen().root.query_tree().children:
                try:
                    if top.get_wm_name() == title and \
                            top.get_attributes().map_state == X.IsViewable:
                        return top.id
                except Exception:
                    continue
            time.sleep(0.05)
        raise TimeoutError(f"no window {title!r} on {display}")
    finally:
        d.close()


@pytest.fixture
def xvfb():
    display = start_xvfb()
    try:
        yield display
    finally:
        display.stop()


@pytest.fixture
def xvfb_factory():
    """Start more displays (e.g. one for a viewer); all stopped at the end."""
    started: list[XDisplay] = []

    def start(size: str = "1024x768") -> XDisplay:
        display = start_xvfb(size)
        started.append(display)
        return display

    try:
        yield start
    finally:
        for display in started:
            display.stop()
