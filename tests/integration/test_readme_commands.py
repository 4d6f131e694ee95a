"""Every grpcurl and sysdesign command block of the README runs, in order, against a live stack.

The blocks are read from README.md itself: each command (continuation lines
joined, trailing comment dropped) runs in bash with the stack's addresses in
place of the defaults, grpcurl (built from the Go module proxy) and the
project's `sysdesign` on PATH, and the placeholders (`<paste_id>`, `<code or
the URL shorten printed>`, ...) filled from what earlier commands printed. A
command must exit 0 and print what the README promises (EXPECT below); a
command the README gains without an entry in EXPECT fails the test, so the
README cannot drift from what runs. Commands that start long-running
processes (`sysdesign serve`, `worker`, `edge`) are started, checked to
answer, and stopped with SIGTERM, which must drain them to exit 0.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_reflection import grpcurl_exe
from tests.stack import ROOT, StackProcess, free_port

README = ROOT / "README.md"
DEFAULT_GRPC = "127.0.0.1:50051"
DEFAULT_HTTP = "http://127.0.0.1:8080"


@dataclass
class Expect:
    """What a README command must print (every fragment, in stdout+stderr)."""

    pattern: str  # a regex the command (after substitution of nothing) matches
    fragments: list[str]
    capture: Callable[[str], dict[str, str]] | None = None  # placeholders this output fills


def _json(out: str) -> dict[str, object]:
    return dict(json.loads(out[out.index("{"):]))


EXPECT = [
    Expect(r"^grpcurl .* list$", ["sysdesign.shortener.v1.ShortenerService", "grpc.health.v1.Health"]),
    Expect(r"^grpcurl .* describe sysdesign\.shortener\.v1\.ShortenerService$",
           ["is a service", "rpc CreateShortUrl"]),
    Expect(r"^TOKEN=\$\(sysdesign token alice\)$", []),
    Expect(r"CreateShortUrl$", ['"code": "base62"', '"long_url": "https://en.wikipedia.org/wiki/Base62"']),
    Expect(r"ResolveShortUrl$", ['"long_url": "https://en.wikipedia.org/wiki/Base62"']),
    Expect(r"^curl -I .*/base62$", ["HTTP/1.1 302", "Location: https://en.wikipedia.org/wiki/Base62"]),
    Expect(r"GetShortUrlStats$", ['"code": "base62"']),
    Expect(r"PasteService/CreatePaste$", ['"paste_id"'],
           lambda out: {"<paste_id>": str(dict(_json(out)["paste"])["paste_id"])}),
    Expect(r"^curl .*/p/<paste_id>$", ['print("hello")']),
    Expect(r"grpc\.health\.v1\.Health/Check$", ['"status": "SERVING"']),
    Expect(r"^sysdesign login \w+ --register$", ["registered", "logged in as"]),
    Expect(r"^sysdesign shorten https://example\.com --max-visits 10$", ["/"],
           lambda out: {"<code or the URL shorten printed>": out.strip().split()[-1],
                        "<code or URL>": out.strip().split()[-1]}),
    Expect(r"^sysdesign resolve <code or the URL shorten printed>$", ["https://example.com"]),
    Expect(r"^sysdesign stats <code or URL>$", []),
    Expect(r"^echo 'hello' \| sysdesign paste create -$", ["/p/"],
           lambda out: {"<paste_id or the raw URL>": re.findall(r"\S+/p/\S+", out)[-1]}),
    Expect(r"^sysdesign paste get <paste_id or the raw URL>$", ["hello"]),
    Expect(r"^sysdesign --help$", ["SYSDESIGN_GRPC_ADDR", "shorten"]),
    Expect(r"^sysdesign migrate$", ["CREATE TABLE"]),
]
# Long-running: started, checked, stopped (see run_process). `sysdesign up` is the stack itself.
PROCESSES = {"sysdesign up", "sysdesign serve --services shortener,identity", "sysdesign worker blobgc",
             "sysdesign edge"}


def strip_comment(line: str) -> str:
    """The line without a trailing `# ...` comment (a # inside quotes stays)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote and line[i - 1] != "\\":
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands() -> list[str]:
    """The commands of every README block that runs grpcurl or sysdesign, in order."""
    blocks = re.findall(r"^```(?:sh|bash|shell)?\n(.*?)^```", README.read_text(), re.S | re.M)
    out: list[str] = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", "", block)
        cmds = [strip_comment(ln).strip() for ln in joined.splitlines()]
        cmds = [c for c in cmds if c]
        if any(re.match(r"^(\w+=\$\()?(grpcurl|sysdesign) ", c) or "| sysdesign " in c for c in cmds):
            out += cmds
    return out


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackProcess]:
    s = StackProcess(tmp_path_factory.mktemp("readme") / "data").start()
    yield s
    assert s.stop() == 0, s.logs()


def _env(stack: StackProcess, tmp: Path) -> dict[str, str]:
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    for name, target in [("grpcurl", grpcurl_exe()), ("sysdesign", str(ROOT / ".venv" / "bin" / "sysdesign"))]:
        link = bindir / name
        if not link.exists():
            link.symlink_to(target if Path(target).exists() else
                            subprocess.run(["which", name], capture_output=True, text=True).stdout.strip())
    return {**stack.env(), "PATH": f"{bindir}:{os.environ['PATH']}", "XDG_CONFIG_HOME": str(tmp / "config"),
            "SYSDESIGN_GRPC_ADDR": stack.grpc_addr, "SYSDESIGN_PUBLIC_URL": stack.http_base}


def _localize(cmd: str, stack: StackProcess) -> str:
    return cmd.replace(DEFAULT_HTTP, stack.http_base).replace(DEFAULT_GRPC, stack.grpc_addr)


def run_process(cmd: str, stack: StackProcess, env: dict[str, str], tmp: Path) -> None:
    """A long-running command: it must come up, answer, and drain to exit 0 on SIGTERM."""
    if cmd == "sysdesign up":
        return  # the stack this module runs on is `sysdesign up`; it stops with exit 0 at the end
    grpc_port, http_port = free_port(), free_port()
    penv = {**env, "SYSDESIGN_REDIS_URL": stack.redis_url, "SYSDESIGN_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
            "SYSDESIGN_HTTP_ADDR": f"127.0.0.1:{http_port}", "SYSDESIGN_METRICS_ADDR": ""}
    log = tmp / f"{cmd.split()[1]}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], env=penv, stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"{cmd} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{cmd} never answered:\n{log.read_text()[-3000:]}"
            if _answers(cmd, grpc_port, http_port, log):
                break
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, f"{cmd} exited {code} on SIGTERM:\n{log.read_text()[-3000:]}"


def _answers(cmd: str, grpc_port: int, http_port: int, log: Path | None = None) -> bool:
    if " serve " in f"{cmd} ":
        try:
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                return all(stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=2).status
                           == health_pb2.HealthCheckResponse.SERVING
                           for s in ["sysdesign.shortener.v1.ShortenerService",
                                     "sysdesign.identity.v1.IdentityService"])
        except grpc.RpcError:
            return False
    if cmd.endswith(" edge"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False
    # a worker serves no port of its own: it is up once it logged that its worker started
    # (a fixed wait is not enough on a loaded machine, and SIGTERM before the handlers are
    # installed would end it with -15)
    return log is not None and log.exists() and "worker_started" in log.read_text(errors="replace")


def test_every_readme_command_runs_and_prints_what_the_readme_says(readme_stack: StackProcess,
                                                                   tmp_path: Path) -> None:
    commands = readme_commands()
    assert len(commands) >= 20, commands
    env = _env(readme_stack, tmp_path)
    filled: dict[str, str] = {"<password>": "correct-horse-battery"}
    unmatched = [c for c in commands if c not in PROCESSES and not any(re.search(e.pattern, c) for e in EXPECT)]
    assert not unmatched, f"README commands with no expectation in this test: {unmatched}"
    for cmd in commands:
        if cmd in PROCESSES:
            run_process(cmd, readme_stack, env, tmp_path)
            continue
        expect = next(e for e in EXPECT if re.search(e.pattern, cmd))
        line = _localize(cmd, readme_stack)
        for placeholder, value in filled.items():
            line = line.replace(placeholder, value)
        assert not re.search(r"<[a-z_ ]+>", line), f"the test cannot fill a placeholder of: {cmd}"
        assign = re.match(r"^(\w+)=\$\((.*)\)$", line)
        r = subprocess.run(["bash", "-o", "pipefail", "-c", assign.group(2) if assign else line],
                           env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                           input=filled["<password>"] + "\n")
        output = r.stdout + r.stderr
        assert r.returncode == 0, f"README command failed ({r.returncode}): {cmd}\n{output[-3000:]}"
        for fragment in expect.fragments:
            assert fragment.lower() in output.lower(), f"{cmd}\nprinted:\n{output[-3000:]}\nmissing: {fragment}"
        if assign:
            env[assign.group(1)] = r.stdout.strip()
            assert env[assign.group(1)], f"{cmd} printed nothing"
        if expect.capture:
            filled.update(expect.capture(r.stdout))
