"""The viewer widget on its own: keys become the right X keysyms, pointer positions map to the
remote screen in both zoom modes, and painting does not eat references to None (PySide6 6.12.0
on Python 3.11 dropped one per call of a void method: an app died after a few thousand
repaints with "none_dealloc"; pyproject pins below 6.12 and this test guards the pin)."""

from __future__ import annotations

import sys

import numpy as np
from PySide6.QtCore import QPoint, Qt
from PySide6.QtTest import QTest

from .fixtures_qt import qt_app  # noqa: F401 - fixture


def make_widget(events: list, control: bool = True):
    from modules.common.qt.viewer import FramebufferWidget
    fb = np.zeros((600, 800, 3), np.uint8)
    fb[:, :, 0] = 200
    widget = FramebufferWidget(lambda: fb, lambda *a: events.append(("pointer", *a)),
                               lambda *a: events.append(("key", *a)), lambda: control)
    widget.resize(800, 600)
    widget.show()
    return widget


def test_painting_keeps_references_to_none(qt_app):  # noqa: F811
    widget = make_widget([])
    qt_app.processEvents()
    before = sys.getrefcount(None)
    for _ in range(2000):
        widget.screen_changed([(0, 0, 16, 16)])
        widget.repaint()
        widget.set_fit(False)
        widget.set_fit(True)
    qt_app.processEvents()
    assert sys.getrefcount(None) >= before - 50     # noise from other objects, not 2000s
    widget.close()


def test_keys_and_pointer_become_rfb_events(qt_app):  # noqa: F811
    events: list = []
    widget = make_widget(events)
    widget.set_fit(False)
    qt_app.processEvents()
    QTest.keyClicks(widget, "aZ/")
    QTest.keyClick(widget, Qt.Key_Return)
    QTest.keyClick(widget, Qt.Key_F5)
    keys = [e[2] for e in events if e[0] == "key" and e[1]]
    assert keys == [ord("a"), ord("Z"), ord("/"), 0xFF0D, 0xFFC2]
    assert sum(1 for e in events if e[0] == "key" and not e[1]) == len(keys)  # all released
    events.clear()
    QTest.mouseClick(widget, Qt.LeftButton, Qt.NoModifier, QPoint(100, 50))
    assert ("pointer", 1, 100, 50) in events and events[-1] == ("pointer", 0, 100, 50)
    events.clear()
    widget.send_keys((0xFFE3, 0xFFE9, 0xFFFF))   # Ctrl+Alt+Del from the menu
    assert [e[1:] for e in events] == [(True, 0xFFE3), (True, 0xFFE9), (True, 0xFFFF),
                                       (False, 0xFFFF), (False, 0xFFE9), (False, 0xFFE3)]
    widget.close()


def test_nothing_goes_out_without_control(qt_app):  # noqa: F811
    events: list = []
    widget = make_widget(events, control=False)
    qt_app.processEvents()
    QTest.keyClicks(widget, "rm -rf /")
    QTest.mouseClick(widget, Qt.LeftButton, Qt.NoModifier, QPoint(10, 10))
    assert events == []
    widget.close()


def test_paused_mark_keeps_the_last_picture(qt_app):  # noqa: F811
    """Issue 16 §2: while the other side paused its screen the picture stays, dimmed, with a
    mark saying so (screenshot in test-artifacts)."""
    from .fixtures_qt import screenshot
    widget = make_widget([])
    widget.resize(1280, 800)
    qt_app.processEvents()
    widget.set_paused("Angehalten von Anna Kundin: Das letzte Bild bleibt stehen, bis es weitergeht.")
    qt_app.processEvents()
    path = screenshot(widget, "viewer-paused-de")
    image = widget.grab().toImage()
    picture, band = image.pixelColor(640, 100), image.pixelColor(640, 380)
    assert 60 < picture.red() < 200                        # the picture, dimmed, still there
    assert (band.red(), band.green()) == (255, 243)        # the mark's band
    widget.set_paused(None)
    qt_app.processEvents()
    assert widget.grab().toImage().pixelColor(640, 100).red() == 200
    assert path.exists()
    widget.close()


def test_fit_to_window_repaints_only_what_changed(qt_app):  # noqa: F811
    """Fit to the window (the app's default): an update repaints the changed area scaled (a
    pixel more around it), not the whole smooth-scaled picture, and the screen shows it."""
    from modules.common.qt.viewer import FramebufferWidget
    fb = np.zeros((600, 800, 3), np.uint8)
    fb[:, :, 0] = 200
    painted: list = []

    class Recorded(FramebufferWidget):
        def paintEvent(self, event):  # noqa: N802
            painted.append(event.rect())
            super().paintEvent(event)
    widget = Recorded(lambda: fb, lambda *a: None, lambda *a: None, lambda: False)
    widget.setWindowFlags(Qt.FramelessWindowHint)
    widget.resize(1000, 750)                       # 800x600 scaled by 1.25
    widget.show()
    QTest.qWaitForWindowExposed(widget)
    widget.screen_changed([(0, 0, 800, 600)])      # the first picture: all of it
    QTest.qWait(50)
    painted.clear()
    fb[100:140, 200:260] = (0, 255, 0)
    widget.screen_changed([(200, 100, 60, 40)])
    QTest.qWait(50)
    assert painted and all(r.width() < 90 and r.height() < 60 for r in painted)
    shown = widget.screen().grabWindow(widget.winId()).toImage()
    for x, y in ((287, 150), (252, 127), (323, 173)):       # centre and inner corners
        colour = shown.pixelColor(x, y)
        assert (colour.red(), colour.green()) == (0, 255), (x, y)
    outside = shown.pixelColor(240, 150)
    assert (outside.red(), outside.green()) == (200, 0)
    widget.close()
