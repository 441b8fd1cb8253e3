"""The host's status window (``hausmeister-host gui``) against the real server and relay, with a
real supporter CLI connecting: online state, the supporter's name and rights during the
session, the emergency-stop button ending it on both sides, the host staying online after.
Last, a recorded session whose connections are cut (``ss -K``): the window comes back online,
the rest of the recording goes up (the presence resumes it), one line says so meanwhile, and a
close asked for then waits until it is done.  Screenshots in both languages."""

from __future__ import annotations

import os
from argparse import Namespace

import pytest
import pytest_twisted

from .fixtures_qt import qt_app, screenshot, until  # noqa: F401 - fixture
from .fixtures_server import run_cli
from .fixtures_x11 import xvfb  # noqa: F401 - fixture
from .module_process import ModuleProcess
from .test_e2e_recording import recordings
from .test_e2e_recording_resume import cut_connections

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_host_window_shows_the_session_and_stops_it(qt_app, app_world,  # noqa: F811
                                                          xvfb, monkeypatch):  # noqa: F811
    """Both languages, one after the other, against one server (a start costs more than a run)."""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.common.terminal.stream_cli import screen_offer
    from modules.remote_host.gui import HostWindow, server_name
    w = app_world
    assert run_cli("host", "policy", "--view", "allow", "--control", "allow",
                   "--home", str(w["pc1"])).returncode == 0
    right = w["tmp"] / "right"
    right.write_text("right-host-password\n")
    screen = screen_offer(Namespace(screen=xvfb.name, window=None, hide_background=False))
    xvfb.xterm("host-term", geometry="40x10+30+30")
    for language in ("en", "de"):
        install_translation(qt_app, language)
        window = HostWindow(reactor, ModuleFolder(w["pc1"]), screen=screen, language=language,
                            admin=True)
        supporter = None
        try:
            window.show()
            await window.start()
            await until(lambda: window.service.online, what="online")
            online = window.online_label.text()
            assert online == ONLINE[language].format(server=server_name(w["srv"].url)), online
            screenshot(window, f"host-idle-{language}")
            if language == "en":
                await offline_and_back(qt_app, window)
            supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers",
                                      "/dev/null", "--password-file", str(right),
                                      "--home", str(w["alice"]))
            await until(lambda: "alice" in window.session_label.text()
                        and window.service.runner is not None
                        and window.service.runner.consent.allows("control"),
                        what="the session with alice holding control")
            window.refresh()
            assert window.stop_button.isEnabled()
            assert "Steuern" in window.rights_label.text() if language == "de" \
                else "control" in window.rights_label.text()
            screenshot(window, f"host-session-{language}")
            if language == "en":     # what the host shows: one window, then the screen again
                await share_from_the_host_window(window, "host-term")
            window.stop_button.click()
            await until(lambda: supporter.proc.poll() is not None
                        and "session ended" in supporter.stderr, what="the supporter's end")
            assert "session ended: emergency stop by the host" in supporter.stderr
            assert supporter.proc.returncode == 1
            await until(lambda: window.service.runner is None, what="the host free again")
            assert window.last_end == "emergency stop by the host"
            # a window chosen in the session was that session's choice: the next one starts
            # with the whole screen again (the host keeps one screen source for all sessions)
            await until(lambda: screen[0].selected_window is None, what="the whole screen again")
            assert window.service.online                         # still online for the next one
            assert not window.stop_button.isEnabled()
            screenshot(window, f"host-ended-{language}")
            if language == "de":     # last: the password the supporter used changes here
                assert window.set_password("a-new-host-password")
                assert not window.set_password("short")
        finally:
            if supporter is not None:
                supporter.stop()
            await window.service.stop()
            window.close()
    right.write_text("a-new-host-password\n")
    await recorded_session_cut_off(qt_app, w, screen, right)
    monkeypatch.setattr("modules.common.session.recorder.RESUME_WAIT_SECONDS", 0.0)
    await rest_up_after_the_bounded_wait(w, screen, right)


ONLINE = {"en": "Online at {server}", "de": "Online bei {server}"}
OFFLINE = {"en": "Offline, reconnecting to {server}\u00a0…",
           "de": "Offline, verbinde erneut mit {server}\u00a0…"}


async def offline_and_back(qt_app, window) -> None:  # noqa: F811
    """The host's connection breaks: at that moment the window says it is offline (both
    languages, the whole line shown), and online again once the presence re-registered.
    Before, the line kept saying "Online" until something else refreshed the window."""
    from PySide6.QtCore import QEvent
    from PySide6.QtWidgets import QApplication
    from modules.remote_host.gui import server_name
    presence = window.service.presence
    server = server_name(window.service.server)
    seen: dict = {}
    told = presence.on_state

    def looked_at() -> None:
        told()
        if presence.state != "backing off" or seen:
            return
        label = window.online_label
        for index, language in ((1, "de"), (0, "en")):
            window.language_box.setCurrentIndex(index)
            QApplication.sendPostedEvents(None, QEvent.LayoutRequest)
            seen[language] = (label.text(), label.height() >= label.heightForWidth(label.width()))
            screenshot(window, f"host-offline-{language}")
    presence.on_state = looked_at
    registered = presence.registered_count
    try:
        presence.connection.transport.abortConnection()
        await until(lambda: seen and presence.registered_count > registered
                    and window.service.online, what="offline, then online again")
    finally:
        presence.on_state = told
    assert seen == {language: (text.format(server=server), True)
                    for language, text in OFFLINE.items()}, seen
    assert window.online_label.text() == ONLINE["en"].format(server=server)


async def recorded_session_cut_off(qt_app, w, screen, right) -> None:
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.common.qt.i18n import install_translation
    from modules.remote_host.gui import HostWindow
    from PySide6.QtCore import QEvent
    from PySide6.QtWidgets import QApplication
    install_translation(qt_app, "en")
    w["srv"].ok("recording", "policy", "on")
    window = HostWindow(reactor, ModuleFolder(w["pc1"]), screen=screen, language="en",
                        admin=True)
    seen: dict = {}

    def shown(state: str) -> None:
        """Right when the line appears (before the upload can finish): both languages, then
        a close, which waits."""
        if state != "uploading" or seen:
            return
        for index, language in ((0, "en"), (1, "de")):
            window.language_box.setCurrentIndex(index)
            QApplication.sendPostedEvents(None, QEvent.LayoutRequest)  # sizes of the new texts
            seen[language] = window.upload_label.text()
            screenshot(window, f"host-recording-upload-{language}")
        window.language_box.setCurrentIndex(0)
        window.close()
        seen["visible after close"] = window.isVisible()
    window.upload_label.state_shown.connect(shown)
    supporter = None
    try:
        window.show()
        await window.start()
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers",
                                  "/dev/null", "--password-file", str(right),
                                  "--home", str(w["alice"]))
        recorder = await cut_while_recording(window)
        await until(lambda: window.upload_label.state in ("complete", "incomplete"), timeout=60,
                    what="the rest of the recording sent")
        assert window.upload_label.state == "complete"
        assert seen == {"en": "Uploading the rest of the session recording …",
                        "de": "Der Rest der Sitzungsaufzeichnung wird hochgeladen …",
                        "visible after close": True}, seen
        assert recorder.closed and not recorder.failed
        await until(lambda: not window.isVisible(), what="the window closing after the upload")
        rows = await until(lambda: [r for r in recordings(w["srv"]) if r["status"] != "uploading"],
                           what="the recording closed on the server")
        assert [r["status"] for r in rows] == ["complete"], rows
    finally:
        if supporter is not None:
            supporter.stop()
        await window.service.stop()
        window.close()


async def cut_while_recording(window):
    """Once the window's session is recorded (bytes on the server), every connection of this
    process to the server is cut (``ss -K``); returns the session's recorder."""
    recorder = await until(lambda: window.service.runner and window.service.runner.recorder
                           and window.service.runner.recorder.stats()["acknowledged"] > 1000
                           and window.service.runner.recorder,
                           what="recording bytes on the server")
    port = window.service.presence.connection.transport.getPeer().port
    assert cut_connections(os.getpid(), port) >= 1
    return recorder


async def rest_up_after_the_bounded_wait(w, screen, right) -> None:
    """The window's bounded wait (made 0 s here) runs out before the presence is back: the line
    says "could not be uploaded", and once the presence resumes the upload after all, it says
    the recording is complete instead of keeping the stale failure."""
    from twisted.internet import reactor

    from modules.common.link.folder import ModuleFolder
    from modules.remote_host.gui import HostWindow
    window = HostWindow(reactor, ModuleFolder(w["pc1"]), screen=screen, language="en",
                        admin=True)
    states: list[str] = []
    window.upload_label.state_shown.connect(states.append)
    supporter = None
    try:
        window.show()
        await window.start()
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers",
                                  "/dev/null", "--password-file", str(right),
                                  "--home", str(w["alice"]))
        recorder = await cut_while_recording(window)
        await until(lambda: "complete" in states, timeout=60,
                    what="the line following the late upload")
        assert states == ["uploading", "incomplete", "complete"], states
        assert window.upload_label.text() == "The session recording is complete on the server."
        assert recorder.closed and not recorder.failed
        assert window.late_upload is None
    finally:
        if supporter is not None:
            supporter.stop()
        await window.service.stop()
        window.close()


async def share_from_the_host_window(window, title: str) -> None:
    """The host's share button opens the picker; a window chosen there is what the session
    core shares (its size is the source's size) until the whole screen is chosen again."""
    source = window.service.runner.screen_offer[0]
    whole = source.size()
    assert window.share_button.isEnabled()
    window.share_button.click()
    picker = window.picker
    await until(lambda: picker.choices.count() > 1, what="the host's listed windows")
    assert picker.select_title(title)
    picker.share_button.click()
    await until(lambda: f"You share only the window {title}." in window.log.toPlainText(),
                what="the host's line about the shared window")
    assert source.size() != whole and source.size()[0] < 400
    window.share_button.click()
    picker = window.picker
    picker.share_button.click()                  # the first row: the whole screen
    await until(lambda: "You share the whole screen again." in window.log.toPlainText(),
                what="the host's line about the whole screen")
    assert source.size() == whole
    window.share_button.click()                  # one window again: the session ends with it
    picker = window.picker
    await until(lambda: picker.choices.count() > 1, what="the host's listed windows")
    assert picker.select_title(title)
    picker.share_button.click()
    await until(lambda: source.size() != whole, what="the window shared again")
