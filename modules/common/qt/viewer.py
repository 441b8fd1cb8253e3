"""The remote screen in a widget: the RFB client's framebuffer drawn as updates arrive, fit to
the window or 1:1 (in a scroll area), with the mouse (buttons, wheel) and the keyboard
forwarded as RFB events.  Whether input may go out is the session's business (the presenter
enforces *control*); the widget forwards only while ``input_enabled`` says so.  While the other
side has paused its screen the last picture stays, dimmed, with a mark (``set_paused``)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
from PySide6.QtCore import QRect, QSize, Qt
from PySide6.QtGui import QColor, QImage, QPainter, QRegion
from PySide6.QtWidgets import QScrollArea, QSizePolicy, QWidget

SPECIAL_KEYS = {
    Qt.Key_Return: 0xFF0D, Qt.Key_Enter: 0xFF8D, Qt.Key_Backspace: 0xFF08, Qt.Key_Tab: 0xFF09,
    Qt.Key_Backtab: 0xFF09, Qt.Key_Escape: 0xFF1B, Qt.Key_Delete: 0xFFFF, Qt.Key_Insert: 0xFF63,
    Qt.Key_Home: 0xFF50, Qt.Key_End: 0xFF57, Qt.Key_PageUp: 0xFF55, Qt.Key_PageDown: 0xFF56,
    Qt.Key_Left: 0xFF51, Qt.Key_Up: 0xFF52, Qt.Key_Right: 0xFF53, Qt.Key_Down: 0xFF54,
    Qt.Key_Shift: 0xFFE1, Qt.Key_Control: 0xFFE3, Qt.Key_Alt: 0xFFE9, Qt.Key_Meta: 0xFFEB,
    Qt.Key_AltGr: 0xFE03, Qt.Key_CapsLock: 0xFFE5, Qt.Key_Print: 0xFF61, Qt.Key_Pause: 0xFF13,
    Qt.Key_Menu: 0xFF67, Qt.Key_Space: 0x20,
}
for _n in range(1, 13):
    SPECIAL_KEYS[getattr(Qt, f"Key_F{_n}")] = 0xFFBD + _n

CTRL_ALT_DEL = (0xFFE3, 0xFFE9, 0xFFFF)

# Keys the supporter's own desktop would take for itself (or that no keyboard event could carry
# to the viewer): sent from the viewer's "Send keys" menu as real RFB key events, pressed in this
# order and released in reverse.  The labels are the English source strings of the menu.
REMOTE_KEY_COMBOS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("Ctrl+Alt+Del", CTRL_ALT_DEL),
    ("Ctrl+Alt+Backspace", (0xFFE3, 0xFFE9, 0xFF08)),
    ("Alt+Tab", (0xFFE9, 0xFF09)),
    ("Alt+F4", (0xFFE9, 0xFFC1)),
    ("Windows key (Super)", (0xFFEB,)),
    ("Ctrl+Esc", (0xFFE3, 0xFF1B)),
    ("Ctrl+Shift+Esc", (0xFFE3, 0xFFE1, 0xFF1B)),
    ("Print Screen", (0xFF61,)),
    ("Alt+Print Screen", (0xFFE9, 0xFF61)),
)


def keysym_of(key: int, text: str) -> int | None:
    """The X keysym for a Qt key event (None: nothing to send)."""
    if key in SPECIAL_KEYS:
        return SPECIAL_KEYS[key]
    if text and len(text) == 1 and ord(text) >= 0x20:
        code = ord(text)
        return code if code < 0x100 else 0x01000000 | code   # Unicode keysyms
    if Qt.Key_A <= key <= Qt.Key_Z:      # with Ctrl held Qt gives no text: the plain letter
        return ord("a") + key - Qt.Key_A
    if 0x20 <= key < 0x7F:
        return key
    return None


class FramebufferWidget(QWidget):
    """Paints ``framebuffer()``: ``H x W x 4`` B G R 255 (the RFB client's ``pixels``, painted
    as ``QImage.Format_RGB32`` without a conversion) or ``H x W x 3`` RGB; ``pointer(mask, x,
    y)`` and ``key(down, keysym)`` are the RFB client's sending methods."""

    def __init__(self, framebuffer: Callable[[], np.ndarray], pointer: Callable[[int, int, int], Any],
                 key: Callable[[bool, int], Any], input_enabled: Callable[[], bool],
                 lock: Any = None) -> None:
        """``lock``: held while painting (the RFB client's ``framebuffer_lock``, so a decoder
        thread never changes the picture mid-paint)."""
        super().__init__()
        self.framebuffer = framebuffer
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.send_pointer = pointer
        self.send_key = key
        self.input_enabled = input_enabled
        self.fit = True
        self._mask = 0
        self._pressed: dict[int, int] = {}   # native scan code → keysym sent for it
        self.frames_painted = 0
        self._shown_size = QSize()
        self.paused_text: str | None = None
        self.setFocusPolicy(Qt.StrongFocus)
        self.setMouseTracking(True)
        self.setAttribute(Qt.WA_OpaquePaintEvent, True)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)

    # --- drawing -------------------------------------------------------------------------------
    def rgb(self) -> np.ndarray:
        """The picture shown, ``H x W x 3`` RGB (a view)."""
        fb = self.framebuffer()
        return fb[..., 2::-1] if fb.shape[2] == 4 else fb

    def remote_size(self) -> QSize:
        fb = self.framebuffer()
        return QSize(fb.shape[1], fb.shape[0])

    def sizeHint(self) -> QSize:  # noqa: N802
        size = self.remote_size()
        return size if size.width() else QSize(640, 400)

    def set_fit(self, fit: bool) -> None:
        self.fit = fit
        if not fit:
            self.setFixedSize(self.remote_size())
        else:
            self.setMinimumSize(1, 1)
            self.setMaximumSize(16_777_215, 16_777_215)
        self.updateGeometry()
        self.update()

    def _target(self) -> QRect:
        size = self.remote_size()
        if not self.fit or not size.width():
            return QRect(0, 0, size.width(), size.height())
        scaled = size.scaled(self.size(), Qt.KeepAspectRatio)
        return QRect((self.width() - scaled.width()) // 2, (self.height() - scaled.height()) // 2,
                     scaled.width(), scaled.height())

    def set_paused(self, text: str | None) -> None:
        """Mark the picture as paused with ``text`` (translated by the caller), or unmark it."""
        self.paused_text = text
        self.update()

    def screen_changed(self, rects=None) -> None:
        """New pixels arrived (``rects``: remote (x, y, w, h) areas; None: everything)."""
        if not self.fit and self.size() != self.remote_size():
            self.setFixedSize(self.remote_size())
        size = self.remote_size()
        if rects is None or size != self._shown_size:   # resized: the borders change too
            self._shown_size = size
            self.update()
            return
        if len(rects) > 8:   # one repaint of the area they span, not a call per rect
            x0 = min(r[0] for r in rects)
            y0 = min(r[1] for r in rects)
            x1 = max(r[0] + r[2] for r in rects)
            y1 = max(r[1] + r[3] for r in rects)
            rects = [(x0, y0, x1 - x0, y1 - y0)]
        for x, y, w, h in rects:
            self.update(self._on_widget(x, y, w, h) if self.fit else QRect(x, y, w, h))

    def _on_widget(self, x: int, y: int, w: int, h: int) -> QRect:
        """A remote area in widget pixels when fit to the window (a pixel more on each side:
        smooth scaling blends neighbours), so only what changed is scaled and repainted."""
        target, size = self._target(), self.remote_size()
        if not size.width() or not size.height():
            return self.rect()
        sx, sy = target.width() / size.width(), target.height() / size.height()
        left, top = int(target.x() + x * sx) - 2, int(target.y() + y * sy) - 2
        right = int(target.x() + (x + w) * sx) + 3
        bottom = int(target.y() + (y + h) * sy) + 3
        return QRect(left, top, right - left, bottom - top)

    def paintEvent(self, event) -> None:  # noqa: N802
        painter = QPainter(self)
        target = self._target()
        # black only around the picture (filling under it too cost a full-screen fill a paint)
        for area in QRegion(event.rect()).subtracted(QRegion(target)):
            painter.fillRect(area, Qt.black)
        with self.lock:
            fb = self.framebuffer()
            if fb.size:
                if fb.shape[2] != 4 or fb.strides[1:] != (4, 1):
                    fb = np.ascontiguousarray(fb)
                image = QImage(fb.data, fb.shape[1], fb.shape[0], fb.strides[0],
                               QImage.Format_RGB32 if fb.shape[2] == 4 else QImage.Format_RGB888)
                painter.setRenderHint(QPainter.SmoothPixmapTransform, self.fit)
                painter.drawImage(target, image)
                self.frames_painted += 1
        if self.paused_text:
            self._paint_paused(painter)
        painter.end()

    def _paint_paused(self, painter: QPainter) -> None:
        """The last picture, dimmed, and a band with the mark across the visible part."""
        visible = self.visibleRegion().boundingRect()
        painter.fillRect(visible, QColor(0, 0, 0, 110))
        font = painter.font()
        font.setPointSizeF(max(font.pointSizeF(), 9.0) * 1.6)
        font.setBold(True)
        painter.setFont(font)
        band = QRect(visible.x(), visible.center().y() - 32, visible.width(), 64)
        painter.fillRect(band, QColor(255, 243, 205))
        painter.setPen(QColor(0x5d, 0x40, 0x37))
        painter.drawText(band, Qt.AlignCenter | Qt.TextWordWrap, self.paused_text)

    # --- input ---------------------------------------------------------------------------------
    def _remote_point(self, pos) -> tuple[int, int] | None:
        target, size = self._target(), self.remote_size()
        if not target.width() or not target.height():
            return None
        x = (pos.x() - target.x()) * size.width() / target.width()
        y = (pos.y() - target.y()) * size.height() / target.height()
        x = min(max(int(x), 0), size.width() - 1)
        y = min(max(int(y), 0), size.height() - 1)
        return x, y

    def _buttons(self, buttons) -> int:
        mask = 0
        if buttons & Qt.LeftButton:
            mask |= 1
        if buttons & Qt.MiddleButton:
            mask |= 2
        if buttons & Qt.RightButton:
            mask |= 4
        return mask

    def _pointer(self, event, mask: int) -> None:
        if not self.input_enabled():
            return
        point = self._remote_point(event.position().toPoint())
        if point is not None:
            self._mask = mask
            self.send_pointer(mask, *point)

    def mousePressEvent(self, event) -> None:  # noqa: N802
        self.setFocus()
        self._pointer(event, self._buttons(event.buttons()))

    def mouseReleaseEvent(self, event) -> None:  # noqa: N802
        self._pointer(event, self._buttons(event.buttons()))

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        self._pointer(event, self._buttons(event.buttons()))

    def wheelEvent(self, event) -> None:  # noqa: N802
        if not self.input_enabled():
            return
        point = self._remote_point(event.position().toPoint())
        if point is None:
            return
        bit = 8 if event.angleDelta().y() > 0 else 16   # buttons 4/5: the wheel
        self.send_pointer(self._mask | bit, *point)
        self.send_pointer(self._mask, *point)

    def keyPressEvent(self, event) -> None:  # noqa: N802
        if not self.input_enabled():
            return
        keysym = keysym_of(event.key(), event.text())
        if keysym is None:
            return
        self._pressed[event.nativeScanCode() or event.key()] = keysym
        self.send_key(True, keysym)

    def keyReleaseEvent(self, event) -> None:  # noqa: N802
        if event.isAutoRepeat() or not self.input_enabled():
            return
        keysym = self._pressed.pop(event.nativeScanCode() or event.key(), None)
        if keysym is not None:
            self.send_key(False, keysym)

    def focusNextPrevChild(self, _next: bool) -> bool:  # noqa: N802
        return False   # Tab goes to the remote screen, not to the next widget

    def focusOutEvent(self, event) -> None:  # noqa: N802
        # keys held when the window lost the focus would stay down on the remote side
        for keysym in self._pressed.values():
            if self.input_enabled():
                self.send_key(False, keysym)
        self._pressed.clear()
        super().focusOutEvent(event)

    def send_keys(self, keysyms: tuple[int, ...]) -> None:
        """Press ``keysyms`` together and release them (e.g. Ctrl+Alt+Del from a menu)."""
        if not self.input_enabled():
            return
        for keysym in keysyms:
            self.send_key(True, keysym)
        for keysym in reversed(keysyms):
            self.send_key(False, keysym)


def scrollable(widget: FramebufferWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidget(widget)
    area.setWidgetResizable(True)
    area.setAlignment(Qt.AlignCenter)
    return area


class RemoteScreenWindow(QWidget):
    """The other side's screen in a window of its own, for the apps whose person usually shows
    (customer, host): after a direction change the supporter's screen appears here.  Input goes
    out only while ``input_enabled`` (the session holds *control*)."""

    def __init__(self, title: str, framebuffer: Callable[[], np.ndarray],
                 pointer: Callable[[int, int, int], Any], key: Callable[[bool, int], Any],
                 input_enabled: Callable[[], bool], lock: Any = None) -> None:
        from PySide6.QtWidgets import QVBoxLayout
        super().__init__(None, Qt.Window)
        self.setWindowTitle(title)
        self.viewer = FramebufferWidget(framebuffer, pointer, key, input_enabled, lock=lock)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.viewer)
        size = self.viewer.remote_size()
        self.resize(min(size.width(), 1280) or 800, min(size.height(), 800) or 600)


class RemoteScreenDelegate:
    """The session-delegate calls about the remote screen for a window that shows it in a
    ``RemoteScreenWindow``; the window provides ``_screen_runner()`` and ``_screen_title()``
    (translated) and ``_paused_text()`` (translated)."""

    remote_window: RemoteScreenWindow | None = None

    def remote_screen(self, screen) -> None:
        runner = self._screen_runner()
        self.remote_screen_closed()
        self.remote_window = RemoteScreenWindow(
            self._screen_title(), lambda: screen.protocol.pixels, runner.pointer,
            runner.key, lambda: not runner.done.called and runner.consent.holds("control"),
            lock=screen.protocol.framebuffer_lock)
        self.remote_window.show()

    def screen_updated(self, rects) -> None:
        if self.remote_window is not None:
            self.remote_window.viewer.screen_changed(rects)

    def screen_paused(self, paused: bool) -> None:
        runner = self._screen_runner()
        if self.remote_window is not None and runner is not None \
                and not runner.consent.is_presenter:
            self.remote_window.viewer.set_paused(self._paused_text() if paused else None)

    def remote_screen_closed(self) -> None:
        if self.remote_window is not None:
            self.remote_window.close()
            self.remote_window.deleteLater()
            self.remote_window = None
