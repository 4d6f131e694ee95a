"""The rate limit service: Envoy's envoy.service.ratelimit.v3 contract on sysdesign's limiter
(servers/platform/ratelimit.py); its guide is docs/ratelimit.md."""
