"""Wake-ups between rides processes: one pub/sub channel, waiters kept in process.

A dispatcher waiting on an offer, a driver's offer stream, a rider's ride
stream and a ride waiting for a free driver would otherwise each poll Redis
or the table several times a second; under a burst of a thousand requests that
polling is most of the load. Instead whoever changes something publishes a
short message on ``{rides:signals}`` and every process's listener wakes its
own waiters:

=============  ==================================================================
``d:<driver>``  the driver's offer or ride changed (offered, accepted, released)
``o:<offer>``   the offer was settled (accepted, declined, expired)
``r:<ride>``    the ride's log has a new row
``f:<cell>``    a driver became available in that H3 cell
=============  ==================================================================

Pub/sub is fire-and-forget, so a signal only shortens a wait: every waiter
also looks for itself after a timeout, and what it finds there (the Lua
scripts, the log) is what decides. A lost message costs one timeout, never a
wrong answer. A free driver wakes the oldest waiters near that cell first, so
under contention rides are matched in the order they were requested.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import structlog

from servers.storage.redis_conn import Subscription, queue_publish

log = structlog.get_logger("sysdesign.rides")

CHANNEL = "{rides:signals}"
# How many waiters near a freed driver's cell one "free" signal wakes.
WAKE_PER_FREE = 2


class Wake:
    """One registered waiter; ``await wake.wait(seconds)`` returns early when signalled."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """Waits for a signal or ``seconds``; True if signalled. Clears the signal."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout=max(0.0, seconds))
            return True
        except TimeoutError:
            return False
        finally:
            self.event.clear()


class Signals:
    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._keyed: dict[tuple[str, str], set[Wake]] = {}
        # Waiters for a free driver, oldest first: id -> (the cells they search, waiter).
        self._free: dict[int, tuple[frozenset[str], Wake]] = {}
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ waiting

    def _ensure_listening(self) -> None:
        if self._task is None and not self._closing:
            self._task = asyncio.create_task(self._listen(), name="rides-signals")

    @contextlib.contextmanager
    def on(self, kind: str, subject: int | str) -> Iterator[Wake]:
        """A waiter for ``kind`` ("d", "o", "r") about ``subject``, registered for the block.

        Register first, then look at the state, then wait: a change between the
        look and the wait has already set the event, so it is not missed."""
        self._ensure_listening()
        k = (kind, str(subject))
        w = Wake()
        self._keyed.setdefault(k, set()).add(w)
        try:
            yield w
        finally:
            group = self._keyed.get(k)
            if group is not None:
                group.discard(w)
                if not group:
                    del self._keyed[k]

    @contextlib.contextmanager
    def on_free(self, cells: Iterable[str]) -> Iterator[Wake]:
        """A waiter for a driver coming free in any of ``cells`` (FIFO among waiters)."""
        self._ensure_listening()
        i = next(self._ids)
        w = Wake()
        self._free[i] = (frozenset(cells), w)
        try:
            yield w
        finally:
            self._free.pop(i, None)

    def _deliver(self, data: bytes) -> None:
        kind, _, subject = data.decode(errors="replace").partition(":")
        if kind == "f":
            woken = 0
            for cells, w in self._free.values():
                if subject in cells and not w.event.is_set():
                    w.event.set()
                    woken += 1
                    if woken >= WAKE_PER_FREE:
                        break
            return
        for w in self._keyed.get((kind, subject), ()):
            w.event.set()

    async def _listen(self) -> None:
        while not self._closing:
            sub = Subscription(self.redis, CHANNEL)
            try:
                await sub.start()
                while not self._closing:
                    data = await sub.get(1.0)
                    if data is not None:
                        self._deliver(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Waiters fall back on their timeouts until the subscription is back.
                log.warning("rides_signals_lost", error=repr(exc))
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await sub.aclose()

    # --------------------------------------------------------------- publishing

    async def publish(self, *messages: str) -> None:
        """Best effort: a signal that cannot be sent only makes some waiter wait its timeout."""
        if not messages:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in messages:
                    queue_publish(pipe, CHANNEL, m)
                await pipe.execute()
        except Exception as exc:
            log.warning("rides_signal_not_sent", error=repr(exc), messages=list(messages)[:4])

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
