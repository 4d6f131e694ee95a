"""`sysdesign migrate` prints a CQL schema for every table, with keys and clustering order."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from servers.systems import all_tables

ROOT = Path(__file__).resolve().parents[2]


def test_migrate_prints_cql_for_every_table() -> None:
    out = subprocess.run([sys.executable, "-m", "clients.cli", "migrate",
                          "--replication", "NetworkTopologyStrategy:dc1=3"],
                         capture_output=True, check=True, cwd=ROOT, timeout=60).stdout.decode()
    assert "CREATE KEYSPACE IF NOT EXISTS sysdesign" in out
    assert "'class': 'NetworkTopologyStrategy'" in out and "'dc1': 3" in out
    for t in all_tables():
        assert f"CREATE TABLE IF NOT EXISTS sysdesign.{t.name}" in out
    assert "PRIMARY KEY ((owner_id), link_id)" in out
    assert "CLUSTERING ORDER BY (link_id DESC)" in out
