"""Fixtures for the Kubernetes checks: the offline renderer and the rendered kustomizations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

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
def kustomize() -> ModuleType:
    return _load("sysdesign_kustomize", ROOT / "scripts" / "kustomize.py")


@pytest.fixture(scope="session")
def k8s_check(kustomize: ModuleType) -> ModuleType:
    return _load("sysdesign_k8s_check", ROOT / "scripts" / "k8s_check.py")


@pytest.fixture(scope="session")
def rendered(k8s_check: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """name ("base", "kind", "minikube") -> the rendered objects."""
    return k8s_check.render_all()  # type: ignore[no-any-return]
