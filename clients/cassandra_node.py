"""A real single-node Apache Cassandra on loopback, from Maven Central.

    python scripts/cassandra.py start [--dir DIR] [--fresh]   # prints the SYSDESIGN_* variables
    python scripts/cassandra.py status [--dir DIR]
    python scripts/cassandra.py stop [--dir DIR]
    python scripts/cassandra.py run [--dir DIR] -- COMMAND...  # start, run COMMAND with the variables, stop
    sysdesign up --cassandra                                  # the whole stack on such a node

Apache Cassandra publishes its server as ``org.apache.cassandra:cassandra-all``
on Maven Central (the binary tarball there stops at 4.0-alpha2). The first
start resolves that artifact and its runtime dependencies with Maven into the
user's Maven repository (``~/.m2``, about 70 MB, under a minute) and keeps the
resulting classpath beside it, so every later start is offline and skips
Maven altogether. The node is configured from scratch under DIR (default
``$SYSDESIGN_DATA_DIR/cassandra``, i.e. ``./data/cassandra``): a generated
``cassandra.yaml`` with free loopback ports, one token, no bootstrap, the
commit log synced before a write is acknowledged (``commitlog_sync: batch``),
a small heap, and the JVM flags Cassandra 5 needs on Java 17.

``run`` is what ``make test`` uses: where Java or Maven is missing it prints
one line saying why the Cassandra half is skipped and runs COMMAND without
it, unless ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from clients.loopback import free_port

VERSION = os.environ.get("SYSDESIGN_CASSANDRA_VERSION", "5.0.9")
ARTIFACT = f"org.apache.cassandra:cassandra-all:{VERSION}"
HEAP = os.environ.get("SYSDESIGN_CASSANDRA_HEAP", "1G")
START_TIMEOUT = float(os.environ.get("SYSDESIGN_CASSANDRA_START_TIMEOUT", "240"))
LOCAL_DC = "datacenter1"  # SimpleSnitch's data centre

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.sysdesign</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""

# From Cassandra's conf/jvm17-server.options (JPMS opens, G1, Netty).
JVM17 = """
-XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m
-XX:MaxGCPauseMillis=300 -XX:+HeapDumpOnOutOfMemoryError -XX:+ExitOnOutOfMemoryError
-Djdk.attach.allowAttachSelf=true
--add-exports java.base/jdk.internal.misc=ALL-UNNAMED
--add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
--add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
--add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
--add-exports java.sql/java.sql=ALL-UNNAMED
--add-exports java.base/java.lang.ref=ALL-UNNAMED
--add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
--add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
--add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
--add-opens java.base/java.lang.module=ALL-UNNAMED
--add-opens java.base/jdk.internal.loader=ALL-UNNAMED
--add-opens java.base/jdk.internal.ref=ALL-UNNAMED
--add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
--add-opens java.base/jdk.internal.math=ALL-UNNAMED
--add-opens java.base/jdk.internal.module=ALL-UNNAMED
--add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
--add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
--add-opens java.base/sun.nio.ch=ALL-UNNAMED
--add-opens java.base/java.io=ALL-UNNAMED
--add-opens java.base/java.lang.reflect=ALL-UNNAMED
--add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
--add-opens java.base/java.lang=ALL-UNNAMED
--add-opens java.base/java.util=ALL-UNNAMED
-Dio.netty.tryReflectionSetAccessible=true
-Dio.netty.allocator.useCacheForAllThreads=true
-Dio.netty.allocator.maxOrder=11
""".split()

LOGBACK = """<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{logdir}/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{{ISO8601}} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.datastax" level="WARN"/>
  <root level="WARN"><appender-ref ref="FILE"/></root>
</configuration>
"""


def log(msg: str) -> None:
    print(f"cassandra: {msg}", file=sys.stderr, flush=True)


def default_dir() -> Path:
    return Path(os.environ.get("SYSDESIGN_DATA_DIR", "data")) / "cassandra"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "sysdesign" / f"cassandra-{VERSION}"


def missing_tools() -> str:
    """Why no node can be started here, or '' when Java and Maven are there."""
    if not shutil.which("java"):
        return "no `java` on PATH (Java 17 is needed)"
    if not (cache_dir() / "classpath.txt").exists() and not shutil.which("mvn"):
        return "no `mvn` on PATH (Maven fetches Cassandra from Maven Central once)"
    return ""


def classpath() -> str:
    """The node's classpath: resolved by Maven once, then read from the cache."""
    cache = cache_dir()
    cp_file = cache / "classpath.txt"
    if cp_file.exists():
        cp = cp_file.read_text().strip()
        if cp and all(Path(p).exists() for p in cp.split(os.pathsep)):
            return cp
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "pom.xml").write_text(POM.format(version=VERSION))
    log(f"resolving {ARTIFACT} and its dependencies from Maven Central (once)")
    t0 = time.monotonic()
    tmp = cache / "classpath.tmp"
    proc = subprocess.run(
        ["mvn", "-B", "-q", "-f", str(cache / "pom.xml"), "dependency:build-classpath",
         "-Dmdep.includeScope=runtime", f"-Dmdep.outputFile={tmp}"],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 or not tmp.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"cassandra: Maven could not resolve {ARTIFACT}")
    tmp.replace(cp_file)
    log(f"resolved in {time.monotonic() - t0:.0f} s, cached in {cp_file}")
    return cp_file.read_text().strip()



def write_config(node: Path, native_port: int, storage_port: int) -> Path:
    for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    conf = node / "conf"
    conf.mkdir(exist_ok=True)
    cfg = {
        "cluster_name": "sysdesign",
        "num_tokens": 1,
        "initial_token": "0",
        "auto_bootstrap": False,
        "partitioner": "org.apache.cassandra.dht.Murmur3Partitioner",
        "endpoint_snitch": "SimpleSnitch",
        "seed_provider": [{
            "class_name": "org.apache.cassandra.locator.SimpleSeedProvider",
            "parameters": [{"seeds": f"127.0.0.1:{storage_port}"}],
        }],
        "listen_address": "127.0.0.1",
        "rpc_address": "127.0.0.1",
        "storage_port": storage_port,
        "native_transport_port": native_port,
        "start_native_transport": True,
        "data_file_directories": [str(node / "data")],
        "commitlog_directory": str(node / "commitlog"),
        "saved_caches_directory": str(node / "saved_caches"),
        "hints_directory": str(node / "hints"),
        "cdc_raw_directory": str(node / "cdc_raw"),
        # A write is acknowledged only once its commit log entry is on disk, so
        # an acknowledged write survives even a SIGKILL of the node.
        "commitlog_sync": "batch",
        # Server-side timeouts with room for a loaded 2-core laptop or CI
        # machine (the defaults give writes 2 s and Paxos contention 1 s); the
        # driver's own request timeout (10 s) stays above them.
        "read_request_timeout": "5000ms",
        "write_request_timeout": "5000ms",
        "counter_write_request_timeout": "5000ms",
        "cas_contention_timeout": "3000ms",
        "range_request_timeout": "8000ms",
        "request_timeout": "8000ms",
        "authenticator": "AllowAllAuthenticator",
        "authorizer": "AllowAllAuthorizer",
        "concurrent_compactors": 1,
        "concurrent_reads": 8,
        "concurrent_writes": 8,
        "concurrent_counter_writes": 8,
        "memtable_heap_space": "128MiB",
        "memtable_offheap_space": "128MiB",
        # One node on a laptop: no point tuning for the ring.
        "dynamic_snitch": False,
        "hinted_handoff_enabled": False,
        "uuid_sstable_identifiers_enabled": True,
    }
    # JSON is a subset of YAML: no YAML writer is needed.
    (conf / "cassandra.yaml").write_text(json.dumps(cfg, indent=2) + "\n")
    (conf / "logback.xml").write_text(LOGBACK.format(logdir=node / "logs"))
    return conf


def state_file(node: Path) -> Path:
    return node / "node.json"


def read_state(node: Path) -> dict[str, Any] | None:
    try:
        st = json.loads(state_file(node).read_text())
    except (OSError, ValueError):
        return None
    try:
        pid = int(st["pid"])
    except (KeyError, ValueError):
        return None
    try:  # a node that died as our child stays a zombie until reaped
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return None
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return st


def env_of(st: dict[str, Any]) -> dict[str, str]:
    return {
        "SYSDESIGN_CASSANDRA_HOSTS": "127.0.0.1",
        "SYSDESIGN_CASSANDRA_PORT": str(st["native_port"]),
        "SYSDESIGN_CASSANDRA_LOCAL_DC": LOCAL_DC,
    }


def cql_ready(port: int) -> bool:
    """True once the node answers a CQL query (not just the open port)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    except OSError:
        return False
    try:
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import WhiteListRoundRobinPolicy
    except ImportError:  # the port answering is the best we can tell
        return True
    profile = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy(["127.0.0.1"]))
    cluster = Cluster(["127.0.0.1"], port=port, connect_timeout=3, protocol_version=5,
                      execution_profiles={EXEC_PROFILE_DEFAULT: profile})
    try:
        session = cluster.connect()
        session.execute("SELECT release_version FROM system.local", timeout=5)
        return True
    except Exception:
        return False
    finally:
        cluster.shutdown()


def start(node: Path, *, fresh: bool = False) -> dict[str, Any]:
    node = node.resolve()
    st = read_state(node)
    if st is not None and not fresh:
        log(f"already running (pid {st['pid']}, CQL on 127.0.0.1:{st['native_port']})")
        return st
    if st is not None:
        stop(node)
    if fresh and node.exists():
        shutil.rmtree(node)
    node.mkdir(parents=True, exist_ok=True)
    cp = classpath()
    old: dict[str, Any] = {}
    try:
        old = json.loads(state_file(node).read_text())
    except (OSError, ValueError):
        pass
    # Keep the ports of an existing node (its ring state names them) when still free.
    native_port, storage_port = old.get("native_port"), old.get("storage_port")
    if not (isinstance(native_port, int) and isinstance(storage_port, int)
            and _port_free(native_port) and _port_free(storage_port)):
        native_port, storage_port = free_port(), free_port()
    conf = write_config(node, native_port, storage_port)
    cmd = [
        "java", f"-Xms{HEAP}", f"-Xmx{HEAP}", "-Xss512k", *JVM17,
        "-Djava.net.preferIPv4Stack=true",
        f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
        f"-Dlogback.configurationFile={conf / 'logback.xml'}",
        f"-Dcassandra.logdir={node / 'logs'}",
        f"-Dcassandra.storagedir={node}",
        "-Dcassandra-foreground=yes",
        # A one-node ring has nobody to wait for.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=0",
        "-Dcassandra.superuser_setup_delay_ms=0",
        "-Dcassandra.load_ring_state=true",
        "-cp", f"{conf}{os.pathsep}{cp}",
        "org.apache.cassandra.service.CassandraDaemon",
    ]
    out = open(node / "logs" / "stdout.log", "ab")  # the child keeps it
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=node)
    out.close()
    st = {"pid": proc.pid, "native_port": native_port, "storage_port": storage_port,
          "version": VERSION, "dir": str(node)}
    state_file(node).write_text(json.dumps(st))
    log(f"starting {VERSION} (pid {proc.pid}, CQL on 127.0.0.1:{native_port}, data in {node})")
    while True:
        if proc.poll() is not None:
            tail = (node / "logs" / "stdout.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"cassandra: the node exited with {proc.returncode}:\n{tail}\n"
                             f"(full log: {node / 'logs'})")
        if cql_ready(int(native_port)):
            break
        if time.monotonic() - t0 > START_TIMEOUT:
            stop(node)
            raise SystemExit(f"cassandra: CQL did not answer within {START_TIMEOUT:.0f} s "
                             f"(log: {node / 'logs' / 'system.log'})")
        time.sleep(0.5)
    log(f"CQL answers after {time.monotonic() - t0:.1f} s")
    return st


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the JVM binds its listeners: connections of a killed node still in
        # TIME_WAIT do not keep the port from being reused.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop(node: Path, timeout: float = 60.0) -> None:
    node = node.resolve()
    st = read_state(node)
    if st is None:
        log("not running")
        return
    pid = int(st["pid"])
    # SIGTERM runs Cassandra's shutdown hook, which drains (flushes memtables).
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            break
        try:  # reap it when it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        log(f"pid {pid} did not stop within {timeout:.0f} s: killing it")
        os.kill(pid, signal.SIGKILL)
    log(f"stopped (pid {pid})")


def run(node: Path | None, command: list[str]) -> int:
    why = missing_tools()
    env = dict(os.environ)
    if why:
        if os.environ.get("CI", "").lower() == "true":
            log(f"cannot start Apache Cassandra: {why}; under CI=true that is a failure")
            return 2
        log(f"the Cassandra half of the tests is SKIPPED: {why}")
        env["SYSDESIGN_TEST_CASSANDRA"] = "skip:" + why
        return subprocess.call(command, env=env)
    own_dir = node is None
    node = node or Path(tempfile.mkdtemp(prefix="sysdesign-cassandra-"))
    try:
        st = start(node, fresh=own_dir)
        for k, v in env_of(st).items():
            env[k.replace("SYSDESIGN_", "SYSDESIGN_TEST_")] = v
        env["SYSDESIGN_TEST_CASSANDRA_DIR"] = str(node.resolve())
        return subprocess.call(command, env=env)
    finally:
        stop(node)
        if own_dir:
            shutil.rmtree(node, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "status", "run", "classpath"])
    ap.add_argument("--dir", type=Path, default=None, help="node directory (default: data/cassandra)")
    ap.add_argument("--fresh", action="store_true", help="wipe the node directory first")
    argv = sys.argv[1:]
    cmd = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.action == "run":
        if not cmd:
            ap.error("run needs a command after --")
        return run(args.dir, cmd)
    node = args.dir or default_dir()
    if args.action == "classpath":
        print(classpath())
        return 0
    if args.action == "start":
        why = missing_tools()
        if why:
            raise SystemExit(f"cassandra: cannot start: {why}")
        st = start(node, fresh=args.fresh)
        for k, v in env_of(st).items():
            print(f"export {k}={v}")
        return 0
    if args.action == "stop":
        stop(node)
        return 0
    running = read_state(node.resolve())
    if running is None:
        print("not running")
        return 1
    st = running
    ready = cql_ready(int(st["native_port"]))
    print(f"pid {st['pid']}, Cassandra {st['version']}, CQL 127.0.0.1:{st['native_port']}"
          f" ({'answering' if ready else 'not answering yet'})")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
