"""The benchmark harness behind `sysdesign bench …`.

- ``loadgen``: open-loop (and closed-loop) load generators for gRPC unary calls
  and HTTP GETs, run in spawned worker processes and merged; the latency
  histogram; the step search for a target's maximum sustainable rate; the
  floor processes.
- ``floors``: the floor servers themselves (a bare grpc.aio echo, a bare
  aiohttp 301), run as separate processes.
- ``stack``: starting `sysdesign up` on private ports and data dir, health,
  tokens, RSS of the process tree.
- ``report``: rich tables and progress, JSON and Markdown results.
- ``shortener``: the URL-shortener scenarios (`sysdesign bench shortener`).
"""
