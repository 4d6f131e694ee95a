"""Ride tables (the table port: Cassandra's model, SQLite by default).

A ride is an immutable header (who, where, the locked price) and a log of its
transitions. Each transition is the next row of the ride's log, claimed ``IF
NOT EXISTS`` on its sequence number: two writers racing from the same state
(the dispatcher's offer and the rider's cancel, two dispatchers on one ride)
cannot both win, and the loser re-reads and finds out what happened. Every
row carries the ride's whole mutable state, so the last row is the ride now;
each names the operation that made it (``accept:<offer>``, ``cancel:rider``),
so replaying an operation finds its own row and answers it again.
"""

from servers.storage.table import Table

RIDES = Table(
    name="rides",
    partition_key=("ride_id",),
    columns={
        "ride_id": "bigint", "rider_id": "bigint", "quote_nonce": "text",
        "pickup_lat": "double", "pickup_lng": "double", "dropoff_lat": "double", "dropoff_lng": "double",
        "currency": "text", "total_minor": "bigint", "base_minor": "bigint", "distance_minor": "bigint",
        "time_minor": "bigint", "surge_milli": "int", "distance_m": "bigint", "duration_s": "bigint",
        "pickup_cell": "text", "create_ms": "bigint",
    },
    comment="ride headers: rider, pickup, dropoff and the price locked by the quote",
)

RIDE_LOG = Table(
    name="ride_log",
    partition_key=("ride_id",),
    clustering=("seq",),
    columns={
        "ride_id": "bigint", "seq": "int", "op": "text", "state": "int", "at_ms": "bigint",
        # The driver who accepted (0 before), the open offer and its driver.
        "driver_id": "bigint", "offer_id": "bigint", "offer_driver": "bigint", "offer_deadline_ms": "bigint",
        # Drivers asked so far (comma-separated), so a new dispatcher asks someone else.
        "asked": "text", "offers": "int",
        "cancel_reason": "int", "fee_minor": "bigint", "accept_ms": "bigint",
    },
    comment="each ride's transitions; the last row is the ride's state",
)

RIDES_BY_RIDER = Table(
    name="rides_by_rider",
    partition_key=("rider_id",),
    clustering=("ride_id",),
    descending=True,
    columns={"rider_id": "bigint", "ride_id": "bigint"},
    comment="a rider's rides, newest first",
)

RIDES_BY_DRIVER = Table(
    name="rides_by_driver",
    partition_key=("driver_id",),
    clustering=("ride_id",),
    descending=True,
    columns={"driver_id": "bigint", "ride_id": "bigint"},
    comment="a driver's accepted rides, newest first",
)

# A quote books at most one ride: its nonce is claimed IF NOT EXISTS.
RIDE_QUOTES = Table(
    name="ride_quotes",
    partition_key=("quote_nonce",),
    columns={"quote_nonce": "text", "ride_id": "bigint", "rider_id": "bigint"},
    comment="quotes already used, and the ride each booked",
)

# An offer, so a driver's AcceptOffer finds its ride without trusting the client.
RIDE_OFFERS = Table(
    name="ride_offers",
    partition_key=("offer_id",),
    columns={"offer_id": "bigint", "ride_id": "bigint", "driver_id": "bigint", "deadline_ms": "bigint",
             "eta_s": "bigint"},
    comment="offers made to drivers",
)

TABLES = [RIDES, RIDE_LOG, RIDES_BY_RIDER, RIDES_BY_DRIVER, RIDE_QUOTES, RIDE_OFFERS]
