"""Remote screen end to end on Xvfb: a host shows an xterm, a supporter connects through the
server and the (tapped) relay, sees the screen, types a command that runs, and a standard VNC
client attached to the supporter's --vnc-listen port gets a correct picture.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import mss
import numpy as np
import pytest
from PIL import Image

from .fixtures_x11 import require, xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .fixtures_server import free_port
from .test_e2e_brokering import wait_until
from .test_e2e_sessions import MARKER, protocol_events, world  # noqa: F401 - fixture

pytestmark = pytest.mark.e2e

TO_HOST = "vom Supporter: Grüße, Äpfel, Öl, Übung, ß — 你好世界"
TO_SUPPORTER = "vom Host: Größe über Maß — 日本語のテキスト, 한국어"


def screen_of(display: str) -> np.ndarray:
    with mss.MSS(display=display) as sct:
        return np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1].astype(np.int16)


def mean_difference(picture: np.ndarray, display: str) -> float:
    return float(np.abs(picture.astype(np.int16) - screen_of(display)).mean())


def focus(display: str, window: int) -> None:
    """What a user's click would do: give the xterm the keyboard."""
    from Xlib import X
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    d.create_resource_object("window", window).set_input_focus(X.RevertToParent, X.CurrentTime)
    d.sync()
    d.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_supporter_sees_and_controls_the_host_screen(world, xvfb, tmp_path):  # noqa: F811
    w = world
    term = xvfb.xterm("host-term", geometry="80x24+0+0", bg="darkblue")
    focus(xvfb.name, term.window)
    marker = tmp_path / "typed-by-supporter"
    right = tmp_path / "right"
    right.write_text("right-host-password\n")
    snapshot = tmp_path / "supporter-view.png"
    clipboard_out = tmp_path / "remote-clipboard.txt"
    vnc_port = free_port()
    host = ModuleProcess("host", "run", "--screen", xvfb.name, "--pipe", "--home", str(w["pc1"]))
    supporter = None
    try:
        host.wait_for_line("online; waiting for supporters")
        supporter = ModuleProcess(
            "supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
            "--password-file", str(right), "--snapshot", str(snapshot),
            "--vnc-listen", f"127.0.0.1:{vnc_port}",
            "--type", f"touch {marker}\\n", "--clipboard", TO_HOST,
            "--clipboard-file", str(clipboard_out), "--home", str(w["alice"]))
        supporter.wait_for_line("snapshot saved", timeout=60)
        # What the supporter sees is the host's screen (lossless encodings here: exact-ish).
        seen = np.asarray(Image.open(snapshot).convert("RGB"))
        assert seen.shape[:2] == (768, 1024)
        assert mean_difference(seen, xvfb.name) < 3.0
        # Keys typed by the supporter ran a command in the host's xterm.
        wait_until(marker.exists, timeout=30, what="the typed command's file")
        # A standard VNC client on the supporter's side gets the same picture.
        supporter.wait_for_line("VNC viewers can attach")
        out = tmp_path / "vncsnapshot.jpg"
        subprocess.run(["timeout", "30", require("vncsnapshot"), "-quality", "95",
                        f"127.0.0.1::{vnc_port}", str(out)], check=True, capture_output=True)
        time.sleep(0.5)  # the xterm may still be echoing; compare with a fresh grab
        picture = np.asarray(Image.open(out).convert("RGB"))
        assert mean_difference(picture, xvfb.name) < 8.0  # JPEG tolerance
        # Clipboard text both ways (the rights of the screen: control in, view out), in UTF-8
        # through the RFB Extended Clipboard (issue 16 §4): umlauts and CJK arrive unchanged.
        xclip = [require("xclip"), "-selection", "clipboard"]
        wait_until(lambda: subprocess.run(xclip + ["-o"], env=xvfb.env,
                                          capture_output=True).stdout.decode() == TO_HOST,
                   timeout=20, what="the supporter's clipboard on the host")
        subprocess.run(xclip + ["-i"], env=xvfb.env, input=TO_SUPPORTER.encode(),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: clipboard_out.exists() and
                   clipboard_out.read_text(encoding="utf-8") == TO_SUPPORTER,
                   timeout=20, what="the host's clipboard at the supporter")
        # Pause (issue 16 §2): Ctrl+Z at the host stops the screen; the supporter keeps the last
        # picture, and nothing at all crosses the relay while the host's screen changes.
        relayed = w["capture"]
        host.proc.send_signal(signal.SIGTSTP)
        supporter.wait_for_line("The host paused the screen; the last picture stays")
        host.wait_for_line("You paused the screen")
        before = relayed.stat().st_size
        xvfb.xterm("while-paused", geometry="30x8+600+450", bg="red")
        time.sleep(1.5)   # a 30-fps screen would have sent ~45 updates by now
        assert relayed.stat().st_size == before, "bytes crossed the relay during the pause"
        held = tmp_path / "held.jpg"
        subprocess.run(["timeout", "30", require("vncsnapshot"), "-quality", "95",
                        f"127.0.0.1::{vnc_port}", str(held)], check=True, capture_output=True)
        red = np.array([255, 0, 0])
        assert np.abs(screen_of(xvfb.name)[500, 700] - red).sum() < 30        # on the host ...
        assert np.abs(np.asarray(Image.open(held).convert("RGB"))[500, 700].astype(int)
                      - red).sum() > 200                                       # ... not shown
        assert relayed.stat().st_size == before
        host.proc.send_signal(signal.SIGTSTP)
        supporter.wait_for_line("The host resumed the screen")
        wait_until(lambda: relayed.stat().st_size > before + 1000, timeout=20,
                   what="screen updates after the resume")
        supporter.close_stdin()
        assert supporter.wait(timeout=30) == 0
        assert host.wait(timeout=30) == 0
    finally:
        host.stop()
        if supporter:
            supporter.stop()
    assert MARKER not in w["capture"].read_bytes()
    kinds = [(e["kind"], e["detail"].get("by")) for e in protocol_events(w["srv"])]
    assert kinds.count(("screen_paused", "host")) == 1      # both report it: one line
    assert kinds.count(("screen_resumed", "host")) == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_supporter_refuses_a_screen_beyond_its_limit_before_allocating(world, xvfb,  # noqa: F811
                                                                      tmp_path):
    """Issue 10, finding 9: the framebuffer limit is the supporter's to configure; a remote
    screen beyond it is refused with the size and the limit, and nothing is drawn."""
    w = world
    right = tmp_path / "right"
    right.write_text("right-host-password\n")
    snapshot = tmp_path / "never.png"
    host = ModuleProcess("host", "run", "--screen", xvfb.name, "--pipe", "--home", str(w["pc1"]))
    supporter = None
    try:
        host.wait_for_line("online; waiting for supporters")
        supporter = ModuleProcess(
            "supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
            "--password-file", str(right), "--snapshot", str(snapshot),
            "--max-screen", "800x600", "--home", str(w["alice"]))
        supporter.wait_for_line(re.escape(
            "the remote screen could not be shown: server desktop size 1024x768 (786,432 pixels) "
            "is larger than this supporter accepts: at most 800x600 (480,000 pixels, either "
            "orientation); a larger screen needs --max-screen WxH"), timeout=60)
        supporter.close_stdin()
        supporter.wait(timeout=30)
        assert not snapshot.exists()
    finally:
        host.stop()
        if supporter:
            supporter.stop()
