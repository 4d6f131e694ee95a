"""Feed settings from the environment, read once per process.

| variable                              | default | what                                              |
|---------------------------------------|---------|---------------------------------------------------|
| SYSDESIGN_FEED_CELEBRITY_THRESHOLD    | 10000   | followers from which an author's posts are pulled |
| SYSDESIGN_FEED_TIMELINE_CACHE_SIZE    | 800     | entries kept per timeline in Redis                |
| SYSDESIGN_FEED_FANOUT_PAGE_SIZE       | 1000    | followers per fan-out batch (and checkpoint)      |
| SYSDESIGN_FEED_FANOUT_CLAIM_IDLE_MS   | 30000   | a fan-out job idle this long is reclaimed         |
| SYSDESIGN_FEED_FOLLOWING_LIMIT        | 5000    | how many users one user may follow                |
| SYSDESIGN_FEED_BACKFILL               | 100     | posts copied into a home timeline on follow       |
| SYSDESIGN_FEED_NEAR_CACHE_MS          | 2000    | lifetime of the per-process near cache's entries  |
| SYSDESIGN_FEED_OUTBOX_SWEEP_S         | 30      | how often the fan-out worker sweeps the outbox     |
| SYSDESIGN_FEED_OUTBOX_MIN_AGE_S       | 60      | an unfinished fan-out this old is queued again     |
| SYSDESIGN_FEED_OUTBOX_WINDOW_H        | 24      | hours of posts the sweep looks back over           |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from servers.platform.config import env_int


@dataclass(frozen=True)
class FeedSettings:
    celebrity_threshold: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_CELEBRITY_THRESHOLD", 10_000))
    timeline_cache_size: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_TIMELINE_CACHE_SIZE", 800))
    fanout_page_size: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_FANOUT_PAGE_SIZE", 1000))
    fanout_claim_idle_ms: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_FANOUT_CLAIM_IDLE_MS", 30_000))
    following_limit: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_FOLLOWING_LIMIT", 5000))
    backfill: int = field(default_factory=lambda: env_int("SYSDESIGN_FEED_BACKFILL", 100, minimum=0))
    near_cache_ms: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_NEAR_CACHE_MS", 2000, minimum=0))
    outbox_sweep_s: int = field(default_factory=lambda: env_int("SYSDESIGN_FEED_OUTBOX_SWEEP_S", 30))
    outbox_min_age_s: int = field(
        default_factory=lambda: env_int("SYSDESIGN_FEED_OUTBOX_MIN_AGE_S", 60, minimum=0))
    outbox_window_h: int = field(default_factory=lambda: env_int("SYSDESIGN_FEED_OUTBOX_WINDOW_H", 24))
