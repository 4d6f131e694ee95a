"""Media pipeline settings, read from the environment like the platform's Config.

| variable                               | default                                      |
|----------------------------------------|----------------------------------------------|
| SYSDESIGN_MEDIA_MAX_BYTES              | 2147483648 (2 GiB per upload)                |
| SYSDESIGN_MEDIA_QUOTA_BYTES            | 10737418240 (10 GiB per user)                |
| SYSDESIGN_MEDIA_PART_BYTES             | 8388608 (staging part; ≥ 5 MiB on S3)        |
| SYSDESIGN_MEDIA_CDN_BASE_URL           | (unset: playback URLs point at the edge)     |
| SYSDESIGN_MEDIA_PRESET                 | veryfast (x264 preset of the HLS ladder)     |
| SYSDESIGN_MEDIA_MAX_ATTEMPTS           | 3 (transcode attempts before FAILED)         |
| SYSDESIGN_MEDIA_CLAIM_IDLE_MS          | 30000 (a dead worker's job is reclaimed)     |
| SYSDESIGN_MEDIA_EDGE_CACHE_BYTES       | 67108864 (the edge's in-process LRU)         |
| SYSDESIGN_MEDIA_PRESIGN_SECONDS        | 3600 (lifetime of presigned S3 URLs)         |
| SYSDESIGN_MEDIA_UPLOAD_TTL_SECONDS     | 604800 (an idle upload is discarded after)   |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

MiB = 1024 * 1024


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class MediaSettings:
    max_bytes: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_MAX_BYTES", 2 * 1024 * MiB))
    quota_bytes: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_QUOTA_BYTES", 10 * 1024 * MiB))
    part_bytes: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_PART_BYTES", 8 * MiB))
    cdn_base_url: str = field(
        default_factory=lambda: os.environ.get("SYSDESIGN_MEDIA_CDN_BASE_URL", "").strip().rstrip("/")
    )
    preset: str = field(default_factory=lambda: os.environ.get("SYSDESIGN_MEDIA_PRESET", "").strip() or "veryfast")
    max_attempts: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_MAX_ATTEMPTS", 3))
    claim_idle_ms: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_CLAIM_IDLE_MS", 30_000))
    edge_cache_bytes: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_EDGE_CACHE_BYTES", 64 * MiB))
    presign_seconds: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_PRESIGN_SECONDS", 3600))
    upload_ttl_seconds: int = field(default_factory=lambda: _int("SYSDESIGN_MEDIA_UPLOAD_TTL_SECONDS", 7 * 86400))
