"""Snowflake ids, Base62 and the short-code permutation."""

from __future__ import annotations

import itertools
import random
import threading
from datetime import UTC, datetime

import pytest

from servers.platform.ids import (
    EPOCH_MS,
    MAX_ID,
    MAX_SEQUENCE,
    CodePermutation,
    Snowflake,
    b62decode,
    b62encode,
    bucket_bounds,
    bucket_of,
    id_for_time,
    id_sequence,
    id_timestamp_ms,
    id_worker,
    is_base62,
)

# --------------------------------------------------------------------------- Snowflake


def test_epoch_is_2024_utc() -> None:
    assert datetime.fromtimestamp(EPOCH_MS / 1000, UTC) == datetime(2024, 1, 1, tzinfo=UTC)


def test_ids_unique_and_increasing_per_thread_under_contention() -> None:
    gen = Snowflake(7)
    per_thread = 20_000
    results: list[list[int]] = [[] for _ in range(8)]

    def work(out: list[int]) -> None:
        for _ in range(per_thread):
            out.append(gen.next_id())

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_ids = [i for r in results for i in r]
    assert len(set(all_ids)) == len(all_ids) == 8 * per_thread
    for r in results:
        assert r == sorted(r) and len(set(r)) == len(r)
    assert all(0 < i <= MAX_ID for i in all_ids)
    assert {id_worker(i) for i in all_ids} == {7}


def test_field_extraction() -> None:
    ms = EPOCH_MS + 123_456_789
    gen = Snowflake(1023, clock=lambda: ms)
    a, b = gen.next_id(), gen.next_id()
    assert id_timestamp_ms(a) == ms and id_timestamp_ms(b) == ms
    assert id_worker(a) == 1023
    assert (id_sequence(a), id_sequence(b)) == (0, 1)
    assert a == ((123_456_789 << 22) | (1023 << 12))


def test_sequence_overflow_moves_to_next_millisecond() -> None:
    now = [EPOCH_MS + 1000]
    calls = [0]

    def clock() -> int:
        calls[0] += 1
        # The clock ticks once the generator starts waiting for it.
        if calls[0] > MAX_SEQUENCE + 3:
            return now[0] + 1
        return now[0]

    gen = Snowflake(3, clock=clock)
    ids = [gen.next_id() for _ in range(MAX_SEQUENCE + 2)]
    assert ids == sorted(set(ids))
    assert id_timestamp_ms(ids[MAX_SEQUENCE]) == now[0]
    assert id_timestamp_ms(ids[-1]) == now[0] + 1
    assert id_sequence(ids[-1]) == 0


def test_clock_going_backwards_never_repeats_or_decreases() -> None:
    t = [EPOCH_MS + 50_000]
    gen = Snowflake(2, clock=lambda: t[0])
    first = gen.next_id()
    t[0] -= 10_000  # NTP steps the clock back by 10 s
    later = [gen.next_id() for _ in range(3 * (MAX_SEQUENCE + 1))]  # overflows while behind
    seq = [first, *later]
    assert seq == sorted(set(seq))
    assert id_timestamp_ms(later[0]) == EPOCH_MS + 50_000  # kept the last timestamp
    t[0] = EPOCH_MS + 60_000  # clock catches up
    assert id_timestamp_ms(gen.next_id()) == EPOCH_MS + 60_000


def test_worker_id_range() -> None:
    with pytest.raises(ValueError):
        Snowflake(1024)
    with pytest.raises(ValueError):
        Snowflake(-1)


def test_id_for_time_is_the_smallest_id_of_that_millisecond() -> None:
    ms = EPOCH_MS + 987_654
    lo = id_for_time(ms)
    assert id_timestamp_ms(lo) == ms and id_worker(lo) == 0 and id_sequence(lo) == 0
    ids = [Snowflake(w, clock=lambda: ms).next_id() for w in (0, 5, 1023)]
    assert all(lo <= i < id_for_time(ms + 1) for i in ids)
    assert id_for_time(ms - 1) < lo
    assert id_for_time(0) == 0  # before the epoch clamps


def test_bucket_of_and_bounds() -> None:
    day = 86_400_000
    ms = int(datetime(2025, 3, 14, 15, 9, tzinfo=UTC).timestamp() * 1000)
    i = Snowflake(9, clock=lambda: ms).next_id()
    b = bucket_of(i, day)
    assert b == ms // day
    lo, hi = bucket_bounds(b, day)
    assert lo <= i < hi
    assert id_timestamp_ms(lo) == b * day  # bucket starts at UTC midnight
    assert bucket_of(hi, day) == b + 1
    with pytest.raises(ValueError):
        bucket_of(i, 0)


def test_bad_ids_rejected() -> None:
    with pytest.raises(ValueError):
        id_timestamp_ms(-1)
    with pytest.raises(ValueError):
        id_worker(MAX_ID + 1)


# --------------------------------------------------------------------------- Base62


def test_b62_known_values() -> None:
    assert b62encode(0) == "0"
    assert b62encode(61) == "z"
    assert b62encode(62) == "10"
    assert b62encode(35) == "Z"
    assert b62encode(36) == "a"
    assert b62encode(5, width=7) == "0000005"
    assert b62encode(62**7 - 1, width=7) == "zzzzzzz"
    assert b62encode(62**7, width=7) == "10000000"  # never truncated


@pytest.mark.parametrize("n", [0, 1, 61, 62, 3843, 3844, 2**63 - 1, 10**40])
def test_b62_roundtrip(n: int) -> None:
    s = b62encode(n)
    assert is_base62(s)
    assert b62decode(s) == n
    assert b62decode(b62encode(n, width=30)) == n


def test_b62_random_roundtrip_and_order() -> None:
    rng = random.Random(1)
    nums = sorted(rng.randrange(62**7) for _ in range(2000))
    codes = [b62encode(n, 7) for n in nums]
    assert [b62decode(c) for c in codes] == nums
    assert codes == sorted(codes)  # same width: string order == number order


@pytest.mark.parametrize("bad", ["", "abc-", "a b", "ä", "12_3", "+1", "=="])
def test_b62_decode_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        b62decode(bad)
    assert not is_base62(bad)


def test_b62_encode_rejects_negative() -> None:
    with pytest.raises(ValueError):
        b62encode(-1)


# --------------------------------------------------------------------------- CodePermutation

KEY = b"0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("width", [1, 2, 3])
def test_permutation_is_a_bijection_exhaustively(width: int) -> None:
    p = CodePermutation(KEY, width=width)
    n = 62**width
    out = [p.encode(i) for i in range(n)]
    assert sorted(out) == list(range(n))
    assert all(p.decode(o) == i for i, o in enumerate(out))


def test_permutation_roundtrips_at_width_7() -> None:
    p = CodePermutation(KEY)
    rng = random.Random(7)
    samples = [rng.randrange(62**7) for _ in range(5000)] + [0, 1, 62**7 - 1]
    for n in samples:
        m = p.encode(n)
        assert 0 <= m < 62**7
        assert p.decode(m) == n
        assert len(b62encode(m, 7)) == 7


def test_consecutive_inputs_look_unrelated() -> None:
    p = CodePermutation(KEY)
    out = [p.encode(i) for i in range(1000)]
    assert len(set(out)) == len(out)
    diffs = [abs(b - a) for a, b in itertools.pairwise(out)]
    assert all(d != 1 for d in diffs)
    assert sum(d < 62**5 for d in diffs) < 10  # neighbours are far apart
    assert out != sorted(out)


def test_different_key_gives_different_permutation() -> None:
    a = CodePermutation(KEY)
    b = CodePermutation(KEY[:-1] + b"X")
    same = sum(a.encode(i) == b.encode(i) for i in range(1000))
    assert same < 5
    small_a, small_b = CodePermutation(KEY, width=2), CodePermutation(b"other", width=2)
    assert [small_a.encode(i) for i in range(3844)] != [small_b.encode(i) for i in range(3844)]


def test_permutation_rejects_out_of_range_and_bad_args() -> None:
    p = CodePermutation(KEY, width=3)
    for bad in (-1, 62**3):
        with pytest.raises(ValueError):
            p.encode(bad)
        with pytest.raises(ValueError):
            p.decode(bad)
    with pytest.raises(ValueError):
        CodePermutation(b"")
    with pytest.raises(ValueError):
        CodePermutation(KEY, rounds=3)


def test_long_keys_and_more_rounds_work() -> None:
    p = CodePermutation(b"k" * 200, width=4, rounds=8)
    for n in (0, 12345, 62**4 - 1):
        assert p.decode(p.encode(n)) == n
