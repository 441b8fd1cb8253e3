"""Pointer and key injection into an X display through XTest, only while control is granted.

``XTestInjector`` turns RFB ``PointerEvent``/``KeyEvent`` into XTest fake input.  Keys come as
X11 keysyms (RFC 6143 §7.5.4); each is mapped to a keycode of the current keyboard mapping, with
Shift pressed around it if a character keysym sits on the shifted level (and held Shift released
around it if it sits on the plain level); function keys keep a held Shift (Ctrl+Shift+Esc).  Keys
and buttons the viewer holds are tracked and released when control is withdrawn or the injector
is closed, so nothing stays stuck.

Every event first asks ``allowed()`` (the session passes
``lambda: driver.enforce(Right.CONTROL, "input")``, which reports refusals itself); a refused
event is dropped and logged (the 1st, 2nd, 4th, ... refusal, so a moving pointer cannot flood the
log).  Calls block on X round trips: keep them short (one event) or run them off the reactor.
"""

from __future__ import annotations

import threading
from typing import Callable

from twisted.logger import Logger

from modules.common.screen.control_gate import ControlGate

__all__ = ["XTestInjector"]

log = Logger()

_SHIFT_KEYSYMS = (0xFFE1, 0xFFE2)     # Shift_L, Shift_R


def _is_printable(keysym: int) -> bool:
    """Keysyms that stand for a character (Latin-1 and the other character sets below the
    function-key range 0xFF00, and Unicode keysyms): for these the keysym already says whether
    the character is shifted, so Shift is pressed or released to match.  Function and modifier
    keys are pressed as they come, with whatever Shift the viewer holds."""
    return keysym < 0xFF00 or keysym >= 0x01000000


class XTestInjector(ControlGate):
    def __init__(self, display: str, allowed: Callable[[], bool], *,
                 origin: Callable[[], tuple[int, int]] | None = None):
        """``origin``: top-left of the shared area on the screen (a shared window), added to
        pointer coordinates; the whole screen by default."""
        from Xlib import display as xdisplay
        self._d = xdisplay.Display(display)
        if not self._d.has_extension("XTEST"):
            raise RuntimeError(f"display {display} has no XTEST extension")
        super().__init__(allowed)
        self.origin = origin or (lambda: (0, 0))
        self._lock = threading.Lock()
        self._mask = 0
        self._keys: dict[int, int] = {}          # keysym → keycode pressed for it
        self._shift_down: set[int] = set()       # keycodes of Shift keys the viewer holds
        # called (from the calling thread) with the count when a key arrives while no window
        # has the input focus: XTest delivers it, but to no application
        self.on_unfocused: Callable[[int], None] | None = None
        self.unfocused_keys = 0
        self._in_unfocused_run = False

    # ------------------------------------------------------------------------------ events
    def pointer(self, mask: int, x: int, y: int) -> bool:
        """RFB PointerEvent: move, then press/release buttons 1-8 whose bit changed (4/5 are
        the wheel).  True if applied."""
        if not self._check("pointer event"):
            return False
        from Xlib import X
        from Xlib.ext import xtest
        with self._lock:
            ox, oy = self.origin()
            xtest.fake_input(self._d, X.MotionNotify, x=ox + x, y=oy + y)
            changed = mask ^ self._mask
            for bit in range(8):
                if changed & (1 << bit):
                    down = bool(mask & (1 << bit))
                    xtest.fake_input(self._d, X.ButtonPress if down else X.ButtonRelease, bit + 1)
            self._mask = mask
            self._d.sync()
        return True

    def key(self, down: bool, keysym: int) -> bool:
        """RFB KeyEvent.  True if applied (False: refused, or keysym not on the keyboard)."""
        if not self._check("key event"):
            return False
        from Xlib import X
        from Xlib.ext import xtest
        with self._lock:
            if not down:
                keycode = self._keys.pop(keysym, None)
                if keycode is None:
                    return False
                xtest.fake_input(self._d, X.KeyRelease, keycode)
                self._shift_down.discard(keycode)
                self._d.sync()
                return True
            self._note_focus()
            keycode, level = self._lookup(keysym)
            if keycode is None:
                log.info("input: keysym {keysym:#x} is not on the keyboard; dropped", keysym=keysym)
                return False
            if keysym in _SHIFT_KEYSYMS:
                self._shift_down.add(keycode)
                xtest.fake_input(self._d, X.KeyPress, keycode)
            elif not _is_printable(keysym):   # Esc, F-keys, arrows: a held Shift is meant
                xtest.fake_input(self._d, X.KeyPress, keycode)   # (Ctrl+Shift+Esc, Shift+Tab)
            else:
                shift = self._d.keysym_to_keycode(_SHIFT_KEYSYMS[0])
                need_shift = level % 2 == 1
                if need_shift and not self._shift_down:
                    xtest.fake_input(self._d, X.KeyPress, shift)
                    xtest.fake_input(self._d, X.KeyPress, keycode)
                    xtest.fake_input(self._d, X.KeyRelease, shift)
                elif not need_shift and self._shift_down:
                    for sc in self._shift_down:
                        xtest.fake_input(self._d, X.KeyRelease, sc)
                    xtest.fake_input(self._d, X.KeyPress, keycode)
                    for sc in self._shift_down:
                        xtest.fake_input(self._d, X.KeyPress, sc)
                else:
                    xtest.fake_input(self._d, X.KeyPress, keycode)
            self._keys[keysym] = keycode
            self._d.sync()
        return True

    def has_focus(self) -> bool:
        """Whether typed keys reach a window: the input focus is a real window (not None,
        not the root), or PointerRoot with the pointer over a window."""
        from Xlib import X
        root = self._d.screen().root
        focus = self._d.get_input_focus().focus
        if focus in (X.NONE, 0) or focus == root:
            return False
        if focus == X.PointerRoot or focus == 1:
            return bool(root.query_pointer().child)
        return True

    def _note_focus(self) -> None:
        if self.has_focus():
            self._in_unfocused_run = False
            return
        self.unfocused_keys += 1
        if not self._in_unfocused_run and self.on_unfocused is not None:
            self._in_unfocused_run = True   # one notice per run of keys that went nowhere
            self.on_unfocused(self.unfocused_keys)

    def _lookup(self, keysym: int) -> tuple[int | None, int]:
        """(keycode, level) for ``keysym``; the plain level is preferred."""
        best: tuple[int | None, int] = (None, 0)
        for keycode, index in self._d.keysym_to_keycodes(keysym):
            if index in (0, 1) and (best[0] is None or index < best[1]):
                best = (keycode, index)
        if best[0] is None:
            # Latin-1 letters have both cases on one key: the other case's key, other level
            if 0x61 <= keysym <= 0x7A or 0x41 <= keysym <= 0x5A:
                other = keysym ^ 0x20
                code = self._d.keysym_to_keycode(other)
                if code:
                    return code, 1 if keysym < 0x61 else 0
        return best

    # ------------------------------------------------------------------------------ control
    def release_all(self) -> None:
        """Release every key and button the viewer holds (control withdrawn, session ended)."""
        from Xlib import X
        from Xlib.ext import xtest
        with self._lock:
            if not self._keys and not self._mask:
                return
            for keycode in set(self._keys.values()):
                xtest.fake_input(self._d, X.KeyRelease, keycode)
            for bit in range(8):
                if self._mask & (1 << bit):
                    xtest.fake_input(self._d, X.ButtonRelease, bit + 1)
            self._keys.clear()
            self._shift_down.clear()
            self._mask = 0
            self._d.sync()

    def close(self) -> None:
        self.release_all()
        self._d.close()
