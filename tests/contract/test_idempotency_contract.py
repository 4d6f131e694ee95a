"""servers/platform/idempotency.py on both table adapters (SQLite, a real Cassandra)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Struct
from google.rpc import error_details_pb2

from servers.platform.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    Replayed,
    Unavailable,
)
from servers.platform.idempotency import IDEMPOTENCY_KEYS, TABLES, IdempotencyStore, fingerprint
from servers.storage.table import TableStore


def _req(**fields: Any) -> Struct:
    s = Struct()
    s.update(fields)
    return s


@pytest.fixture
async def store(table_backend: Any) -> AsyncIterator[TableStore]:
    s = table_backend.open()
    await s.create_tables(TABLES)
    yield s
    await s.close()


class Counted:
    """A handler that counts its runs and answers with the run number."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self) -> Struct:
        self.runs += 1
        return _req(run=self.runs, note="charged")


def _key() -> str:
    return "k-" + secrets.token_hex(8)


async def test_the_first_answer_is_replayed_without_running_again(store: TableStore) -> None:
    idem, h, key = IdempotencyStore(store), Counted(), _key()
    first = await idem.run(scope="t.Create", owner=1, key=key, request=_req(amount=100), response_type=Struct,
                           handler=h)
    again = await idem.run(scope="t.Create", owner=1, key=key, request=_req(amount=100), response_type=Struct,
                           handler=h)
    assert h.runs == 1
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    assert again["run"] == 1


async def test_the_same_key_with_other_parameters_is_refused(store: TableStore) -> None:
    idem, h, key = IdempotencyStore(store), Counted(), _key()
    await idem.run(scope="t.Create", owner=1, key=key, request=_req(amount=100), response_type=Struct, handler=h)
    with pytest.raises(InvalidArgument) as err:
        await idem.run(scope="t.Create", owner=1, key=key, request=_req(amount=101), response_type=Struct,
                       handler=h)
    assert [v.field for v in err.value.violations] == ["idempotency_key"]
    assert h.runs == 1


async def test_keys_belong_to_their_owner_and_method(store: TableStore) -> None:
    idem, h, key = IdempotencyStore(store), Counted(), _key()
    for scope, owner in (("t.Create", 1), ("t.Create", 2), ("t.Refund", 1)):
        out = await idem.run(scope=scope, owner=owner, key=key, request=_req(amount=5), response_type=Struct,
                             handler=h)
        assert out["run"] == h.runs
    assert h.runs == 3


async def test_a_second_call_while_the_first_runs_is_aborted_with_a_retry_hint(store: TableStore) -> None:
    idem, key = IdempotencyStore(store, retry_after_s=0.5), _key()
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> Struct:
        started.set()
        await release.wait()
        return _req(done=True)

    first = asyncio.create_task(idem.run(scope="t.Create", owner=1, key=key, request=_req(a=1),
                                         response_type=Struct, handler=slow))
    await started.wait()
    with pytest.raises(Aborted) as err:
        await idem.run(scope="t.Create", owner=1, key=key, request=_req(a=1), response_type=Struct, handler=slow)
    status = err.value.to_status()
    assert status.code == grpc.StatusCode.ABORTED.value[0]
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry) and retry.retry_delay.ToMilliseconds() == 500
    release.set()
    assert (await first)["done"] is True
    replay = await idem.run(scope="t.Create", owner=1, key=key, request=_req(a=1), response_type=Struct,
                            handler=slow)
    assert replay["done"] is True


async def test_a_final_error_is_stored_and_answered_again_exactly(store: TableStore) -> None:
    idem, key, runs = IdempotencyStore(store), _key(), []

    async def refuse() -> Struct:
        runs.append(1)
        raise FailedPrecondition("the intent was cancelled", reason="INTENT_CANCELLED", subject="intents/9")

    with pytest.raises(FailedPrecondition) as first:
        await idem.run(scope="t.Capture", owner=1, key=key, request=_req(a=1), response_type=Struct,
                       handler=refuse)
    with pytest.raises(Replayed) as again:
        await idem.run(scope="t.Capture", owner=1, key=key, request=_req(a=1), response_type=Struct,
                       handler=refuse)
    assert len(runs) == 1
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert again.value.to_status().SerializeToString() == first.value.to_status().SerializeToString()


async def test_an_outcome_a_retry_could_change_is_not_stored(store: TableStore) -> None:
    idem, key, runs = IdempotencyStore(store), _key(), []

    async def flaky() -> Struct:
        runs.append(1)
        if len(runs) == 1:
            raise Unavailable("the processor did not answer")
        return _req(ok=True)

    with pytest.raises(Unavailable):
        await idem.run(scope="t.Confirm", owner=1, key=key, request=_req(a=1), response_type=Struct,
                       handler=flaky)
    out = await idem.run(scope="t.Confirm", owner=1, key=key, request=_req(a=1), response_type=Struct,
                         handler=flaky)
    assert out["ok"] is True and len(runs) == 2


async def test_a_claim_whose_process_died_is_taken_over_after_its_lease(store: TableStore) -> None:
    key, h = _key(), Counted()
    # What a process that died mid-call leaves: a claim and no outcome.
    await store.put(IDEMPOTENCY_KEYS, {"scope": "t.Confirm", "owner": 1, "idem_key": key, "attempt": 0,
                                       "part": "claim", "fingerprint": fingerprint(_req(a=1)),
                                       "lease_until_ms": 1, "created_ms": 1}, if_not_exists=True)
    out = await IdempotencyStore(store).run(scope="t.Confirm", owner=1, key=key, request=_req(a=1),
                                            response_type=Struct, handler=h)
    assert out["run"] == 1
    rows = (await store.slice(IDEMPOTENCY_KEYS, {"scope": "t.Confirm", "owner": 1, "idem_key": key})).rows
    assert [(r["attempt"], r["part"]) for r in rows] == [(0, "claim"), (1, "claim"), (1, "outcome")]


async def test_answers_survive_a_new_store_on_the_same_place(table_backend: Any) -> None:
    key, h = _key(), Counted()
    first = table_backend.open()
    await first.create_tables(TABLES)
    await IdempotencyStore(first).run(scope="t.Create", owner=3, key=key, request=_req(a=1), response_type=Struct,
                                      handler=h)
    await first.close()
    second = table_backend.open()
    try:
        out = await IdempotencyStore(second).run(scope="t.Create", owner=3, key=key, request=_req(a=1),
                                                 response_type=Struct, handler=h)
    finally:
        await second.close()
    assert out["run"] == 1 and h.runs == 1


async def test_no_key_runs_every_time_and_a_long_key_is_refused(store: TableStore) -> None:
    idem, h = IdempotencyStore(store), Counted()
    for _ in range(2):
        await idem.run(scope="t.Create", owner=1, key="", request=_req(a=1), response_type=Struct, handler=h)
    assert h.runs == 2
    with pytest.raises(InvalidArgument):
        await idem.run(scope="t.Create", owner=1, key="x" * 300, request=_req(a=1), response_type=Struct,
                       handler=h)
    assert h.runs == 2
