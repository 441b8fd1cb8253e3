"""The supporter app (``hausmeister-supporter gui``) against the real server and relay, with a
real ``host run --screen`` on an Xvfb display: the host list shows the enrolled host online, a
double-click asks for the password and opens a viewer whose pixels are the host's screen, a
click and typed keys in the viewer run a command in the host's xterm, a file goes each way with
the progress bar at 100 %, and the ad-hoc action shows the 8-digit ID large and, after the
connection was cut, a new one by itself (the old one refused, a customer joins with the new).
Screenshots of every window and dialog in both languages."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import pytest_twisted
from PySide6.QtCore import QPoint, Qt
from PySide6.QtTest import QTest

from .fixtures_qt import qt_app, screenshot, until  # noqa: F401 - fixture
from .fixtures_server import run_cli
from .fixtures_x11 import mss_grab_buffers, wait_for_window, xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_recording_resume import cut_connections
from .test_e2e_screen import focus, screen_of

pytestmark = pytest.mark.e2e


def picture_of(widget) -> np.ndarray:
    image = widget.grab().toImage().convertToFormat(widget.grab().toImage().Format.Format_RGB888)
    width, height = image.width(), image.height()
    data = np.frombuffer(image.constBits(), np.uint8, image.bytesPerLine() * height)
    return data.reshape(height, image.bytesPerLine())[:, :width * 3].reshape(height, width, 3)


class KeyWitness:
    """xev on the host's display, holding its keyboard focus: which keys reached an
    application there (xev prints every KeyPress/KeyRelease with its keycode)."""

    def __init__(self, display) -> None:
        self.proc = subprocess.Popen(["xev", "-event", "keyboard", "-name", "key-witness"],
                                     env=display.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        display.children.append(self.proc)          # stopped (by PID) with the display
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.output = b""
        self.window = wait_for_window(display.name, "key-witness")

    def events(self) -> list[tuple[str, int]]:
        try:
            self.output += os.read(self.proc.stdout.fileno(), 1 << 16) or b""
        except BlockingIOError:
            pass
        return [(kind, int(code)) for kind, code in re.findall(
            rb"(KeyPress|KeyRelease) event.*?keycode (\d+)", self.output, re.S)
            for kind, code in [(kind.decode(), code)]]


def keycodes(display: str, keysyms) -> list[int]:
    from Xlib import display as xdisplay
    d = xdisplay.Display(display)
    try:
        return [d.keysym_to_keycode(k) for k in keysyms]
    finally:
        d.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_supporter_app_lists_connects_views_controls_and_moves_files(
        qt_app, app_world, xvfb, tmp_path, monkeypatch):  # noqa: F811
    """Both languages against one server and one host (a server start costs more than a run)."""
    w = app_world
    monkeypatch.setenv("DISPLAY", xvfb.name)    # the supporter's own screen, if it shows
    assert run_cli("host", "policy", "--view", "allow", "--control", "allow", "--files",
                   "allow", "--home", str(w["pc1"])).returncode == 0
    term = xvfb.xterm("host-term", geometry="80x24+0+0", bg="darkblue")
    focus(xvfb.name, term.window)
    from_host = tmp_path / "host-log.bin"
    from_host.write_bytes(os.urandom(200_000))
    host_inbox = tmp_path / "host-inbox"
    host_inbox.mkdir()
    host = ModuleProcess("host", "run", "--screen", xvfb.name, "--send", str(from_host),
                         "--receive-dir", str(host_inbox), "--home", str(w["pc1"]))
    grab_buffers = mss_grab_buffers()    # an earlier test in this process may hold some
    try:
        await until(lambda: "online; waiting for supporters" in host.stderr, what="host online")
        for number, language in enumerate(("en", "de"), 1):
            window = await one_session(qt_app, w, xvfb, term, host, tmp_path, language, number)
            if language == "de":
                # the host goes away: the server pushes it, the list shows it offline
                host.stop()
                await until(lambda: window.proxy.index(0, 0).data() == "offline",
                            what="the host offline in the list (no Refresh)")
            await server_away_and_back(window, w["srv"], language)
            window.close()
            # closing the window ends every session, and every session (also one that could
            # not be secured: a wrong host password) lets go of the supporter's own screen it
            # held for "Show my screen": an X connection and a full-screen buffer each
            await until(lambda: mss_grab_buffers() == grab_buffers,
                        what="the own screen released")
    finally:
        host.stop()


NOT_CONNECTED = {
    "en": "Not connected to the server right now; the list reconnects by itself. Try again in "
          "a moment.",
    "de": "Gerade nicht mit dem Server verbunden; die Liste verbindet sich von selbst neu. "
          "Versuchen Sie es gleich noch einmal."}
OFFLINE = {"en": "Offline, reconnecting to ", "de": "Offline, verbinde erneut mit "}


ADHOC_RECONNECTING = {
    "en": "The connection to the server was lost. Reconnecting to draw a new ID ...",
    "de": "Die Verbindung zum Server ist abgebrochen. Verbinde erneut, um eine neue ID zu "
          "erzeugen ..."}
ADHOC_NEW_ID = {
    "en": "The connection to the server was lost, so a new ID was drawn. Tell your customer the "
          "new ID: {id}",
    "de": "Die Verbindung zum Server war abgebrochen, daher wurde eine neue ID erzeugt. Nennen "
          "Sie Ihrem Kunden die neue ID: {id}"}


async def server_away_and_back(window, srv, language: str) -> None:
    """The supporter's connections break while the server does not answer (stopped): the host
    list says it is reconnecting and is greyed, a session asked for then says why it does not
    start, the waiting ad-hoc tab strikes its ID through and says it reconnects; once the server
    answers again the list is current again and the ad-hoc tab offers a new ID, by themselves."""
    from modules.supporter.adhoc_panel import whole
    from modules.supporter.gui import HOST_ID
    adhoc = window.sessions[-1]          # one_session's ad-hoc tab, still waiting
    old_id = adhoc.adhoc_panel.adhoc_id
    closed = window.new_adhoc()          # and one the supporter closes while it reconnects
    await until(lambda: closed.adhoc_panel.adhoc_id, what="the second ad-hoc ID")
    window.tabs.setCurrentIndex(0)
    count = window.model.rowCount()
    os.kill(srv.process.pid, signal.SIGSTOP)
    try:
        assert cut_connections(os.getpid(), srv.module_port) >= 3   # the list's and the IDs'
        await until(lambda: window.status_label.text().startswith(OFFLINE[language]),
                    what="the list reconnecting")
        await until(lambda: closed.adhoc_panel.offline, what="the second tab reconnecting")
        window._close_tab(window.tabs.indexOf(closed))
        assert closed.offer.stopped
        screenshot(window, f"supporter-reconnecting-{language}")
        assert not window.table.isEnabled()     # greyed: no double-click into a stale list
        await until(lambda: adhoc.adhoc_panel.offline, what="the ad-hoc tab reconnecting")
        window.tabs.setCurrentWidget(adhoc)
        screenshot(window, f"supporter-adhoc-reconnecting-{language}")
        panel = adhoc.adhoc_panel
        assert panel.state_label.text().startswith(ADHOC_RECONNECTING[language])
        assert panel.adhoc_id == old_id and panel.id_label.font().strikeOut()
        assert panel.valid_label.isHidden()
        window.tabs.setCurrentIndex(0)
        # a session asked for in that moment (the list went offline under the click): in words
        window.connect_host(window.proxy.index(0, 1).data(HOST_ID), "pc1", "right-host-password")
        tab = window.sessions[-1]
        await until(lambda: tab.notice.text(), what="why no session starts")
        assert tab.notice.text() == NOT_CONNECTED[language], tab.notice.text()
        window._close_tab(window.tabs.indexOf(tab))
        window.tabs.setCurrentIndex(0)
    finally:
        os.kill(srv.process.pid, signal.SIGCONT)
    await until(lambda: window.conn is not None and not window.offline_text
                and window.model.rowCount() == count, what="the list current again")
    assert window.table.isEnabled()
    assert window.status_label.text().startswith("Hosts: " if language == "en" else "Rechner: ")
    await until(lambda: not panel.offline and panel.adhoc_id != old_id, what="a new ad-hoc ID")
    new_id = panel.adhoc_id
    assert re.fullmatch(r"\d{4} \d{4}", new_id) and not panel.id_label.font().strikeOut()
    assert panel.state_label.text() == ADHOC_NEW_ID[language].format(id=whole(new_id))
    assert window.tabs.tabText(window.tabs.indexOf(adhoc)) == new_id
    window.tabs.setCurrentWidget(adhoc)
    screenshot(window, f"supporter-adhoc-new-id-{language}")
    window.tabs.setCurrentIndex(0)
    # the closed tab stopped trying: no connection, no attempt pending, no new ID
    assert closed.offer.conn is None and not closed.offer._retry.active()
    assert closed.adhoc_panel.offline and closed.task.called
    if language == "en":
        await customer_joins_with_the_new_id(srv, adhoc, old_id, new_id)


async def customer_joins_with_the_new_id(srv, adhoc, old_id: str, new_id: str) -> None:
    """The ID that was shown before the cut is refused; the new one reaches this tab, whose
    secret keys the channel (the verification code appears: the key confirmation passed)."""
    server = ("--server", srv.url, "--ca-fingerprint", srv.fingerprint)
    if old_id.split()[0] != new_id.split()[0]:   # 1 in 10,000 the server drew the same four
        old = ModuleProcess("customer", *server, old_id, "--pipe", "--answers", "/dev/null")
        await until(lambda: old.proc.poll() is not None, what="the old ID refused")
        assert old.proc.returncode != 0 and "unknown or expired" in old.stderr, old.stderr
    assert adhoc.timer_label.isHidden() and adhoc.started is None   # waited long, no timer
    joining = time.monotonic()
    customer = ModuleProcess("customer", *server, new_id, "--pipe", "--answers", "/dev/null")
    try:
        await until(lambda: adhoc.code_label.text(), what="the session secured with the new ID")
        # the session's time counts from the customer's joining, not from the tab's opening
        assert adhoc.started >= joining and not adhoc.timer_label.isHidden()
        minutes, seconds = map(int, re.fullmatch(r"Session (\d\d):(\d\d)",
                                                 adhoc.timer_label.text()).groups())
        assert minutes * 60 + seconds <= time.monotonic() - joining + 1
        assert "Customer joined from 127.0.0.1." in adhoc.chat_log.toPlainText()
        await until(lambda: adhoc.end_text is not None or customer.proc.poll() is not None,
                    what="the customer's answer to the terms")
        await until(lambda: customer.proc.poll() is not None, what="the customer's end")
        assert "joined the session of supporter alice" in customer.stderr, customer.stderr
    finally:
        customer.stop()


def drop_file_on(widget, path) -> None:
    """What Qt delivers when a file is dragged onto ``widget`` and dropped: the enter event
    (which must be accepted — by the widget or, through Qt's propagation, the session tab
    around it) and the drop, with the file's URL as the drag's data."""
    from PySide6.QtCore import QMimeData, QPointF, QUrl
    from PySide6.QtGui import QDragEnterEvent, QDropEvent
    from PySide6.QtWidgets import QApplication
    data = QMimeData()
    data.setUrls([QUrl.fromLocalFile(str(path))])
    where = widget.rect().center()
    enter = QDragEnterEvent(where, Qt.CopyAction, data, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted(), "the session tab refused a dragged file"
    drop = QDropEvent(QPointF(where), Qt.CopyAction, data, Qt.LeftButton, Qt.NoModifier)
    QApplication.sendEvent(widget, drop)


WRONG_PASSWORD = {
    "en": "The password or ID does not match, so the session was not started. Check it and try "
          "again.",
    "de": "Passwort oder ID stimmen nicht, die Sitzung wurde nicht gestartet. Prüfen Sie die "
          "Angabe und versuchen Sie es noch einmal."}


NOT_TRANSFERRED = {   # the reason said in the window's language, not as the protocol has it
    "en": "The file {name} was not transferred: cancelled by the supporter",
    "de": "Die Datei {name} wurde nicht übertragen: vom Supporter abgebrochen"}


async def one_session(qt_app, w, xvfb, term, host, tmp_path,  # noqa: F811 - the fixture
                      language: str, number: int):
    """The host list, a double-click into the viewer, a click and keys, the keys menu, files
    both ways, the end, and the ad-hoc ID; screenshots in ``language``."""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.common.qt.viewer import REMOTE_KEY_COMBOS
    from modules.supporter.gui import EnrollDialog, SupporterWindow
    install_translation(qt_app, language)
    to_host = tmp_path / f"report-{language}.bin"
    to_host.write_bytes(os.urandom(300_000))
    host_inbox, my_inbox = tmp_path / "host-inbox", tmp_path / f"my-inbox-{language}"
    my_inbox.mkdir()
    marker = tmp_path / f"typed-in-the-viewer-{language}"
    from_host = tmp_path / "host-log.bin"
    window = SupporterWindow(reactor, ModuleFolder(w["alice"]), language)
    window.receive_dir = str(my_inbox)
    try:
        enroll = EnrollDialog(None, w["srv"].url, w["srv"].fingerprint)
        enroll.show()
        screenshot(enroll, f"supporter-enroll-{language}")
        enroll.close()
        window.show()
        await window.start()
        await until(lambda: window.proxy.rowCount() == 1, what="the host list")
        first = window.proxy.index(0, 1)
        assert first.data() == "pc1"
        assert window.proxy.index(0, 0).data() == "online"
        screenshot(window, f"supporter-hosts-{language}")
        # double-click on the host → its password; a wrong one: the tab says so in words
        where = window.table.visualRect(first).center()
        QTest.mouseClick(window.table.viewport(), Qt.LeftButton, Qt.NoModifier, where)
        QTest.mouseDClick(window.table.viewport(), Qt.LeftButton, Qt.NoModifier, where)
        dialog = await until(lambda: getattr(window, "password_dialog", None), what="password")
        screenshot(dialog, f"supporter-password-{language}")
        dialog.setTextValue("not-the-host-password")
        dialog.accept()
        wrong = await until(lambda: window.sessions and window.sessions[-1], what="session tab")
        await until(lambda: wrong.notice.text(), what="the wrong password said in the tab")
        assert wrong.notice.text() == WRONG_PASSWORD[language], wrong.notice.text()
        assert wrong.viewer is None and not wrong.waiting.isVisible()
        assert not wrong.actions["end"].isEnabled()
        screenshot(window, f"supporter-wrong-password-{language}")
        window._close_tab(window.tabs.indexOf(wrong))
        # the right one → a session tab with the viewer
        window.password_dialog = None
        QTest.mouseDClick(window.table.viewport(), Qt.LeftButton, Qt.NoModifier, where)
        dialog = await until(lambda: window.password_dialog, what="password")
        dialog.setTextValue("right-host-password")
        dialog.accept()
        tab = await until(lambda: window.sessions[-1] is not wrong and window.sessions[-1],
                          what="session tab")
        assert not tab.keys_button.isEnabled()      # no keys menu before control and a screen
        await until(lambda: tab.viewer is not None and tab._control_held(),
                    what="the viewer with control")
        tab.fit.setChecked(False)   # 1:1: the widget's pixels are the remote framebuffer
        await until(lambda: tab.viewer.width() == 1024, what="1:1 size")
        seen = picture_of(tab.viewer).astype(np.int16)
        assert seen.shape[:2] == (768, 1024)
        assert float(np.abs(seen - screen_of(xvfb.name)).mean()) < 6.0
        # a click into the xterm, then keys: a command runs on the host
        QTest.mouseClick(tab.viewer, Qt.LeftButton, Qt.NoModifier, QPoint(100, 100))
        QTest.keyClicks(tab.viewer, f"touch {marker}")
        QTest.keyClick(tab.viewer, Qt.Key_Return)
        await until(marker.exists, what="the typed command's file")
        # keys the supporter's own desktop would grab, from the "Send keys" menu: each reaches
        # an application on the host's display as real key events (xev holds the focus there)
        assert tab.keys_button.isEnabled()
        witness = KeyWitness(xvfb)
        focus(xvfb.name, witness.window)
        expected = []
        for label, keysyms in REMOTE_KEY_COMBOS:
            tab.key_actions[label].trigger()
            codes = keycodes(xvfb.name, keysyms)
            expected += [("KeyPress", c) for c in codes]
            expected += [("KeyRelease", c) for c in reversed(codes)]
        await until(lambda: len(witness.events()) >= len(expected), what="the keys at xev")
        assert witness.events() == expected
        witness.proc.terminate()
        tab.keys_menu.popup(tab.keys_button.mapToGlobal(tab.keys_button.rect().bottomLeft()))
        await until(lambda: tab.keys_menu.isVisible(), what="the keys menu")
        screenshot(tab.keys_menu, f"supporter-keys-menu-{language}")
        tab.keys_menu.hide()
        focus(xvfb.name, term.window)
        # files both ways
        tab.actions["files"].trigger()
        await until(lambda: tab.runner.consent.holds("files"), what="the files right")
        drop_file_on(tab.viewer, to_host)  # dragged from a file manager onto the remote screen
        await until(lambda: (host_inbox / to_host.name).exists() and tab.progress.value() == 100,
                    what="the file on the host")
        await until(lambda: (my_inbox / from_host.name).exists(), what="the host's file")
        digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        assert digest(host_inbox / to_host.name) == digest(to_host)
        assert digest(my_inbox / from_host.name) == digest(from_host)
        # a file sent can be cancelled from beside its progress bar (here at its first bytes)
        big = tmp_path / f"big-{language}.bin"
        big.write_bytes(os.urandom(3_000_000))

        def cancel_at_once(_value):
            if tab.cancel_transfer.isVisible() and tab.progress.format().startswith(big.name):
                tab.cancel_transfer.click()
        tab.progress.valueChanged.connect(cancel_at_once)
        tab.send_file(str(big))
        await until(lambda: f"file failed: {big.name}" in host.stderr, what="the host's cancel")
        tab.progress.valueChanged.disconnect(cancel_at_once)
        assert "cancelled by the supporter" in host.stderr
        assert tab.notice.text() == NOT_TRANSFERRED[language].format(name=big.name)
        assert not tab.cancel_transfer.isVisible()
        assert not (host_inbox / big.name).exists()
        tab.fit.setChecked(True)
        await until(lambda: tab.viewer.width() < 1024, what="fit to the window")
        screenshot(window, f"supporter-session-{language}")
        if language == "en":     # the supporter shows its screen and narrows it to one window
            await share_from_the_supporter_tab(tab, term.title)
        tab.actions["end"].trigger()
        await until(lambda: tab.end_text is not None, what="the end")
        assert tab.end_text == "ended by the supporter"
        await until(lambda: host.stderr.count("session ended: ended by the supporter") == number,
                    what="the host's end line")
        screenshot(window, f"supporter-ended-{language}")
        # the ad-hoc action: the 8-digit ID, large
        adhoc = window.new_adhoc()
        await until(lambda: len(adhoc.adhoc_label.text().replace(" ", "")) == 8,
                    what="the ad-hoc ID")
        assert adhoc.timer_label.isHidden()     # no session time while waiting for the customer
        screenshot(window, f"supporter-adhoc-{language}")
        window.tabs.setCurrentIndex(0)
        return window
    except BaseException:
        window.close()
        raise


async def share_from_the_supporter_tab(tab, title: str) -> None:
    """After "Show my screen" the tab's share action opens the picker; the window chosen there
    is what the session core now captures (the source's size is the window's)."""
    assert not tab.actions["window"].isEnabled()          # not while the host shows
    tab.actions["direction"].trigger()
    await until(lambda: tab.runner.consent.is_presenter and tab.actions["window"].isEnabled(),
                what="the supporter showing its screen")
    tab.actions["window"].trigger()
    picker = tab.picker
    await until(lambda: picker.choices.count() > 1, what="the supporter's listed windows")
    assert picker.select_title(title)
    picker.share_button.click()
    await until(lambda: f"You share only the window {title}." in tab.chat_log.toPlainText(),
                what="the tab's line about the shared window")
    info = next(w for w in await tab.runner.windows() if w.title == title)
    width, height = tab.runner.screen_offer[0].size()
    assert abs(width - info.rect.w) <= 4 and abs(height - info.rect.h) <= 4
