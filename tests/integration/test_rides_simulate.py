"""`sysdesign rides simulate` against a real stack: the CLI itself, as a subprocess.

Drivers drive at 150 km/h in a box of about 500 m, riders think half a
second: in 20 s rides are requested, matched and completed, no ping the
simulator sends is refused, and every ride the server holds for the
simulated riders ended (completed, or cancelled when the run stopped).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from sysdesign.identity.v1 import identity_pb2 as ipb
from sysdesign.identity.v1 import identity_pb2_grpc as ipbg
from sysdesign.rides.v1 import rides_pb2 as pb
from sysdesign.rides.v1 import rides_pb2_grpc as pbg

from tests.stack import ROOT, StackProcess

pytestmark = [pytest.mark.tables, pytest.mark.redis_cluster]

RIDES_ENV = {
    "SYSDESIGN_RIDES_OFFER_SECONDS": "2",
    "SYSDESIGN_RIDES_NO_DRIVER_WAIT_SECONDS": "1",
    "SYSDESIGN_RIDES_MAX_OFFERS": "3",
    "SYSDESIGN_RIDES_SURGE_EVERY_SECONDS": "0.5",
}
# About 500 m by 500 m, far from San Francisco's default box.
BOX = "40.7000,-74.0100,40.7045,-74.0041"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("ridesim") / "data", extra_env=RIDES_ENV).start()
    yield s
    assert s.stop() == 0, s.logs()


def _summary(out: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^[│|]\s*([a-z][a-z ()]+?)\s*[│|]\s*(.+?)\s*[│|]$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_simulate_requests_matches_and_completes_rides(stack: StackProcess) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
    env.update({"PYTHONPATH": stack.env()["PYTHONPATH"], "COLUMNS": "200"})
    out = subprocess.run(
        [sys.executable, "-m", "clients.cli", "rides", "simulate", "--drivers", "8", "--riders", "4",
         "--duration", "20", "--seed", "7", "--box", BOX, "--speed-kmh", "150", "--think", "0.5",
         "--addr", stack.grpc_addr],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _summary(out.stdout)
    assert int(rows["rides requested"]) >= 1, out.stdout
    assert int(rows["rides completed"]) >= 1, out.stdout
    assert int(rows["pings sent"]) > 8 * 10, out.stdout
    assert rows["pings refused"] == "0", out.stdout + out.stderr
    assert rows["pings accepted"] == rows["pings sent"], out.stdout + out.stderr

    # The server agrees: the simulated riders' rides, through the public API.
    names = sorted(set(re.findall(r"simrdr_[0-9a-f]+_", out.stderr)))
    assert len(names) == 1, out.stderr
    completed = ended = total = 0
    with grpc.insecure_channel(stack.grpc_addr) as ch:
        ident, rider = ipbg.IdentityServiceStub(ch), pbg.RiderServiceStub(ch)
        for i in range(4):
            tok = ident.Login(ipb.LoginRequest(username=f"{names[0]}{i}",
                                               password="simulated rider and driver")).access_token
            rides = rider.ListRides(pb.ListRidesRequest(page_size=100),
                                    metadata=(("authorization", f"Bearer {tok}"),)).rides
            total += len(rides)
            completed += sum(1 for r in rides if r.state == pb.RIDE_STATE_COMPLETED)
            ended += sum(1 for r in rides if r.state in (pb.RIDE_STATE_COMPLETED, pb.RIDE_STATE_CANCELLED))
    assert total == int(rows["rides requested"])
    assert completed >= int(rows["rides completed"]) >= 1
    # Stopping left nothing open: unstarted rides were cancelled, riders in a car dropped off.
    assert ended == total
