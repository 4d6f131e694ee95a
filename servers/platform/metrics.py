"""Prometheus metrics, served on a side port (SYSDESIGN_METRICS_ADDR)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

GRPC_REQUESTS = Counter(
    "sysdesign_grpc_requests_total", "gRPC requests handled", ["method", "code"]
)
GRPC_LATENCY = Histogram(
    "sysdesign_grpc_request_duration_seconds",
    "gRPC handling time",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_REQUESTS = Counter(
    "sysdesign_http_requests_total", "HTTP edge requests", ["route", "status"]
)
CACHE_LOOKUPS = Counter(
    "sysdesign_cache_lookups_total", "Cache lookups by result (hit, miss, negative_hit)", ["cache", "result"]
)
QUEUE_DEPTH = Gauge(
    "sysdesign_queue_depth", "Jobs in a Redis stream by state", ["queue", "state"]
)
BACKEND_UP = Gauge("sysdesign_backend_up", "1 when the backend answers its ping", ["backend"])
DRIVE_BLOCK_BYTES = Counter(
    "sysdesign_drive_block_bytes_total", "Block bytes received (up) and sent (down)", ["direction"]
)
DRIVE_COMMITS = Counter(
    "sysdesign_drive_commits_total",
    "File commits by outcome (committed, missing_blocks, conflicted, unchanged)", ["outcome"]
)
DRIVE_COLLECTED = Counter(
    "sysdesign_drive_sweep_blocks_total", "Blocks the collector looked at, by outcome (deleted, kept, …)",
    ["outcome"]
)


def serve_metrics(host: str, port: int) -> None:
    start_http_server(port, addr=host)
