"""The image builds, and every workload of the kind overlay runs from it: scripts/image_check.py.

`make image-check` runs the same script (and `make test` runs that, not this
module: `make k8s-check` leaves it out). It builds the Dockerfile with podman
on a Debian bookworm base made with debootstrap (no registry), then starts
each Deployment's container and the schema Job from the image with the pod's
args, rendered environment, user, read-only root, tmpfs /tmp, dropped
capabilities and memory limit, against a Valkey and a moto S3 server: every
probe must pass, the Job must exit 0, and SIGTERM must drain every container
to exit code 0 within its grace period.

Needs root, and podman, runc and debootstrap or apt-get to install them;
skipped with one line saying why otherwise, except under CI=true.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from test_k8s_manifests import app_containers, find

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def test_the_image_builds_and_runs_every_workload_of_the_kind_overlay(
        image_check: ModuleType, rendered: dict[str, list[dict[str, Any]]]) -> None:
    why = image_check.unavailable()
    if why:
        skip_or_fail("the image check", why)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "image_check.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    # One passing row per workload that runs the image, and nothing else.
    expected = {f"{o['kind'].lower()}/{o['metadata']['name']}" for kind in ("Deployment", "Job")
                for o in find(rendered["kind"], kind) if app_containers(o)}
    rows = dict(re.findall(r"^│ ((?:deployment|job)/[\w-]+)\s+│[^│]*│ (\S)", r.stdout, flags=re.M))
    assert set(rows) == expected, out[-8000:]
    assert set(rows.values()) == {"✔"}, out[-8000:]
