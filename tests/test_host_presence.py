"""The host's reconnect schedule (``modules.common.link.reconnect.ReconnectSchedule``): full jitter
after failures, and after a clean shutdown's notice a first attempt when the server is back,
with the back-off started afresh.  Clock and random source are passed in; no reactor, no sleep."""

from __future__ import annotations

import math

from hypothesis import given, strategies as st

from modules.common.link.reconnect import MAX_NOTICE_BACK_IN, ReconnectSchedule


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def highest(lo: float, hi: float) -> float:
    return hi  # the upper end of every random draw


def waits(schedule: ReconnectSchedule, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(schedule.delay())
        schedule.failed()
    return out


def test_failures_grow_the_back_off_to_the_cap_and_a_registration_resets_it():
    schedule = ReconnectSchedule(Clock(), base=1.0, cap=60.0, rand=highest)
    assert waits(schedule, 8) == [1, 2, 4, 8, 16, 32, 60, 60]
    schedule.registered()
    assert waits(schedule, 2) == [1, 2]


def test_a_clean_shutdown_notice_means_back_in_plus_spread_then_a_fresh_back_off():
    clock = Clock()
    schedule = ReconnectSchedule(clock, base=1.0, cap=60.0, rand=highest)
    waits(schedule, 6)  # refused six times: the next wait would be the cap
    assert schedule.going_away(back_in=5.0, spread=40.0)
    clock.t += 2.0  # the connection closes two seconds after the notice
    assert schedule.delay() == 3.0 + 40.0
    schedule.failed()  # the server was not back yet: a short wait, not the cap
    assert waits(schedule, 3) == [2, 4, 8]


def test_the_first_wait_after_a_notice_starts_at_back_in_and_stays_within_the_spread():
    clock = Clock()
    draws = []
    schedule = ReconnectSchedule(clock, rand=lambda lo, hi: draws.append((lo, hi)) or lo)
    schedule.going_away(back_in=5.0, spread=4.0)
    assert schedule.delay() == 5.0
    assert draws == [(0.0, 4.0)]


def test_a_busy_server_after_a_notice_keeps_the_back_off_at_the_notices_spread():
    schedule = ReconnectSchedule(Clock(), base=1.0, cap=60.0, rand=highest)
    schedule.going_away(back_in=5.0, spread=12.5)
    assert schedule.delay() == 5.0 + 12.5
    schedule.failed()
    schedule.busy()  # connected, then dropped before Hello: not from one second again
    assert waits(schedule, 3) == [16, 32, 60]
    schedule.registered()
    schedule.busy()  # without a notice since the last registration: plain back-off
    assert waits(schedule, 2) == [1, 2]


def test_the_hosts_own_cap_bounds_what_a_notice_asks():
    schedule = ReconnectSchedule(Clock(), cap=0.5, rand=highest)
    schedule.going_away(back_in=5.0, spread=2.0)
    assert schedule.delay() == 0.5


@given(back_in=st.floats(allow_nan=True, allow_infinity=True),
       spread=st.floats(allow_nan=True, allow_infinity=True))
def test_any_notice_gives_a_finite_wait_within_bounds(back_in, spread):
    schedule = ReconnectSchedule(Clock(), cap=1e9, rand=highest)
    accepted = schedule.going_away(back_in, spread)
    wait = schedule.delay()
    assert math.isfinite(wait) and 0 <= wait <= 2 * MAX_NOTICE_BACK_IN + 1
    assert accepted == (math.isfinite(back_in) and math.isfinite(spread)
                        and back_in >= 0 and spread >= 0)
