"""When a module tries its server again after losing it (sans-I/O: clock and random source
passed in): full-jitter back-off, and a clean shutdown's notice honoured so a planned restart
does not grow every module's back-off towards the cap.  The host's presence and the supporter's
host list both wait by it."""

from __future__ import annotations

import math
import random
from typing import Callable


#: bounds on what a server's going-away notice may ask of a module (seconds)
MAX_NOTICE_BACK_IN = 600.0
MAX_NOTICE_SPREAD = 600.0


class ReconnectSchedule:
    """How long a module waits before its next connection attempt (sans-I/O: clock and random
    source passed in).

    ``failed()`` after every attempt that did not end registered; ``registered()`` when one
    did; ``going_away(back_in, spread)`` when the server announced a clean shutdown; ``busy()``
    when the server took the connection but dropped it before answering ``Hello`` (it is up but
    overwhelmed).  ``delay()`` is asked once per wait."""

    def __init__(self, now: Callable[[], float], base: float = 1.0, cap: float = 60.0,
                 rand: Callable[[float, float], float] = random.uniform) -> None:
        self.now = now
        self.base = base
        self.cap = cap
        self.rand = rand
        self.failures = 0
        #: (moment the server expects to listen again, spread), until the first wait after it
        self.notice: tuple[float, float] | None = None
        #: the spread of the last notice, until a registration: the scale a busy server asked for
        self.spread = 0.0

    def registered(self) -> None:
        self.failures = 0
        self.spread = 0.0

    def busy(self) -> None:
        """After a notice, a server that drops connections before ``Hello`` is starting up with
        more hosts than it can take: the back-off goes on at the notice's spread rather than
        from one second (measured: 5,000 hosts retrying at 1, 2, 4 s kept a CPU-starved server
        from finishing any handshake in time, bench/README.md)."""
        if self.spread > 0:
            self.failures = max(self.failures, math.ceil(math.log2(max(1.0, self.spread / self.base))))

    def failed(self) -> None:
        self.failures += 1

    def going_away(self, back_in: float, spread: float) -> bool:
        """Remember a clean shutdown's notice; False (ignored) if its numbers make no sense."""
        if not (math.isfinite(back_in) and math.isfinite(spread)) or back_in < 0 or spread < 0:
            return False
        self.notice = (self.now() + min(back_in, MAX_NOTICE_BACK_IN),
                       min(spread, MAX_NOTICE_SPREAD))
        self.spread = self.notice[1]
        return True

    def delay(self) -> float:
        if self.notice is not None:  # the wait right after a clean shutdown: no back-off yet
            back_at, spread = self.notice
            self.notice = None
            self.failures = 0
            return min(self.cap, max(0.0, back_at - self.now()) + self.rand(0.0, spread))
        return self.rand(0.0, min(self.cap, self.base * 2 ** min(self.failures, 32)))
