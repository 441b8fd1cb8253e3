"""The customer app (``hausmeister-customer gui``) against the real server, with a real
supporter CLI on the other side: it takes the ID, shows the terms, grants view, control and
files through its dialogs, shows the always-on-top bar, asks about each file the supporter
sends in its own dialog (accept into a folder of the customer's choice, decline, cancel while
it arrives), and its emergency-stop button ends the session on both sides with the right
reason in the protocol.  Last, a recorded session whose connections are cut (``ss -K``): the
window uploads the rest of the recording over a new connection, says so in one line and does
not close before it is done.  Screenshots in both languages."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import pytest_twisted
from PySide6.QtTest import QTest

from .fixtures_qt import qt_app, screenshot, until  # noqa: F401 - fixture
from .fixtures_server import free_port, run_cli
from .fixtures_x11 import mss_grab_buffers, xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_recording import recordings
from .test_e2e_recording_resume import cut_connections

pytestmark = pytest.mark.e2e


def t_pause(language: str) -> str:
    return {"en": "Pause screen", "de": "Bildschirm anhalten"}[language]


def ended_lines(srv) -> list[dict]:
    lines = []
    for path in sorted((srv.data_dir / "protocols").rglob("*.jsonl")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if e["kind"] == "ended" and e["actor"] == "server"]


def press_ctrl_f12(display: str) -> None:
    """What the customer's fingers do, on the X display (XTest), wherever the focus is."""
    from Xlib import X, XK
    from Xlib import display as xdisplay
    from Xlib.ext import xtest
    d = xdisplay.Display(display)
    ctrl = d.keysym_to_keycode(XK.string_to_keysym("Control_L"))
    f12 = d.keysym_to_keycode(XK.string_to_keysym("F12"))
    for kind, code in ((X.KeyPress, ctrl), (X.KeyPress, f12), (X.KeyRelease, f12),
                       (X.KeyRelease, ctrl)):
        xtest.fake_input(d, kind, code)
    d.sync()
    d.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_customer_app_consents_and_stops(qt_app, running_server, enrolled_supporter,  # noqa: F811
                                               xvfb, tmp_path):  # noqa: F811
    """Both languages, one session each, against one server (a start costs more than a run)."""
    for number, language in enumerate(("en", "de"), 1):
        folder = tmp_path / language
        folder.mkdir()
        await server_not_reachable(qt_app, running_server, language)
        await one_session(qt_app, running_server, enrolled_supporter, xvfb, folder, language,
                          number)
    await recorded_session_cut_off(qt_app, running_server, enrolled_supporter, xvfb, tmp_path)


UNKNOWN_ID = {
    "en": "There is no session with this ID. Check the eight digits with your supporter and try "
          "again.",
    "de": "Zu dieser ID gibt es keine Sitzung. Prüfen Sie die acht Ziffern mit Ihrem Supporter "
          "und versuchen Sie es noch einmal."}


UNREACHABLE = {
    "en": "The support server cannot be reached. Check this computer's network connection and "
          "try again in a moment.",
    "de": "Der Support-Server ist nicht erreichbar. Prüfen Sie die Netzwerkverbindung dieses "
          "Computers und versuchen Sie es gleich noch einmal."}


async def server_not_reachable(qt_app, srv, language: str) -> None:
    """A server address nobody answers at (a closed port on 127.0.0.1): the window says in
    plain words that the server cannot be reached, not a socket error."""
    from twisted.internet import reactor

    from modules.common.qt.i18n import install_translation
    from modules.customer.gui import CustomerWindow
    install_translation(qt_app, language)
    window = CustomerWindow(reactor, f"https://127.0.0.1:{free_port()}", srv.fingerprint,
                            language=language)
    try:
        window.show()
        QTest.keyClicks(window.first, "1234")
        QTest.keyClicks(window.second, "5678")
        window.connect_button.click()
        await until(lambda: window.status_label.text() == UNREACHABLE[language]
                    and window.connect_button.isEnabled(), what="the unreachable server said")
        label = window.status_label     # all of its lines shown, none cut off
        await until(lambda: label.height() >= label.heightForWidth(label.width()),
                    timeout=5, what="room for the whole sentence")
        screenshot(window, f"customer-unreachable-{language}")
    finally:
        window.close()


async def one_session(qt_app, srv, enrolled_supporter, xvfb, tmp_path,  # noqa: F811 - fixtures
                      language: str, number: int) -> None:
    from twisted.internet import reactor

    # (the reactor runs this test: wait for the other processes with ``until``, never blocking)
    from modules.common.qt.i18n import install_translation
    from modules.customer.gui import CustomerWindow
    install_translation(qt_app, language)
    small, big = tmp_path / "notes.txt", tmp_path / "driver-setup.bin"
    small.write_bytes(os.urandom(150_000))
    big.write_bytes(os.urandom(2_000_000))
    inbox, chosen = tmp_path / "inbox", tmp_path / "chosen"
    chosen.mkdir()
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--chat", "Hello, I am Alice.", "--request", "view,control,files",
                              "--send", str(small), "--send", str(big),
                              "--home", str(enrolled_supporter))
    window = CustomerWindow(reactor, srv.url, srv.fingerprint, language=language,
                            share_display=xvfb.name, receive_dir=str(inbox))
    try:
        window.show()
        nameplate, secret = supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups()
        screenshot(window, f"customer-start-{language}")
        # a mistyped first half: the window says in plain words that no session has this ID
        QTest.keyClicks(window.first, f"{(int(nameplate) + 1) % 10000:04d}")
        QTest.keyClicks(window.second, secret)
        grab_buffers = mss_grab_buffers()
        window.connect_button.click()
        await until(lambda: window.status_label.text() == UNKNOWN_ID[language]
                    and window.connect_button.isEnabled(), what="the unknown ID said")
        # the screen opened for that try is let go at once (X connection, shared memory)
        assert mss_grab_buffers() == grab_buffers
        screenshot(window, f"customer-unknown-id-{language}")
        window.first.clear()
        window.second.clear()
        QTest.keyClicks(window.first, nameplate)
        QTest.keyClicks(window.second, secret)
        assert window.second.text() == secret
        window.connect_button.click()
        terms = await until(lambda: window.ui and window.ui.open and window.ui.open[0],
                            what="the terms dialog")
        screenshot(terms, f"customer-terms-{language}")
        terms.yes_button.click()
        for right in ("view", "control", "files"):
            question = await until(lambda: window.ui.open and window.ui.open[0],
                                   what=f"the question for {right}")
            screenshot(question, f"customer-question-{right}-{language}")
            assert "alice" in question.findChild(type(window.title)).text()
            question.yes_button.click()
        await until(lambda: window.bar.isVisible() and "alice" in window.bar.label.text()
                    and window.runner.consent.allows("control"), what="the sharing bar")
        await until(lambda: "granted control" in supporter.stderr, what="the supporter's grant")
        await until(lambda: "Alice" in window.log.toPlainText(), what="the chat line")
        screenshot(window, f"customer-session-{language}")
        screenshot(window.bar, f"customer-sharing-bar-{language}")
        assert window.log.toPlainText().count("Hello, I am Alice.") == 1
        # each file the supporter sends waits for the customer, in its own dialog
        await until(lambda: len(window.file_dialogs) == 2, what="two file dialogs")
        dialogs = {d.offer.name: d for d in window.file_dialogs.values()}
        first, second = dialogs[small.name], dialogs[big.name]
        assert not (inbox / small.name).exists() and not (chosen / small.name).exists()
        assert str(inbox) in first.folder_label.text()
        screenshot(first, f"customer-file-offer-{language}")
        digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
        if language == "en":
            first.set_folder(str(chosen))           # what "Change folder ..." leads to
            first.accept_button.click()
            await until(lambda: first.outcome, what="the first file's end")
            assert first.outcome == "saved" and first.progress.value() == 100
            assert digest(chosen / small.name) == digest(small)
            screenshot(first, f"customer-file-saved-{language}")
            # the second is cancelled as soon as its first bytes are in
            second.progressed.connect(lambda _: second.cancel_button.isVisible()
                                      and second.cancel_button.click())
            second.accept_button.click()
            await until(lambda: second.outcome, what="the second file's end")
            assert second.outcome == "failed"
            screenshot(second, f"customer-file-cancelled-{language}")
            await until(lambda: f"file completed: {small.name}" in supporter.stderr
                        and f"file failed: {big.name}" in supporter.stderr,
                        what="the supporter's file lines")
            assert "cancelled by the customer" in supporter.stderr
            assert not (inbox / big.name).exists()
        else:
            first.decline_button.click()
            await until(lambda: first.outcome, what="the first file's end")
            assert first.outcome == "declined"
            second.accept_button.click()
            await until(lambda: second.outcome, what="the second file's end")
            assert second.outcome == "saved"
            assert digest(inbox / big.name) == digest(big)
            screenshot(second, f"customer-file-saved-{language}")
            await until(lambda: f"file rejected: {small.name}" in supporter.stderr
                        and f"file completed: {big.name}" in supporter.stderr,
                        what="the supporter's file lines")
            assert "declined by the customer" in supporter.stderr
            assert not (inbox / small.name).exists()
        for dialog in (first, second):
            dialog.close_button.click()
        # the pause button on the bar (issue 16 §2): a thin call into the session core
        window.bar.pause_button.click()
        await until(lambda: "The customer paused the screen" in supporter.stderr,
                    what="the supporter's paused line")
        await until(lambda: window.bar.pause_button.text() != t_pause(language),
                    what="the button's resume text")
        screenshot(window.bar, f"customer-sharing-bar-paused-{language}")
        window.bar.pause_button.click()
        await until(lambda: "The customer resumed the screen" in supporter.stderr,
                    what="the supporter's resumed line")
        if language == "en":
            window.bar.stop_button.click()      # the big red button
        else:                                   # Ctrl+F12 on the X display (grabbed there)
            press_ctrl_f12(xvfb.name)
        await until(lambda: window.runner.done.called, what="the end of the session")
        await until(lambda: supporter.proc.poll() is not None and "session ended" in
                    supporter.stderr, what="the supporter's exit")
        assert "session ended: emergency stop by the customer" in supporter.stderr
        assert supporter.proc.returncode == 1
        assert not window.bar.isVisible()
        assert window.end_text == "emergency stop by the customer"
        screenshot(window, f"customer-ended-{language}")
    finally:
        supporter.stop()
        window.close()
    lines = await until(lambda: len(ended_lines(srv)) >= number and ended_lines(srv),
                        what="the protocol's ended line")
    assert len(lines) == number
    assert all((line["detail"]["cause"], line["detail"]["ended_by"]) ==
               ("emergency_stop", "customer") for line in lines)


async def recorded_session_cut_off(qt_app, srv, enrolled_supporter, xvfb,  # noqa: F811
                                   tmp_path) -> None:
    """The connections are cut while the customer's screen is recorded: the window sends the
    rest over a new connection (as the CLI does), shows one line meanwhile and a close asked
    for then waits until the recording is complete on the server."""
    from twisted.internet import reactor

    from modules.common.qt.i18n import install_translation
    from modules.customer.gui import CustomerWindow
    from PySide6.QtCore import QEvent
    from PySide6.QtWidgets import QApplication
    install_translation(qt_app, "en")
    srv.ok("recording", "policy", "on")
    supporter = ModuleProcess("supporter", "adhoc", "--pipe", "--answers", "/dev/null",
                              "--request", "view", "--home", str(enrolled_supporter))
    window = CustomerWindow(reactor, srv.url, srv.fingerprint, language="en",
                            share_display=xvfb.name, receive_dir=str(tmp_path / "inbox"))
    seen: dict = {}

    def uploading(text: str) -> None:
        """Right when the line appears (before the upload can finish): look at it in both
        languages, then ask the window to close."""
        if window.upload_label.state != "uploading" or seen:
            return
        for index, language in ((0, "en"), (1, "de")):
            window.language_box.setCurrentIndex(index)
            QApplication.sendPostedEvents(None, QEvent.LayoutRequest)  # sizes of the new texts
            seen[language] = window.upload_label.text()
            screenshot(window, f"customer-recording-upload-{language}")
        window.language_box.setCurrentIndex(0)
        seen["connect while uploading"] = window.connect_button.isEnabled()
        window.close()
        seen["visible after close"] = window.isVisible()
    window.event_shown.connect(uploading)
    try:
        window.show()
        nameplate, secret = supporter.wait_for_line(r"ad-hoc ID: (\d{4}) (\d{4})").groups()
        QTest.keyClicks(window.first, nameplate)
        QTest.keyClicks(window.second, secret)
        window.connect_button.click()
        for what in ("the terms dialog", "the question for view"):
            dialog = await until(lambda: window.ui and window.ui.open and window.ui.open[0],
                                 what=what)
            dialog.yes_button.click()
        recorder = await until(lambda: window.runner and window.runner.recorder
                               and window.runner.recorder.stats()["acknowledged"] > 1000
                               and window.runner.recorder, what="recording bytes on the server")
        assert cut_connections(os.getpid(), window.conn.transport.getPeer().port) >= 1
        await until(lambda: window.runner.done.called, what="the end of the cut-off session")
        await until(lambda: window.upload_label.state in ("complete", "incomplete"), timeout=60,
                    what="the rest of the recording sent")
        assert window.upload_label.state == "complete", window.upload_label.text()
        assert seen == {"en": "Uploading the rest of the session recording …",
                        "de": "Der Rest der Sitzungsaufzeichnung wird hochgeladen …",
                        "connect while uploading": False, "visible after close": True}, seen
        assert recorder.closed and not recorder.failed
        await until(lambda: not window.isVisible(), what="the window closing after the upload")
        rows = await until(lambda: [r for r in recordings(srv) if r["status"] != "uploading"],
                           what="the recording closed on the server")
        assert [r["status"] for r in rows] == ["complete"], rows
        await until(lambda: supporter.proc.poll() is not None, what="the supporter's exit")
    finally:
        supporter.stop()
        window.close()


def test_apps_without_a_display_say_so_in_one_line(tmp_path):
    for kind in ("customer", "supporter"):   # (the host's app needs an enrolled host first)
        result = run_cli(kind, "gui", *(("--home", str(tmp_path)) if kind == "supporter" else ()),
                         env={"DISPLAY": "", "QT_QPA_PLATFORM": "xcb"})
        assert result.returncode == 2, (kind, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert f"hausmeister-{kind}: error: no display" in result.stderr
