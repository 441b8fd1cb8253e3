"""The screen follows a direction change (issue 16 §3), with screens on two Xvfb displays.

A supporter CLI (``adhoc --screen B --snapshot``) and a customer run through the session core
(``join``, with the customer app's window as its delegate) share one server: the supporter sees
the customer's display A; the customer asks the supporter to show instead, the supporter
agrees, and the customer's app shows display B in a window of its own; the customer takes the screen back and the supporter
sees A again.  Both changes are in the protocol.  Then the customer narrows what it shows to one
window with the app's picker (issue 16 §5): a VNC viewer on the supporter's side gets only that
window, then the whole screen again; both choices are in the protocol."""

from __future__ import annotations

import re
from argparse import Namespace

import mss
import numpy as np
import pytest
import pytest_twisted
from PIL import Image
from twisted.internet import defer
from zope.interface import implementer

from modules.common.session.consent import IConsentUI
from protocol.runtime import run_blocking

from .fixtures_qt import qt_app, screenshot, until  # noqa: F401 - fixture
from .fixtures_x11 import mss_grab_buffers, xvfb_factory  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .rfb_decoder import RAW, BlockingRFBClient
from .test_e2e_brokering import wait_until
from .test_e2e_sessions import protocol_events

pytestmark = pytest.mark.e2e


def grab(display: str) -> np.ndarray:
    with mss.MSS(display=display) as sct:
        return np.asarray(sct.grab(sct.monitors[0]))[..., 2::-1].astype(np.int16)


def difference(picture: np.ndarray, display: str) -> float:
    return float(np.abs(picture.astype(np.int16) - grab(display)).mean())


def vnc_picture(port: int) -> np.ndarray:
    """What a VNC viewer attached to the supporter's ``--vnc-listen`` port sees (blocking)."""
    client = BlockingRFBClient("127.0.0.1", port, [RAW], timeout=20)
    try:
        client.request(incremental=False)
        client.next_update()
        return client.decoder.fb.astype(np.int16)
    finally:
        client.close()


async def open_picker(qt_app, window, language: str):  # noqa: F811 - the fixture's app
    """The customer presses the bar's share button; the picker lists the windows."""
    from modules.common.qt.i18n import install_translation
    install_translation(qt_app, language)
    window.bar.share_button.click()
    picker = window.picker
    await until(lambda: picker.choices.count() > 1, what="the listed windows")
    return picker


async def vnc_sees(port: int, shape: tuple[int, int], timeout: float = 30) -> np.ndarray:
    """The VNC viewer's picture once its size is ``shape`` (it follows a size change)."""
    from twisted.internet import reactor, task
    deadline = reactor.seconds() + timeout
    while True:                    # one look is one short loopback connection
        seen = await run_blocking(vnc_picture, port)
        if abs(seen.shape[0] - shape[0]) <= 4 and abs(seen.shape[1] - shape[1]) <= 4:
            return seen
        if reactor.seconds() > deadline:
            raise AssertionError(f"the VNC viewer still sees {seen.shape[:2]}, not {shape}")
        await task.deferLater(reactor, 0.05, lambda: None)


@implementer(IConsentUI)
class YesUI:
    """The customer at the keyboard says yes to the terms and to every question."""

    def show_terms(self, text):
        return defer.succeed(True)

    def ask(self, question, right):
        return defer.succeed(True)

    def notify(self, event):
        pass


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_the_screen_follows_a_direction_change_and_back(
        qt_app, running_server, enrolled_supporter, xvfb_factory, tmp_path):  # noqa: F811
    from twisted.internet import reactor

    from modules.customer.gui import CustomerWindow
    from modules.common.terminal.stream_cli import screen_offer
    from modules.customer.join import join
    srv = running_server
    customer_display, supporter_display = xvfb_factory("800x600"), xvfb_factory("640x480")
    customer_display.xterm("customer-term", geometry="60x20+20+20", bg="darkgreen")
    supporter_display.xterm("supporter-term", geometry="40x10+200+150", bg="darkred")
    snapshot = tmp_path / "supporter-sees.png"
    grab_buffers_before = mss_grab_buffers()    # an earlier test in this process may hold some
    answers = tmp_path / "supporter-answers"
    answers.write_text("y\n")           # the supporter agrees to show its screen
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", str(answers),
                              "--screen", supporter_display.name, "--snapshot", str(snapshot),
                              "--vnc-listen", "127.0.0.1:0",
                              "--home", str(enrolled_supporter))
    window = CustomerWindow(reactor, srv.url, srv.fingerprint, share_display=customer_display.name)
    conn = runner = None
    try:
        nameplate, secret = supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups()
        conn, runner = await join(
            reactor, srv.url, srv.fingerprint, f"{nameplate} {secret}",
            lambda ticket, consent: YesUI(), delegate=window, pipe=False,
            screen=screen_offer(Namespace(screen=customer_display.name)))
        window.runner, window.supporter = runner, "alice"
        session = defer.ensureDeferred(runner.run())

        def snapshots() -> int:
            return supporter.stderr.count("snapshot saved")

        # 1. the supporter sees the customer's display
        await until(lambda: snapshots() == 1, timeout=60, what="the supporter's first snapshot")
        assert difference(np.asarray(Image.open(snapshot).convert("RGB")),
                          customer_display.name) < 3
        # 2. the customer asks the supporter to show; it agrees: the customer sees display B
        assert runner.show_my_screen()
        await until(lambda: window.remote_window is not None, timeout=60,
                    what="the supporter's screen in the customer's app")
        assert runner.consent.presenter.value == "supporter"
        seen = window.remote_window.viewer.rgb()
        assert seen.shape[:2] == (480, 640)
        assert difference(seen, supporter_display.name) < 3
        assert window.remote_window.windowTitle() == "Screen of alice"
        await until(lambda: window.remote_window.viewer.frames_painted, what="the painted screen")
        screenshot(window.remote_window, "customer-remote-screen-en")
        # 3. the customer takes the screen back: the supporter sees display A again
        assert runner.show_my_screen()
        await until(lambda: snapshots() == 2, timeout=60, what="the supporter's second snapshot")
        assert window.remote_window is None and runner.consent.is_presenter
        picture = np.asarray(Image.open(snapshot).convert("RGB"))
        assert picture.shape[:2] == (600, 800)
        assert difference(picture, customer_display.name) < 3
        # 4. the customer picks one window in the app (German, then English): the supporter's
        #    VNC viewer gets only that window; then the whole screen again
        def vnc_ports() -> list[str]:
            return re.findall(r"VNC viewers can attach at 127\.0\.0\.1:(\d+)", supporter.stderr)
        await until(lambda: len(vnc_ports()) == 2, what="the supporter's second VNC port")
        port = int(vnc_ports()[-1])
        picker = await open_picker(qt_app, window, "de")
        assert picker.choices.item(0).text() == "Ganzer Bildschirm"
        assert picker.select_title("customer-term")
        screenshot(picker, "customer-window-picker-de")
        picker.close()
        picker = await open_picker(qt_app, window, "en")
        assert picker.select_title("customer-term")
        screenshot(picker, "customer-window-picker-en")
        picker.share_button.click()
        await until(lambda: "You share only the window customer-term." in window.log.toPlainText(),
                    what="the app's line about the shared window")
        term = next(w for w in await runner.windows() if w.title == "customer-term")
        region = grab(customer_display.name)[term.rect.y:term.rect.y + term.rect.h,
                                              term.rect.x:term.rect.x + term.rect.w]
        seen = await vnc_sees(port, (term.rect.h, term.rect.w))
        h, w = min(seen.shape[0], region.shape[0]), min(seen.shape[1], region.shape[1])
        assert float(np.abs(seen[:h, :w] - region[:h, :w]).mean()) < 8
        picker = await open_picker(qt_app, window, "en")
        picker.choices.setCurrentRow(0)                         # the whole screen again
        picker.share_button.click()
        await until(lambda: "You share the whole screen again." in window.log.toPlainText(),
                    what="the app's line about the whole screen")
        assert difference(await vnc_sees(port, (600, 800)), customer_display.name) < 8
        with pytest.raises(LookupError):
            await runner.share_window("no-such-window")
        runner.end_session()
        await until(lambda: session.called, timeout=60, what="the customer's end of the session")
        # the customer's display is no longer held: no X connection, no grab buffer mapped
        assert not runner.screen_offer[0].holds_display
        assert mss_grab_buffers() <= grab_buffers_before
        await until(lambda: supporter.proc.poll() is not None, what="the supporter's exit")
        assert supporter.proc.returncode == 0, supporter.stderr
    finally:
        supporter.stop()
        window.close()
        if conn is not None:
            conn.transport.loseConnection()
    events = wait_until(lambda: [e for e in protocol_events(srv)
                                 if e["kind"] == "ended" and e["actor"] == "server"]
                        and protocol_events(srv), what="the protocol's end")
    changes = [e["detail"]["presenter"] for e in events if e["kind"] == "direction_changed"]
    assert changes == ["supporter", "customer"]
    shared = [e["detail"] for e in events if e["kind"] == "window_shared"]
    assert [d.get("title", d["window"]) for d in shared] == ["customer-term", "screen"]
