"""A real Wayland desktop for screen tests: headless sway with a foot terminal, served by wayvnc.

sway refuses to start as root ("Unable to drop root"), so it runs under ``unshare --user`` (its
uid is 65534 inside, files are still written as root).  The socket is ``wayland-1`` (sway 1.7
skips wayland-0).  foot is started by sway's ``exec`` and exits with it; wayvnc listens on
127.0.0.1 only, without authentication.  Every process is stopped by its PID.  A missing binary
is a failure, not a skip: ``make test`` installs sway, wayvnc and foot.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .fixtures_server import free_port
from .fixtures_x11 import require, stop_process


@dataclass
class Wayland:
    folder: Path
    sway: subprocess.Popen
    wayvnc: subprocess.Popen
    vnc_port: int

    @property
    def vnc_url(self) -> str:
        return f"vnc://127.0.0.1:{self.vnc_port}"

    def stop(self) -> None:
        stop_process(self.wayvnc)
        stop_process(self.sway)


def wait_for(check, what: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_wayland(folder: Path, size: str = "1280x720") -> Wayland:
    sway_bin, wayvnc_bin = require("sway"), require("wayvnc")
    require("foot")
    require("swaymsg")
    runtime = folder / "rt"
    runtime.mkdir(mode=0o700)
    config = folder / "sway.conf"
    # foot runs a plain sh so the prompt is the same on every machine
    config.write_text("xwayland disable\n"
                      f"output HEADLESS-1 resolution {size} position 0,0\n"
                      "default_border none\n"
                      "exec foot -- /bin/sh\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(folder), "SHELL": "/bin/sh", "LANG": "C.UTF-8",
           "WLR_BACKENDS": "headless", "WLR_LIBINPUT_NO_DEVICES": "1", "WLR_RENDERER": "pixman",
           "XDG_RUNTIME_DIR": str(runtime), "PS1": "$ "}
    log = open(folder / "sway.log", "wb")
    sway = subprocess.Popen(["unshare", "--user", sway_bin, "-c", str(config)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    log.close()
    wayvnc = None
    try:
        wait_for(lambda: (runtime / "wayland-1").exists() or sway.poll() is not None,
                 "sway's wayland-1 socket")
        if sway.poll() is not None:
            pytest.fail("sway exited at start: " + (folder / "sway.log").read_text()[-2000:])
        port = free_port()
        vlog = open(folder / "wayvnc.log", "wb")
        wayvnc = subprocess.Popen([wayvnc_bin, "127.0.0.1", str(port)],
                                  env={**env, "WAYLAND_DISPLAY": "wayland-1"},
                                  stdout=vlog, stderr=subprocess.STDOUT, cwd=folder)
        vlog.close()
        wait_for(lambda: listening(port) or wayvnc.poll() is not None, "wayvnc listening")
        if wayvnc.poll() is not None:
            pytest.fail("wayvnc exited at start: " + (folder / "wayvnc.log").read_text()[-2000:])
        socket = next(runtime.glob("sway-ipc.*.sock"))

        def foot_mapped() -> bool:
            tree = subprocess.run(["swaymsg", "-s", str(socket), "-t", "get_tree"],
                                  capture_output=True, text=True, timeout=10).stdout
            return '"app_id": "foot"' in tree
        wait_for(foot_mapped, "foot's window")
        return Wayland(folder, sway, wayvnc, port)
    except BaseException:
        if wayvnc is not None:
            stop_process(wayvnc)
        stop_process(sway)
        raise


def vncdo(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The vncdotool CLI (its own process: its Python API runs a reactor in a thread)."""
    import sys
    exe = Path(sys.executable).with_name("vncdo")
    if not exe.exists():
        pytest.fail("vncdotool is not installed: run `make test` (pip install -e '.[test]')")
    return subprocess.run([str(exe), *args], capture_output=True, timeout=timeout, check=True)


@pytest.fixture(scope="module")
def wayland(tmp_path_factory):
    """One headless sway + foot + wayvnc for all checks of a test module."""
    desktop = start_wayland(tmp_path_factory.mktemp("wayland"))
    try:
        yield desktop
    finally:
        desktop.stop()
