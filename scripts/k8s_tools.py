#!/usr/bin/env python3
"""The Kubernetes tools `make k8s-check` runs: kustomize and kubeconform, built from the Go module proxy.

    python scripts/k8s_tools.py build      # go install each pinned tool once; prints the binaries' paths
    python scripts/k8s_tools.py schemas    # prints kubeconform's -schema-location (generated on first use)

Neither tool is published to a package registry as a binary, but both are Go
modules, so ``go install <module>@<pinned version>`` builds them from the Go
module proxy, as their own READMEs suggest. Measured on two shared cores, each
with empty module and build caches: kustomize 36-62 s, kubeconform 41-51 s;
both in a row about a minute, as the second shares the first's standard
library (modules about 100 MB and 75 MB, build cache 180 MB and 110 MB). Each
binary is kept under ``~/.cache/sysdesign/tools/<tool>-<version>/`` and later
runs skip Go. Needs Go >= 1.26 (kustomize v5.8.3 already asks for 1.27).

kubeconform normally downloads its JSON schemas from GitHub, which these
machines cannot reach. The schemas come from the ``kubernetes-validate`` wheel
(a dev dependency from PyPI), which ships the Kubernetes OpenAPI schemas of
every supported release, converted to JSON Schema, in kubeconform's file
naming (``deployment-apps-v1.json``). Their references point at
``https://kubernetes.io/api/_definitions.json``, so :func:`schema_location`
copies one version's strict schemas into
``~/.cache/sysdesign/k8s-schemas/kubernetes-validate-<wheel version>/`` with
those references made relative to the file beside them; nothing of them is
committed.

Without Go (and no binary built before) the render and the schema validation
are skipped with one line saying why, except under ``CI=true``, where that is
a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The Kubernetes release the manifests target (native gRPC probes need >= 1.27;
# kind and minikube default to a recent release).
K8S_VERSION = "1.33.0"


@dataclass(frozen=True)
class Tool:
    name: str
    package: str  # what `go install` builds
    version: str  # pinned


TOOLS = {
    "kustomize": Tool("kustomize", "sigs.k8s.io/kustomize/kustomize/v5", "v5.8.2"),
    "kubeconform": Tool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform", "v0.8.0"),
}
# How the wheel names a version's strict schemas, and the reference it makes to their definitions.
WHEEL_DIR = "v{version}-local-strict"
WHEEL_DEFINITIONS_REF = "/api/_definitions.json#"


class ToolsMissing(RuntimeError):
    """The tools are not built and cannot be built here (the message says why)."""


def log(msg: str) -> None:
    print(f"k8s-tools: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sysdesign"


def binary_path(tool: Tool) -> Path:
    return cache_root() / "tools" / f"{tool.name}-{tool.version}" / tool.name


def missing_tools() -> str:
    """Why the tools cannot be built here, or "" when they can (or already are)."""
    if all(binary_path(t).exists() for t in TOOLS.values()) or shutil.which("go"):
        return ""
    return ("Go is not installed (kustomize and kubeconform are built from the Go module proxy "
            "with `go install`)")


def build(name: str) -> Path:
    """The tool's binary, built with ``go install`` on first use."""
    tool = TOOLS[name]
    exe = binary_path(tool)
    if exe.exists():
        return exe
    if not shutil.which("go"):
        raise ToolsMissing(missing_tools() or f"Go is not installed (needed to build {name})")
    exe.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {tool.package}@{tool.version} from the Go module proxy (about a minute the first time)")
    started = time.monotonic()
    env = {**os.environ, "GOBIN": str(exe.parent), "CGO_ENABLED": "0"}
    r = subprocess.run(["go", "install", f"{tool.package}@{tool.version}"], env=env)
    if r.returncode != 0 or not exe.exists():
        raise RuntimeError(f"go install {tool.package}@{tool.version} failed ({r.returncode})")
    log(f"built {exe} in {time.monotonic() - started:.0f} s")
    return exe


def build_all() -> dict[str, Path]:
    return {name: build(name) for name in TOOLS}


# -- schemas ------------------------------------------------------------------------------


def wheel_schemas() -> tuple[Path, str]:
    """The kubernetes-validate wheel's schema directory and the wheel's version."""
    import kubernetes_validate
    from kubernetes_validate.version import __version__

    return Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema", str(__version__)


def _relative_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _relative_refs(v) for k, v in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(WHEEL_DEFINITIONS_REF):
            out["$ref"] = "_definitions.json#" + ref[len(WHEEL_DEFINITIONS_REF):]
        return out
    if isinstance(node, list):
        return [_relative_refs(v) for v in node]
    return node


def schema_location(version: str = K8S_VERSION) -> str:
    """kubeconform's ``-schema-location`` template for the wheel's strict schemas of `version`.

    The first call per wheel version writes the schemas (about 5 MB) into the
    cache: each file with its ``$id`` dropped (so references resolve against
    the file itself) and ``/api/_definitions.json#...`` rewritten to the
    ``_definitions.json`` beside it.
    """
    src_root, wheel_version = wheel_schemas()
    name = WHEEL_DIR.format(version=version)
    src = src_root / name
    if not src.is_dir():
        have = sorted(p.name for p in src_root.iterdir() if p.name.endswith("-local-strict"))
        raise RuntimeError(f"kubernetes-validate {wheel_version} ships no schemas for Kubernetes {version} "
                           f"(it has {', '.join(have)}); upgrade it (pip install -U kubernetes-validate)")
    root = cache_root() / "k8s-schemas" / f"kubernetes-validate-{wheel_version}"
    dest = root / name
    if not (dest / "_definitions.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            for f in sorted(src.glob("*.json")):
                schema = _relative_refs(json.loads(f.read_text(encoding="utf-8")))
                schema.pop("$id", None)
                (tmp / f.name).write_text(json.dumps(schema), encoding="utf-8")
            try:  # the whole directory at once: a half-written one is never used
                tmp.rename(dest)
            except OSError:  # another process finished first
                if not (dest / "_definitions.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return f"{root}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/" \
           f"{{{{ .ResourceKind }}}}{{{{ .KindSuffix }}}}.json"


# -- running them -------------------------------------------------------------------------


def kustomize_build(path: Path) -> str:
    """`kustomize build PATH`: the rendered YAML, as `kubectl apply -k PATH` would apply it."""
    r = subprocess.run([str(build("kustomize")), "build", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kustomize build {path} failed ({r.returncode}):\n{r.stderr.strip()}")
    return r.stdout


def kubeconform(manifests: str, *args: str, version: str = K8S_VERSION) -> subprocess.CompletedProcess[str]:
    """`kubeconform -strict -kubernetes-version VERSION ARGS` over the YAML on its stdin, offline."""
    cmd = [str(build("kubeconform")), "-strict", "-kubernetes-version", version,
           "-schema-location", schema_location(version), *args, "-"]
    return subprocess.run(cmd, input=manifests, capture_output=True, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/k8s_tools.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "schemas"])
    args = ap.parse_args(argv)
    if args.command == "schemas":
        print(schema_location())
        return 0
    why = missing_tools()
    if why:
        if os.environ.get("CI") == "true":
            log(f"CI=true: the Kubernetes render and schema validation may not be skipped: {why}")
            return 2
        log(f"Kubernetes render and schema validation skipped: {why}")
        return 0
    for name, path in build_all().items():
        print(f"{name} {TOOLS[name].version} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
