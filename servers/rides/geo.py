"""Distances, ETAs and fares: the arithmetic of ride matching, with no I/O.

No road graph ships with the project, so a trip's road distance is the
great-circle (haversine) distance times a road factor (1.3 by default, the
usual detour of a city street grid), and its duration that distance over a
speed that depends on the hour of the day (slow in the rush hours). A
driver's ETA to a pickup adds a turning penalty when the driver is moving away
from it, so the nearest driver in a straight line is not always the first
asked: one heading the other way on a fast road is behind one a little
further off heading towards the rider.

Cells are H3 (``h3`` package): the driver index is sharded by a cell of
``shard_res`` (7 by default, ~5 km² each) and surge is kept per cell of the
same resolution.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import h3

EARTH_RADIUS_M = 6_371_008.8
ESTIMATE_METHOD = "great-circle distance x road factor, speed by hour of day (no road graph)"

# km/h by local hour 0..23: free-flowing nights, slow rush hours.
SPEED_BY_HOUR_KMH = (
    38, 40, 40, 40, 38, 34, 28, 22, 18, 20, 24, 26,
    26, 26, 25, 24, 21, 18, 19, 23, 27, 30, 33, 36,
)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class RidesSettings:
    """SYSDESIGN_RIDES_* variables (docs/rides.md lists them)."""

    shard_res: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_SHARD_RES", 7))
    search_radius_m: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_SEARCH_RADIUS_M", 3000))
    # Candidates asked per ride before it is cancelled for want of a driver.
    max_offers: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_MAX_OFFERS", 5))
    # How long a ride waits for a driver to come free before it is told none is available.
    no_driver_wait_s: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_NO_DRIVER_WAIT_SECONDS",
                                                                       5.0))
    offer_timeout_s: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_OFFER_SECONDS", 10.0))
    fresh_s: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_FRESH_SECONDS", 30.0))
    quote_ttl_s: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_QUOTE_SECONDS", 300))
    cancel_grace_s: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_CANCEL_GRACE_SECONDS", 120))
    max_speed_kmh: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_MAX_SPEED_KMH", 200.0))
    road_factor: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_ROAD_FACTOR", 1.3))
    currency: str = field(default_factory=lambda: os.environ.get("SYSDESIGN_RIDES_CURRENCY", "USD"))
    base_minor: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_BASE_MINOR", 250))
    per_km_minor: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_PER_KM_MINOR", 120))
    per_min_minor: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_PER_MIN_MINOR", 30))
    cancel_fee_minor: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_CANCEL_FEE_MINOR", 500))
    # Surge: demand over supply per cell over a sliding window, smoothed and capped.
    surge_window_s: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_SURGE_WINDOW_SECONDS", 300))
    surge_every_s: float = field(default_factory=lambda: _env_float("SYSDESIGN_RIDES_SURGE_EVERY_SECONDS", 5.0))
    surge_cap_milli: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_SURGE_CAP_MILLI", 3000))
    # Rides one dispatcher process runs at once (each mostly waits on a driver).
    dispatch_concurrency: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_DISPATCH_CONCURRENCY",
                                                                       512))
    # A dispatch whose process died is taken over after this long.
    dispatch_claim_ms: int = field(default_factory=lambda: _env_int("SYSDESIGN_RIDES_DISPATCH_CLAIM_MS", 5000))

    def __post_init__(self) -> None:
        if not 4 <= self.shard_res <= 10:
            raise ValueError("SYSDESIGN_RIDES_SHARD_RES is 4 to 10")
        if self.search_radius_m < 100 or self.max_offers < 1 or self.offer_timeout_s <= 0:
            raise ValueError("the search radius is at least 100 m, with at least one offer of positive length")

    def ring(self, radius_m: float | None = None) -> int:
        """How many rings of cells around a point's own cell cover a radius round it
        (wherever in its cell the point is, with a margin for cells smaller than average)."""
        edge = h3.average_hexagon_edge_length(self.shard_res, "m") * 0.9
        r = self.search_radius_m if radius_m is None else radius_m
        return max(1, math.ceil((r + edge) / (edge * math.sqrt(3))))

    def search_steps(self) -> list[int]:
        """The radii a nearby search tries in turn, smallest first, up to search_radius_m:
        where drivers are dense the first small circle already holds enough of them, so
        a query's cost follows how many it needs, not how many are online."""
        steps, r = [], 250
        while r < self.search_radius_m:
            steps.append(r)
            r *= 2
        return [*steps, self.search_radius_m]


def haversine_m(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lng2 - lng1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bearing_deg(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """The initial bearing from the first point to the second, 0..360 (0 = north)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lng2 - lng1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return (math.degrees(math.atan2(y, x)) + 360.0) % 360.0


def speed_mps(hour: int) -> float:
    return SPEED_BY_HOUR_KMH[hour % 24] / 3.6


def road_m(s: RidesSettings, lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    return haversine_m(lat1, lng1, lat2, lng2) * s.road_factor


def trip_seconds(s: RidesSettings, distance_road_m: float, hour: int) -> float:
    return distance_road_m / speed_mps(hour)


def pickup_eta_s(s: RidesSettings, *, driver: tuple[float, float], heading: float, moving_mps: float,
                 pickup: tuple[float, float], hour: int) -> float:
    """A driver's time to the pickup: the road distance at the hour's speed, plus
    up to a minute to turn round when moving away from it."""
    d = road_m(s, driver[0], driver[1], pickup[0], pickup[1])
    eta = d / speed_mps(hour)
    if moving_mps > 2.0 and d > 50:
        off = abs((bearing_deg(driver[0], driver[1], pickup[0], pickup[1]) - heading + 180) % 360 - 180)
        if off > 45:
            eta += 60.0 * (off - 45) / 135
    return eta


@dataclass(frozen=True)
class FareParts:
    base: int
    distance: int
    time: int
    surge_milli: int

    @property
    def total(self) -> int:
        # Integer arithmetic throughout: round half up to the minor unit.
        raw = (self.base + self.distance + self.time) * self.surge_milli
        return (raw + 500) // 1000


def fare(s: RidesSettings, distance_road_m: float, seconds: float, surge_milli: int) -> FareParts:
    return FareParts(
        base=s.base_minor,
        distance=(round(distance_road_m) * s.per_km_minor + 500) // 1000,
        time=(round(seconds) * s.per_min_minor + 30) // 60,
        surge_milli=max(1000, surge_milli),
    )


def cell_of(s: RidesSettings, lat: float, lng: float) -> str:
    return h3.latlng_to_cell(lat, lng, s.shard_res)  # type: ignore[no-any-return]


def cells_around(s: RidesSettings, lat: float, lng: float, radius_m: float | None = None) -> list[str]:
    return list(h3.grid_disk(cell_of(s, lat, lng), s.ring(radius_m)))


def surge_from(demand: int, supply: int, previous_milli: int, cap_milli: int) -> int:
    """Next surge multiplier (thousandths) of a cell: half the excess of demand over
    supply, capped, and smoothed against the previous value so it does not flap."""
    ratio = demand / max(1, supply)
    target = 1000 if ratio <= 1 else min(cap_milli, int(1000 + 500 * (ratio - 1)))
    smoothed = round(0.6 * max(1000, previous_milli) + 0.4 * target)
    # Settle back to exactly 1.0 instead of creeping towards it.
    return 1000 if smoothed < 1010 else min(cap_milli, smoothed)
