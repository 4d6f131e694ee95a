"""The Kubernetes manifests under k8s/, rendered offline, against the deployment policies.

Every kustomization (the base and each overlay) renders with the real
kustomize and every object is valid for the targeted Kubernetes version
(kubeconform, strict schemas). Then, for every
workload: requests and limits, non-root, read-only root with an emptyDir at
/tmp, no capabilities, no privilege escalation; native gRPC probes naming the
service's health status; a termination grace period longer than the preStop
pause plus the server's drain; a PodDisruptionBudget and an autoscaler for
the stateless Deployments; and one Deployment for every gRPC service declared
in protos/ (parsed here, not listed) and every worker in servers/systems.py.
"""

from __future__ import annotations

import base64
import copy
import re
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["base", "kind", "minikube"]
LOCAL_OVERLAYS = ["kind", "minikube"]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "CronJob"}
APP_IMAGE = "sysdesign"

Obj = dict[str, Any]


# -- helpers -------------------------------------------------------------------------


def proto_services() -> dict[str, list[str]]:
    """package -> fully qualified names of the gRPC services declared in protos/**/*.proto."""
    out: dict[str, list[str]] = {}
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        text = proto.read_text(encoding="utf-8")
        text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
        text = re.sub(r"//[^\n]*", "", text)
        pkg = re.search(r"^\s*package\s+([\w.]+)\s*;", text, flags=re.M)
        assert pkg, f"{proto} declares no package"
        names = re.findall(r"^\s*service\s+(\w+)\s*\{", text, flags=re.M)
        if names or pkg[1].startswith("sysdesign."):  # message-only files of foreign contracts
            out.setdefault(pkg[1], []).extend(f"{pkg[1]}.{n}" for n in names)
    return out


# Contracts sysdesign serves under their owners' names, so their clients call it
# unchanged: package -> the system of servers/systems.py that serves it.
FOREIGN_CONTRACTS = {"envoy.service.ratelimit.v3": "ratelimit"}


def system_of(package: str) -> str:
    """sysdesign.<system>.v1 -> <system> (DESIGN.md: one system = one proto package)."""
    if package in FOREIGN_CONTRACTS:
        return FOREIGN_CONTRACTS[package]
    parts = package.split(".")
    assert len(parts) >= 3 and parts[0] == "sysdesign", f"unexpected proto package {package}"
    return parts[1]


def find(objs: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[Obj], kind: str, name: str) -> Obj:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def template(obj: Obj) -> Obj:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]  # type: ignore[no-any-return]
    return obj["spec"]["template"]  # type: ignore[no-any-return]


def pod(obj: Obj) -> Obj:
    return template(obj)["spec"]  # type: ignore[no-any-return]


def containers(obj: Obj, *, init: bool = True) -> list[Obj]:
    spec = pod(obj)
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def label(o: Obj) -> str:
    return f"{o['kind']}/{o['metadata']['name']}"


def image_name(image: str) -> str:
    """registry/name:tag@digest -> registry/name."""
    ref = image.split("@")[0]
    return ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref


def app_containers(obj: Obj) -> list[Obj]:
    return [c for c in containers(obj, init=False) if image_name(c["image"]) == APP_IMAGE]


def app_workloads(objs: list[Obj]) -> list[Obj]:
    return [w for w in workloads(objs) if app_containers(w)]


def effective_env(objs: list[Obj], c: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it (envFrom, then env)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        if ref := src.get("configMapRef"):
            env.update(one(objs, "ConfigMap", ref["name"])["data"])
        if ref := src.get("secretRef"):
            data = one(objs, "Secret", ref["name"])["data"]
            env.update({k: base64.b64decode(v).decode() for k, v in data.items()})
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), e["value"])
        elif ref := (e.get("valueFrom") or {}).get("configMapKeyRef"):
            env[e["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif ref := (e.get("valueFrom") or {}).get("secretKeyRef"):
            env[e["name"]] = base64.b64decode(one(objs, "Secret", ref["name"])["data"][ref["key"]]).decode()
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(objs: list[Obj], selector: dict[str, str]) -> list[Obj]:
    return [w for w in workloads(objs) if selects(selector, template(w)["metadata"].get("labels") or {})]


def port_named(c: Obj, name: str) -> int:
    for p in c.get("ports") or []:
        if p.get("name") == name:
            return int(p["containerPort"])
    raise AssertionError(f"container {c['name']} has no port named {name}")


def pre_stop_sleep(c: Obj) -> int:
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep", f"{c['name']}: preStop should pause, got {cmd}"
    return int(cmd[1])


def args_services(c: Obj) -> list[str]:
    args = c.get("args") or []
    assert args[:1] == ["serve"], args
    i = args.index("--services")
    return [s for s in args[i + 1].split(",") if s]


@pytest.fixture(params=TARGETS)
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[Obj]]) -> list[Obj]:
    return rendered[request.param]


# -- rendering and schemas ----------------------------------------------------------------


def test_every_kustomization_is_checked(k8s_check: ModuleType) -> None:
    assert set(k8s_check.targets()) == set(TARGETS)


def test_every_object_validates_against_the_kubernetes_schemas(
        request: pytest.FixtureRequest, objs: list[Obj], rendered_yaml: dict[str, str], k8s_check: ModuleType) -> None:
    # kubeconform over exactly what `kustomize build` printed (what `kubectl apply -k` applies).
    assert len(objs) > 10
    errors = k8s_check.validate_yaml(rendered_yaml[request.node.callspec.params["objs"]])
    assert not errors, "\n".join(errors)
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"sysdesign"}
    assert one(objs, "Namespace", "sysdesign")


def test_schema_validation_is_strict(k8s_check: ModuleType, k8s_tools: ModuleType,
                                     rendered: dict[str, list[Obj]]) -> None:
    """kubeconform refuses an unknown field, a wrong type, a duplicated key and an unknown kind,
    so the check above means something."""
    edge = one(rendered["kind"], "Deployment", "edge")
    assert k8s_check.validate(edge) is None
    d = copy.deepcopy(edge)
    d["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 1}}
    assert "/spec/template/spec/containers/0: additional properties 'readinesProbe' not allowed" in \
        (k8s_check.validate(d) or "")
    d = copy.deepcopy(edge)
    d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = {"cores": 1}
    assert "/spec/template/spec/containers/0/resources/limits/cpu" in (k8s_check.validate(d) or "")
    d = copy.deepcopy(edge)
    d["spec"]["replicas"] = "two"
    assert "/spec/replicas: got string, want null or integer" in (k8s_check.validate(d) or "")
    # A key given twice (YAML would silently keep the last one).
    dup = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  name: b\n"
    assert k8s_check.validate_yaml(dup), "a duplicated key passed"
    # A kind without a schema is an error, never a skip: the schemas are there offline.
    d = copy.deepcopy(edge)
    d["kind"] = "Deploymnet"
    assert "could not find schema for Deploymnet" in (k8s_check.validate(d) or "")
    # What make k8s-check runs (-summary) fails on an invalid object.
    bad = k8s_tools.kubeconform(yaml.safe_dump(d), "-summary")
    assert bad.returncode != 0 and "Errors: 1" in bad.stdout, bad.stdout
    assert "Invalid: 0, Errors: 0, Skipped: 0" in k8s_tools.kubeconform(yaml.safe_dump(edge), "-summary").stdout


def test_references_resolve(objs: list[Obj]) -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for w in workloads(objs):
        for c in containers(w):
            for src in c.get("envFrom") or []:
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if ref := src.get(key):
                        assert (kind, ref["name"]) in names, f"{label(w)}: no {kind} {ref['name']}"
            effective_env(objs, c)  # every key reference resolves (KeyError otherwise)
            volumes = {v["name"]: v for v in pod(w).get("volumes") or []}
            claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates") or []}
            for m in c.get("volumeMounts") or []:
                assert m["name"] in volumes or m["name"] in claims, f"{label(w)}: no volume {m['name']}"
    for svc in find(objs, "Service"):
        backing = selected_workloads(objs, svc["spec"]["selector"])
        assert backing, f"Service {svc['metadata']['name']} selects no workload"
        for p in svc["spec"]["ports"]:
            if isinstance(p["targetPort"], str):
                for w in backing:
                    assert any(q.get("name") == p["targetPort"]
                               for c in containers(w, init=False) for q in c.get("ports") or []), \
                        f"{label(w)} has no port {p['targetPort']} for Service {svc['metadata']['name']}"
    for pdb in find(objs, "PodDisruptionBudget"):
        assert selected_workloads(objs, pdb["spec"]["selector"]["matchLabels"]), label(pdb)
    for hpa in find(objs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names, label(hpa)
    for sts in find(objs, "StatefulSet"):
        svc = one(objs, "Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{label(sts)} needs a headless Service"


# -- policies for every workload ----------------------------------------------------------


def test_every_container_has_requests_limits_and_a_locked_down_security_context(objs: list[Obj]) -> None:
    for w in workloads(objs):
        spec = pod(w)
        pod_sc = spec.get("securityContext") or {}
        assert spec.get("automountServiceAccountToken") is False, label(w)
        # No docker-link variables (EDGE_PORT=tcp://...) leaking into the environment.
        assert spec.get("enableServiceLinks") is False, label(w)
        assert (pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", label(w)
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        for c in containers(w):
            where = f"{label(w)} container {c['name']}"
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{where}: {kind} cpu+memory"
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{where}: a numeric non-root runAsUser"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{where}: drop ALL"
            assert not (sc.get("capabilities") or {}).get("add"), f"{where}: adds capabilities"
            assert sc.get("privileged") is not True, where
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            assert tmp, f"{where}: no writable /tmp"
            assert "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp is not an emptyDir"


def test_every_grpc_deployment_probes_its_service_natively(objs: list[Obj]) -> None:
    services = proto_services()
    grpc_deployments = [d for d in find(objs, "Deployment")
                        if any((c.get("args") or [])[:1] == ["serve"] for c in app_containers(d))]
    assert grpc_deployments
    for d in grpc_deployments:
        c, = app_containers(d)
        hosted = {s for pkg, names in services.items() if system_of(pkg) in args_services(c) for s in names}
        assert hosted, f"{label(d)} serves {args_services(c)}, which declare no gRPC service in protos/"
        port = port_named(c, "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (c.get(probe) or {}).get("grpc")
            assert grpc, f"{label(d)}: {probe} must be a native gRPC probe"
            assert grpc["port"] == port, f"{label(d)}: {probe} on port {grpc['port']}, gRPC is on {port}"
            assert grpc.get("service") in hosted, \
                f"{label(d)}: {probe} names {grpc.get('service')!r}, not one of {sorted(hosted)}"
        svc = [s for s in find(objs, "Service") if selects(s["spec"]["selector"], template(d)["metadata"]["labels"])]
        assert any(p["name"] == "grpc" and p["targetPort"] in ("grpc", port)
                   for s in svc for p in s["spec"]["ports"]), f"{label(d)}: no Service port named grpc"


def test_every_grpc_service_in_protos_has_a_deployment(objs: list[Obj]) -> None:
    from servers.systems import SYSTEMS

    services = proto_services()
    assert services, "no protos found"
    deployed: dict[str, set[str]] = {}  # system -> services named by that Deployment's probes
    for d in find(objs, "Deployment"):
        for c in app_containers(d):
            if (c.get("args") or [])[:1] == ["serve"]:
                probed = {(c.get(p) or {}).get("grpc", {}).get("service")
                          for p in ("startupProbe", "readinessProbe", "livenessProbe")}
                for system in args_services(c):
                    deployed.setdefault(system, set()).update(probed)
    missing = []
    for package, names in services.items():
        system = system_of(package)
        for name in names:
            if system not in SYSTEMS:
                missing.append(f"{name}: package {package} has no system {system!r} in servers/systems.py")
            elif system not in deployed:
                missing.append(f"{name}: no Deployment runs `serve --services {system}`"
                               f" (copy k8s/base/systems/identity/)")
            elif not deployed[system] & set(names):
                missing.append(f"{name}: the {system} Deployment's probes name none of {names}")
    assert not missing, "\n".join(missing)


def test_every_worker_has_a_deployment(objs: list[Obj]) -> None:
    from servers.systems import WORKERS

    by_worker = {}
    for d in find(objs, "Deployment"):
        for c in app_containers(d):
            args = c.get("args") or []
            if args[:1] == ["worker"]:
                by_worker[args[1]] = (d, c)
    assert set(WORKERS) <= set(by_worker), f"workers without a Deployment: {sorted(set(WORKERS) - set(by_worker))}"
    assert set(by_worker) <= set(WORKERS), f"Deployments of unknown workers: {sorted(set(by_worker) - set(WORKERS))}"
    for d, c in by_worker.values():
        port = port_named(c, "grpc")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (c.get(probe) or {}).get("grpc")
            # A worker process registers only the overall status ("").
            assert grpc and grpc["port"] == port and not grpc.get("service"), f"{label(d)}: {probe}"


def test_the_edge_serves_http_with_backend_aware_readiness(objs: list[Obj]) -> None:
    edges = [(d, c) for d in find(objs, "Deployment") for c in app_containers(d)
             if (c.get("args") or [])[:1] == ["edge"]]
    assert len(edges) == 1, "exactly one edge Deployment (it serves every system's edge routes)"
    d, c = edges[0]
    port = port_named(c, "http")
    env = effective_env(objs, c)
    assert env["SYSDESIGN_HTTP_ADDR"].rsplit(":", 1)[1] == str(port)
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    # Liveness must not depend on the backends, or an outage restarts every edge.
    assert c["livenessProbe"]["httpGet"]["path"] != "/healthz"
    svc = [s for s in find(objs, "Service") if selects(s["spec"]["selector"], template(d)["metadata"]["labels"])]
    assert any(p["name"] == "http" for s in svc for p in s["spec"]["ports"])


def test_termination_grace_covers_the_prestop_pause_and_the_drain(objs: list[Obj]) -> None:
    for w in app_workloads(objs):
        if w["kind"] == "Job":
            continue
        c, = app_containers(w)
        grace = float(effective_env(objs, c)["SYSDESIGN_SHUTDOWN_GRACE_SECONDS"])
        pause = pre_stop_sleep(c)
        assert pause >= 1, label(w)
        # Stack.stop(): the gRPC drain, then (workers) the current job, each up to the grace.
        drains = 2 if (c.get("args") or [])[:1] == ["worker"] else 1
        tgp = pod(w)["terminationGracePeriodSeconds"]
        assert tgp > pause + drains * grace, \
            f"{label(w)}: terminationGracePeriodSeconds {tgp} <= preStop {pause} + {drains}x{grace}"
    c, = containers(one(objs, "StatefulSet", "cassandra"), init=False)
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["nodetool", "drain"]


def test_stateless_deployments_have_a_pdb_and_an_autoscaler(objs: list[Obj], request: pytest.FixtureRequest) -> None:
    deployments = find(objs, "Deployment")
    assert deployments
    for d in deployments:
        labels = template(d)["metadata"]["labels"]
        pdbs = [p for p in find(objs, "PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(pdbs) == 1, f"{label(d)}: {len(pdbs)} PodDisruptionBudgets"
        assert "maxUnavailable" in pdbs[0]["spec"] or "minAvailable" in pdbs[0]["spec"]
        hpas = [h for h in find(objs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": d["metadata"]["name"]}]
        assert len(hpas) == 1, f"{label(d)}: {len(hpas)} autoscalers"
        h = hpas[0]["spec"]
        assert 1 <= h["minReplicas"] <= h["maxReplicas"], label(d)
        assert h["metrics"], label(d)
        if request.node.callspec.params["objs"] == "base":
            assert d["spec"]["replicas"] >= 2 and h["minReplicas"] >= 2, f"{label(d)}: base runs >= 2"


# -- backends, schema Job, configuration ---------------------------------------------------


def test_backends_are_statefulsets_with_claims(objs: list[Obj], request: pytest.FixtureRequest) -> None:
    target = request.node.callspec.params["objs"]
    for name in ("cassandra", "redis", "minio"):
        sts = one(objs, "StatefulSet", name)
        assert sts["spec"]["volumeClaimTemplates"], name
        c, = containers(sts, init=False)
        data_claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
        assert any(m["name"] == data_claim for m in c["volumeMounts"]), f"{name}: the claim is not mounted"
        assert c.get("readinessProbe") and c.get("livenessProbe"), name
    redis, = containers(one(objs, "StatefulSet", "redis"), init=False)
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    cassandra = one(objs, "StatefulSet", "cassandra")
    env = effective_env(objs, containers(cassandra, init=False)[0])
    for seed in env["CASSANDRA_SEEDS"].split(","):
        ordinal = int(seed.split(".")[0].rsplit("-", 1)[1])
        assert seed == f"cassandra-{ordinal}.{cassandra['spec']['serviceName']}"
        assert ordinal < cassandra["spec"]["replicas"], f"seed {seed} is not a pod of the ring"
    heap = int(env["MAX_HEAP_SIZE"].rstrip("M"))
    limit = containers(cassandra, init=False)[0]["resources"]["limits"]["memory"]
    limit_mib = int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1)
    assert heap < limit_mib * 0.75, "the heap leaves room for off-heap memory"
    base = request.getfixturevalue("rendered")["base"]
    base_env = effective_env(base, containers(one(base, "StatefulSet", "cassandra"), init=False)[0])
    if target == "base":
        assert cassandra["spec"]["replicas"] == 3
    else:
        assert cassandra["spec"]["replicas"] == 1
        assert heap < int(base_env["MAX_HEAP_SIZE"].rstrip("M")), "overlays run a smaller heap"


def test_schema_job_migrates_with_a_replication_the_ring_can_meet(objs: list[Obj]) -> None:
    job, = find(objs, "Job")
    c, = app_containers(job)
    assert c["args"][:2] == ["migrate", "--apply"]
    assert pod(job)["restartPolicy"] in ("OnFailure", "Never")
    env = effective_env(objs, c)
    cls, _, spec = env["SYSDESIGN_CASSANDRA_REPLICATION"].partition(":")
    assert cls == "NetworkTopologyStrategy"
    dcs = dict(part.split("=") for part in spec.split(","))
    cassandra = one(objs, "StatefulSet", "cassandra")
    ring = effective_env(objs, containers(cassandra, init=False)[0])
    assert set(dcs) == {ring["CASSANDRA_DC"]} == {env["SYSDESIGN_CASSANDRA_LOCAL_DC"]}
    assert int(dcs[ring["CASSANDRA_DC"]]) == min(3, cassandra["spec"]["replicas"]), \
        f"replication {env['SYSDESIGN_CASSANDRA_REPLICATION']} for {cassandra['spec']['replicas']} node(s)"
    # The Job also creates the bucket, so it needs the S3 endpoint and credentials.
    assert env["SYSDESIGN_S3_ENDPOINT"] and env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]


def _service_port(objs: list[Obj], host: str, port: int) -> None:
    # "<service>" or "<pod>.<service>" (a StatefulSet pod behind its headless Service).
    svc_name = host.split(".")[1] if "." in host else host
    svc = one(objs, "Service", svc_name)
    assert port in [p["port"] for p in svc["spec"]["ports"]], f"Service {svc_name} has no port {port}"


def test_configuration_points_at_the_backends_and_secrets_come_from_secrets(objs: list[Obj]) -> None:
    minio, = containers(one(objs, "StatefulSet", "minio"), init=False)
    minio_env = effective_env(objs, minio)
    config, = [c for c in find(objs, "ConfigMap") if c["metadata"]["name"].startswith("sysdesign-config-")]
    assert "SYSDESIGN_TOKEN_SECRET" not in config["data"] and "AWS_SECRET_ACCESS_KEY" not in config["data"]
    for w in app_workloads(objs):
        for c in app_containers(w):
            env = effective_env(objs, c)
            redis = urlsplit(env["SYSDESIGN_REDIS_URL"])
            _service_port(objs, redis.hostname or "", redis.port or 6379)
            for host in env["SYSDESIGN_CASSANDRA_HOSTS"].split(","):
                _service_port(objs, host, int(env["SYSDESIGN_CASSANDRA_PORT"]))
            s3 = urlsplit(env["SYSDESIGN_S3_ENDPOINT"])
            _service_port(objs, s3.hostname or "", s3.port or 80)
            assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
                (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]), label(w)
            assert env["SYSDESIGN_DATA_DIR"].startswith("/tmp/") and env["MPLCONFIGDIR"].startswith("/tmp/")
            if w["kind"] != "Job":
                assert len(env.get("SYSDESIGN_TOKEN_SECRET", "")) >= 32, f"{label(w)}: token secret"
                for name, addr in (("grpc", "SYSDESIGN_GRPC_ADDR"), ("metrics", "SYSDESIGN_METRICS_ADDR")):
                    if any(p.get("name") == name for p in c.get("ports") or []):
                        host, _, port = env[addr].rpartition(":")
                        assert host == "0.0.0.0" and int(port) == port_named(c, name), f"{label(w)}: {addr}"
    # The generated Secrets carry kustomize's content hash, so new values roll the pods.
    for secret in find(objs, "Secret"):
        assert re.fullmatch(r"[a-z-]+-[a-z0-9]{10}", secret["metadata"]["name"]), secret["metadata"]["name"]


@pytest.mark.parametrize("overlay", LOCAL_OVERLAYS)
def test_local_overlays_run_one_replica_of_the_local_image(rendered: dict[str, list[Obj]], overlay: str) -> None:
    objs = rendered[overlay]
    for w in app_workloads(objs):
        for c in app_containers(w):
            assert c["image"] == "sysdesign:dev", f"{label(w)}: {c['image']} (make image builds sysdesign:dev)"
            assert c.get("imagePullPolicy") in ("IfNotPresent", "Never"), label(w)
    for d in find(objs, "Deployment"):
        assert d["spec"]["replicas"] == 1, label(d)
    for h in find(objs, "HorizontalPodAutoscaler"):
        assert h["spec"]["minReplicas"] == 1, label(h)
    edge = one(objs, "Service", "edge")
    assert edge["spec"]["type"] == "NodePort"
    assert all(30000 <= p["nodePort"] <= 32767 for p in edge["spec"]["ports"])


# -- the image -------------------------------------------------------------------------------


def test_dockerfile_builds_one_non_root_image_for_every_process(rendered: dict[str, list[Obj]]) -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, flags=re.M | re.I)
    assert len(stages) >= 2, "multi-stage build"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M)
    assert base and re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", base[1]), "a slim Python base"
    build, runtime = text.split("\nFROM ", 2)[1:3]
    assert "pip wheel" in build and "pip install" in runtime and "--no-index" in runtime
    assert "[dev]" not in text, "no dev dependencies in the image"
    assert re.search(r'^ENTRYPOINT \["sysdesign"\]', runtime, flags=re.M)
    user = re.search(r"^USER (\d+)(?::(\d+))?$", runtime, flags=re.M)
    assert user, "USER must be numeric so the kubelet can verify runAsNonRoot"
    assert "MPLCONFIGDIR=/tmp/" in runtime
    for w in app_workloads(rendered["base"]):
        assert pod(w)["securityContext"]["runAsUser"] == int(user[1]), label(w)
    exposed = {int(p) for p in re.findall(r"\d+", re.search(r"^EXPOSE (.+)$", runtime, flags=re.M)[1])}  # type: ignore[index]
    ports = {p["containerPort"] for w in app_workloads(rendered["base"]) for c in app_containers(w)
             for p in c.get("ports") or []}
    assert ports <= exposed
    # One pattern a line; a line starting with # is a comment (Docker's rule).
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    assert {".venv", "data", ".git"} <= set(ignored)
    copied = set(re.findall(r"^COPY (\S+)", build, flags=re.M))
    assert not copied & set(ignored), "the build copies something .dockerignore drops"
    assert re.search(r"^image:.*\n\tdocker build -t \$\(IMAGE\) \.$",
                     (ROOT / "Makefile").read_text(encoding="utf-8"), flags=re.M)


def test_the_rate_limit_service_reads_its_limits_from_a_hot_reloadable_configmap(objs: list[Obj]) -> None:
    """Its ConfigMap keeps its name (no hash suffix: an edit updates the mounted files in
    place and the pods reload them, instead of rolling them), is mounted where
    SYSDESIGN_RATELIMIT_CONFIG_DIR points, and every file in it loads."""
    from servers.ratelimit.config import RateLimitConfig

    d = one(objs, "Deployment", "ratelimit")
    c, = app_containers(d)
    env = effective_env(objs, c)
    cm = one(objs, "ConfigMap", "ratelimit-limits")
    volumes = {v["name"]: v for v in pod(d)["volumes"]}
    mounts = [m for m in c["volumeMounts"] if m["mountPath"] == env["SYSDESIGN_RATELIMIT_CONFIG_DIR"]]
    assert len(mounts) == 1 and mounts[0].get("readOnly") is True
    assert volumes[mounts[0]["name"]]["configMap"]["name"] == "ratelimit-limits"
    assert env["SYSDESIGN_RATELIMIT_FAILURE_MODE"] in ("allow", "deny", "error")
    cfg = RateLimitConfig()
    for name, text in cm["data"].items():
        assert name.endswith(".yaml"), name
        cfg.load_text(name, text)
    assert cfg.domains
