"""The offline kustomize renderer (scripts/kustomize.py) on small kustomizations.

Each test writes a kustomization the way k8s/ does and checks what
`kustomize build` would print for it: generated names with kustomize's
content hash (checked against the vectors of kustomize's own hasher tests),
references renamed, overlays merging, patches, and loud failures for anything
the renderer does not implement.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


DEPLOYMENT = """
    apiVersion: apps/v1
    kind: Deployment
    metadata:
      name: web
      labels:
        app: web
    spec:
      replicas: 3
      selector:
        matchLabels:
          app: web
      template:
        metadata:
          labels:
            app: web
        spec:
          initContainers:
            - name: init
              image: busybox:1.36
          containers:
            - name: web
              image: app
              env:
                - name: A
                  value: "1"
                - name: TOKEN
                  valueFrom:
                    secretKeyRef:
                      name: token
                      key: TOKEN
              envFrom:
                - configMapRef:
                    name: settings
              volumeMounts:
                - name: cfg
                  mountPath: /cfg
          volumes:
            - name: cfg
              configMap:
                name: settings
            - name: both
              projected:
                sources:
                  - configMap:
                      name: settings
                  - secret:
                      name: token
"""


@pytest.mark.parametrize(("kind", "data", "extra", "expected"), [
    # Vectors from kustomize's api/hasher/hasher_test.go.
    ("ConfigMap", {}, {}, "42745tchd9"),
    ("ConfigMap", {"one": ""}, {}, "9g67k2htb6"),
    ("ConfigMap", {"two": "2", "one": "", "three": "3"}, {}, "f5h7t85m9b"),
    ("Secret", {}, {"type": "my-type"}, "t75bgf6ctb"),
    ("Secret", {"one": ""}, {"type": "my-type"}, "74bd68bm66"),
])
def test_content_hash_matches_kustomize_vectors(kustomize: ModuleType, kind: str, data: dict[str, str],
                                                extra: dict[str, str], expected: str) -> None:
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": ""}, "data": data, **extra}
    assert kustomize.content_hash(obj) == expected


def test_generators_hash_names_and_rename_every_reference(kustomize: ModuleType, tmp_path: Path) -> None:
    root = write(tmp_path, {
        "kustomization.yaml": """
            namespace: demo
            resources: [deploy.yaml]
            configMapGenerator:
              - name: settings
                envs: [settings.env]
                literals: [EXTRA=yes]
            secretGenerator:
              - name: token
                literals: [TOKEN=s3cret]
        """,
        "settings.env": "# a comment\nMODE=prod\n\nLEVEL=debug\n",
        "deploy.yaml": DEPLOYMENT,
    })
    objects = kustomize.build(root)
    cm, = by_kind(objects, "ConfigMap")
    secret, = by_kind(objects, "Secret")
    assert cm["data"] == {"EXTRA": "yes", "LEVEL": "debug", "MODE": "prod"}
    assert secret["data"] == {"TOKEN": "czNjcmV0"} and secret["type"] == "Opaque"
    assert cm["metadata"]["name"] == "settings-" + kustomize.content_hash(
        {**cm, "metadata": {"name": "settings"}})
    assert secret["metadata"]["name"].startswith("token-") and len(secret["metadata"]["name"]) == 16
    assert {o["metadata"]["namespace"] for o in objects} == {"demo"}

    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    assert c["env"][1]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    sources = pod["volumes"][1]["projected"]["sources"]
    assert sources[0]["configMap"]["name"] == cm["metadata"]["name"]
    assert sources[1]["secret"]["name"] == secret["metadata"]["name"]


def test_overlay_merges_generator_patches_and_retags(kustomize: ModuleType, tmp_path: Path) -> None:
    write(tmp_path, {
        "base/kustomization.yaml": """
            resources: [deploy.yaml, ns.yaml]
            namespace: demo
            labels:
              - pairs: {app.kubernetes.io/part-of: demo}
                includeTemplates: true
            configMapGenerator:
              - name: settings
                literals: [MODE=prod, LEVEL=info]
            images:
              - name: app
                newTag: "1.0"
        """,
        "base/ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: demo\n",
        "base/deploy.yaml": DEPLOYMENT,
        "overlay/kustomization.yaml": """
            resources: [../base]
            images:
              - name: app
                newName: registry.local/app
                newTag: dev
            configMapGenerator:
              - name: settings
                behavior: merge
                literals: [LEVEL=debug]
            replicas:
              - name: web
                count: 1
            patches:
              - path: env.yaml
              - target: {kind: Deployment, labelSelector: "app in (web,api),!canary"}
                patch: |-
                  - op: add
                    path: /spec/template/spec/containers/0/args
                    value: ["serve"]
        """,
        "overlay/env.yaml": """
            apiVersion: apps/v1
            kind: Deployment
            metadata:
              name: web
            spec:
              template:
                spec:
                  containers:
                    - name: web
                      env:
                        - name: A
                          value: "2"
                        - name: B
                          value: "3"
                      volumeMounts:
                        - mountPath: /cfg
                          $patch: delete
        """,
    })
    base = kustomize.build(tmp_path / "base")
    overlay = kustomize.build(tmp_path / "overlay")

    base_cm, = by_kind(base, "ConfigMap")
    cm, = by_kind(overlay, "ConfigMap")
    assert cm["data"] == {"LEVEL": "debug", "MODE": "prod"}
    assert cm["metadata"]["name"] != base_cm["metadata"]["name"]  # the hash follows the content

    ns, = by_kind(overlay, "Namespace")
    assert "namespace" not in ns["metadata"]  # cluster-scoped
    assert overlay[0]["kind"] == "Namespace"  # kustomize's legacy order: namespaces first

    d, = by_kind(overlay, "Deployment")
    assert d["spec"]["replicas"] == 1
    assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "demo"
    assert d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "demo"
    assert "app.kubernetes.io/part-of" not in d["spec"]["selector"]["matchLabels"]
    c = d["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.local/app:dev"
    assert d["spec"]["template"]["spec"]["initContainers"][0]["image"] == "busybox:1.36"
    assert c["args"] == ["serve"]
    assert [(e["name"], e.get("value")) for e in c["env"]] == [("A", "2"), ("TOKEN", None), ("B", "3")]
    assert c["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    assert c["volumeMounts"] == []


def test_json6902_operations(kustomize: ModuleType) -> None:
    doc = {"spec": {"replicas": 3, "list": [1, 2, 3], "gone": True}}
    out = kustomize.json_patch(doc, [
        {"op": "replace", "path": "/spec/replicas", "value": 1},
        {"op": "add", "path": "/spec/list/1", "value": 9},
        {"op": "add", "path": "/spec/list/-", "value": 4},
        {"op": "remove", "path": "/spec/gone"},
        {"op": "add", "path": "/spec/a~1b", "value": "slash"},
        {"op": "test", "path": "/spec/replicas", "value": 1},
    ])
    assert out == {"spec": {"replicas": 1, "list": [1, 9, 2, 3, 4], "a/b": "slash"}}
    assert doc["spec"]["replicas"] == 3  # the input is untouched
    with pytest.raises(kustomize.KustomizeError):
        kustomize.json_patch(doc, [{"op": "replace", "path": "/spec/missing", "value": 1}])
    with pytest.raises(kustomize.KustomizeError):
        kustomize.json_patch(doc, [{"op": "test", "path": "/spec/replicas", "value": 2}])


def test_label_selectors(kustomize: ModuleType) -> None:
    labels = {"app": "web", "tier": "front"}
    match = kustomize._selector_matches
    assert match("app=web", labels) and match("app==web,tier", labels)
    assert match("app in (api, web)", labels) and match("app notin (api),!canary", labels)
    assert not match("app!=web", labels)
    assert not match("tier in (back)", labels)
    assert not match("missing", labels)


@pytest.mark.parametrize(("files", "message"), [
    ({"kustomization.yaml": "resources: [a.yaml]\ncommonAnnotations: {x: y}\n",
      "a.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"}, "unsupported kustomization field"),
    ({"kustomization.yaml": "resources: [a.yaml, b.yaml]\n",
      "a.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
      "b.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"}, "duplicate resource"),
    ({"kustomization.yaml": "resources: [../outside.yaml]\n"}, "outside the kustomization root"),
    ({"kustomization.yaml": "resources: [missing.yaml]\n"}, "does not exist"),
    ({"kustomization.yaml": "resources: [a.yaml]\npatches:\n  - target: {kind: Service}\n"
                            "    patch: '[{op: remove, path: /spec}]'\n",
      "a.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"}, "matches nothing"),
    ({"kustomization.yaml": "configMapGenerator:\n  - name: c\n    behavior: merge\n    literals: [A=1]\n"},
     "no ConfigMap c"),
])
def test_refuses_what_kustomize_would_reject_or_it_does_not_implement(
        kustomize: ModuleType, tmp_path: Path, files: dict[str, str], message: str) -> None:
    (tmp_path / "outside.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: o}\n")
    write(tmp_path / "k", files)
    with pytest.raises(kustomize.KustomizeError, match=message):
        kustomize.build(tmp_path / "k")


def test_cli_prints_yaml_documents(kustomize: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, {
        "kustomization.yaml": "resources: [ns.yaml]\nconfigMapGenerator:\n  - name: c\n    literals: [A=1]\n",
        "ns.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    })
    assert kustomize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n---\n") == 1 and "kind: Namespace" in out and "name: c-" in out
    assert kustomize.main([str(tmp_path / "nowhere")]) == 1
