"""The screen from a local VNC server, end to end: a host whose screen is wayvnc on a headless sway
(Wayland) or x11vnc on Xvfb, a supporter connecting through the server and the (tapped) relay.

What is checked with the real parts: the supporter sees what the local server shows (compared
with the server's own frame read by vncdotool, or the X display), keys it types run a command in
the host's terminal, keys sent while *control* is not granted never reach the local server, the
local server is connected only while the screen is shown (emergency stop disconnects), a
non-loopback address is refused in one line, and a wrong password ends the session cleanly with
one clear line on both sides.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from .fixtures_server import free_port, run_cli
from .fixtures_wayland import vncdo, wayland  # noqa: F401 - fixture
from .fixtures_x11 import require, stop_process, xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_brokering import wait_until
from .test_e2e_screen import focus, mean_difference
from .test_e2e_sessions import MARKER, protocol_events, world  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e


def established_to(port: int) -> int:
    """Open TCP connections to 127.0.0.1:``port`` made by clients (the VNC server's peers)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def supporter_for(w, tmp_path, *extra: str) -> ModuleProcess:
    right = tmp_path / "right"
    right.write_text("right-host-password\n")
    return ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                         "--password-file", str(right), *extra, "--home", str(w["alice"]))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_screens_from_wayvnc_and_x11vnc(world, wayland, xvfb, tmp_path):  # noqa: F811
    """One server (its start is most of the cost) for both local servers."""
    wayvnc_bridge(world, wayland, tmp_path / "wayland")
    x11vnc_bridge(world, xvfb, tmp_path / "x11")
    assert MARKER not in world["capture"].read_bytes()   # the relay saw ciphertext only


def wayvnc_bridge(w, wayland, tmp_path):  # noqa: F811
    """wayvnc on headless sway, configured as the host's screen; view and control asked of the
    logged-in user (answers through a FIFO, one at a time)."""
    tmp_path.mkdir()
    pc1 = str(w["pc1"])
    # a screen off this machine is refused in one line, before anything is stored
    refused = run_cli("host", "screen", "--screen", "vnc://192.0.2.7:5900", "--home", pc1)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "the VNC server must run on this machine" in refused.stderr
    # the host is configured to share wayvnc's screen; control is the logged-in user's to grant
    configured = run_cli("host", "screen", "--screen", wayland.vnc_url, "--home", pc1)
    assert configured.returncode == 0 and wayland.vnc_url in configured.stdout
    assert run_cli("host", "policy", "--view", "ask", "--control", "ask",
                   "--home", pc1).returncode == 0
    answers = tmp_path / "host-answers"
    os.mkfifo(answers)
    answer_fd = os.open(answers, os.O_RDWR)   # held open: the host's reads wait for our line
    typed, not_typed = tmp_path / "typed-by-supporter", tmp_path / "typed-without-control"
    snapshot = tmp_path / "supporter-view.png"
    vnc_port = free_port()
    host = ModuleProcess("host", "run", "--pipe", "--answers", str(answers), "--home", pc1)
    supporter = None
    try:
        host.wait_for_line("online; waiting for supporters")
        assert established_to(wayland.vnc_port) == 0   # nothing is taken before a session
        supporter = supporter_for(w, tmp_path, "--snapshot", str(snapshot),
                                  "--vnc-listen", f"127.0.0.1:{vnc_port}",
                                  "--type", f"touch {typed}\\n")
        # view is asked of the logged-in user: until the answer, wayvnc is not even connected
        host.wait_for_line("verification code", timeout=60)
        wait_until(lambda: any(e["kind"] == "right_requested" and
                               e["detail"].get("right") == "control"
                               for e in protocol_events(w["srv"])),
                   timeout=30, what="the supporter's requests in the protocol")
        assert established_to(wayland.vnc_port) == 0 and not snapshot.exists()
        os.write(answer_fd, b"y\n")   # view
        supporter.wait_for_line("snapshot saved", timeout=60)
        host.wait_for_line(re.escape(f"connecting to the local screen {wayland.vnc_url}"))
        # what the supporter sees is wayvnc's own frame (raw on loopback, lossless both legs)
        theirs = tmp_path / "wayvnc-frame.png"
        vncdo("-s", f"127.0.0.1::{wayland.vnc_port}", "capture", str(theirs))
        seen = np.asarray(Image.open(snapshot).convert("RGB")).astype(np.int16)
        frame = np.asarray(Image.open(theirs).convert("RGB")).astype(np.int16)
        assert seen.shape == frame.shape == (720, 1280, 3)
        assert float(np.abs(seen - frame).mean()) < 1.0
        assert established_to(wayland.vnc_port) == 1
        # control is not granted yet: keys from a viewer attached at the supporter's side go
        # to the host, whose module refuses them; nothing reaches wayvnc
        supporter.wait_for_line("VNC viewers can attach")
        vncdo("-s", f"127.0.0.1::{vnc_port}", "type", f"touch {not_typed}", "key", "enter")
        host.wait_for_line("refused input from the supporter: it does not hold the control "
                           "right", timeout=30)
        # the logged-in user grants control: the supporter's --type runs in foot
        os.write(answer_fd, b"y\n")   # control
        supporter.wait_for_line("granted control", timeout=30)
        wait_until(typed.exists, timeout=30, what="the typed command's file")
        assert not not_typed.exists()   # keys are applied in order: these never arrived
        # emergency stop at the host: the local server is disconnected at once
        host.proc.send_signal(signal.SIGINT)
        wait_until(lambda: established_to(wayland.vnc_port) == 0, timeout=10,
                   what="the host's connection to wayvnc to close")
        host.wait_for_line("session ended: emergency stop by the host", timeout=30)
        supporter.wait_for_line("session ended: emergency stop by the host", timeout=30)
        assert host.wait(timeout=30) == 1 and supporter.wait(timeout=30) == 1
    finally:
        os.close(answer_fd)
        host.stop()
        if supporter:
            supporter.stop()
    assert wayland.sway.poll() is None and wayland.wayvnc.poll() is None  # both still serve


def start_x11vnc(display: str, password: str, log) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([require("x11vnc"), "-display", display, "-rfbport", str(port),
                             "-localhost", "-noipv6", "-passwd", password, "-forever", "-shared",
                             "-noxdamage", "-quiet"], stdout=log, stderr=subprocess.STDOUT)
    from .fixtures_wayland import listening, wait_for
    wait_for(lambda: listening(port) or proc.poll() is not None, "x11vnc listening")
    assert proc.poll() is None, "x11vnc exited at start"
    return proc, port


def x11vnc_bridge(w, xvfb, tmp_path):  # noqa: F811
    """The same bridge against x11vnc on Xvfb, with VNC authentication: wrong, then right."""
    tmp_path.mkdir()
    assert run_cli("host", "policy", "--view", "allow", "--control", "allow",
                   "--home", str(w["pc1"])).returncode == 0
    term = xvfb.xterm("host-term", geometry="80x24+0+0", bg="darkblue")
    focus(xvfb.name, term.window)
    with open(tmp_path / "x11vnc.log", "wb") as log:
        x11vnc, port = start_x11vnc(xvfb.name, "s3cret!x", log)
    wrong, right = tmp_path / "wrong-vnc-password", tmp_path / "vnc-password"
    wrong.write_text("guessed\n")
    right.write_text("s3cret!x\n")
    url = f"vnc://127.0.0.1:{port}"
    procs: list[ModuleProcess] = []

    def session(password_file, *supporter_args):
        host = ModuleProcess("host", "run", "--screen", url, "--screen-password-file",
                             str(password_file), "--pipe", "--home", str(w["pc1"]))
        procs.append(host)
        host.wait_for_line("online; waiting for supporters")
        supporter = supporter_for(w, tmp_path, *supporter_args)
        procs.append(supporter)
        return host, supporter
    try:
        # a wrong password: one clear line on both sides, the session ends in order
        host, supporter = session(wrong)
        line = (f"session ended: error in the host's session: the local VNC server {url} "
                "refused the password")
        host.wait_for_line(re.escape(line), timeout=60)
        supporter.wait_for_line(re.escape(line), timeout=30)
        assert host.wait(timeout=30) == 1 and supporter.wait(timeout=30) == 1
        assert "Traceback" not in host.stderr + supporter.stderr
        # the right one: the supporter sees the xterm and types into it
        marker, snapshot = tmp_path / "typed-through-x11vnc", tmp_path / "seen.png"
        host, supporter = session(right, "--snapshot", str(snapshot),
                                  "--type", f"touch {marker}\\n")
        supporter.wait_for_line("snapshot saved", timeout=60)
        seen = np.asarray(Image.open(snapshot).convert("RGB"))
        assert seen.shape[:2] == (768, 1024)
        assert mean_difference(seen, xvfb.name) < 3.0
        wait_until(marker.exists, timeout=30, what="the typed command's file")
        supporter.close_stdin()
        assert supporter.wait(timeout=30) == 0 and host.wait(timeout=30) == 0
        wait_until(lambda: established_to(port) == 0, timeout=10, what="x11vnc disconnected")
    finally:
        for proc in procs:
            proc.stop()
        stop_process(x11vnc)
