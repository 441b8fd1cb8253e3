"""Input reaches the shown screen only while *control* is granted: the one check every injector
(XTest on an X display, events to a local VNC server) makes before each pointer or key event.

A refused event releases whatever the viewer still holds, so a revoked control never leaves a key
or button down; refusals are logged at 1, 2, 4, 8, … so a viewer that keeps typing cannot flood
the log.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

log = Logger()


class ControlGate:
    """Base of the injectors: ``allowed()`` says whether control is granted right now."""

    def __init__(self, allowed: Callable[[], bool]) -> None:
        self.allowed = allowed
        self.refused = 0

    def _check(self, what: str) -> bool:
        if self.allowed():
            return True
        self.refused += 1
        if self.refused & (self.refused - 1) == 0:
            log.warn("input: {what} dropped, remote control is not granted "
                     "(refusal {count})", what=what, count=self.refused)
        self.release_all()
        return False

    def release_all(self) -> None:
        """Release every key and button the viewer still holds on this screen."""
        raise NotImplementedError
