"""Ctrl+C in a module CLI: during a session it is that session's emergency stop; a second
Ctrl+C, or one while no session runs, stops the program (``reactor.stop``, as Twisted would).

So ``hausmeister-host run`` stays online after the person at the host stopped one session, and
the session's end is reported and told to the peer before anything is torn down.

Ctrl+Z (SIGTSTP) pauses the screen this side shows, and resumes it the next time; it does not
suspend the program (a suspended module would hold the session open without a word).
"""

from __future__ import annotations

import signal
from typing import Callable

_installed: dict[int, "Interrupts"] = {}


class Interrupts:
    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._session_stop: Callable[[], None] | None = None
        self._toggle_pause: Callable[[], object] | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._signal)
        signal.signal(signal.SIGTSTP, self._pause_signal)

    def session(self, stop: Callable[[], None] | None,
                toggle_pause: Callable[[], object] | None = None) -> None:
        """The running session's emergency stop and pause key (None: no session runs)."""
        self._session_stop = stop
        self._toggle_pause = toggle_pause

    def _pause_signal(self, _number, _frame) -> None:
        self.reactor.callFromThread(self._pause)

    def _pause(self) -> None:
        if self._toggle_pause is not None:
            self._toggle_pause()

    def _signal(self, _number, _frame) -> None:
        self.reactor.callFromThread(self._interrupt)

    def _interrupt(self) -> None:
        stop, self._session_stop = self._session_stop, None
        if stop is not None:
            stop()
        elif self.reactor.running:
            self.reactor.stop()


def interrupts(reactor) -> Interrupts:
    """The process's one handler (installed on first use; the reactor must be running)."""
    handler = _installed.get(id(reactor))
    if handler is None:
        handler = _installed[id(reactor)] = Interrupts(reactor)
        handler.install()
    return handler
