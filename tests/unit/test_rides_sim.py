"""The simulator's geometry: the box it parses, and paths that never outrun the speed asked for."""

from __future__ import annotations

import random

import pytest

from clients.rides.sim import SF_BOX, Box, distance_m, grid_route, toward


def test_box_parses_either_corner_order_and_refuses_bad_boxes() -> None:
    b = Box.parse("37.80,-122.38, 37.75,-122.45")
    assert (b.south, b.west, b.north, b.east) == (37.75, -122.45, 37.80, -122.38)
    sf = Box(*SF_BOX)
    assert 5000 < sf.width_m < 7000 and 5000 < sf.height_m < 7000
    for bad in ("1,2,3", "a,b,c,d", "nan,1,2,3", "91,0,92,1", "37.0,-122.0,37.0001,-122.0001",
                "0,0,10,10"):
        with pytest.raises(ValueError):
            Box.parse(bad)


def test_points_and_corners_stay_in_the_box() -> None:
    b, rng = Box(*SF_BOX), random.Random(1)
    for _ in range(500):
        for lat, lng in (b.point(rng), b.corner(rng)):
            assert b.south <= lat <= b.north and b.west <= lng <= b.east


def test_a_grid_walk_moves_no_further_than_its_budget_and_ends_at_the_target() -> None:
    b, rng = Box(*SF_BOX), random.Random(2)
    for _ in range(50):
        pos, target = b.point(rng), b.corner(rng)
        route = grid_route(pos, target)
        assert route[-1] == target and len(route) <= 2
        step = rng.uniform(1, 60)
        for _ in range(2000):
            if not route:
                break
            nxt = toward(pos, route[0], step)
            assert distance_m(pos, nxt) <= step + 1e-6
            pos = nxt
            if pos == route[0]:
                route.pop(0)
        assert not route and pos == target
