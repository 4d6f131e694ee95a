"""The chat benchmark's plumbing: pairing of clients and an open-loop run against the
bidi echo floor (a real server process, real streams)."""

from __future__ import annotations

import asyncio
import time

from clients.bench.chat import (
    ChatBenchOptions,
    ClientSpec,
    _settings,
    _split,
    _Worker,
    start_bidi_echo,
)
from clients.bench.loadgen import Histogram


def test_pairs_stay_in_one_worker() -> None:
    specs = [ClientSpec(f"t{i}", f"d{i}", f"c{i // 2}", -1) for i in range(12)]
    per = _split(specs, 3)
    assert sorted(len(w) for w in per) == [4, 4, 4]
    for w in per:
        for i, s in enumerate(w):
            partner = w[s.partner]
            assert partner.conversation == s.conversation and w[partner.partner] is s
            assert s.partner != i


def test_settings_defaults_and_checks() -> None:
    s = _settings(ChatBenchOptions())
    assert s.clients == 1000 and s.rate == 200.0
    q = _settings(ChatBenchOptions(quick=True))
    assert q.clients < s.clients and q.duration < s.duration
    for bad in (ChatBenchOptions(clients=3), ChatBenchOptions(clients=8, workers=8)):
        try:
            _settings(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_open_loop_run_against_the_echo_floor() -> None:
    echo = start_bidi_echo()
    try:
        async def go() -> dict[str, object]:
            w = _Worker(0)
            specs = _split([ClientSpec("", f"e{i}", "", -1) for i in range(6)], 1)[0]
            assert await w.connect("echo", echo.address, specs) == 6
            try:
                return await w.run(1, 100.0, 1.0, time.time() + 0.2, 5.0)
            finally:
                await w.close()

        res = asyncio.run(go())
    finally:
        echo.stop()
    assert res["sent"] == 100 and res["received"] == 100 and not res["errors"]
    hist = Histogram.from_dict(res["latency"])  # type: ignore[arg-type]
    assert hist.count == 100 and hist.max_us > 0
