"""The Qt apps inside a test: one QApplication (Qt's offscreen platform: the windows are real
widgets, drawn and grabbed without a window system; the screens they share are Xvfb displays),
its events pumped by the test's Twisted reactor, and screenshots into test-artifacts/apps/."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from twisted.internet import task

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "apps"


@pytest.fixture
def qt_app():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from twisted.internet import reactor

    from modules.common.qt.app import qt_application
    app = qt_application("en")
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
    """Save ``widget`` (a window or dialog) as test-artifacts/apps/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert widget.grab().save(str(path)), path
    return path
