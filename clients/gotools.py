"""The Go programs the project runs (MinIO, grpcurl, buf, kustomize, kubeconform, envoyproxy/ratelimit), built from the Go module proxy and cached.

    python scripts/gotools.py build [NAME ...]   # every tool (or those named); prints their paths
    python scripts/gotools.py path NAME          # the cached binary's path (built if missing)

None of these ships a binary through a package registry these machines reach,
but each is a Go module, so ``go install <package>@<pinned version>`` builds
it from the Go module proxy. The binary is kept under
``~/.cache/sysdesign/go/<name>-<version>/`` (and Go's own module and build
caches), so only the first build costs time. ``make test`` builds them first;
where Go is missing, what needs them is skipped with one line saying why,
except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO


@dataclass(frozen=True)
class GoTool:
    name: str
    package: str  # what `go install` builds
    version: str
    why: str
    cold_build: str  # measured on a 2-core VM with empty Go caches
    command: str = ""  # the binary `go install` writes (the package's last element); default: name

    @property
    def binary(self) -> Path:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "sysdesign" / "go" / f"{self.name}-{self.version}" / (self.command or self.name)


TOOLS = {t.name: t for t in [
    # MinIO tags its releases RELEASE.<date>, which Go does not read as versions, so the
    # proxy serves its commits as pseudo-versions: this is the newest it lists.
    GoTool("minio", "github.com/minio/minio", os.environ.get(
        "SYSDESIGN_MINIO_VERSION", "v0.0.0-20260212201848-7aac2a2c5b7c"),
        "the S3 server the blob contract suite and media-on-S3 run against", "about 3.5 min"),
    # v1.9 speaks server reflection v1 (falling back to v1alpha), as current grpcurl does.
    GoTool("grpcurl", "github.com/fullstorydev/grpcurl/cmd/grpcurl", "v1.9.4",
           "the README's grpcurl commands and the reflection tests", "about 1.5 min"),
    GoTool("buf", "github.com/bufbuild/buf/cmd/buf", "v1.75.0",
           "`buf lint` and `buf breaking` on protos/ (make lint)", "about 1-2 min"),
    # v5.8.3 already asks for Go 1.27; this is the newest that builds with Go 1.26.
    GoTool("kustomize", "sigs.k8s.io/kustomize/kustomize/v5", "v5.8.2",
           "renders k8s/ for make k8s-check, as `kubectl apply -k` does", "about 40-60 s"),
    GoTool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform", "v0.8.0",
           "validates the rendered manifests against the Kubernetes schemas (make k8s-check)",
           "about 40-50 s"),
    # Envoy's reference rate limit service. Its last tag, v1.4.0, is from 2020 (it releases
    # container images by commit), so this is the proxy's pseudo-version of the newest commit.
    GoTool("envoy-ratelimit", "github.com/envoyproxy/ratelimit/src/service_cmd", os.environ.get(
        "SYSDESIGN_ENVOY_RATELIMIT_VERSION", "v1.4.1-0.20260122083618-3fb702589d36"),
        "the reference the rate limit service is checked and benchmarked against", "about 45 s",
        command="service_cmd"),
]}


def log(msg: str) -> None:
    print(f"gotools: {msg}", file=sys.stderr, flush=True)


def unavailable(what: str, why: str, *, prefix: str = "", ci_prefix: str | None = None,
                file: TextIO | None = None) -> int:
    """Say in one line that ``what`` is skipped because ``why``: exit 0, or 2 under CI=true."""
    out = file or sys.stderr
    if os.environ.get("CI") == "true":
        print(f"{prefix if ci_prefix is None else ci_prefix}CI=true: {what} may not be skipped: {why}", file=out)
        return 2
    print(f"{prefix}{what} skipped: {why}", file=out)
    return 0


def missing_go(tool: GoTool) -> str:
    """Why ``tool`` cannot be had here, or "" when it can (or already is built)."""
    if tool.binary.exists() or shutil.which("go"):
        return ""
    return f"Go is not installed ({tool.name} is built from the Go module proxy with `go install`)"


def build(name: str) -> Path:
    """The tool's binary, built with ``go install`` on first use."""
    tool = TOOLS[name]
    exe = tool.binary
    if exe.exists():
        return exe
    why = missing_go(tool)
    if why:
        raise RuntimeError(why)
    exe.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {tool.package}@{tool.version} from the Go module proxy ({tool.cold_build} the first time)")
    started = time.monotonic()
    env = {**os.environ, "GOBIN": str(exe.parent), "CGO_ENABLED": "0"}
    r = subprocess.run(["go", "install", f"{tool.package}@{tool.version}"], env=env)
    if r.returncode != 0 or not exe.exists():
        raise RuntimeError(f"go install {tool.package}@{tool.version} failed ({r.returncode})")
    log(f"built {exe} in {time.monotonic() - started:.0f} s")
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/gotools.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "path"])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"tools: {', '.join(TOOLS)} (default: all)")
    args = ap.parse_args(argv)
    names = args.names or list(TOOLS)
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        ap.error(f"unknown tool {', '.join(unknown)} (tools: {', '.join(TOOLS)})")
    if args.command == "path":
        for name in names:
            print(build(name))
        return 0
    for name in names:
        why = missing_go(TOOLS[name])
        if why:
            if unavailable(name, why, prefix="gotools: "):
                return 2
            continue
        print(build(name))
    return 0
