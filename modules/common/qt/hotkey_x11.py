"""Ctrl+F12 anywhere on an X display: the customer's emergency stop also works while another
window (or the supporter's remote control) has the keyboard.  ``XGrabKey`` on the root window
with every combination of Caps Lock and Num Lock; a daemon thread waits for the key and hands
it to ``callback`` (which must be thread-safe, e.g. ``reactor.callFromThread``)."""

from __future__ import annotations

import threading
from typing import Callable


class GlobalHotkey:
    def __init__(self, display: str, callback: Callable[[], None]) -> None:
        from Xlib import X, XK
        from Xlib import display as xdisplay
        self._X = X
        self._d = xdisplay.Display(display)
        self._root = self._d.screen().root
        self.callback = callback
        self.keycode = self._d.keysym_to_keycode(XK.string_to_keysym("F12"))
        self.modifiers = [X.ControlMask | extra
                          for extra in (0, X.LockMask, X.Mod2Mask, X.LockMask | X.Mod2Mask)]
        for mods in self.modifiers:
            self._root.grab_key(self.keycode, mods, True, X.GrabModeAsync, X.GrabModeAsync)
        self._d.sync()
        self._closed = False
        self._thread = threading.Thread(target=self._wait, name="hotkey-x11", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        while not self._closed:
            try:
                event = self._d.next_event()
            except Exception:      # the display was closed
                return
            if event.type == self._X.KeyPress and event.detail == self.keycode:
                self.callback()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for mods in self.modifiers:
                self._root.ungrab_key(self.keycode, mods)
            self._d.flush()
            self._d.close()
        except Exception:
            pass
