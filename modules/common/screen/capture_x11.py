"""Screen capture for the showing side: frames as numpy arrays, damage by tiles, scroll moves.

``ScreenSource`` is the X11 backend (``mss`` for pixels, ``python-xlib`` for windows and the
cursor).  Other platforms add a class with the same small interface (``size()``, ``capture()``,
the option attributes) — see ``CaptureBackend``.  Every method here blocks (X round trips); the
Twisted adapter calls ``capture()`` through ``protocol.runtime.run_blocking``.

Options the showing side controls:

* ``window``: share one window (X window id, or a title matched exactly, then as a substring)
  instead of the whole screen; the frame is that window's on-screen rectangle, clipped to the
  screen, and its size follows the window (the RFB server announces size changes).
* ``paused``: ``capture()`` returns the last frame with no damage (the viewer sees a still image).
* ``hide_background``: best effort — pixels of the root window not covered by a mapped top-level
  window (its bounding rectangle; shaped windows are treated as rectangles) are filled with
  ``background_colour``.  With a window manager, top-level windows are its frames, so this hides
  the wallpaper and desktop icons drawn on the root window, not icons drawn by a desktop window
  (e.g. a file manager's desktop, which is itself a top-level window).
"""

from __future__ import annotations

import select
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from modules.common.screen.rfb_server import Cursor, Move, Rect

__all__ = ["ScreenSource", "Capture", "CaptureBackend", "DamageTracker", "WindowInfo", "tile_damage",
           "find_scroll", "ChangeWatch"]

TILE = 64


@dataclass
class Capture:
    """One captured frame (H×W×4 BGRX as X11 delivers it; ``rfb_server.as_rgb`` gives an RGB
    view), what changed since the previous one, and the cursor."""
    frame: np.ndarray
    damage: list[Rect]
    moves: list[Move] = field(default_factory=list)
    cursor: Cursor | None = None


@dataclass(frozen=True)
class WindowInfo:
    """One top-level window the showing side may share: its id (what ``select_window`` and
    ``--window`` take), its title and where it is on the screen."""
    id: int
    title: str
    rect: Rect

    def line(self) -> str:
        """How ``--list-windows`` prints it: id, geometry, title."""
        r = self.rect
        return f"0x{self.id:08x}  {r.w}x{r.h}+{r.x}+{r.y}  {self.title}"


class CaptureBackend(Protocol):
    paused: bool
    hide_background: bool

    def size(self) -> tuple[int, int]: ...

    def capture(self, tracker: "DamageTracker | None" = None) -> Capture: ...

    def close(self) -> None: ...


def tile_damage(prev: np.ndarray | None, cur: np.ndarray, tile: int = TILE) -> list[Rect]:
    """Rects (tile-aligned, clipped to the frame) where ``cur`` differs from ``prev``.
    Changed tiles of a tile row are joined into runs; equal runs of consecutive rows merge."""
    h, w = cur.shape[:2]
    if prev is None or prev.shape != cur.shape:
        return [Rect(0, 0, w, h)]
    changed = _changed_tiles(prev, cur, tile)
    th, tw = changed.shape
    rects: list[Rect] = []
    open_runs: dict[tuple[int, int], Rect] = {}
    for ty in range(th):
        row = changed[ty]
        runs = []
        tx = 0
        while tx < tw:
            if row[tx]:
                start = tx
                while tx < tw and row[tx]:
                    tx += 1
                runs.append((start, tx))
            else:
                tx += 1
        next_open: dict[tuple[int, int], Rect] = {}
        for run in runs:
            y0 = ty * tile
            if run in open_runs:
                r = open_runs.pop(run)
                next_open[run] = Rect(r.x, r.y, r.w, r.h + tile)
            else:
                next_open[run] = Rect(run[0] * tile, y0, (run[1] - run[0]) * tile, tile)
        rects.extend(open_runs.values())
        open_runs = next_open
    rects.extend(open_runs.values())
    return [c for c in (r.clip(w, h) for r in rects) if c is not None]


def _changed_tiles(prev: np.ndarray, cur: np.ndarray, tile: int) -> np.ndarray:
    """th×tw booleans: which tiles of ``cur`` differ from ``prev``.  For BGRX frames whose
    width is whole tiles (1920, 1280, 1024, ...), pixels are compared two at a time (uint64)
    and a tile row's 32 results are reduced as four uint64 words: a quarter of the work of
    comparing pixel by pixel, which at 1080p is most of a full-screen change's damage cost."""
    h, w = cur.shape[:2]
    th, tw = -(-h // tile), -(-w // tile)
    if (cur.shape[2] == 4 and cur.flags.c_contiguous and prev.flags.c_contiguous
            and w % tile == 0 and tile % 16 == 0):
        pairs = prev.reshape(h, w * 4).view(np.uint64) != cur.reshape(h, w * 4).view(np.uint64)
        per_row = pairs.view(np.uint64).reshape(h, tw, tile // 16).any(axis=2)
    else:
        if cur.shape[2] == 4 and cur.flags.c_contiguous and prev.flags.c_contiguous:
            diff = prev.view(np.uint32)[..., 0] != cur.view(np.uint32)[..., 0]
        else:
            diff = (prev != cur).any(axis=2)
        padded = np.zeros((h, tw * tile), bool)
        padded[:, :w] = diff
        per_row = padded.reshape(h, tw, tile).any(axis=2)
    rows = np.zeros((th * tile, tw), bool)
    rows[:h] = per_row
    return rows.reshape(th, tile, tw).any(axis=1)


def row_hashes(frame: np.ndarray, area: Rect) -> np.ndarray:
    """One uint64 per row of ``area``, from all its bytes (8 at a time where the row allows):
    equal rows have equal hashes; equal hashes are verified exactly by whoever relies on them.
    About 0.6 ms for a 1080p frame (every 7th byte widened to uint64, as before: 1.8 ms)."""
    rows = np.ascontiguousarray(frame[area.y:area.y + area.h, area.x:area.x + area.w])
    rows = rows.reshape(area.h, -1)
    width = rows.shape[1]
    if width % 8 == 0:
        words = rows.view(np.uint64)
    else:
        words = (rows.view(np.uint32) if width % 4 == 0 else rows).astype(np.uint64)
    return words @ _hash_weights(words.shape[1])


_weights: dict[int, np.ndarray] = {}


def _hash_weights(n: int) -> np.ndarray:
    """n odd random 64-bit multipliers (products wrap modulo 2**64)."""
    if n not in _weights:
        _weights[n] = np.random.default_rng(7).integers(
            0, 1 << 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    return _weights[n]


def find_scroll(prev: np.ndarray, cur: np.ndarray, area: Rect, max_shift: int = 512,
                hashes: "dict | None" = None) -> Move | None:
    """A vertical scroll of ``area`` between ``prev`` and ``cur`` (e.g. a terminal printing
    lines), as the Move that reproduces most of it, or None.  Rows are compared by hash
    (``row_hashes``); ``hashes`` (frame id and area → hashes) keeps them for the next frame, so
    each frame's rows are hashed once, not again when it becomes ``prev``."""
    if area.h < 32:
        return None
    ha = _cached_hashes(hashes, prev, area)
    hb = _cached_hashes(hashes, cur, area)
    # candidate shifts from rows that occur once in prev (uniform rows say nothing)
    vals, idx, counts = np.unique(ha, return_index=True, return_counts=True)
    unique_rows = dict(zip(vals[counts == 1].tolist(), idx[counts == 1].tolist()))
    votes: dict[int, int] = {}
    for y, v in enumerate(hb.tolist()):
        src = unique_rows.get(v)
        if src is not None and src != y and abs(src - y) <= max_shift:
            votes[src - y] = votes.get(src - y, 0) + 1
    if not votes:
        return None
    dy, n = max(votes.items(), key=lambda kv: kv[1])
    if n < 4:
        return None
    # the longest band of rows where cur[y] == prev[y + dy]
    ys = np.arange(max(0, -dy), min(area.h, area.h - dy))
    same = hb[ys] == ha[ys + dy]
    best, start, run_start = (0, 0), None, None
    for i, s in enumerate(same.tolist()):
        if s and run_start is None:
            run_start = i
        if (not s or i == len(same) - 1) and run_start is not None:
            end = i + 1 if s else i
            if end - run_start > best[1] - best[0]:
                best = (run_start, end)
            run_start = None
    length = best[1] - best[0]
    if length < 16:
        return None
    y0 = int(ys[best[0]])
    # verify exactly (hash collisions)
    x0, x1 = area.x, area.x + area.w
    if not np.array_equal(cur[area.y + y0:area.y + y0 + length, x0:x1],
                          prev[area.y + y0 + dy:area.y + y0 + dy + length, x0:x1]):
        return None
    return Move(area.x, area.y + y0 + dy, area.x, area.y + y0, area.w, length)


def _cached_hashes(cache: "dict | None", frame: np.ndarray, area: Rect) -> np.ndarray:
    if cache is None:
        return row_hashes(frame, area)
    key = (id(frame), area)
    if key not in cache:
        cache[key] = row_hashes(frame, area)
    return cache[key]


class DamageTracker:
    """What changed between the frames one viewer has seen: tile damage and vertical scrolls.
    A scroll's destination band is taken out of the damage (CopyRect reproduces it exactly)."""

    def __init__(self, detect_scroll: bool = True):
        self.detect_scroll = detect_scroll
        self.prev: np.ndarray | None = None
        self._hashes: dict = {}      # (id of prev, area) → row hashes, for the next update

    def update(self, frame: np.ndarray) -> tuple[list[Rect], list[Move]]:
        prev, self.prev = self.prev, frame
        # row hashes of prev, computed when it was the new frame (its id is not reused while
        # this tracker holds it); those of this frame are kept for the next update
        hashes = {key: value for key, value in self._hashes.items() if key[0] == id(prev)}
        self._hashes = {}
        damage = tile_damage(prev, frame)
        if not self.detect_scroll or prev is None or prev.shape != frame.shape:
            return damage, []
        moves: list[Move] = []
        out: list[Rect] = []
        for r in damage:
            m = find_scroll(prev, frame, r, hashes=hashes) if r.w * r.h >= 64 * 256 else None
            if m is None:
                out.append(r)
                continue
            moves.append(m)
            if m.y > r.y:
                out.append(Rect(r.x, r.y, r.w, m.y - r.y))
            if m.y + m.h < r.y + r.h:
                out.append(Rect(r.x, m.y + m.h, r.w, r.y + r.h - m.y - m.h))
        self._hashes = {key: value for key, value in hashes.items() if key[0] == id(frame)}
        return out, moves


class ChangeWatch:
    """Calls ``on_change()`` (from its own thread) when the X server reports that pixels of the
    screen changed (DAMAGE on the root window, which covers every window) or that the cursor
    image changed (XFixes), so the RFB server can capture right after a change instead of
    polling a still screen.  Own X connection and daemon thread; ``stop()`` ends both within a
    quarter of a second.  If the connection fails, ``failed`` is set and ``on_change`` called
    once more (the caller goes back to polling).  Raises ``LookupError`` without DAMAGE, and
    while a compositing manager runs (it owns ``_NET_WM_CM_S0``): what is on the screen is then
    drawn by the compositor, and root-window damage is not a reliable report of it (x11vnc
    advises ``-noxdamage`` for the same reason), so such a screen is polled."""

    def __init__(self, display: str, on_change: Callable[[], None]):
        from Xlib import X
        from Xlib import display as xdisplay
        from Xlib.ext import damage, xfixes
        x = xdisplay.Display(display)
        if not x.has_extension("DAMAGE"):
            x.close()
            raise LookupError(f"{display} has no DAMAGE extension")
        screen_number = x.get_default_screen()
        if x.get_selection_owner(x.intern_atom(f"_NET_WM_CM_S{screen_number}")) != X.NONE:
            x.close()
            raise LookupError(f"{display} has a compositing manager")
        x.damage_query_version()
        root = x.screen().root
        self._damage = root.damage_create(damage.DamageReportNonEmpty)
        if x.has_extension("XFIXES"):
            x.xfixes_query_version()
            x.xfixes_select_cursor_input(root, xfixes.XFixesDisplayCursorNotifyMask)
        x.flush()
        self._x = x
        self._on_change = on_change
        self._stop = threading.Event()
        self.failed = False
        self.changes = 0
        self._thread = threading.Thread(target=self._run, name="x-change-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        x = self._x
        try:
            while not self._stop.is_set():
                select.select([x], [], [], 0.25)
                changed = False
                while x.pending_events():
                    event = x.next_event()
                    if type(event).__name__ == "DamageNotify":
                        x.damage_subtract(self._damage)    # report the next change again
                        changed = True
                    elif type(event).__name__ == "DisplayCursorNotify":
                        changed = True
                if changed and not self._stop.is_set():
                    x.flush()
                    self.changes += 1
                    self._on_change()
        except Exception:          # the display went away: the caller polls instead
            self.failed = True
            if not self._stop.is_set():
                self._on_change()
        finally:
            try:
                x.close()
            except Exception:
                pass

    def stop(self) -> None:
        self._stop.set()


class ScreenSource:
    """X11 screen (or one window) of ``display`` via mss; see the module docstring."""

    def __init__(self, display: str = ":99", *, window: int | str | None = None,
                 hide_background: bool = False,
                 background_colour: tuple[int, int, int] = (0x2E, 0x34, 0x40),
                 detect_scroll: bool = True, with_cursor: bool = True):
        self.display_name = display
        self.paused = False
        self.hide_background = hide_background
        self.background_colour = background_colour
        self.detect_scroll = detect_scroll
        self._lock = threading.RLock()
        self._with_cursor = with_cursor
        self._mss = self._x = self._root = None
        self._xfixes = False
        self._window: int | None = None
        self._last: np.ndarray | None = None
        self._tracker = DamageTracker(detect_scroll)
        self._cursor: Cursor | None = None
        self._cursor_serial: int | None = None
        self._open()              # a display that cannot be opened is an error now, not later
        if window is not None:
            self.select_window(window)

    def _open(self) -> None:
        """Connect to the display (mss with its shared memory, python-xlib) unless connected."""
        with self._lock:
            if self._mss is not None:
                return
            import mss
            from Xlib import display as xdisplay
            grabber = mss.MSS(display=self.display_name)
            try:
                x = xdisplay.Display(self.display_name)
            except Exception:
                grabber.close()
                raise
            self._mss, self._x, self._root = grabber, x, x.screen().root
            self._xfixes = self._with_cursor and x.has_extension("XFIXES")
            if self._xfixes:
                x.xfixes_query_version()
            self._cursor_serial = None

    @property
    def holds_display(self) -> bool:
        """True while the source holds its X connections and shared memory (not ``connected``:
        the session runner reads that as a local VNC server to connect to first)."""
        return self._mss is not None

    # ------------------------------------------------------------------------------ options
    @property
    def selected_window(self) -> int | None:
        """The window shared now (None: the whole screen)."""
        return self._window

    def select_window(self, window: int | str | None) -> None:
        """Share one window (id or title) or, with None, the whole screen again."""
        with self._lock:
            if window is None or isinstance(window, int):
                self._window = window
            else:
                self._window = self._find_window(window)
            self._last = None

    def windows(self) -> list[WindowInfo]:
        """The mapped top-level windows with a title, in stacking order (bottom first) — what
        a person picks from to share one window (blocking: X round trips)."""
        with self._lock:
            return [WindowInfo(w.id, name, rect)
                    for w, name, rect in self._toplevels(mapped_only=True, with_names=True)
                    if name]

    def _find_window(self, title: str) -> int:
        candidates = []
        for w in self._toplevels(mapped_only=False, with_names=True):
            name = w[1] or ""
            if name == title:
                return w[0].id
            if title in name:
                candidates.append(w[0].id)
        if candidates:
            return candidates[0]
        raise LookupError(f"no window titled {title!r} on {self.display_name}")

    def _toplevels(self, mapped_only: bool = True, with_names: bool = False):
        """(window, name, Rect) for the root's children and, one level down, their children
        with a name (window-manager frames hold the client window)."""
        from Xlib import X
        self._open()
        out = []
        for child in self._root.query_tree().children:
            try:
                attrs = child.get_attributes()
                if mapped_only and attrs.map_state != X.IsViewable:
                    continue
                g = child.get_geometry()
                rect = Rect(g.x, g.y, g.width + 2 * g.border_width, g.height + 2 * g.border_width)
                name = None
                if with_names:
                    name = child.get_wm_name()
                    if not name:
                        for sub in child.query_tree().children:
                            sub_name = sub.get_wm_name()
                            if sub_name:
                                out.append((sub, sub_name, rect))
                out.append((child, name, rect))
            except Exception:   # the window vanished meanwhile (BadWindow): skip it
                continue
        return out

    def watch_changes(self, on_change: Callable[[], None]) -> ChangeWatch | None:
        """A ``ChangeWatch`` on this display, or None where the X server cannot report changes
        (then the caller polls)."""
        try:
            return ChangeWatch(self.display_name, on_change)
        except Exception:
            return None

    def origin(self) -> tuple[int, int]:
        """Top-left of the shared area on the screen: where a viewer's (0, 0) points."""
        area = self._area()
        return area.x, area.y

    # ------------------------------------------------------------------------------ capture
    def size(self) -> tuple[int, int]:
        area = self._area()
        return area.w, area.h

    def _area(self) -> Rect:
        self._open()
        mon = self._mss.monitors[0]
        screen = Rect(mon["left"], mon["top"], mon["width"], mon["height"])
        if self._window is None:
            return screen
        win = self._x.create_resource_object("window", self._window)
        g = win.get_geometry()
        pos = win.translate_coords(self._root, 0, 0)
        r = Rect(-pos.x, -pos.y, g.width, g.height).clip(screen.w, screen.h)
        return r or Rect(0, 0, 1, 1)

    def grab(self) -> np.ndarray:
        """The current pixels of the shared area, H×W×4 BGRX (blocking)."""
        with self._lock:
            area = self._area()
            shot = self._mss.grab({"left": area.x, "top": area.y, "width": area.w,
                                   "height": area.h})
        raw = shot.raw           # a fresh bytearray of this grab: the frame uses it, no copy
        if len(raw) == shot.height * shot.width * 4:
            frame = np.frombuffer(raw, np.uint8).reshape(shot.height, shot.width, 4)
        else:
            frame = np.array(shot, dtype=np.uint8, copy=True)
        if self.hide_background:
            self._fill_background(frame, area)
        return frame

    def _fill_background(self, frame: np.ndarray, area: Rect) -> None:
        covered = np.zeros(frame.shape[:2], bool)
        for _win, _name, r in self._toplevels():
            c = r.intersect(area)
            if c is not None:
                covered[c.y - area.y:c.y - area.y + c.h, c.x - area.x:c.x - area.x + c.w] = True
        r, g, b = self.background_colour
        frame[~covered] = (b, g, r, 255)

    def cursor(self) -> Cursor | None:
        """The current cursor image (XFixes), cached by its serial."""
        self._open()
        if not self._xfixes:
            return None
        img = self._x.xfixes_get_cursor_image(self._root)
        if img.cursor_serial != self._cursor_serial or self._cursor is None:
            argb = np.array(img.cursor_image, dtype=np.uint32).reshape(img.height, img.width)
            rgba = np.stack([(argb >> 16) & 0xFF, (argb >> 8) & 0xFF, argb & 0xFF,
                             argb >> 24], axis=2).astype(np.uint8)
            self._cursor = Cursor(img.xhot, img.yhot, rgba)
            self._cursor_serial = img.cursor_serial
        return self._cursor

    def capture(self, tracker: "DamageTracker | None" = None) -> Capture:
        """Grab a frame and compare it with what ``tracker`` saw last (blocking).  Each viewer
        has its own tracker; without one, the source's own tracker is used."""
        with self._lock:
            tracker = tracker or self._tracker
            if self.paused and self._last is not None:
                frame = self._last
            else:
                frame = self._last = self.grab()
            damage, moves = tracker.update(frame)
            return Capture(frame, damage, moves, self.cursor())

    def close(self) -> None:
        """Release the X connections and the shared memory of the grabs; a later call that needs
        the display (a new session's first capture, ``windows()``) connects again."""
        with self._lock:
            grabber, x = self._mss, self._x
            self._mss = self._x = self._root = None
            self._last = None
            if grabber is not None:
                grabber.close()
            if x is not None:
                x.close()

    def disconnect(self) -> None:
        """What the session calls when its screen stops (session end, view withdrawn, direction
        change): nothing of the display is held between sessions."""
        self.close()
