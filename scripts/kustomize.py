#!/usr/bin/env python3
"""An offline renderer for the subset of kustomize that `k8s/` uses.

`make k8s-check` runs on machines that have Python and pip but no `kubectl`,
no `kustomize` binary and no network, and no PyPI wheel ships a Linux
kustomize. So this module builds a kustomization the way `kustomize build`
(v5) does for exactly the features our manifests use, and refuses anything
else loudly: an unknown kustomization field, patch directive or resource
kind outside the known pod-spec carriers is an error, never silently ignored.
On a real cluster `kubectl apply -k` uses the real kustomize; this renderer
only has to agree with it on our files.

Supported:

- ``resources``: YAML files (multi-document) inside the kustomization root,
  and directories holding their own kustomization (built recursively, so a
  base's transformers apply to the base only);
- ``namespace`` (cluster-scoped kinds are left alone);
- ``labels`` (``pairs``, ``includeTemplates`` incl. StatefulSet claim templates;
  ``includeSelectors: false`` only);
- ``images`` (``name``, ``newName``, ``newTag``, ``digest``);
- ``configMapGenerator`` / ``secretGenerator`` (``envs``, ``files``,
  ``literals``, ``behavior: create|merge|replace``, ``options.labels``,
  ``options.disableNameSuffixHash``) and ``generatorOptions``: the name gets
  kustomize's content-hash suffix (sha256 over the JSON of kind, name and
  data, first ten hex digits with 0,1,3,a,e spelled g,h,k,m,t), and every
  reference from a pod spec (envFrom, valueFrom, volumes, projected volumes,
  imagePullSecrets) is renamed with it;
- ``patches`` (``path`` or inline ``patch``; strategic merge or JSON 6902;
  ``target`` by group, version, kind, name regex, namespace, label selector);
- ``replicas``.

Usage: ``python scripts/kustomize.py k8s/overlays/kind`` prints the rendered
YAML like ``kustomize build``.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "namespace", "labels", "images",
    "configMapGenerator", "secretGenerator", "generatorOptions", "patches", "replicas",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
    "CSIDriver", "Node", "VolumeAttachment",
}
# Where each workload kind keeps its pod template.
POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
# kustomize's legacy output order (what `kustomize build` prints by default).
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding", "ConfigMap",
    "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass", "PersistentVolume",
    "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob", "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
# Strategic-merge keys of the list fields our patches touch (from the Kubernetes API types).
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name",
}


class KustomizeError(Exception):
    """A kustomization this renderer cannot build (or kustomize would reject)."""


# -- resources ----------------------------------------------------------------


@dataclass
class Resource:
    obj: dict[str, Any]
    # Generated ConfigMaps/Secrets get their hash suffix at the very end of the
    # top-level build, so an overlay's merge changes the hash and references
    # keep using the plain name until then.
    hash_suffix: bool = False

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.obj.get("metadata", {}).get("namespace", ""))

    @property
    def group_version(self) -> tuple[str, str]:
        api = str(self.obj.get("apiVersion", ""))
        group, _, version = api.rpartition("/")
        return group, version

    def ident(self) -> tuple[str, str, str, str]:
        return (self.group_version[0], self.kind, self.namespace, self.name)


@dataclass
class Build:
    resources: list[Resource] = field(default_factory=list)

    def find(self, kind: str, name: str, namespace: str | None = None) -> Resource | None:
        for r in self.resources:
            if r.kind == kind and r.name == name and (namespace is None or r.namespace == namespace):
                return r
        return None

    def add(self, res: Resource, origin: str) -> None:
        if any(r.ident() == res.ident() for r in self.resources):
            raise KustomizeError(f"{origin}: duplicate resource {res.kind}/{res.name}"
                                 f" (namespace {res.namespace or '-'})")
        self.resources.append(res)


def _load_kustomization(root: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        path = root / name
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(data, dict):
                raise KustomizeError(f"{path}: not a mapping")
            unknown = sorted(set(data) - SUPPORTED_FIELDS)
            if unknown:
                raise KustomizeError(
                    f"{path}: unsupported kustomization field(s) {unknown}; the offline renderer "
                    f"(scripts/kustomize.py) implements {sorted(SUPPORTED_FIELDS)}")
            kind = data.get("kind", "Kustomization")
            if kind != "Kustomization":
                raise KustomizeError(f"{path}: kind {kind!r} is not a Kustomization")
            return data
    raise KustomizeError(f"{root}: no kustomization.yaml")


def _inside(root: Path, path: Path, what: str) -> Path:
    """kustomize's default load restrictor: files must live under the kustomization root."""
    resolved = path.resolve()
    if resolved != root.resolve() and root.resolve() not in resolved.parents:
        raise KustomizeError(f"{what} {path} is outside the kustomization root {root}")
    return resolved


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
        if doc is None:
            continue
        if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
            raise KustomizeError(f"{path}: every document needs apiVersion and kind")
        if doc["kind"].endswith("List") and "items" in doc:
            yield from doc["items"]
        else:
            yield doc


def build(root: str | Path) -> list[dict[str, Any]]:
    """`kustomize build root`: the rendered objects, in kustomize's legacy order."""
    b = _build(Path(root), stack=())
    _apply_hash_suffixes(b)
    return [r.obj for r in sorted(b.resources, key=_order_key)]


def _order_key(r: Resource) -> tuple[int, str, str, str]:
    if r.kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(r.kind)
    elif r.kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(r.kind)
    else:
        rank = len(ORDER_FIRST)
    return (rank, r.kind, r.namespace, r.name)


def _build(root: Path, stack: tuple[Path, ...]) -> Build:
    root = root.resolve()
    if root in stack:
        raise KustomizeError(f"cycle in kustomizations: {' -> '.join(map(str, (*stack, root)))}")
    k = _load_kustomization(root)
    out = Build()
    for entry in k.get("resources") or []:
        path = root / entry
        if path.is_dir():
            for r in _build(path, (*stack, root)).resources:
                out.add(r, str(root))
        elif path.is_file():
            for doc in _documents(_inside(root, path, "resource")):
                out.add(Resource(doc), str(path))
        else:
            raise KustomizeError(f"{root}: resource {entry!r} does not exist")

    options = k.get("generatorOptions") or {}
    for gen in k.get("configMapGenerator") or []:
        _generate(out, root, gen, "ConfigMap", options)
    for gen in k.get("secretGenerator") or []:
        _generate(out, root, gen, "Secret", options)

    for patch in k.get("patches") or []:
        _apply_patch(out, root, patch)

    if ns := k.get("namespace"):
        for r in out.resources:
            if r.kind not in CLUSTER_SCOPED:
                r.obj.setdefault("metadata", {})["namespace"] = ns

    for spec in k.get("labels") or []:
        _apply_labels(out, spec)

    for image in k.get("images") or []:
        _apply_image(out, image)

    for rep in k.get("replicas") or []:
        targets = [r for r in out.resources
                   if r.name == rep["name"] and r.kind in ("Deployment", "StatefulSet", "ReplicaSet")]
        if not targets:
            raise KustomizeError(f"{root}: replicas: no Deployment/StatefulSet named {rep['name']!r}")
        for r in targets:
            r.obj.setdefault("spec", {})["replicas"] = int(rep["count"])
    return out


# -- generators -----------------------------------------------------------------


def _parse_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}:{n}: expected KEY=VALUE")
        key, _, value = line.partition("=")
        out[key.strip()] = value
    return out


def _generator_data(root: Path, gen: dict[str, Any]) -> dict[str, str]:
    data: dict[str, str] = {}

    def put(key: str, value: str, origin: str) -> None:
        if key in data:
            raise KustomizeError(f"{origin}: key {key!r} defined twice in {gen.get('name')}")
        data[key] = value

    for env in gen.get("envs") or []:
        for key, value in _parse_env_file(_inside(root, root / env, "env file")).items():
            put(key, value, env)
    for spec in gen.get("files") or []:
        key, sep, rel = str(spec).partition("=")
        if not sep:
            key, rel = Path(spec).name, spec
        put(key, _inside(root, root / rel, "file").read_text(encoding="utf-8"), rel)
    for lit in gen.get("literals") or []:
        key, sep, value = str(lit).partition("=")
        if not sep:
            raise KustomizeError(f"literal {lit!r} is not KEY=VALUE")
        if len(value) > 1 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]  # kustomize drops one pair of surrounding quotes
        put(key, value, "literals")
    return data


def _generate(out: Build, root: Path, gen: dict[str, Any], kind: str,
              options: dict[str, Any]) -> None:
    name = gen["name"]
    opts = {**options, **(gen.get("options") or {})}
    data = _generator_data(root, gen)
    if kind == "Secret":
        payload = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        payload = data
    behavior = gen.get("behavior", "create")
    existing = out.find(kind, name, gen.get("namespace"))
    if behavior == "create":
        if existing is not None:
            raise KustomizeError(f"{root}: {kind} {name} already exists; use behavior: merge or replace")
        obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": name}}
        if gen.get("namespace"):
            obj["metadata"]["namespace"] = gen["namespace"]
        if kind == "Secret":
            obj["type"] = gen.get("type", "Opaque")
        obj["data"] = dict(sorted(payload.items()))
        res = Resource(obj, hash_suffix=not opts.get("disableNameSuffixHash", False))
        out.add(res, str(root))
    elif behavior in ("merge", "replace"):
        if existing is None:
            raise KustomizeError(f"{root}: behavior {behavior} but no {kind} {name} to {behavior}")
        res = existing
        merged = {} if behavior == "replace" else dict(res.obj.get("data") or {})
        merged.update(payload)
        res.obj["data"] = dict(sorted(merged.items()))
        if "disableNameSuffixHash" in opts:
            res.hash_suffix = not opts["disableNameSuffixHash"]
    else:
        raise KustomizeError(f"{root}: unknown generator behavior {behavior!r}")
    if labels := opts.get("labels"):
        res.obj["metadata"].setdefault("labels", {}).update(labels)
    if annotations := opts.get("annotations"):
        res.obj["metadata"].setdefault("annotations", {}).update(annotations)


def _go_json(value: Any) -> str:
    """encoding/json.Marshal of a map: sorted keys, compact, HTML-safe escapes."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def content_hash(obj: dict[str, Any]) -> str:
    """kustomize's name suffix for a ConfigMap or Secret (api/hasher)."""
    name = obj.get("metadata", {}).get("name", "")
    if obj["kind"] == "ConfigMap":
        m: dict[str, Any] = {"kind": "ConfigMap", "name": name, "data": obj.get("data", "")}
        if isinstance(obj.get("binaryData"), dict):
            m["binaryData"] = obj["binaryData"]
    elif obj["kind"] == "Secret":
        m = {"kind": "Secret", "type": obj.get("type", ""), "name": name, "data": obj.get("data", "")}
        if isinstance(obj.get("stringData"), dict):
            m["stringData"] = obj["stringData"]
    else:
        raise KustomizeError(f"cannot hash a {obj['kind']}")
    digest = hashlib.sha256(_go_json(m).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _pod_specs(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if obj.get("kind") == "Pod":
        yield obj.setdefault("spec", {})
        return
    path = POD_TEMPLATE_PATHS.get(str(obj.get("kind")))
    if path is None:
        return
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and isinstance(node.get("spec"), dict):
        yield node["spec"]


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from pod.get(key) or []


def _rename_references(obj: dict[str, Any], kind: str, old: str, new: str) -> None:
    for pod in _pod_specs(obj):
        for c in _containers(pod):
            for src in c.get("envFrom") or []:
                ref = src.get("configMapRef" if kind == "ConfigMap" else "secretRef")
                if ref and ref.get("name") == old:
                    ref["name"] = new
            for env in c.get("env") or []:
                vf = env.get("valueFrom") or {}
                ref = vf.get("configMapKeyRef" if kind == "ConfigMap" else "secretKeyRef")
                if ref and ref.get("name") == old:
                    ref["name"] = new
        for vol in pod.get("volumes") or []:
            if kind == "ConfigMap" and (vol.get("configMap") or {}).get("name") == old:
                vol["configMap"]["name"] = new
            if kind == "Secret" and (vol.get("secret") or {}).get("secretName") == old:
                vol["secret"]["secretName"] = new
            for src in (vol.get("projected") or {}).get("sources") or []:
                ref = src.get("configMap" if kind == "ConfigMap" else "secret")
                if ref and ref.get("name") == old:
                    ref["name"] = new
        if kind == "Secret":
            for ips in pod.get("imagePullSecrets") or []:
                if ips.get("name") == old:
                    ips["name"] = new


def _apply_hash_suffixes(b: Build) -> None:
    for r in b.resources:
        if not r.hash_suffix:
            continue
        old = r.name
        new = f"{old}-{content_hash(r.obj)}"
        r.obj["metadata"]["name"] = new
        for other in b.resources:
            if other.namespace == r.namespace or other.kind in CLUSTER_SCOPED:
                _rename_references(other.obj, r.kind, old, new)


# -- transformers ----------------------------------------------------------------


def _apply_labels(b: Build, spec: dict[str, Any]) -> None:
    if spec.get("includeSelectors"):
        raise KustomizeError("labels.includeSelectors: true is not supported by the offline "
                             "renderer (selectors are written out in each manifest)")
    pairs = {str(k): str(v) for k, v in (spec.get("pairs") or {}).items()}
    for r in b.resources:
        r.obj.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if spec.get("includeTemplates"):
            path = POD_TEMPLATE_PATHS.get(r.kind)
            if path is None:
                continue
            node: Any = r.obj
            for key in path:
                node = node.setdefault(key, {})
            node.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if r.kind == "CronJob":
                jt = r.obj["spec"]["jobTemplate"]
                jt.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
            if r.kind == "StatefulSet":
                # As kustomize does (kubernetes-sigs/kustomize#5389); harmless while constant.
                for vct in r.obj["spec"].get("volumeClaimTemplates") or []:
                    vct.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


_IMAGE_RE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>.+))?$")


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    m = _IMAGE_RE.match(image)
    if not m:
        raise KustomizeError(f"cannot parse image {image!r}")
    return m["name"], m["tag"], m["digest"]


def _apply_image(b: Build, spec: dict[str, Any]) -> None:
    for r in b.resources:
        for pod in _pod_specs(r.obj):
            for c in _containers(pod):
                name, tag, digest = _split_image(str(c.get("image", "")))
                if name != spec["name"]:
                    continue
                name = spec.get("newName", name)
                if "digest" in spec:
                    c["image"] = f"{name}@{spec['digest']}"
                elif "newTag" in spec:
                    c["image"] = f"{name}:{spec['newTag']}"
                else:
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# -- patches ---------------------------------------------------------------------


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes label selector syntax: a=b, a==b, a!=b, a, !a, a in (x,y), a notin (x,y)."""
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = term.strip()
        if not term:
            continue
        if m := re.fullmatch(r"([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)", term):
            key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",")}
            present = key in labels and labels[key] in values
            if (op == "in") != present:
                return False
        elif m := re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", term):
            key, op, value = m[1], m[2], m[3]
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif m := re.fullmatch(r"!\s*([\w./-]+)", term):
            if m[1] in labels:
                return False
        elif re.fullmatch(r"[\w./-]+", term):
            if term not in labels:
                return False
        else:
            raise KustomizeError(f"cannot parse label selector term {term!r}")
    return True


def _target_matches(r: Resource, target: dict[str, Any]) -> bool:
    group, version = r.group_version
    meta = r.obj.get("metadata", {})
    checks = [
        ("group", group), ("version", version), ("kind", r.kind),
        ("name", r.name), ("namespace", r.namespace),
    ]
    for key, actual in checks:
        if key in target and not re.fullmatch(str(target[key]), actual):
            return False
    if "labelSelector" in target and not _selector_matches(target["labelSelector"],
                                                           meta.get("labels") or {}):
        return False
    return not ("annotationSelector" in target and not _selector_matches(
        target["annotationSelector"], meta.get("annotations") or {}))


def _apply_patch(b: Build, root: Path, spec: dict[str, Any]) -> None:
    if "path" in spec:
        text = _inside(root, root / spec["path"], "patch").read_text(encoding="utf-8")
    elif "patch" in spec:
        text = spec["patch"]
    else:
        raise KustomizeError(f"{root}: a patch needs path or patch")
    body = yaml.safe_load(text)
    target = spec.get("target")
    if isinstance(body, list):
        if not target:
            raise KustomizeError(f"{root}: a JSON 6902 patch needs a target")
        targets = [r for r in b.resources if _target_matches(r, target)]
        if not targets:
            raise KustomizeError(f"{root}: patch target {target} matches nothing")
        for r in targets:
            r.obj = json_patch(r.obj, body)
        return
    if not isinstance(body, dict):
        raise KustomizeError(f"{root}: a patch must be a mapping or a JSON 6902 list")
    if target:
        targets = [r for r in b.resources if _target_matches(r, target)]
    else:
        kind, name = body.get("kind"), body.get("metadata", {}).get("name")
        targets = [r for r in b.resources if r.kind == kind and r.name == name]
    if not targets:
        raise KustomizeError(f"{root}: patch {target or (body.get('kind'), body.get('metadata'))}"
                             " matches nothing")
    for r in targets:
        patch = copy.deepcopy(body)
        if target:
            # With a target, the patch's own identity is ignored (kustomize's "name: not-important").
            meta = patch.get("metadata")
            if isinstance(meta, dict):
                meta.pop("name", None)
                if not meta:
                    del patch["metadata"]
        for ident in ("apiVersion", "kind"):
            patch.pop(ident, None)
        r.obj = strategic_merge(r.obj, patch)


def strategic_merge(original: Any, patch: Any, field_name: str = "") -> Any:
    """Kubernetes strategic merge for the fields our manifests patch.

    Maps merge recursively (``null`` deletes a key); lists with a merge key
    (containers and env by name, volumeMounts by mountPath, container ports by
    containerPort, ...) merge element-wise and honour ``$patch: delete``; any
    other list is replaced, as the API's default ``replace`` strategy does.
    """
    if isinstance(patch, dict):
        if patch.get("$patch") == "replace":
            return {k: v for k, v in patch.items() if k != "$patch"}
        for key in patch:
            if key.startswith("$") and key != "$patch":
                raise KustomizeError(f"unsupported strategic-merge directive {key}")
        if not isinstance(original, dict):
            original = {}
        out = copy.deepcopy(original)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = strategic_merge(None, value, key)
        return out
    if isinstance(patch, list):
        key = MERGE_KEYS.get(field_name)
        if field_name == "ports" and patch and all(isinstance(p, dict) for p in patch):
            key = "containerPort" if all("containerPort" in p for p in patch) else "port"
        if key is None or not isinstance(original, list):
            return [strategic_merge(None, v) if isinstance(v, dict) else v for v in patch
                    if not (isinstance(v, dict) and v.get("$patch") == "delete")]
        out_list = copy.deepcopy(original)
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise KustomizeError(f"{field_name}: patch element without merge key {key!r}")
            idx = next((i for i, o in enumerate(out_list) if o.get(key) == item[key]), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    del out_list[idx]
            elif idx is None:
                out_list.append(strategic_merge(None, item))
            else:
                out_list[idx] = strategic_merge(out_list[idx], item)
        return out_list
    return copy.deepcopy(patch)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add / replace / remove / test on a copy of doc."""
    out = copy.deepcopy(doc)
    for op in ops:
        kind = op.get("op")
        parts = _pointer(op["path"])
        parent: Any = out
        for p in parts[:-1]:
            try:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            except (KeyError, IndexError, ValueError) as exc:
                raise KustomizeError(f"JSON patch path {op['path']} does not exist") from exc
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(copy.deepcopy(op["value"]))
                continue
            try:
                index = int(last)
            except ValueError as exc:
                raise KustomizeError(f"JSON patch path {op['path']}: bad index") from exc
            if not 0 <= index < len(parent) + (1 if kind == "add" else 0):
                raise KustomizeError(f"JSON patch path {op['path']}: index out of range")
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[index]
            elif kind == "test":
                if parent[index] != op["value"]:
                    raise KustomizeError(f"JSON patch test failed at {op['path']}")
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind!r}")
        elif isinstance(parent, dict):
            if kind in ("replace", "remove", "test") and last not in parent:
                raise KustomizeError(f"JSON patch {kind} {op['path']}: no such member")
            if kind in ("add", "replace"):
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent[last] != op["value"]:
                    raise KustomizeError(f"JSON patch test failed at {op['path']}")
            else:
                raise KustomizeError(f"unsupported JSON patch op {kind!r}")
        else:
            raise KustomizeError(f"JSON patch path {op['path']} goes through a scalar")
    return out


# -- output ----------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str_presenter)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
                        for o in objects)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: kustomize.py DIR   (like `kustomize build DIR`)", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(to_yaml(build(argv[0])))
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
