"""servers/payments/ledger.py on both table adapters (SQLite, a real Cassandra)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from servers.payments.ledger import Ledger
from servers.payments.tables import ACCOUNT_LOG, TABLES, TRANSFERS
from servers.platform.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from servers.storage.table import TableStore

_ids = itertools.count(secrets.randbits(40) << 16)


def nid() -> int:
    return next(_ids)


@pytest.fixture
async def store(table_backend: Any) -> AsyncIterator[TableStore]:
    s = table_backend.open()
    await s.create_tables(TABLES)
    yield s
    await s.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(store: TableStore, clock: Clock) -> Ledger:
    # A book of its own: the Cassandra keyspace is shared by the run's tests.
    return Ledger(store, next_id=nid, clock_ms=clock, book="t-" + secrets.token_hex(6))


async def _accounts(ledger: Ledger, currency: str = "USD", *, flag: bool = True) -> tuple[int, int, int]:
    """(clearing, customer with debits_must_not_exceed_credits, merchant)"""
    clearing = await ledger.create_account(code="processor_clearing", currency=currency)
    customer = await ledger.create_account(code="customer_funds", currency=currency,
                                           debits_must_not_exceed_credits=flag)
    merchant = await ledger.create_account(code="merchant_receivable", currency=currency)
    return clearing.id, customer.id, merchant.id


async def _total_rows(store: TableStore, *accounts: int) -> int:
    total = 0
    for a in accounts:
        total += len((await store.slice(ACCOUNT_LOG, {"account_id": a}, limit=1000)).rows)
    return total


async def test_balances_follow_the_transfers(ledger: Ledger) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    await ledger.transfer(id=nid(), debit_account_id=clearing, credit_account_id=customer, amount=10_000)
    await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=2_550,
                          code="charge", reference="order 7")
    c, m, k = [await ledger.balance(a) for a in (customer, merchant, clearing)]
    assert (c.debits_posted, c.credits_posted, c.net_posted) == (2_550, 10_000, 7_450)
    assert (m.credits_posted, m.debits_posted) == (2_550, 0)
    assert k.net_posted == -10_000
    page = await ledger.entries(customer, page_size=1)
    assert [e.op for e in page.entries] == ["single"] and page.next_page_token
    rest = await ledger.entries(customer, page_size=10, page_token=page.next_page_token)
    assert [(e.side, e.amount, e.debits_posted) for e in rest.entries] == [("d", 2_550, 2_550)]
    assert not rest.next_page_token
    with pytest.raises(InvalidArgument):
        await ledger.entries(customer, page_token="not-a-token")
    assert await ledger.audit() == []


async def test_a_transfer_id_answers_its_first_result_and_refuses_other_fields(ledger: Ledger,
                                                                               store: TableStore) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    tid = nid()
    first = await ledger.transfer(id=tid, debit_account_id=clearing, credit_account_id=customer, amount=500)
    again = await ledger.transfer(id=tid, debit_account_id=clearing, credit_account_id=customer, amount=500)
    assert again == first and first.status == "posted"
    assert (await ledger.balance(customer)).credits_posted == 500
    before = await _total_rows(store, clearing, customer, merchant)
    with pytest.raises(AlreadyExists) as err:
        await ledger.transfer(id=tid, debit_account_id=clearing, credit_account_id=customer, amount=501)
    assert err.value.reason == "TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS"
    assert await _total_rows(store, clearing, customer, merchant) == before
    assert await ledger.get_transfer(tid) == first


async def test_bad_transfers_are_refused_and_store_nothing(ledger: Ledger, store: TableStore) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    euro = await ledger.create_account(code="fees", currency="EUR")
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"debit_account_id": clearing, "credit_account_id": euro.id, "amount": 5}, FailedPrecondition,
         "CURRENCY_MISMATCH"),
        ({"debit_account_id": clearing, "credit_account_id": customer, "amount": 0}, InvalidArgument, "amount"),
        ({"debit_account_id": clearing, "credit_account_id": customer, "amount": -3}, InvalidArgument, "amount"),
        ({"debit_account_id": clearing, "credit_account_id": customer, "amount": 2**63}, InvalidArgument,
         "amount"),
        ({"debit_account_id": clearing, "credit_account_id": clearing, "amount": 5}, InvalidArgument,
         "credit_account_id"),
        ({"debit_account_id": clearing, "credit_account_id": nid(), "amount": 5}, NotFound,
         "ACCOUNT_NOT_FOUND"),
        ({"debit_account_id": customer, "credit_account_id": merchant, "amount": 1}, FailedPrecondition,
         "EXCEEDS_CREDITS"),
    ]
    before = await _total_rows(store, clearing, customer, merchant, euro.id)
    for args, exc, what in cases:
        tid = nid()
        with pytest.raises(exc) as err:
            await ledger.transfer(id=tid, **args)
        if isinstance(err.value, InvalidArgument):
            assert what in [v.field for v in err.value.violations]
        else:
            assert err.value.reason == what  # type: ignore[attr-defined]
        assert (await store.slice(TRANSFERS, {"transfer_id": tid})).rows == []
    assert await _total_rows(store, clearing, customer, merchant, euro.id) == before
    assert await ledger.in_flight() == []
    with pytest.raises(InvalidArgument) as bad:
        await ledger.create_account(code="savings", currency="XXX")
    assert {v.field for v in bad.value.violations} == {"code", "currency"}
    assert await ledger.audit() == []


async def test_racing_debits_on_a_flagged_account_take_exactly_what_fits(ledger: Ledger) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    await ledger.transfer(id=nid(), debit_account_id=clearing, credit_account_id=customer, amount=1_000)

    async def spend(i: int) -> bool:
        try:
            await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant,
                                  amount=70 + i)
            return True
        except FailedPrecondition as exc:
            assert exc.reason == "EXCEEDS_CREDITS"
            return False

    amounts = [70 + i for i in range(50)]
    won = await asyncio.gather(*(spend(i) for i in range(50)))
    spent = sum(a for a, ok in zip(amounts, won, strict=True) if ok)
    assert 0 < spent <= 1_000
    # Every refused one would not have fitted what was left.
    left = 1_000 - spent
    assert all(a > left for a, ok in zip(amounts, won, strict=True) if not ok)
    bal = await ledger.balance(customer)
    assert (bal.debits_posted, bal.net_posted) == (spent, left)
    assert (await ledger.balance(merchant)).credits_posted == spent
    # The balance never went below zero at any entry.
    token, seen = "", 0
    while True:
        page = await ledger.entries(customer, page_size=7, page_token=token)
        for e in page.entries:
            assert e.debits_posted <= e.credits_posted
            seen += 1
        token = page.next_page_token
        if not token:
            break
    assert seen >= 1 + sum(won)
    assert await ledger.audit() == []


async def test_pending_transfers_post_partially_void_and_time_out(ledger: Ledger, clock: Clock) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    await ledger.transfer(id=nid(), debit_account_id=clearing, credit_account_id=customer, amount=1_000)
    hold = await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=600,
                                 pending=True)
    assert hold.status == "pending"
    b = await ledger.balance(customer)
    assert (b.debits_pending, b.debits_posted) == (600, 0)
    # The hold counts against the flag.
    with pytest.raises(FailedPrecondition) as err:
        await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=401)
    assert err.value.reason == "EXCEEDS_CREDITS"
    with pytest.raises(InvalidArgument):
        await ledger.post_pending(id=nid(), pending_id=hold.id, amount=601)
    post_id = nid()
    posted = await ledger.post_pending(id=post_id, pending_id=hold.id, amount=450)
    assert posted.status == "posted" and posted.amount == 450
    assert await ledger.post_pending(id=post_id, pending_id=hold.id, amount=450) == posted
    b, m = await ledger.balance(customer), await ledger.balance(merchant)
    assert (b.debits_pending, b.debits_posted) == (0, 450)
    assert (m.credits_pending, m.credits_posted) == (0, 450)
    for again in (ledger.post_pending(id=nid(), pending_id=hold.id), ledger.void_pending(id=nid(),
                                                                                          pending_id=hold.id)):
        with pytest.raises(FailedPrecondition) as err:
            await again
        assert err.value.reason == "PENDING_TRANSFER_ALREADY_RESOLVED"

    hold2 = await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=300,
                                  pending=True)
    voided = await ledger.void_pending(id=nid(), pending_id=hold2.id)
    assert voided.status == "voided"
    assert (await ledger.balance(customer)).debits_pending == 0

    hold3 = await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=100,
                                  pending=True, timeout_s=60)
    clock.now += 61_000
    with pytest.raises(FailedPrecondition) as err:
        await ledger.post_pending(id=nid(), pending_id=hold3.id)
    assert err.value.reason == "PENDING_TRANSFER_EXPIRED"
    assert (await ledger.void_pending(id=nid(), pending_id=hold3.id)).status == "voided"
    b = await ledger.balance(customer)
    assert (b.debits_pending, b.debits_posted, b.credits_posted) == (0, 450, 1_000)
    assert await ledger.audit() == []


async def test_a_crash_between_the_debit_and_the_credit_is_completed_once(ledger: Ledger,
                                                                          store: TableStore) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    await ledger.transfer(id=nid(), debit_account_id=clearing, credit_account_id=customer, amount=1_000)
    tid = nid()
    # What a process that died after the debit leaves: the intent and one side.
    from servers.payments.ledger import _Spec

    assert await ledger._begin(_Spec(tid, "single", customer, merchant, 300, code="charge"))
    intent = (await ledger._steps(tid))["intent"]
    await ledger.apply_side(intent, "d", 0)
    assert (await ledger.balance(customer)).debits_posted == 300
    assert (await ledger.balance(merchant)).credits_posted == 0
    findings = await ledger.audit()
    assert {f.kind for f in findings} == {"IN_FLIGHT", "UNBALANCED"}

    # Two reconcilers at once complete it once between them.
    runs = await asyncio.gather(ledger.recover(), ledger.recover())
    assert tid in runs[0] + runs[1]
    assert await ledger.recover() == []
    assert (await ledger.balance(customer)).debits_posted == 300
    assert (await ledger.balance(merchant)).credits_posted == 300
    assert len((await ledger.entries(merchant)).entries) == 1
    # The caller's retry answers the completed transfer, applying nothing again.
    again = await ledger.transfer(id=tid, debit_account_id=customer, credit_account_id=merchant, amount=300,
                                  code="charge")
    assert again.status == "posted"
    assert (await ledger.balance(customer)).debits_posted == 300
    assert await ledger.audit() == []

    # A post that died after claiming the pending transfer's resolution.
    hold = await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=200,
                                 pending=True)
    post_id = nid()
    assert await ledger._begin(_Spec(post_id, "post", amount=150, pending_id=hold.id))
    assert await ledger._resolve((await ledger._steps(post_id))["intent"]) == ""
    assert await ledger.recover() == [post_id]
    b = await ledger.balance(customer)
    assert (b.debits_posted, b.debits_pending) == (450, 0)
    assert (await ledger.post_pending(id=post_id, pending_id=hold.id, amount=150)).status == "posted"
    assert (await ledger.balance(merchant)).credits_posted == 450
    assert await ledger.audit() == []


async def test_audit_reports_a_corrupted_entry(ledger: Ledger, store: TableStore) -> None:
    clearing, customer, merchant = await _accounts(ledger)
    await ledger.transfer(id=nid(), debit_account_id=clearing, credit_account_id=customer, amount=1_000)
    await ledger.transfer(id=nid(), debit_account_id=customer, credit_account_id=merchant, amount=999)
    assert await ledger.audit() == []
    tail = (await store.slice(ACCOUNT_LOG, {"account_id": customer}, limit=1, reverse=True)).rows[0]
    # A row that debits the customer with no matching balance change elsewhere.
    await store.put(ACCOUNT_LOG, {**tail, "seq": int(tail["seq"]) + 1, "transfer_id": nid(), "op": "single",
                                  "side": "d", "amount": 5, "debits_posted": int(tail["debits_posted"])},
                    if_not_exists=True)
    # And one whose balances do not follow from the entry.
    tail2 = (await store.slice(ACCOUNT_LOG, {"account_id": merchant}, limit=1, reverse=True)).rows[0]
    await store.put(ACCOUNT_LOG, {**tail2, "seq": int(tail2["seq"]) + 1, "transfer_id": nid(), "op": "single",
                                  "side": "c", "amount": 1, "credits_posted": int(tail2["credits_posted"]) + 2},
                    if_not_exists=True)
    kinds = {(f.kind, f.subject) for f in await ledger.audit()}
    assert ("BROKEN_CHAIN", f"accounts/{customer}/entries/{int(tail['seq']) + 1}") in kinds
    assert ("BROKEN_CHAIN", f"accounts/{merchant}/entries/{int(tail2['seq']) + 1}") in kinds
    assert ("UNBALANCED", "currencies/USD") in kinds
    assert ("ORPHAN_ENTRY", f"accounts/{customer}/entries/{int(tail['seq']) + 1}") in kinds
    # A flagged account pushed over its flag.
    tail3 = (await store.slice(ACCOUNT_LOG, {"account_id": customer}, limit=1, reverse=True)).rows[0]
    await store.put(ACCOUNT_LOG, {**tail3, "seq": int(tail3["seq"]) + 1, "transfer_id": nid(), "op": "single",
                                  "side": "d", "amount": 10, "debits_posted": int(tail3["debits_posted"]) + 10},
                    if_not_exists=True)
    assert any(f.kind == "FLAG_VIOLATED" and f.subject == f"accounts/{customer}" for f in await ledger.audit())


async def test_a_credit_refused_after_its_debit_is_taken_back(ledger: Ledger) -> None:
    clearing, customer, _ = await _accounts(ledger, flag=False)
    fees = await ledger.create_account(code="fees", currency="USD", credits_must_not_exceed_debits=True)
    await ledger.transfer(id=nid(), debit_account_id=fees.id, credit_account_id=customer, amount=100)
    from servers.payments.ledger import _Spec

    # Two credits that each fit alone, begun before either is applied (as two racing calls would).
    first, second = nid(), nid()
    for tid in (first, second):
        assert await ledger._begin(_Spec(tid, "single", clearing, fees.id, 80))
    assert (await ledger._complete(first)).status == "posted"
    with pytest.raises(FailedPrecondition) as err:
        await ledger._complete(second)
    assert err.value.reason == "EXCEEDS_DEBITS"
    # The debit of the refused one was booked, then taken back by an undo entry.
    ops = [(e.transfer_id, e.op) for e in (await ledger.entries(clearing)).entries]
    assert ops == [(first, "single"), (second, "single"), (second, "undo:single")]
    assert (await ledger.balance(clearing)).net_posted == -80
    assert (await ledger.balance(fees.id)).credits_posted == 80
    # Its id answers the refusal again and books nothing more.
    with pytest.raises(FailedPrecondition) as again:
        await ledger.transfer(id=second, debit_account_id=clearing, credit_account_id=fees.id, amount=80)
    assert again.value.reason == "EXCEEDS_DEBITS"
    assert len((await ledger.entries(clearing)).entries) == 3
    with pytest.raises(NotFound):
        await ledger.get_transfer(second)
    assert await ledger.audit() == []


async def test_accounts_are_idempotent_by_id_and_recover_drops_a_transfer_never_begun(
        ledger: Ledger, store: TableStore) -> None:
    aid = nid()
    a = await ledger.create_account(id=aid, code="refunds", currency="JPY")
    assert await ledger.create_account(id=aid, code="refunds", currency="JPY") == a
    with pytest.raises(AlreadyExists):
        await ledger.create_account(id=aid, code="refunds", currency="KWD")
    # A process that died after the in-flight row, before the intent.
    from servers.payments.tables import INFLIGHT_BUCKETS, TRANSFERS_IN_FLIGHT

    tid = nid()
    await store.put(TRANSFERS_IN_FLIGHT, {"book": ledger.book, "bucket": tid % INFLIGHT_BUCKETS,
                                          "transfer_id": tid, "at_ms": 1})
    assert tid in await ledger.in_flight()
    assert tid not in await ledger.recover()
    assert await ledger.in_flight() == []
    assert await ledger.audit() == []
