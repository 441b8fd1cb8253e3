"""The Qt apps inside a test: one QApplication on Qt's real X11 platform (xcb) on its own Xvfb
display, shared by the whole test session (a QApplication cannot change its display, and one
Xvfb start instead of one per test keeps the suite fast); its events are pumped by the test's
Twisted reactor; screenshots go to test-artifacts/apps/.  The screens the apps *share* are other
Xvfb displays (fixtures_x11.xvfb), so what a test types on a host never lands in the app.

The fixtures are registered once, as a plugin (conftest.py), so every module gets the same
display; the session's end deletes the QApplication before its display stops (Qt's xcb platform
ends the process when its X connection breaks)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from twisted.internet import task

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "apps"
QT_SCREEN = "1280x800"    # the size the apps are checked at


@pytest.fixture(scope="session")
def qt_display():
    """The Xvfb display the test session's QApplication draws on (xcb platform)."""
    from .fixtures_x11 import start_xvfb
    display = start_xvfb(QT_SCREEN)
    try:
        yield display
    finally:
        from PySide6.QtWidgets import QApplication
        app = QApplication.instance()
        if app is not None:
            import shiboken6
            for widget in app.topLevelWidgets():
                widget.close()
            app.processEvents()
            shiboken6.delete(app)
        display.stop()


@pytest.fixture
def qt_app(qt_display):
    from PySide6.QtWidgets import QApplication
    from twisted.internet import reactor

    from modules.common.qt.app import qt_application
    if QApplication.instance() is None:
        # the command line's -platform/-display win over the environment's QT_QPA_PLATFORM
        QApplication(["hausmeister-test", "-platform", "xcb", "-display", qt_display.name])
    app = qt_application("en")
    assert app.platformName() == "xcb", app.platformName()
    pump = task.LoopingCall(app.processEvents)
    pump.clock = reactor
    pump.start(0.01)
    yield app
    pump.stop()
    from modules.common.qt.i18n import install_translation
    install_translation(app, "en")
    for widget in app.topLevelWidgets():
        widget.close()
    app.processEvents()


@pytest.fixture
def app_world(running_server, enrolled_supporter, tmp_path):
    """What the app tests run against: the server (its relay inside it), supporter alice and
    host pc1 with its password.  Lighter than test_e2e_sessions' ``world`` (no tapped relay
    process: these tests are about the apps, not what the relay sees)."""
    from .fixtures_server import add_enrolled_host
    pc1 = add_enrolled_host(running_server, "pc1", tmp_path / "pc1", "right-host-password")
    return {"srv": running_server, "alice": enrolled_supporter, "pc1": pc1, "tmp": tmp_path}


async def until(predicate, timeout: float = 30, what: str = "condition"):
    """Wait (letting the reactor and Qt run) until ``predicate()`` is truthy; return it."""
    from twisted.internet import reactor
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.05, lambda: None)


def screenshot(widget, name: str) -> Path:
    """Save ``widget`` (a window or dialog, drawn by Qt on the xcb display) as
    test-artifacts/apps/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert widget.grab().save(str(path)), path
    return path
