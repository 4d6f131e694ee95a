"""The access log writes valid JSON lines, in batches, with the fields operators grep for."""

from __future__ import annotations

import io
import json

from servers.platform.logs import AccessLog


async def test_lines_are_json_and_buffered() -> None:
    out = io.StringIO()
    log = AccessLog(out, max_lines=3, interval=60)
    log("/sysdesign.shortener.v1.ShortenerService/ResolveShortUrl", "OK", 0.0012345, "abc.1:x-2", None)
    log("/sysdesign.identity.v1.IdentityService/GetUser", "NOT_FOUND", 0.5, "r2", 42)
    assert out.getvalue() == ""  # buffered until max_lines, the interval or flush()
    log("/m", "OK", 0, "r3", 7)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [x["request_id"] for x in lines] == ["abc.1:x-2", "r2", "r3"]
    assert lines[0]["ms"] == 1.234 and lines[0]["event"] == "rpc" and "user_id" not in lines[0]
    assert lines[1]["user_id"] == "42" and lines[1]["code"] == "NOT_FOUND"
    assert lines[0]["timestamp"].endswith("Z") and "T" in lines[0]["timestamp"]


async def test_interval_flush() -> None:
    import asyncio

    out = io.StringIO()
    log = AccessLog(out, interval=0.01)
    log("/m", "OK", 0, "r1", None)
    for _ in range(200):
        if out.getvalue():
            break
        await asyncio.sleep(0.01)
    assert json.loads(out.getvalue())["request_id"] == "r1"
