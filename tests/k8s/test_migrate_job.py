"""What the schema Job runs, against real backends: `sysdesign migrate --apply --wait N`.

The Job starts together with Cassandra and MinIO, so the command must wait
for a backend that is not up yet, then create the tables and the bucket.
Here the tables go to SQLite (Cassandra needs a cluster; see the contract
suite's SYSDESIGN_TEST_CASSANDRA_HOSTS) and the bucket to a moto S3 server
started in its own process, first absent, then started while migrate waits.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import boto3
from k8s_support import CREDS, free_port, moto_server

from servers.systems import all_tables

ROOT = Path(__file__).resolve().parents[2]


def migrate_env(data_dir: Path, endpoint: str, bucket: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
    env.update(CREDS)
    env.update({
        "SYSDESIGN_DATA_DIR": str(data_dir),
        "SYSDESIGN_S3_ENDPOINT": endpoint,
        "SYSDESIGN_S3_BUCKET": bucket,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "generated")]),
    })
    return env


def bucket_exists(endpoint: str, bucket: str) -> bool:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    return bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def sqlite_tables(data_dir: Path) -> set[str]:
    with sqlite3.connect(data_dir / "tables.sqlite3") as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_migrate_waits_for_s3_then_creates_tables_and_bucket(tmp_path: Path) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = f"k8s-{secrets.token_hex(4)}"
    data_dir = tmp_path / "data"
    log = (tmp_path / "migrate.log").open("w+b")
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "migrate", "--apply", "--wait", "120"],
                            cwd=ROOT, env=migrate_env(data_dir, endpoint, bucket),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        # Nothing listens yet: migrate applies the tables, then keeps retrying S3.
        deadline = time.monotonic() + 120
        while b"s3 not ready" not in (tmp_path / "migrate.log").read_bytes():
            assert proc.poll() is None, (tmp_path / "migrate.log").read_text()
            assert time.monotonic() < deadline, "migrate never reported waiting for S3"
            time.sleep(0.2)
        with moto_server(port, tmp_path / "moto.log"):
            assert proc.wait(timeout=180) == 0, (tmp_path / "migrate.log").read_text()
            assert bucket_exists(endpoint, bucket)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    output = (tmp_path / "migrate.log").read_text()
    assert "schema applied" in output and f"bucket ready: {bucket}" in output
    assert {t.name for t in all_tables()} <= sqlite_tables(data_dir)


def test_migrate_gives_up_after_the_wait(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing will listen here
    done = subprocess.run([sys.executable, "-m", "clients.cli", "migrate", "--apply", "--wait", "0"],
                          cwd=ROOT, env=migrate_env(tmp_path / "data", endpoint, "never"),
                          capture_output=True, timeout=180)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 1, output
    assert "s3 unavailable" in output and "bucket ready" not in output and "Traceback" not in output


def test_replication_comes_from_the_environment_like_the_job_sets_it(tmp_path: Path) -> None:
    env = migrate_env(tmp_path / "data", "", "unused")
    env["SYSDESIGN_CASSANDRA_REPLICATION"] = "NetworkTopologyStrategy:dc1=1"
    out = subprocess.run([sys.executable, "-m", "clients.cli", "migrate"], cwd=ROOT, env=env,
                         capture_output=True, check=True, timeout=60).stdout.decode()
    assert "'class': 'NetworkTopologyStrategy'" in out and "'dc1': 1" in out
    assert not (tmp_path / "data").exists(), "printing the schema touches nothing"
