"""Fixtures for the Kubernetes checks: the rendered kustomizations, from the real kustomize.

scripts/k8s_check.py renders with `kustomize build` and validates with
kubeconform, both built from the Go module proxy (scripts/k8s_tools.py).
Without Go the tests that need a render are skipped with the reason, except
under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def k8s_check() -> ModuleType:
    return _load("sysdesign_k8s_check", ROOT / "scripts" / "k8s_check.py")


@pytest.fixture(scope="session")
def k8s_tools(k8s_check: ModuleType) -> ModuleType:
    """scripts/k8s_tools.py with kustomize and kubeconform built (or the tests skipped, saying why)."""
    tools = k8s_check.tools
    why = tools.missing_tools()
    if why:
        skip_or_fail("Kubernetes render and schema validation", why)
    tools.build_all()
    return tools  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def rendered_yaml(k8s_check: ModuleType, k8s_tools: ModuleType) -> dict[str, str]:
    """name ("base", "kind", "minikube") -> what `kustomize build` prints for it."""
    return {name: k8s_check.render(path) for name, path in k8s_check.targets().items()}


@pytest.fixture(scope="session")
def rendered(k8s_check: ModuleType, rendered_yaml: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """name ("base", "kind", "minikube") -> the rendered objects."""
    return {name: k8s_check.parse(text) for name, text in rendered_yaml.items()}


@pytest.fixture(scope="session")
def image_check(k8s_check: ModuleType) -> ModuleType:
    """scripts/image_check.py (podman build of the Dockerfile, the kind overlay's workloads run from it)."""
    return _load("sysdesign_image_check", ROOT / "scripts" / "image_check.py")
