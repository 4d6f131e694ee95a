"""The Kubernetes tools: pinned builds from the Go module proxy (clients/gotools.py), offline schemas, and no Go.

Without Go, `make k8s-check` skips the render and the schema validation with
one line saying why, and never passes silently under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def run_without_go(tmp_path: Path, ci: str, *argv: str) -> subprocess.CompletedProcess[str]:
    # A PATH with the interpreter but no go, and an empty cache (no tool built before).
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    if not (bindir / "python3").exists():
        (bindir / "python3").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSDESIGN_")}
    env.update({"PATH": str(bindir), "CI": ci, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=60)


def test_without_go_the_check_is_skipped_with_one_line(tmp_path: Path) -> None:
    out = run_without_go(tmp_path, "", str(ROOT / "scripts" / "k8s_check.py"))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "Go is not installed" in lines[0], out.stdout


def test_under_ci_a_missing_go_fails(tmp_path: Path) -> None:
    out = run_without_go(tmp_path, "true", str(ROOT / "scripts" / "k8s_check.py"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "CI=true" in out.stdout and "Go is not installed" in out.stdout
    assert not list((tmp_path / "cache").glob("**/kustomize*"))


def test_the_pinned_versions_are_the_ones_built(k8s_tools: ModuleType) -> None:
    kustomize = subprocess.run([str(k8s_tools.build("kustomize")), "version"],
                               capture_output=True, text=True, check=True)
    assert kustomize.stdout.strip() == k8s_tools.TOOLS["kustomize"].version
    for name, tool in k8s_tools.TOOLS.items():
        assert k8s_tools.build(name).parent.name == f"{name}-{tool.version}"


def test_the_schemas_are_local_files_from_the_wheel(k8s_tools: ModuleType) -> None:
    location = k8s_tools.schema_location()
    assert location.startswith("/") and "://" not in location
    d = Path(location.split("/{{")[0]) / f"v{k8s_tools.K8S_VERSION}-local-strict"
    schema = json.loads((d / "deployment-apps-v1.json").read_text(encoding="utf-8"))
    assert "$id" not in schema and schema["additionalProperties"] is False
    refs = json.dumps(schema)
    assert '"_definitions.json#/$defs/io.k8s.api.apps.v1.DeploymentSpec"' in refs and "kubernetes.io/api" not in refs
    assert (d / "_definitions.json").is_file()
