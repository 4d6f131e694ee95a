"""The arithmetic of ride matching: distances, ETAs, fares, surge, cells and quotes."""

from __future__ import annotations

import h3
import pytest

from servers.platform.errors import InvalidArgument
from servers.rides import geo
from servers.rides.core import Quote, QuoteSigner
from servers.rides.geo import FareParts, RidesSettings

S = RidesSettings()


def test_haversine_matches_known_distances() -> None:
    # One degree of latitude is about 111.2 km anywhere.
    assert geo.haversine_m(10, 20, 11, 20) == pytest.approx(111_195, rel=1e-3)
    # San Francisco to Los Angeles, about 559 km.
    assert geo.haversine_m(37.7749, -122.4194, 34.0522, -118.2437) == pytest.approx(559_000, rel=0.01)
    assert geo.bearing_deg(0, 0, 1, 0) == pytest.approx(0.0)
    assert geo.bearing_deg(0, 0, 0, 1) == pytest.approx(90.0)


def test_a_driver_heading_away_ranks_behind_a_slightly_further_one_heading_in() -> None:
    pickup = (37.7749, -122.4194)
    near_away = (37.7749 + 0.004, -122.4194)   # 445 m north, driving north
    far_toward = (37.7749 + 0.005, -122.4194)  # 556 m north, driving south
    hour = 3
    a = geo.pickup_eta_s(S, driver=near_away, heading=0, moving_mps=12, pickup=pickup, hour=hour)
    b = geo.pickup_eta_s(S, driver=far_toward, heading=180, moving_mps=12, pickup=pickup, hour=hour)
    assert b < a
    # Standing still, distance decides.
    a0 = geo.pickup_eta_s(S, driver=near_away, heading=0, moving_mps=0, pickup=pickup, hour=hour)
    assert a0 < b
    # Rush hour is slower than night.
    assert geo.pickup_eta_s(S, driver=far_toward, heading=180, moving_mps=0, pickup=pickup, hour=8) > \
        geo.pickup_eta_s(S, driver=far_toward, heading=180, moving_mps=0, pickup=pickup, hour=3)


def test_fares_are_integer_minor_units_rounded_half_up() -> None:
    f = geo.fare(S, 10_000.0, 1200.0, 1000)
    assert (f.base, f.distance, f.time) == (250, 1200, 600)
    assert f.total == 2050
    assert geo.fare(S, 10_000.0, 1200.0, 1500).total == 3075
    # 2050 * 1.2345 = 2530.725 -> 2531
    assert FareParts(250, 1200, 600, 1234).total == 2530  # 2529.7 -> 2530
    assert FareParts(1, 0, 0, 1500).total == 2            # 1.5 rounds up
    assert geo.fare(S, 1.0, 1.0, 500).surge_milli == 1000  # surge never discounts


def test_surge_rises_with_excess_demand_is_capped_and_settles_back() -> None:
    assert geo.surge_from(3, 10, 1000, 3000) == 1000
    up = geo.surge_from(10, 2, 1000, 3000)  # ratio 5 -> target 3000 -> 0.6*1000 + 0.4*3000
    assert up == 1800
    assert geo.surge_from(1000, 0, 3000, 3000) == 3000
    m = 3000
    for _ in range(20):
        m = geo.surge_from(0, 10, m, 3000)
    assert m == 1000


def test_the_search_disk_covers_the_radius() -> None:
    cells = geo.cells_around(S, 37.7749, -122.4194)
    centre = geo.cell_of(S, 37.7749, -122.4194)
    assert centre in cells and h3.get_resolution(centre) == S.shard_res
    # A point 3 km east lies in one of the searched cells.
    assert geo.cell_of(S, 37.7749, -122.4194 + 3000 / 88_000) in cells


def _quote(rider: int = 7, expire_ms: int = 10_000) -> Quote:
    return Quote("nonce", rider, (1.0, 2.0), (1.5, 2.5), FareParts(250, 100, 60, 1000), "USD", 1000, 120,
                 "872830828ffffff", expire_ms)


def test_quote_ids_are_signed_and_bound_to_their_rider_and_expiry() -> None:
    signer = QuoteSigner(b"x" * 32)
    token = signer.sign(_quote())
    assert signer.verify(token, 7, 5_000) == _quote()
    for token_, rider, at in ((token, 8, 5_000), (token, 7, 10_001), (token + "x", 7, 5_000),
                              (QuoteSigner(b"y" * 32).sign(_quote()), 7, 5_000), ("", 7, 0)):
        with pytest.raises(InvalidArgument) as e:
            signer.verify(token_, rider, at)
        assert e.value.violations[0].field == "quote_id"
