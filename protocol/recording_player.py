"""Plays a recording's screen: recorded entries in, framebuffer pictures at given times out.

Sans-I/O: the caller reads the file (``protocol.recording.Reader``) and hands over entries in
order; ``frame_at(t_ms)`` advances the RFB stream up to that time and returns the picture.  The
RFB server→client bytes are decoded by the same ``protocol.rfb_client.RFBClient`` the supporter
uses (the recorded viewer spoke to the presenter with exactly that client, so the pixel format
and encodings match).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from . import recording
from .rfb_client import RFBClient, RFBClientError


class PlaybackError(ValueError):
    """The recorded screen stream cannot be decoded; the message says where."""


class ScreenPlayer:
    def __init__(self) -> None:
        self.client = RFBClient()
        self.t_ms = 0
        self.events: list[tuple[int, dict]] = []
        self.inputs: list[tuple[int, dict]] = []
        self._queue: list[recording.Entry] = []
        self.changed = False  # the picture changed since the caller last looked

    def feed(self, entry: recording.Entry) -> None:
        self._queue.append(entry)

    @property
    def framebuffer(self) -> np.ndarray | None:
        """The picture as ``H x W x 3`` RGB (a view), None before the first."""
        return self.client.framebuffer if self.client.pixels.size else None

    @property
    def pixels(self) -> np.ndarray | None:
        """The picture as the client keeps it, ``H x W x 4`` B G R 255, None before the first."""
        return self.client.pixels if self.client.pixels.size else None

    def advance(self, t_ms: int) -> None:
        """Apply every queued entry up to ``t_ms``."""
        i = 0
        for i, entry in enumerate(self._queue):  # noqa: B007
            if entry.t_ms > t_ms:
                break
            self._apply(entry)
        else:
            i = len(self._queue)
        del self._queue[:i]
        self.t_ms = t_ms

    def _apply(self, entry: recording.Entry) -> None:
        if entry.kind == recording.RFB_OUT:
            try:
                if self.client.receive(entry.payload):
                    self.changed = True
                self.client.data_to_send()  # the handshake's answers go nowhere
            except RFBClientError as exc:
                raise PlaybackError(f"the recorded screen at {entry.t_ms} ms cannot be decoded: "
                                    f"{exc.reason}") from None
        elif entry.kind == recording.EVENT:
            try:
                event = entry.json()
            except ValueError:
                return
            self.events.append((entry.t_ms, event))
            if event.get("kind") == "rfb_restart" and self.client.initialised:
                self.client = RFBClient()  # a new stream (direction change): decode afresh
        elif entry.kind == recording.INPUT:
            try:
                self.inputs.append((entry.t_ms, entry.json()))
            except ValueError:
                pass


def frames(entries: Iterable[recording.Entry], fps: float, end_ms: int | None = None,
           bgrx: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """``(t_ms, RGB picture)`` (``bgrx``: ``H x W x 4`` B G R 255, no conversion) on a 1/fps grid from the first picture on, but only where the
    picture changed (a still screen costs nothing), and always the last one at the end (so a
    player shows the right duration)."""
    player = ScreenPlayer()
    step = 1000.0 / fps

    def picture() -> np.ndarray:
        return player.pixels if bgrx else player.framebuffer

    n = 0
    last_t = 0
    shown = False

    def due(t: int):
        nonlocal shown
        player.advance(t)
        if player.pixels is not None and (player.changed or not shown):
            player.changed = False
            shown = True
            return t, picture()
        return None

    for entry in entries:
        last_t = max(last_t, entry.t_ms)
        while n * step < entry.t_ms:
            frame = due(int(n * step))
            if frame is not None:
                yield frame
            n += 1
        player.feed(entry)
    stop = last_t if end_ms is None else end_ms
    while n * step <= stop:
        frame = due(int(n * step))
        if frame is not None:
            yield frame
        n += 1
    player.advance(stop)
    if player.pixels is not None:
        yield max(stop, int((n - 1) * step)) if shown else stop, picture()
