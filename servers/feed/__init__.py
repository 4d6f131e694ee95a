"""The news feed: social graph, posts and hybrid fan-out timelines (sysdesign.feed.v1)."""
