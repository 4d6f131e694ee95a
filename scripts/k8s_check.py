#!/usr/bin/env python3
"""`make k8s-check`: render every kustomization under k8s/ and validate it offline.

For the base and each overlay: build it with the offline renderer
(scripts/kustomize.py), then validate every object against the Kubernetes
OpenAPI schemas of K8S_VERSION shipped in the `kubernetes-validate` wheel, in
strict mode (unknown fields are errors, as `kubectl apply --validate=strict`
would report). The deployment policies (probes, resources, security context,
one Deployment per gRPC service in protos/) are asserted by tests/k8s.

    python scripts/k8s_check.py                 # check, print a summary
    python scripts/k8s_check.py --out DIR       # also write DIR/<name>.yaml

Needs no cluster, no kubectl and no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# The Kubernetes minor the manifests target (native gRPC probes need >= 1.27;
# kind and minikube default to a recent release).
K8S_VERSION = "1.33.0"


def _load_renderer() -> ModuleType:
    if "sysdesign_kustomize" in sys.modules:  # already loaded (tests/k8s)
        return sys.modules["sysdesign_kustomize"]
    spec = importlib.util.spec_from_file_location("sysdesign_kustomize", ROOT / "scripts" / "kustomize.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kustomize = _load_renderer()


def targets() -> dict[str, Path]:
    """Every kustomization to check: the base and each overlay."""
    out = {"base": K8S / "base"}
    for d in sorted((K8S / "overlays").iterdir()):
        if (d / "kustomization.yaml").is_file():
            out[d.name] = d
    return out


def render_all() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize.build(path) for name, path in targets().items()}


def validate(obj: dict[str, Any], version: str = K8S_VERSION) -> str | None:
    """None when obj is valid for the Kubernetes version, else the first error."""
    import kubernetes_validate.utils as kv

    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return f"{where}: {exc.message}"
    except kv.SchemaNotFoundError as exc:
        return exc.message
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write each rendered kustomization to DIR/<name>.yaml")
    args = parser.parse_args(argv)
    failures = 0
    for name, path in targets().items():
        try:
            objects = kustomize.build(path)
        except kustomize.KustomizeError as exc:
            print(f"✘ {name}: does not render: {exc}")
            failures += 1
            continue
        errors = []
        for obj in objects:
            problem = validate(obj)
            if problem:
                errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {problem}")
        kinds = Counter(o["kind"] for o in objects)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        if errors:
            failures += 1
            print(f"✘ {name} ({path.relative_to(ROOT)}): {len(errors)} invalid object(s)")
            for e in errors:
                print(f"    {e}")
        else:
            print(f"✔ {name} ({path.relative_to(ROOT)}): {len(objects)} objects valid for "
                  f"Kubernetes {K8S_VERSION}: {summary}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.yaml").write_text(kustomize.to_yaml(objects), encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
