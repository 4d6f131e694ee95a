"""A double-entry ledger (TigerBeetle's model) on a store with only single-row LWTs.

Accounts
    An account has an id, a kind (``code``: customer_funds,
    merchant_receivable, processor_clearing, fees, refunds), a currency
    (servers/payments/money.py) and flags: ``debits_must_not_exceed_credits``
    and ``credits_must_not_exceed_debits``. Accounts are immutable.

Transfers
    A transfer moves a positive integer amount of minor units from a debit
    account to a credit account of the same currency. Its id is the caller's:
    the same id with the same fields answers the first result again, with
    other fields it is refused (ALREADY_EXISTS). A transfer is ``single``
    (posted at once) or ``pending`` (it reserves: counts in debits_pending and
    credits_pending, and against the flags); a pending transfer is resolved
    once, by a ``post`` (its amount or less) or a ``void``, each a transfer of
    its own naming the pending one, as in TigerBeetle. A pending transfer may
    have a timeout after which it can no longer be posted (it can be voided).

Storage (servers/payments/tables.py)
    There are no multi-row transactions, so every account is its own log:
    partition ``account_id``, one row per ``seq``, each claimed ``IF NOT
    EXISTS`` and carrying the account's four balances after it. Appending the
    next row is the flag check and the balance update in one LWT: two
    transfers racing on one account cannot both take seq N; the loser re-reads
    the tail and checks again. Entries are never rewritten; balances are the
    tail row.

    A transfer is applied in steps, each decided by a row claimed IF NOT
    EXISTS:

    1. a row in the in-flight index (a plain write), then the transfer's
       ``intent`` row, which also records each account log's tail seq as it
       was just before (so any application of this transfer comes after it);
    2. for a post or void: the pending transfer's ``resolution`` row, naming
       this transfer (the first one wins; a post after the timeout loses);
    3. the debit account's log row naming the transfer, then the credit
       account's. Each side's decision is the first log row naming the
       transfer after the recorded seq: either it applied, or, when the flag
       did not allow it at that tail, a ``refused`` row that changes no
       balance. If the credit side is refused, an ``undo`` row on the debit
       account takes the debit back;
    4. the ``outcome`` row (posted, pending, voided, refused), then the
       in-flight row is deleted.

    Every step first looks whether it was already taken (the log is searched
    for the transfer id after the recorded seq), so a process that dies
    between any two steps leaves a transfer that ``recover()`` (or the same
    call retried) completes exactly once, and two of them running at once
    reach the same rows. A transfer refused up front (bad input, unknown
    account, currency mismatch, a flag the current balance already rules
    out) writes nothing; only a transfer that lost a race on a flagged
    account leaves a ``refused`` log row and a refused outcome (its id then
    answers that refusal again).

Books
    The two index partitions (accounts by currency, transfers in flight) are
    per book, a name given to ``Ledger`` ("main" by default): ``audit()`` and
    ``recover()`` walk one book. Account and transfer ids are global.

Audit
    ``audit()`` walks the book's accounts index per currency and checks: the sum of
    posted balances (credits - debits) and of pending balances is zero per
    currency; no flagged account is over its flag; every account log row
    follows from the one before it and is booked by the intent of the transfer
    it names; no transfer is left in flight (one that
    is can be completed by ``recover()``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from servers.payments import money
from servers.payments.tables import (
    ACCOUNT_BUCKETS,
    ACCOUNT_LOG,
    ACCOUNTS,
    ACCOUNTS_BY_CURRENCY,
    INFLIGHT_BUCKETS,
    TRANSFERS,
    TRANSFERS_IN_FLIGHT,
)
from servers.platform.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Violations,
)
from servers.storage.table import (
    ClusteringRange,
    InvalidPageToken,
    Row,
    Table,
    TableError,
    TableStore,
)

ACCOUNT_CODES = ("customer_funds", "merchant_receivable", "processor_clearing", "fees", "refunds")

DEBITS_MUST_NOT_EXCEED_CREDITS = 1
CREDITS_MUST_NOT_EXCEED_DEBITS = 2
ALL_FLAGS = DEBITS_MUST_NOT_EXCEED_CREDITS | CREDITS_MUST_NOT_EXCEED_DEBITS

KINDS = ("single", "pending", "post", "void")
MAX_TEXT = 256
MAX_PAGE = 1000
# Appends racing on one account: each loser re-reads and tries again.
MAX_APPEND_ATTEMPTS = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Account:
    id: int
    code: str
    currency: str
    flags: int
    created_ms: int

    @property
    def debits_must_not_exceed_credits(self) -> bool:
        return bool(self.flags & DEBITS_MUST_NOT_EXCEED_CREDITS)

    @property
    def credits_must_not_exceed_debits(self) -> bool:
        return bool(self.flags & CREDITS_MUST_NOT_EXCEED_DEBITS)


@dataclass(frozen=True)
class Balance:
    account_id: int
    currency: str
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    seq: int

    @property
    def net_posted(self) -> int:
        """credits - debits, posted."""
        return self.credits_posted - self.debits_posted


@dataclass(frozen=True)
class Transfer:
    id: int
    kind: str
    debit_account_id: int
    credit_account_id: int
    amount: int
    currency: str
    code: str
    reference: str
    pending_id: int
    timeout_at_ms: int
    status: str  # posted, pending, voided


@dataclass(frozen=True)
class Entry:
    account_id: int
    seq: int
    transfer_id: int
    side: str
    op: str
    amount: int
    pending_amount: int
    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    at_ms: int


@dataclass
class EntryPage:
    entries: list[Entry]
    next_page_token: str = ""


@dataclass(frozen=True)
class Finding:
    kind: str  # UNBALANCED, FLAG_VIOLATED, BROKEN_CHAIN, IN_FLIGHT
    subject: str
    detail: str


@dataclass
class _Spec:
    """What a transfer call asks for (the intent row, before it is written)."""

    id: int
    kind: str
    debit_account_id: int = 0
    credit_account_id: int = 0
    amount: int = 0
    currency: str = ""
    code: str = ""
    reference: str = ""
    pending_id: int = 0
    timeout_s: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        # A post or void names only its pending transfer (its accounts are looked up).
        resolves = self.kind in ("post", "void")
        body = {"kind": self.kind, "debit": 0 if resolves else self.debit_account_id,
                "credit": 0 if resolves else self.credit_account_id,
                "amount": self.amount, "code": self.code, "reference": self.reference,
                "pending_id": self.pending_id, "timeout_s": self.timeout_s}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


BALANCE_COLUMNS = ("debits_posted", "credits_posted", "debits_pending", "credits_pending")


def delta(op: str, side: str, amount: int, pending_amount: int) -> tuple[int, int, int, int]:
    """What a log row does to (debits_posted, credits_posted, debits_pending, credits_pending)."""
    if op in ("open", "refused"):
        return 0, 0, 0, 0
    if op.startswith("undo:"):
        d = delta(op[5:], side, amount, pending_amount)
        return -d[0], -d[1], -d[2], -d[3]
    if op == "single":
        posted, pending = amount, 0
    elif op == "pending":
        posted, pending = 0, amount
    elif op == "post":
        posted, pending = amount, -pending_amount
    elif op == "void":
        posted, pending = 0, -pending_amount
    else:
        raise ValueError(f"unknown log op {op!r}")
    return (posted, 0, pending, 0) if side == "d" else (0, posted, 0, pending)


def _balances(row: Row) -> tuple[int, int, int, int]:
    return (int(row["debits_posted"] or 0), int(row["credits_posted"] or 0),
            int(row["debits_pending"] or 0), int(row["credits_pending"] or 0))


def _violates(flags: int, b: tuple[int, int, int, int]) -> str:
    """The reason a balance breaks the account's flags ('' when it does not)."""
    dp, cp, dpend, cpend = b
    if flags & DEBITS_MUST_NOT_EXCEED_CREDITS and dp + dpend > cp:
        return "EXCEEDS_CREDITS"
    if flags & CREDITS_MUST_NOT_EXCEED_DEBITS and cp + cpend > dp:
        return "EXCEEDS_DEBITS"
    if any(v > money.MAX_AMOUNT or v < 0 for v in b):
        return "OVERFLOWS"
    return ""


def _account(row: Row) -> Account:
    return Account(int(row["account_id"]), str(row["code"]), str(row["currency"]), int(row["flags"] or 0),
                   int(row["created_ms"] or 0))


def _entry(row: Row) -> Entry:
    return Entry(int(row["account_id"]), int(row["seq"]), int(row["transfer_id"] or 0), str(row["side"] or ""),
                 str(row["op"]), int(row["amount"] or 0), int(row["pending_amount"] or 0), *_balances(row),
                 int(row["at_ms"] or 0))


_REFUSALS = {
    "EXCEEDS_CREDITS": "the debit would exceed the account's credits",
    "EXCEEDS_DEBITS": "the credit would exceed the account's debits",
    "OVERFLOWS": "the balance would overflow",
    "PENDING_TRANSFER_EXPIRED": "the pending transfer timed out: it can no longer be posted",
    "PENDING_TRANSFER_ALREADY_RESOLVED": "the pending transfer was already posted or voided",
}


class Ledger:
    def __init__(self, tables: TableStore, *, next_id: Callable[[], int] | None = None,
                 clock_ms: Callable[[], int] = now_ms, book: str = "main") -> None:
        self.tables = tables
        self.book = book
        self.next_id = next_id or (lambda: secrets.randbits(62) + 1)
        self.clock_ms = clock_ms

    # -- accounts ------------------------------------------------------------------------

    async def create_account(self, *, code: str, currency: str, id: int = 0,
                             debits_must_not_exceed_credits: bool = False,
                             credits_must_not_exceed_debits: bool = False) -> Account:
        """A new account (or, for an id given again with the same fields, the same one)."""
        v = Violations()
        if code not in ACCOUNT_CODES:
            v.add("code", "must be one of " + ", ".join(ACCOUNT_CODES))
        if not money.is_known(currency):
            v.add("currency", "is not a known ISO 4217 currency")
        if id < 0 or id > money.MAX_AMOUNT:
            v.add("id", "must be a positive 64-bit integer")
        if debits_must_not_exceed_credits and credits_must_not_exceed_debits:
            v.add("flags", "an account cannot have both debits_must_not_exceed_credits and "
                           "credits_must_not_exceed_debits")
        v.raise_if_any()
        flags = ((DEBITS_MUST_NOT_EXCEED_CREDITS if debits_must_not_exceed_credits else 0)
                 | (CREDITS_MUST_NOT_EXCEED_DEBITS if credits_must_not_exceed_debits else 0))
        account_id = id or self.next_id()
        at = self.clock_ms()
        # Index first, then the opening log row, then the account: an account
        # that exists always has both.
        await self.tables.put(ACCOUNTS_BY_CURRENCY, {"book": self.book, "currency": currency,
                                                     "bucket": account_id % ACCOUNT_BUCKETS,
                                                     "account_id": account_id})
        await self.tables.put(ACCOUNT_LOG, {"account_id": account_id, "seq": 0, "transfer_id": 0, "side": "",
                                            "op": "open", "amount": 0, "pending_amount": 0, "debits_posted": 0,
                                            "credits_posted": 0, "debits_pending": 0, "credits_pending": 0,
                                            "at_ms": at}, if_not_exists=True)
        row = {"account_id": account_id, "code": code, "currency": currency, "flags": flags, "created_ms": at}
        if not await self.tables.put(ACCOUNTS, row, if_not_exists=True):
            have = await self.account(account_id)
            if (have.code, have.currency, have.flags) != (code, currency, flags):
                raise AlreadyExists(f"account {account_id} exists with other fields",
                                    reason="ACCOUNT_EXISTS_WITH_DIFFERENT_FIELDS")
            return have
        return _account(row)

    async def account(self, account_id: int) -> Account:
        row = await self.tables.get(ACCOUNTS, {"account_id": account_id})
        if row is None:
            raise NotFound(f"no account {account_id}", reason="ACCOUNT_NOT_FOUND")
        return _account(row)

    async def _tail(self, account_id: int) -> Row:
        rows = (await self.tables.slice(ACCOUNT_LOG, {"account_id": account_id}, limit=1, reverse=True)).rows
        if not rows:
            raise NotFound(f"no account {account_id}", reason="ACCOUNT_NOT_FOUND")
        return rows[0]

    async def balance(self, account_id: int) -> Balance:
        acct = await self.account(account_id)
        tail = await self._tail(account_id)
        return Balance(account_id, acct.currency, *_balances(tail), int(tail["seq"]))

    async def entries(self, account_id: int, page_size: int = 100, page_token: str = "") -> EntryPage:
        """The account's entries, oldest first (the opening row left out)."""
        if page_size < 1 or page_size > MAX_PAGE:
            raise InvalidArgument([("page_size", f"must be between 1 and {MAX_PAGE}")])
        await self.account(account_id)
        try:
            page = await self.tables.slice(ACCOUNT_LOG, {"account_id": account_id}, limit=page_size,
                                           page_token=page_token, bounds=ClusteringRange(gt=(0,)))
        except InvalidPageToken as exc:
            raise InvalidArgument([("page_token", "is not a token this listing returned")]) from exc
        return EntryPage([_entry(r) for r in page.rows], page.next_page_token)

    # -- transfers -----------------------------------------------------------------------

    async def transfer(self, *, id: int, debit_account_id: int, credit_account_id: int, amount: int,
                       code: str = "", reference: str = "", pending: bool = False,
                       timeout_s: int = 0) -> Transfer:
        """Move ``amount`` minor units: posted at once, or held with ``pending``."""
        v = Violations()
        self._check_id(v, "id", id)
        self._check_id(v, "debit_account_id", debit_account_id)
        self._check_id(v, "credit_account_id", credit_account_id)
        if debit_account_id == credit_account_id and debit_account_id:
            v.add("credit_account_id", "must differ from debit_account_id")
        self._check_amount(v, amount)
        self._check_text(v, code, reference)
        if timeout_s < 0:
            v.add("timeout_s", "must not be negative")
        elif timeout_s and not pending:
            v.add("timeout_s", "only a pending transfer can time out")
        v.raise_if_any()
        spec = _Spec(id, "pending" if pending else "single", debit_account_id, credit_account_id, amount,
                     code=code, reference=reference, timeout_s=timeout_s)
        return await self._submit(spec)

    async def post_pending(self, *, id: int, pending_id: int, amount: int | None = None, code: str = "",
                           reference: str = "") -> Transfer:
        """Post a pending transfer: its whole amount, or less (the rest is released)."""
        v = Violations()
        self._check_id(v, "id", id)
        self._check_id(v, "pending_id", pending_id)
        if amount is not None:
            self._check_amount(v, amount)
        self._check_text(v, code, reference)
        v.raise_if_any()
        return await self._submit(_Spec(id, "post", amount=amount or 0, code=code, reference=reference,
                                        pending_id=pending_id))

    async def void_pending(self, *, id: int, pending_id: int, code: str = "", reference: str = "") -> Transfer:
        """Release a pending transfer's reservation."""
        v = Violations()
        self._check_id(v, "id", id)
        self._check_id(v, "pending_id", pending_id)
        self._check_text(v, code, reference)
        v.raise_if_any()
        return await self._submit(_Spec(id, "void", code=code, reference=reference, pending_id=pending_id))

    async def get_transfer(self, transfer_id: int) -> Transfer:
        steps = await self._steps(transfer_id)
        if "intent" not in steps or "outcome" not in steps or steps["outcome"]["status"] == "refused":
            raise NotFound(f"no transfer {transfer_id}", reason="TRANSFER_NOT_FOUND")
        return self._result(steps["intent"], steps["outcome"])

    @staticmethod
    def _check_id(v: Violations, name: str, value: int) -> None:
        if not isinstance(value, int) or value <= 0 or value > money.MAX_AMOUNT:
            v.add(name, "must be a positive 64-bit integer")

    @staticmethod
    def _check_amount(v: Violations, amount: int) -> None:
        if not isinstance(amount, int) or isinstance(amount, bool):
            v.add("amount", "must be an integer number of minor units")
        elif amount <= 0:
            v.add("amount", "must be positive")
        elif amount > money.MAX_AMOUNT:
            v.add("amount", "is too large")

    @staticmethod
    def _check_text(v: Violations, code: str, reference: str) -> None:
        if len(code) > MAX_TEXT:
            v.add("code", f"must be at most {MAX_TEXT} characters")
        if len(reference) > MAX_TEXT:
            v.add("reference", f"must be at most {MAX_TEXT} characters")

    async def _steps(self, transfer_id: int) -> dict[str, Row]:
        rows = (await self.tables.slice(TRANSFERS, {"transfer_id": transfer_id}, limit=10)).rows
        return {str(r["step"]): r for r in rows}

    async def _submit(self, spec: _Spec) -> Transfer:
        for _ in range(5):
            steps = await self._steps(spec.id)
            if "intent" in steps:
                if steps["intent"]["fingerprint"] != spec.fingerprint():
                    raise AlreadyExists(f"transfer {spec.id} exists with other fields",
                                        reason="TRANSFER_EXISTS_WITH_DIFFERENT_FIELDS")
                return await self._complete(spec.id)
            if await self._begin(spec):
                return await self._complete(spec.id)
        raise Unavailable("the transfer id is contended; try again")

    async def _begin(self, spec: _Spec) -> bool:
        """Checks what can be checked up front (refusing writes nothing), then writes
        the in-flight row and the intent. False when another call wrote the intent first."""
        if spec.kind in ("post", "void"):
            psteps = await self._steps(spec.pending_id)
            pintent, poutcome = psteps.get("intent"), psteps.get("outcome")
            if pintent is None or poutcome is None or poutcome["status"] != "pending":
                if pintent is not None and poutcome is None:
                    try:
                        await self._complete(spec.pending_id)
                    except FailedPrecondition as exc:
                        raise NotFound(f"no pending transfer {spec.pending_id}",
                                       reason="PENDING_TRANSFER_NOT_FOUND") from exc
                    return await self._begin(spec)
                raise NotFound(f"no pending transfer {spec.pending_id}", reason="PENDING_TRANSFER_NOT_FOUND")
            if "resolution" in psteps:
                raise FailedPrecondition(_REFUSALS["PENDING_TRANSFER_ALREADY_RESOLVED"],
                                         reason="PENDING_TRANSFER_ALREADY_RESOLVED",
                                         subject=f"transfers/{spec.pending_id}")
            pamount = int(pintent["amount"])
            if spec.kind == "post":
                if spec.amount > pamount:
                    raise InvalidArgument([("amount", f"must not exceed the pending amount {pamount}")])
                timeout = int(pintent["timeout_at_ms"] or 0)
                if timeout and self.clock_ms() >= timeout:
                    raise FailedPrecondition(_REFUSALS["PENDING_TRANSFER_EXPIRED"],
                                             reason="PENDING_TRANSFER_EXPIRED",
                                             subject=f"transfers/{spec.pending_id}")
            spec.debit_account_id = int(pintent["debit_account_id"])
            spec.credit_account_id = int(pintent["credit_account_id"])
            spec.extra["pending_amount"] = pamount
            spec.extra["post_amount"] = (spec.amount or pamount) if spec.kind == "post" else 0
        debit = await self.account(spec.debit_account_id)
        credit = await self.account(spec.credit_account_id)
        if debit.currency != credit.currency:
            raise FailedPrecondition(f"the debit account is in {debit.currency}, the credit account in "
                                     f"{credit.currency}", reason="CURRENCY_MISMATCH",
                                     subjects=[f"accounts/{debit.id}", f"accounts/{credit.id}"])
        dtail, ctail = await self._tail(debit.id), await self._tail(credit.id)
        if spec.kind in ("single", "pending"):
            for acct, tail, side in ((debit, dtail, "d"), (credit, ctail, "c")):
                after = self._after(tail, spec.kind, side, spec.amount, 0)
                why = _violates(acct.flags, after)
                if why:
                    raise FailedPrecondition(_REFUSALS[why], reason=why, subject=f"accounts/{acct.id}")
        at = self.clock_ms()
        await self.tables.put(TRANSFERS_IN_FLIGHT, {**self._in_flight_key(spec.id), "at_ms": at})
        amount = spec.extra.get("post_amount", spec.amount) if spec.kind == "post" else spec.amount
        if spec.kind == "void":
            amount = 0
        intent = {"transfer_id": spec.id, "step": "intent", "kind": spec.kind,
                  "debit_account_id": debit.id, "credit_account_id": credit.id, "amount": amount,
                  "currency": debit.currency, "code": spec.code, "reference": spec.reference,
                  "pending_id": spec.pending_id,
                  "timeout_at_ms": at + spec.timeout_s * 1000 if spec.timeout_s else 0,
                  "fingerprint": spec.fingerprint(), "debit_from_seq": int(dtail["seq"]),
                  "credit_from_seq": int(ctail["seq"]), "at_ms": at}
        return await self.tables.put(TRANSFERS, intent, if_not_exists=True)

    @staticmethod
    def _after(tail: Row, op: str, side: str, amount: int, pending_amount: int) -> tuple[int, int, int, int]:
        d = delta(op, side, amount, pending_amount)
        b = _balances(tail)
        return b[0] + d[0], b[1] + d[1], b[2] + d[2], b[3] + d[3]

    async def _pending_amount(self, intent: Row) -> int:
        if intent["kind"] not in ("post", "void"):
            return 0
        psteps = await self._steps(int(intent["pending_id"]))
        return int(psteps["intent"]["amount"])

    async def _complete(self, transfer_id: int) -> Transfer:
        """Takes every step of a begun transfer not yet taken; answers its outcome."""
        steps = await self._steps(transfer_id)
        intent = steps.get("intent")
        if intent is None:
            raise NotFound(f"no transfer {transfer_id}", reason="TRANSFER_NOT_FOUND")
        outcome = steps.get("outcome")
        if outcome is None:
            outcome = await self._decide(intent)
        await self.tables.delete(TRANSFERS_IN_FLIGHT, self._in_flight_key(transfer_id))
        if outcome["status"] == "refused":
            why = str(outcome["reason"])
            raise FailedPrecondition(_REFUSALS.get(why, why), reason=why, subject=f"transfers/{transfer_id}")
        return self._result(intent, outcome)

    async def _decide(self, intent: Row) -> Row:
        tid, kind = int(intent["transfer_id"]), str(intent["kind"])
        reason = ""
        if kind in ("post", "void"):
            reason = await self._resolve(intent)
        debit_seq = credit_seq = 0
        if not reason:
            pamount = await self._pending_amount(intent)
            d = await self.apply_side(intent, "d", pamount)
            debit_seq = int(d["seq"])
            if d["op"] == "refused":
                reason = self._refusal_of(d)
            else:
                c = await self.apply_side(intent, "c", pamount)
                credit_seq = int(c["seq"])
                if c["op"] == "refused":
                    reason = self._refusal_of(c)
                    await self.apply_side(intent, "d", pamount, undo=True)
        status = "refused" if reason else {"single": "posted", "pending": "pending", "post": "posted",
                                           "void": "voided"}[kind]
        row = {"transfer_id": tid, "step": "outcome", "status": status, "reason": reason,
               "debit_seq": debit_seq, "credit_seq": credit_seq, "at_ms": self.clock_ms()}
        if not await self.tables.put(TRANSFERS, row, if_not_exists=True):
            row = (await self._steps(tid))["outcome"]
        return row

    @staticmethod
    def _refusal_of(row: Row) -> str:
        return "EXCEEDS_CREDITS" if row["side"] == "d" else "EXCEEDS_DEBITS"

    async def _resolve(self, intent: Row) -> str:
        """Claims the pending transfer's single resolution for this post or void: '' when it is
        this transfer's, else the reason it is refused."""
        tid, pid = int(intent["transfer_id"]), int(intent["pending_id"])
        psteps = await self._steps(pid)
        res = psteps.get("resolution")
        if res is None:
            timeout = int(psteps["intent"]["timeout_at_ms"] or 0)
            if intent["kind"] == "post" and timeout and self.clock_ms() >= timeout:
                return "PENDING_TRANSFER_EXPIRED"
            claim = {"transfer_id": pid, "step": "resolution", "resolver_id": tid, "kind": intent["kind"],
                     "at_ms": self.clock_ms()}
            if not await self.tables.put(TRANSFERS, claim, if_not_exists=True):
                res = (await self._steps(pid))["resolution"]
            else:
                res = claim
        return "" if int(res["resolver_id"]) == tid else "PENDING_TRANSFER_ALREADY_RESOLVED"

    async def apply_side(self, intent: Row, side: str, pending_amount: int, *, undo: bool = False) -> Row:
        """The log row of one side of a transfer (or of the undo of its debit): the one
        already there, or a new one claimed IF NOT EXISTS at the account's tail."""
        tid, kind = int(intent["transfer_id"]), str(intent["kind"])
        account_id = int(intent["debit_account_id"] if side == "d" else intent["credit_account_id"])
        from_seq = int(intent["debit_from_seq"] if side == "d" else intent["credit_from_seq"])
        amount = int(intent["amount"])
        op = f"undo:{kind}" if undo else kind
        acct = await self.account(account_id)
        for _ in range(MAX_APPEND_ATTEMPTS):
            rows = await self._log_since(account_id, from_seq)
            mine = [r for r in rows if int(r["transfer_id"] or 0) == tid and r["side"] == side
                    and (str(r["op"]).startswith("undo:") == undo)]
            if mine:
                return mine[0]
            tail = rows[-1]
            after = self._after(tail, op, side, amount, pending_amount)
            final = op
            if not undo and kind in ("single", "pending") and _violates(acct.flags, after):
                final, after = "refused", _balances(tail)
            row = {"account_id": account_id, "seq": int(tail["seq"]) + 1, "transfer_id": tid, "side": side,
                   "op": final, "amount": amount, "pending_amount": pending_amount,
                   "debits_posted": after[0], "credits_posted": after[1], "debits_pending": after[2],
                   "credits_pending": after[3], "at_ms": self.clock_ms()}
            try:
                if await self.tables.put(ACCOUNT_LOG, row, if_not_exists=True):
                    return row
            except TableError:
                # A contended LWT that timed out may or may not have landed: the
                # next round reads the log and finds out.
                await asyncio.sleep(0.01)
            await asyncio.sleep(0)
        raise Unavailable(f"account {account_id} is contended; try again")

    async def _log_since(self, account_id: int, from_seq: int) -> list[Row]:
        out: list[Row] = []
        token = ""
        while True:
            page = await self.tables.slice(ACCOUNT_LOG, {"account_id": account_id}, limit=MAX_PAGE,
                                           page_token=token, bounds=ClusteringRange(ge=(from_seq,)))
            out.extend(page.rows)
            token = page.next_page_token
            if not token:
                return out

    @staticmethod
    def _result(intent: Row, outcome: Row) -> Transfer:
        return Transfer(int(intent["transfer_id"]), str(intent["kind"]), int(intent["debit_account_id"]),
                        int(intent["credit_account_id"]), int(intent["amount"]), str(intent["currency"]),
                        str(intent["code"] or ""), str(intent["reference"] or ""), int(intent["pending_id"] or 0),
                        int(intent["timeout_at_ms"] or 0), str(outcome["status"]))

    # -- recovery and audit --------------------------------------------------------------

    def _in_flight_key(self, transfer_id: int) -> dict[str, Any]:
        return {"book": self.book, "bucket": transfer_id % INFLIGHT_BUCKETS, "transfer_id": transfer_id}

    async def _walk(self, table: Table, partition: dict[str, Any], column: str) -> list[int]:
        """One column of every row of one partition, page by page."""
        out: list[int] = []
        token = ""
        while True:
            page = await self.tables.slice(table, partition, limit=MAX_PAGE, page_token=token)
            out.extend(int(r[column]) for r in page.rows)
            token = page.next_page_token
            if not token:
                return out

    async def in_flight(self) -> list[int]:
        """Transfers of this book begun and not yet decided."""
        out: list[int] = []
        for bucket in range(INFLIGHT_BUCKETS):
            out += await self._walk(TRANSFERS_IN_FLIGHT, {"book": self.book, "bucket": bucket}, "transfer_id")
        return out

    async def recover(self) -> list[int]:
        """Completes every transfer left in flight (a process died mid-way); returns their ids.
        Safe to run at any time, concurrently with transfers and with itself."""
        done = []
        for tid in await self.in_flight():
            steps = await self._steps(tid)
            if "intent" not in steps:  # died before the intent: nothing was applied
                await self.tables.delete(TRANSFERS_IN_FLIGHT, self._in_flight_key(tid))
                continue
            try:
                await self._complete(tid)
            except FailedPrecondition:
                pass  # decided as refused: nothing applied
            done.append(tid)
        return done

    async def accounts(self, currency: str) -> list[int]:
        """The ids of this book's accounts in one currency."""
        out: list[int] = []
        for bucket in range(ACCOUNT_BUCKETS):
            part = {"book": self.book, "currency": currency, "bucket": bucket}
            out += await self._walk(ACCOUNTS_BY_CURRENCY, part, "account_id")
        return out

    async def audit(self) -> list[Finding]:
        """The ledger's invariants, checked; an empty list when the books are clean."""
        findings: list[Finding] = []
        for tid in await self.in_flight():
            findings.append(Finding("IN_FLIGHT", f"transfers/{tid}",
                                    "begun and not decided; recover() completes it"))
        intents: dict[int, Row | None] = {}
        for currency in money.CURRENCIES:
            posted = pending = 0
            for account_id in await self.accounts(currency):
                row = await self.tables.get(ACCOUNTS, {"account_id": account_id})
                if row is None:  # index row of an account whose creation did not finish
                    continue
                acct = _account(row)
                rows = await self._log_since(account_id, 0)
                prev: tuple[int, int, int, int] = (0, 0, 0, 0)
                for r in rows:
                    d = delta(str(r["op"]), str(r["side"] or ""), int(r["amount"] or 0),
                              int(r["pending_amount"] or 0))
                    want = (prev[0] + d[0], prev[1] + d[1], prev[2] + d[2], prev[3] + d[3])
                    if _balances(r) != want:
                        findings.append(Finding("BROKEN_CHAIN", f"accounts/{account_id}/entries/{r['seq']}",
                                                f"balances {_balances(r)} do not follow from {prev} "
                                                f"and the entry ({r['op']} {r['amount']})"))
                    prev = _balances(r)
                    tid = int(r["transfer_id"] or 0)
                    if r["op"] != "open" and not await self._entry_matches(r, account_id, intents):
                        findings.append(Finding("ORPHAN_ENTRY", f"accounts/{account_id}/entries/{r['seq']}",
                                                f"names transfer {tid}, which does not book it"))
                b = _balances(rows[-1]) if rows else (0, 0, 0, 0)
                why = _violates(acct.flags, b)
                if why:
                    findings.append(Finding("FLAG_VIOLATED", f"accounts/{account_id}",
                                            f"{why}: debits {b[0]}+{b[2]} pending, credits {b[1]}+{b[3]} pending"))
                posted += b[1] - b[0]
                pending += b[3] - b[2]
            if posted or pending:
                findings.append(Finding("UNBALANCED", f"currencies/{currency}",
                                        f"posted balances sum to {posted}, pending to {pending} (want 0)"))
        return findings

    async def _entry_matches(self, row: Row, account_id: int, intents: dict[int, Row | None]) -> bool:
        """Whether a log row is one its transfer's intent books on this account."""
        tid = int(row["transfer_id"] or 0)
        if tid not in intents:
            intents[tid] = (await self._steps(tid)).get("intent")
        intent = intents[tid]
        if intent is None:
            return False
        want = int(intent["debit_account_id"] if row["side"] == "d" else intent["credit_account_id"])
        op = str(row["op"])
        kind_ok = op == "refused" or op.removeprefix("undo:") == intent["kind"]
        return want == account_id and kind_ok and int(row["amount"] or 0) == int(intent["amount"])
