"""Start a Qt app with Twisted on the same event loop (qasync's asyncio loop with a shorter
path per socket event, event_loop.py, under Twisted's asyncio reactor), after checking that a
display server is there: without one, Qt would abort the process; we say so in one line and
exit 2."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any, Callable


class NoDisplay(RuntimeError):
    pass


def check_display() -> None:
    """Raise ``NoDisplay`` unless an X display (or Qt's offscreen platform) is usable."""
    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if platform.startswith("offscreen") or platform.startswith("wayland"):
        return
    display = os.environ.get("DISPLAY")
    if not display:
        raise NoDisplay("no display: DISPLAY is not set (start the app in a desktop session, "
                        "or under xvfb-run)")
    name = ctypes.util.find_library("xcb") or "libxcb.so.1"
    try:
        xcb = ctypes.CDLL(name)
    except OSError:
        raise NoDisplay("libxcb is missing: install libxcb1 (and Qt's xcb libraries)") from None
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    conn = xcb.xcb_connect(display.encode(), None)
    ok = xcb.xcb_connection_has_error(conn) == 0
    xcb.xcb_disconnect(conn)
    if not ok:
        raise NoDisplay(f"cannot connect to X display {display!r}: is the desktop session "
                        f"running (or start the app under xvfb-run)?")


def qt_application(language: str | None = None):
    """The process's QApplication (created once) with the translation for ``language``."""
    from PySide6.QtWidgets import QApplication

    from .i18n import install_translation
    app = QApplication.instance() or QApplication(sys.argv[:1])
    install_translation(app, language)
    font = app.font()
    if font.pointSizeF() < 11:
        font.setPointSizeF(11)
        app.setFont(font)
    return app


def install_reactor(app):
    """Twisted's asyncio reactor on the Qt loop of ``app`` (``event_loop.QtEventLoop``), as
    the process's global reactor; returns it."""
    import asyncio

    from .event_loop import QtEventLoop
    loop = QtEventLoop(app)
    asyncio.set_event_loop(loop)
    from twisted.internet import asyncioreactor
    asyncioreactor.install(loop)
    from twisted.internet import reactor
    return reactor


def run_app(prog: str, language: str | None, main: Callable[[Any, Any], Any]) -> int:
    """Run ``main(app, reactor)`` (it shows the windows) until the last window closes."""
    try:
        check_display()
    except NoDisplay as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    app = qt_application(language)
    reactor = install_reactor(app)
    app.setQuitOnLastWindowClosed(True)
    app.lastWindowClosed.connect(lambda: reactor.callLater(0, reactor.stop))
    reactor.callWhenRunning(main, app, reactor)
    reactor.run()
    return 0
