"""The interactive chat's reconnect schedule: exponential, capped, jittered."""

from __future__ import annotations

import random

from clients.commands.chat import RECONNECT_FIRST_S, RECONNECT_MAX_S, reconnect_delay


def test_backoff_doubles_to_the_cap_with_equal_jitter() -> None:
    rnd = random.Random(7)
    for attempt in range(12):
        step = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** attempt)
        delays = [reconnect_delay(attempt, rnd) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays), (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > step / 4, "the waits are spread, not synchronised"
    assert reconnect_delay(50, rnd) <= RECONNECT_MAX_S
