#!/usr/bin/env python3
"""The Kubernetes tools `make k8s-check` runs: kustomize and kubeconform, and the schemas kubeconform reads offline.

    python scripts/k8s_tools.py schemas    # prints kubeconform's -schema-location (generated on first use)
    python scripts/gotools.py build kustomize kubeconform   # builds the two tools alone

Both tools are Go modules, built once with ``go install <module>@<pinned
version>`` from the Go module proxy by clients/gotools.py (which pins them)
and cached under ``~/.cache/sysdesign/go/<tool>-<version>/``. Measured on two
shared cores, each with empty module and build caches: kustomize 36-62 s,
kubeconform 41-51 s; both in a row about a minute, as the second shares the
first's standard library (modules about 100 MB and 75 MB, build cache 180 MB
and 110 MB). Needs Go >= 1.26 (kustomize v5.8.3 already asks for 1.27).

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
a failure (scripts/k8s_check.py, tests/k8s/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clients import gotools

# The Kubernetes release the manifests target (native gRPC probes need >= 1.27;
# kind and minikube default to a recent release).
K8S_VERSION = "1.33.0"
TOOLS = {name: gotools.TOOLS[name] for name in ("kustomize", "kubeconform")}
# How the wheel names a version's strict schemas, and the reference it makes to their definitions.
WHEEL_DIR = "v{version}-local-strict"
WHEEL_DEFINITIONS_REF = "/api/_definitions.json#"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sysdesign"


def missing_tools() -> str:
    """Why the tools cannot be had here, or "" when they can (or already are built)."""
    for tool in TOOLS.values():
        why = gotools.missing_go(tool)
        if why:
            return why.replace(f"({tool.name} is", "(kustomize and kubeconform are")
    return ""


def build(name: str) -> Path:
    """The tool's binary, built with ``go install`` on first use."""
    return gotools.build(TOOLS[name].name)


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
    ap.add_argument("command", choices=["schemas"])
    ap.parse_args(argv)
    print(schema_location())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
