"""`sysdesign bench payments`: confirms and ledger transfers against raw table writes, and a soak under faults.

Three scenarios against ``sysdesign up`` on private ports, with the card
processor's stand-in (``sysdesign sim psp``) started by the bench as a child
process of its own (``SYSDESIGN_PSP_URL``; its webhooks go to the stack's
edge, ``/webhooks/psp``):

1. **confirm** — ConfirmPaymentIntent (automatic capture, a card that
   succeeds, an idempotency key per call) on intents created just before each
   step, the processor answering at once. Open loop, step search (the
   harness's ``find_max_rate``), latency from the scheduled time. Floor: the
   table-port writes one such confirm makes (the key's claim and outcome, the
   work index row and its delete, the intent's begin, done and booked rows,
   the ledger transfer's in-flight row, intent, two account-log rows, outcome
   and in-flight delete: 13), issued straight against the same table store,
   many confirms' worth at once, with no reads and no processor.
2. **ledger** — LedgerService.CreateTransfer (single transfers between random
   pairs of ``--accounts`` operator-created accounts) by an operator, step
   search. Floor: the same transfer's 6 table writes, raw, on the same number
   of accounts.
3. **soak** — ``--intents`` intents (10,000) from ``--clients`` concurrent
   clients (200), every fault switch of the stand-in on: latency, 5xx, 429,
   duplicate, out-of-order and dropped webhooks, and ``timeout_after_charge``
   (a switch: it is turned on for a share of the time, so that share of the
   money-moving calls is committed and never answered). Clients retry with
   the same key on UNAVAILABLE / ABORTED / DEADLINE_EXCEEDED, replay some
   finished calls, send some calls twice at once, and reuse some keys with
   other parameters (which must be refused). Then the reconciler is left to
   settle, and LedgerService.Audit runs with today's settlement date.
   Targets: audit clean, no key answered two ways, every reused key refused,
   exactly one captured charge at the processor per succeeded intent (its
   settlement report; ``/v1/payment_intents/search`` on a sample), none for
   the others, nothing left unsettled.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from clients.bench.loadgen import (
    HarnessError,
    Histogram,
    LoadGenerator,
    SearchCriteria,
    SearchPlan,
    SearchResult,
    SearchStep,
    StepResult,
    find_max_rate,
)
from clients.bench.report import (
    ProgressUI,
    Row,
    RunReport,
    Scenario,
    command_line,
    machine_info,
    print_report,
    to_markdown,
)
from clients.bench.stack import CpuWindow, Stack, sysdesign_command
from clients.loopback import free_port

SCENARIOS = ("confirm", "ledger", "soak")

PSP_KEY = "sk_test_bench"
PSP_WHSEC = "whsec_bench"
OPERATOR = "benchop"
OPERATOR_ID = 7_900_000_000_000_000_000
CUSTOMER_BASE = 7_800_000_000_000_000_000
CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000002"
CONFIRM_METHOD = "/sysdesign.payments.v1.PaymentService/ConfirmPaymentIntent"
TRANSFER_METHOD = "/sysdesign.payments.v1.LedgerService/CreateTransfer"
# The confirm's writes, in the order one confirm makes them (servers/payments/intents.py,
# servers/payments/ledger.py, servers/platform/idempotency.py).
CONFIRM_WRITES = 13
TRANSFER_WRITES = 6
# The soak's faults (POST /_sim/faults); timeout_after_charge is turned on for a share of the time.
SOAK_FAULTS: dict[str, Any] = {
    "latency_ms": 20, "error_5xx_rate": 0.05, "rate_limit_rate": 0.05, "duplicate_webhooks": 0.2,
    "out_of_order_webhooks": True, "drop_webhooks": 0.1, "timeout_hold_ms": 500,
}
RETRYABLE = ("UNAVAILABLE", "ABORTED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


@dataclass
class PaymentsBenchOptions:
    quick: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    step_seconds: float | None = None     # confirm, ledger: seconds per open-loop step (5; quick 2)
    max_steps: int | None = None          # confirm, ledger: steps per search (6; quick 3)
    workers: int = 2                      # confirm, ledger: load processes
    p99_limit_ms: float = 250.0           # confirm, ledger: a step passes with p99 at most this
    customers: int | None = None          # confirm, soak: customers the intents belong to (500; quick 50)
    accounts: int | None = None           # ledger: accounts the transfers move between (200; quick 50)
    intents: int | None = None            # soak (10,000; quick 300)
    clients: int | None = None            # soak: concurrent clients (200; quick 40)
    timeout_share: float = 0.2            # soak: share of the time timeout_after_charge is on
    settle_timeout: float | None = None   # soak: seconds the reconciler is given to settle (300; quick 90)
    search_sample: int | None = None      # soak: intents also looked up by search at the processor (200; quick 100)
    out_dir: Path = Path("bench-results")
    keep_data: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    seed: int = 1

    def resolved(self) -> dict[str, Any]:
        q = self.quick
        r = {
            "step_seconds": self.step_seconds or (2.0 if q else 5.0),
            "max_steps": self.max_steps or (3 if q else 6),
            "workers": self.workers,
            "p99_limit_ms": self.p99_limit_ms,
            "customers": self.customers or (50 if q else 500),
            "accounts": self.accounts or (50 if q else 200),
            "intents": self.intents or (300 if q else 10_000),
            "clients": self.clients or (40 if q else 200),
            "timeout_share": self.timeout_share,
            "settle_timeout_s": self.settle_timeout or (90.0 if q else 300.0),
            "search_sample": self.search_sample or (100 if q else 200),
        }
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenario(s) {', '.join(bad)}: choose from {', '.join(SCENARIOS)}")
        if not 0 <= r["timeout_share"] <= 1:
            raise ValueError("--timeout-share must be from 0 to 1")
        if r["accounts"] < 2:
            raise ValueError("--accounts must be at least 2")
        return r


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _mint(secret: bytes, base: int, n: int, prefix: str) -> list[tuple[int, str]]:
    from servers.platform.auth import TokenSigner

    signer = TokenSigner(secret, 6 * 3600)
    return [(base + i, signer.mint(base + i, f"{prefix}{i}")[0]) for i in range(n)]


def _violated_fields(exc: Any) -> list[str]:
    """The fields a gRPC error's BadRequest detail names (google.rpc.Status in its trailers)."""
    from google.rpc import error_details_pb2, status_pb2

    fields: list[str] = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for d in status_pb2.Status.FromString(value).details:
                if d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    br = error_details_pb2.BadRequest()
                    d.Unpack(br)
                    fields += [v.field for v in br.field_violations]
    return fields


def _operator_token(secret: bytes) -> str:
    from servers.platform.auth import TokenSigner

    return str(TokenSigner(secret, 6 * 3600).mint(OPERATOR_ID, OPERATOR)[0])


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


# --------------------------------------------------------------------------- the processor's stand-in


class SimPspProcess:
    """``sysdesign sim psp`` as a child process on a free port, its charges under ``data_dir``."""

    def __init__(self, data_dir: Path, webhook_url: str, seed: int) -> None:
        self.data_dir = data_dir
        self.webhook_url = webhook_url
        self.seed = seed
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> SimPspProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [*sysdesign_command(), "sim", "psp", "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--webhook-url", self.webhook_url, "--secret-key", PSP_KEY, "--webhook-secret", PSP_WHSEC,
               "--seed", str(self.seed), "--webhook-retry-base-ms", "200"]
        with open(self.data_dir / "sim.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"`sysdesign sim psp` exited with {self.proc.returncode}:\n{self.log_tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        self.stop()
        raise HarnessError(f"`sysdesign sim psp` did not listen within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, limit: int = 4000) -> str:
        p = self.data_dir / "sim.log"
        return p.read_bytes()[-limit:].decode(errors="replace") if p.exists() else ""

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 60) -> Any:
        """One call; the injected 500s and 429s (the faults are on for the bench's own reads too) are retried."""
        import urllib.error

        data = None if body is None else json.dumps(body).encode()
        for attempt in range(100):
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {PSP_KEY}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                    raw = resp.read()
                    ctype = resp.headers.get("Content-Type", "")
                return json.loads(raw) if "json" in ctype else raw.decode()
            except urllib.error.HTTPError as exc:
                if exc.code not in (429, 500) or attempt == 99:
                    raise
                time.sleep(0.05)
        raise HarnessError(f"{method} {path}: no answer")

    def faults(self, **values: Any) -> None:
        self.request("POST", "/_sim/faults", values)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- load targets


@dataclass(frozen=True)
class OneShotTarget:
    """A unary method called once per prepared request: each worker sends its own list in order
    (an intent is confirmed once), each request with its own caller's token."""

    name: str
    address: str
    method: str
    per_worker: tuple[tuple[tuple[bytes, str], ...], ...]
    timeout_s: float = 30.0

    async def connect(self, worker: int, seed: int) -> Any:
        return _OneShotClient(self, worker)


class _OneShotClient:
    def __init__(self, target: OneShotTarget, worker: int) -> None:
        import grpc

        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(target.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self._call = self._channel.unary_unary(target.method)
        self._items = target.per_worker[worker % len(target.per_worker)]
        self._i = 0
        self._timeout = target.timeout_s

    async def call(self) -> str | None:
        if self._i >= len(self._items):
            return "EXHAUSTED"
        payload, token = self._items[self._i]
        self._i += 1
        try:
            await self._call(payload, timeout=self._timeout, metadata=_md(token))
        except self._grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return None

    async def close(self) -> None:
        await self._channel.close()


@dataclass(frozen=True)
class TransferRequests:
    """CreateTransfer requests: single transfers between random pairs of ``accounts``, fresh ids."""

    accounts: tuple[int, ...]
    base: int

    def bind(self, worker: int, seed: int) -> Callable[[], bytes]:
        from sysdesign.payments.v1 import payments_pb2 as pb

        rnd = random.Random(seed * 1_000_003 + worker)
        accounts = self.accounts
        state = {"n": 0}
        start = self.base + (worker << 40)

        def next_request() -> bytes:
            state["n"] += 1
            d, c = rnd.sample(accounts, 2)
            return pb.CreateTransferRequest(transfer_id=start + state["n"], kind=pb.TRANSFER_KIND_SINGLE,
                                            debit_account_id=d, credit_account_id=c,
                                            amount_minor=rnd.randint(1, 10_000), code="bench",
                                            reference="bench").SerializeToString()

        return next_request


class RefillingLoad(LoadGenerator):
    """A load generator whose every step first gets ``prepare(n)`` fresh requests (a new target):
    a confirm needs an intent of its own that has never been confirmed."""

    def __init__(self, prepare: Callable[[int], Any], *, probe_rate_cap: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.prepare = prepare
        self.probe_rate_cap = probe_rate_cap

    def _refill(self, n: int) -> None:
        self.setup(self.prepare(n + self.workers * self.warmup_calls))

    def run_open(self, rate: float, duration_s: float, **kw: Any) -> StepResult:
        self._refill(max(1, round(rate * duration_s)) + self.workers)
        return super().run_open(rate, duration_s, **kw)

    def run_closed(self, concurrency: int, duration_s: float, **kw: Any) -> StepResult:
        self._refill(round(self.probe_rate_cap * duration_s))
        return super().run_closed(concurrency, duration_s, **kw)


# --------------------------------------------------------------------------- setup through the API


async def _create_intents(addr: str, customers: list[tuple[int, str]], n: int, seed: int,
                          concurrency: int = 48) -> list[tuple[str, str]]:
    """n intents (automatic capture, a card that succeeds) spread over the customers: (intent id, token)."""
    import grpc
    from sysdesign.payments.v1 import payments_pb2 as pb
    from sysdesign.payments.v1 import payments_pb2_grpc as pbg

    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.PaymentServiceStub(ch)
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            _, tok = customers[rng.randrange(len(customers))]
            req = pb.CreatePaymentIntentRequest(
                amount=pb.Money(currency_code="USD", value=f"{rng.randint(100, 99_999) / 100:.2f}"),
                capture_method=pb.CAPTURE_METHOD_AUTOMATIC, payment_method=CARD_OK)
            async with sem:
                resp = await stub.CreatePaymentIntent(req, metadata=_md(tok), timeout=60)
            out.append((resp.payment_intent.payment_intent_id, tok))

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


def _confirm_target(addr: str, intents: list[tuple[str, str]], workers: int) -> OneShotTarget:
    from sysdesign.payments.v1 import payments_pb2 as pb

    items = [(pb.ConfirmPaymentIntentRequest(payment_intent_id=iid, idempotency_key=f"confirm-{iid}")
              .SerializeToString(), tok) for iid, tok in intents]
    per = tuple(tuple(items[w::workers]) for w in range(workers))
    return OneShotTarget("ConfirmPaymentIntent", addr, CONFIRM_METHOD, per)


async def _create_accounts(addr: str, token: str, n: int, base: int) -> list[int]:
    import grpc
    from sysdesign.payments.v1 import payments_pb2 as pb
    from sysdesign.payments.v1 import payments_pb2_grpc as pbg

    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.LedgerServiceStub(ch)
        ids = [base + i for i in range(n)]
        await asyncio.gather(*(stub.CreateAccount(pb.CreateAccountRequest(
            account_id=i, code=pb.ACCOUNT_CODE_PROCESSOR_CLEARING, currency_code="USD"),
            metadata=_md(token), timeout=60) for i in ids))
    return ids


# --------------------------------------------------------------------------- floors: raw table writes


def _open_store(stack: Stack) -> Any:
    from servers.platform.config import Config
    from servers.storage.backends import open_table_store

    return open_table_store(Config(data_dir=stack.data_dir, redis_url="", cassandra_hosts=[], token_secret=""))


async def _floor(stack: Stack, seconds: float, concurrency: int, sequence: Callable[[Any, int], Any]) -> dict[str, Any]:
    """Runs ``sequence(store, i)`` (one operation's writes, in order) ``concurrency`` at a time for
    ``seconds``; every sequence begun is finished. Operations per second and their latency."""
    store = _open_store(stack)
    lat = Histogram()
    done = [0]
    counter = iter(range(1 << 62))
    try:
        start = time.perf_counter()
        end = start + seconds

        async def lane() -> None:
            while time.perf_counter() < end:
                t = time.perf_counter()
                await sequence(store, next(counter))
                lat.record(time.perf_counter() - t)
                done[0] += 1

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await store.close()
    return {"ops": done[0], "seconds": round(elapsed, 3), "per_s": done[0] / elapsed, "latency": lat.summary()}


def _confirm_writes(base: int, accounts: tuple[int, int]) -> Callable[[Any, int], Any]:
    """The table-port writes of one ConfirmPaymentIntent (automatic capture, succeeded, the ledger's
    accounts already there), with fresh keys; the account-log rows go to two accounts, as a confirm's
    go to a customer's account and the one merchant account."""
    from servers.payments.tables import (
        ACCOUNT_LOG,
        PAYMENT_INTENT_LOG,
        PAYMENT_WORK,
        TRANSFERS,
        TRANSFERS_IN_FLIGHT,
    )
    from servers.platform.idempotency import IDEMPOTENCY_KEYS

    seqs = {a: 0 for a in accounts}
    pending = json.dumps({"kind": "confirm", "n": 1, "request": json.dumps(
        {"method": "POST", "path": "/v1/payment_intents", "body": {"amount": 1234, "currency": "usd", "confirm": True,
                                                                   "capture_method": "automatic",
                                                                   "payment_method": CARD_OK,
                                                                   "metadata": {"ref": "1"}},
         "key": "sd-1-1-confirm"}), "prev": 2, "at_ms": 0, "reason": "", "client_key": "confirm-1"})
    book = json.dumps([{"id": 1, "kind": "single", "debit": 1, "credit": 2, "amount": 1234,
                        "reference": "intent:1:capture"}])

    def log_row(iid: int, seq: int, op: str, **kw: Any) -> dict[str, Any]:
        return {"intent_id": iid, "seq": seq, "op": op, "status": 4, "at_ms": int(time.time() * 1000), "n": 1,
                "payment_method": CARD_OK, "psp_id": "pi_0123456789abcdefghij", "capturable": 0, "received": 0,
                "refunded": 0, "refunds": "", "error_type": "", "error_code": "", "decline_code": "",
                "error_message": "", "cancellation_reason": "", "pending": "", "book": "", **kw}

    async def sequence(store: Any, i: int) -> None:
        iid, tid, now = base + i, base + i, int(time.time() * 1000)
        part = {"scope": "payments.ConfirmPaymentIntent", "owner": CUSTOMER_BASE, "idem_key": f"floor-{iid}"}
        await store.put(IDEMPOTENCY_KEYS, {**part, "attempt": 0, "part": "claim", "fingerprint": "f" * 64,
                                           "lease_until_ms": now + 30_000, "created_ms": now},
                        if_not_exists=True, ttl_seconds=86_400)
        work = {"bucket": iid % 16, "intent_id": iid}
        await store.put(PAYMENT_WORK, {**work, "at_ms": now})
        await store.put(PAYMENT_INTENT_LOG, log_row(iid, 1, "begin:1:confirm", pending=pending), if_not_exists=True)
        await store.put(PAYMENT_INTENT_LOG, log_row(iid, 2, "done:1", status=6, received=1234, book=book),
                        if_not_exists=True)
        flight = {"book": "floor", "bucket": tid % 16, "transfer_id": tid}
        await store.put(TRANSFERS_IN_FLIGHT, {**flight, "at_ms": now})
        await store.put(TRANSFERS, {"transfer_id": tid, "step": "intent", "kind": "single",
                                    "debit_account_id": accounts[0], "credit_account_id": accounts[1],
                                    "amount": 1234, "currency": "USD", "code": "payment",
                                    "reference": f"intent:{iid}:capture", "pending_id": 0, "timeout_at_ms": 0,
                                    "fingerprint": "f" * 64, "debit_from_seq": seqs[accounts[0]],
                                    "credit_from_seq": seqs[accounts[1]], "at_ms": now}, if_not_exists=True)
        for side, acct in (("d", accounts[0]), ("c", accounts[1])):
            seqs[acct] += 1
            await store.put(ACCOUNT_LOG, {"account_id": acct, "seq": seqs[acct], "transfer_id": tid, "side": side,
                                          "op": "single", "amount": 1234, "pending_amount": 0,
                                          "debits_posted": seqs[acct] * 1234, "credits_posted": 0,
                                          "debits_pending": 0, "credits_pending": 0, "at_ms": now},
                            if_not_exists=True)
        await store.put(TRANSFERS, {"transfer_id": tid, "step": "outcome", "status": "posted", "reason": "",
                                    "debit_seq": 1, "credit_seq": 1, "at_ms": now}, if_not_exists=True)
        await store.delete(TRANSFERS_IN_FLIGHT, flight)
        await store.put(PAYMENT_INTENT_LOG, log_row(iid, 3, "booked:1", status=6, received=1234), if_not_exists=True)
        await store.delete(PAYMENT_WORK, work)
        await store.put(IDEMPOTENCY_KEYS, {**part, "attempt": 0, "part": "outcome", "code": 0,
                                           "response": b"\x0a" * 400}, if_not_exists=True, ttl_seconds=86_400)

    return sequence


def _transfer_writes(base: int, accounts: tuple[int, ...], seed: int) -> Callable[[Any, int], Any]:
    """The table-port writes of one single ledger transfer, between random pairs of ``accounts``."""
    from servers.payments.tables import ACCOUNT_LOG, TRANSFERS, TRANSFERS_IN_FLIGHT

    rng = random.Random(seed)
    seqs = {a: 0 for a in accounts}

    async def sequence(store: Any, i: int) -> None:
        tid, now = base + i, int(time.time() * 1000)
        d, c = rng.sample(accounts, 2)
        flight = {"book": "floor", "bucket": tid % 16, "transfer_id": tid}
        await store.put(TRANSFERS_IN_FLIGHT, {**flight, "at_ms": now})
        await store.put(TRANSFERS, {"transfer_id": tid, "step": "intent", "kind": "single", "debit_account_id": d,
                                    "credit_account_id": c, "amount": 500, "currency": "USD", "code": "bench",
                                    "reference": "bench", "pending_id": 0, "timeout_at_ms": 0,
                                    "fingerprint": "f" * 64, "debit_from_seq": seqs[d], "credit_from_seq": seqs[c],
                                    "at_ms": now}, if_not_exists=True)
        for side, acct in (("d", d), ("c", c)):
            seqs[acct] += 1
            await store.put(ACCOUNT_LOG, {"account_id": acct, "seq": seqs[acct], "transfer_id": tid, "side": side,
                                          "op": "single", "amount": 500, "pending_amount": 0,
                                          "debits_posted": 0, "credits_posted": 0, "debits_pending": 0,
                                          "credits_pending": 0, "at_ms": now}, if_not_exists=True)
        await store.put(TRANSFERS, {"transfer_id": tid, "step": "outcome", "status": "posted", "reason": "",
                                    "debit_seq": seqs[d], "credit_seq": seqs[c], "at_ms": now}, if_not_exists=True)
        await store.delete(TRANSFERS_IN_FLIGHT, flight)

    return sequence


# --------------------------------------------------------------------------- confirm and ledger


def _search(lg: LoadGenerator, plan: SearchPlan, criteria: SearchCriteria, ui: ProgressUI) -> SearchResult:
    def each(s: SearchStep) -> None:
        ui.log(s.line())

    return find_max_rate(lg, plan, criteria, on_step=ui.step, on_result=each)


def _throughput_rows(label: str, res: SearchResult, floor: dict[str, Any], floor_name: str, target: float,
                     p99_limit: float) -> list[Row]:
    best = res.best
    return [
        Row(f"{label} max sustained rate", round(res.max_rps, 1) if best else None, "/s",
            floor=round(floor["per_s"], 1), floor_name=floor_name, target_op=">=", target=target),
        Row(f"{label} p50 at that rate", round(best.latency.percentile_ms(50), 2) if best else None, "ms",
            note="from the scheduled time"),
        Row(f"{label} p99 at that rate", round(best.latency.percentile_ms(99), 2) if best else None, "ms",
            target_op="<=", target=p99_limit, target_on="value", note="from the scheduled time"),
    ]


def _confirm(o: PaymentsBenchOptions, r: dict[str, Any], stack: Stack, customers: list[tuple[int, str]],
             ui: ProgressUI) -> Scenario:
    sc = Scenario("confirm", "ConfirmPaymentIntent, the processor answering at once")
    rng = random.Random(o.seed)
    made = [0]
    prep_s = [0.0]

    def prepare(n: int) -> OneShotTarget:
        t = time.perf_counter()
        intents = asyncio.run(_create_intents(stack.grpc_addr, customers, n, rng.randrange(1 << 30)))
        prep_s[0] += time.perf_counter() - t
        made[0] += n
        return _confirm_target(stack.grpc_addr, intents, r["workers"])

    plan = SearchPlan(probe_s=min(2.0, r["step_seconds"]), step_s=r["step_seconds"], concurrency=32,
                      resolution=0.1 if o.quick else 0.05, max_steps=r["max_steps"], settle_s=0.5,
                      confirm_failures=0 if o.quick else 1)
    criteria = SearchCriteria(p99_limit_ms=r["p99_limit_ms"])
    with ui.phase("confirm: step search over fresh intents"), RefillingLoad(
            prepare, probe_rate_cap=600.0, workers=r["workers"], warmup_calls=2, drain_s=10.0,
            seed=o.seed) as lg:
        lg.setup(prepare(2 * r["workers"] * lg.warmup_calls))
        res = _search(lg, plan, criteria, ui)
    with ui.phase("confirm: the work index drains"):
        # An overloaded step leaves operations to the reconciler; the next measurement waits for them.
        drain_s, left = _drain(stack, 180.0)
    with ui.phase(f"confirm floor: {CONFIRM_WRITES} table writes a confirm, raw"):
        base = random.Random(o.seed + 1).randrange(1 << 60, 1 << 61)
        floor = asyncio.run(_floor(stack, r["step_seconds"], 64, _confirm_writes(base, (base + 1, base + 2))))
    sc.rows += _throughput_rows("ConfirmPaymentIntent", res, floor,
                                f"its {CONFIRM_WRITES} table writes, raw", 0.25, r["p99_limit_ms"])
    sc.notes.append(f"target: ≥ 0.25x the raw writes: a confirm also reads about as many rows as it writes, "
                    f"calls the processor (its own SQLite transaction) and answers over gRPC; a step passes with "
                    f"achieved ≥ 95 % of offered, ≤ 1 % errors and p99 ≤ {r['p99_limit_ms']:g} ms")
    sc.notes.append(f"{made[0]:,} intents created for the search (CreatePaymentIntent, {prep_s[0]:.0f} s, "
                    f"not timed); the floor ran 64 confirms' writes at a time through the table port's group "
                    f"commit, {floor['ops']:,} in {floor['seconds']:.1f} s")
    errors: Counter[str] = Counter()
    for st in res.steps:
        errors.update(st.result.errors)
    if errors:
        sc.notes.append(f"errors over the search's steps: {dict(errors)}")
    sc.notes.append(f"after the search the reconciler took {drain_s:.1f} s to empty the work index"
                    + (f" ({left} intents still there)" if left else ""))
    sc.details = {"search": res.summary(), "floor": floor, "intents_created": made[0],
                  "drain_s": round(drain_s, 2), "work_left_after_drain": left, "errors": dict(errors)}
    return sc


def _ledger(o: PaymentsBenchOptions, r: dict[str, Any], stack: Stack, op_token: str, ui: ProgressUI) -> Scenario:
    from clients.bench.loadgen import GrpcUnaryTarget

    sc = Scenario("ledger", f"LedgerService.CreateTransfer between {r['accounts']:,} accounts")
    rng = random.Random(o.seed + 2)
    with ui.phase(f"ledger: {r['accounts']:,} accounts"):
        accounts = asyncio.run(_create_accounts(stack.grpc_addr, op_token, r["accounts"],
                                                rng.randrange(1 << 60, 1 << 61)))
    target = GrpcUnaryTarget("CreateTransfer", stack.grpc_addr, TRANSFER_METHOD,
                             TransferRequests(tuple(accounts), rng.randrange(1 << 59, 1 << 60)),
                             metadata=_md(op_token))
    plan = SearchPlan(probe_s=min(2.0, r["step_seconds"]), step_s=r["step_seconds"], concurrency=32,
                      resolution=0.1 if o.quick else 0.05, max_steps=r["max_steps"], settle_s=0.5,
                      confirm_failures=0 if o.quick else 1)
    with ui.phase("ledger: step search"), LoadGenerator(r["workers"], warmup_calls=8, seed=o.seed) as lg:
        lg.setup(target)
        res = _search(lg, plan, SearchCriteria(p99_limit_ms=r["p99_limit_ms"]), ui)
    with ui.phase(f"ledger floor: {TRANSFER_WRITES} table writes a transfer, raw"):
        base = rng.randrange(1 << 61, 1 << 62)
        floor_accounts = tuple(base + 1 + i for i in range(r["accounts"]))
        floor = asyncio.run(_floor(stack, r["step_seconds"], 64, _transfer_writes(base + 1_000_000, floor_accounts,
                                                                                  o.seed)))
    sc.rows += _throughput_rows("CreateTransfer", res, floor, f"its {TRANSFER_WRITES} table writes, raw", 0.3,
                                r["p99_limit_ms"])
    sc.notes.append("target: ≥ 0.3x the raw writes (a transfer reads both accounts' tails and its own steps "
                    "before each LWT)")
    sc.details = {"search": res.summary(), "floor": floor, "accounts": len(accounts)}
    return sc


# --------------------------------------------------------------------------- soak


@dataclass
class _KeyLog:
    method: str
    answers: list[tuple[str, bytes]] = field(default_factory=list)
    retries: int = 0
    gave_up: bool = False


@dataclass
class _Plan:
    index: int
    customer: int
    token: str
    flow: str  # auto, manual, declined
    amount: int
    refund: bool


class _Soak:
    def __init__(self, addr: str, psp: SimPspProcess, customers: list[tuple[int, str]], n: int, clients: int,
                 seed: int, tag: str) -> None:
        self.addr, self.psp, self.n, self.clients, self.tag = addr, psp, n, clients, tag
        self.rng = random.Random(seed)
        self.keys: dict[str, _KeyLog] = {}
        self.reuse_checked = 0
        self.reuse_not_refused: list[str] = []
        self.codes: Counter[str] = Counter()
        self.intents: dict[str, dict[str, Any]] = {}  # intent id -> plan and what the client was answered
        self.errors: list[str] = []
        self.done = 0
        plans = []
        for i in range(n):
            uid, tok = customers[self.rng.randrange(len(customers))]
            roll = self.rng.random()
            flow = "auto" if roll < 0.65 else ("manual" if roll < 0.9 else "declined")
            plans.append(_Plan(i, uid, tok, flow, self.rng.randint(100, 99_999), self.rng.random() < 0.15))
        self.plans = plans

    async def _once(self, fn: Any, req: Any, md: Any) -> tuple[str, bytes] | None:
        """One attempt: a terminal answer, or None when the call may be retried."""
        import grpc

        try:
            resp = await fn(req, metadata=md, timeout=10)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            self.codes[code] += 1
            if code in RETRYABLE:
                return None
            return code, (exc.details() or "").encode()
        self.codes["OK"] += 1
        return "OK", resp.SerializeToString(deterministic=True)

    async def call(self, method: str, fn: Any, req: Any, md: Any, key: str, rng: random.Random) -> tuple[str, bytes]:
        """Sends until a terminal answer (same request, same key), sometimes two copies at once,
        sometimes a replay after the answer; every terminal answer is kept under the key."""
        kl = self.keys.setdefault(key, _KeyLog(method))

        async def until_terminal() -> tuple[str, bytes] | None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = await self._once(fn, req, md)
                if got is not None:
                    kl.answers.append(got)
                    return got
                kl.retries += 1
                await asyncio.sleep(rng.uniform(0.1, 1.0))
            kl.gave_up = True
            return None

        if rng.random() < 0.1:  # a client that sent twice (a timeout of its own, a double click)
            got = await asyncio.gather(until_terminal(), until_terminal())
            first = got[0] or got[1]
        else:
            first = await until_terminal()
        if first is not None and rng.random() < 0.25:  # a replay after the answer
            await until_terminal()
        if first is None:
            raise HarnessError(f"{method} with key {key} got no answer within 120 s")
        return first

    async def reuse(self, fn: Any, req: Any, md: Any, key: str) -> None:
        """The same key with other parameters: must be INVALID_ARGUMENT naming the key's field."""
        import grpc

        self.reuse_checked += 1
        for _ in range(100):
            try:
                await fn(req, metadata=md, timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code().name in RETRYABLE:
                    await asyncio.sleep(0.3)
                    continue
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key" in _violated_fields(exc):
                    return
                self.reuse_not_refused.append(f"{key}: {exc.code().name} {exc.details()}")
                return
            self.reuse_not_refused.append(f"{key}: answered OK")
            return
        self.reuse_not_refused.append(f"{key}: no answer")

    async def flow(self, p: _Plan, stub: Any) -> None:
        from sysdesign.payments.v1 import payments_pb2 as pb

        rng = random.Random(p.index * 7919 + 1)
        md = _md(p.token)
        k = f"soak-{self.tag}-{p.index}"
        card = CARD_DECLINED if p.flow == "declined" else CARD_OK
        method = pb.CAPTURE_METHOD_MANUAL if p.flow == "manual" else pb.CAPTURE_METHOD_AUTOMATIC
        amount = pb.Money(currency_code="USD", value=f"{p.amount / 100:.2f}")
        create = pb.CreatePaymentIntentRequest(amount=amount, capture_method=method, payment_method=card,
                                               metadata={"soak": str(p.index)}, idempotency_key=f"{k}-create")
        code, body = await self.call("CreatePaymentIntent", stub.CreatePaymentIntent, create, md, f"{k}-create", rng)
        if code != "OK":
            self.errors.append(f"create {k}: {code} {body[:200]!r}")
            return
        pi = pb.CreatePaymentIntentResponse.FromString(body).payment_intent
        rec: dict[str, Any] = {"flow": p.flow, "amount": p.amount, "customer": p.customer, "token": p.token,
                               "last": pi.status, "received": 0, "refunded": 0}
        self.intents[pi.payment_intent_id] = rec
        if rng.random() < 0.1:
            other = pb.CreatePaymentIntentRequest()
            other.CopyFrom(create)
            other.amount.value = f"{(p.amount + 1) / 100:.2f}"
            await self.reuse(stub.CreatePaymentIntent, other, md, f"{k}-create")
        confirm = pb.ConfirmPaymentIntentRequest(payment_intent_id=pi.payment_intent_id,
                                                 idempotency_key=f"{k}-confirm")
        code, body = await self.call("ConfirmPaymentIntent", stub.ConfirmPaymentIntent, confirm, md,
                                     f"{k}-confirm", rng)
        if code != "OK":
            self.errors.append(f"confirm {pi.payment_intent_id}: {code} {body[:200]!r}")
            return
        pi = pb.ConfirmPaymentIntentResponse.FromString(body).payment_intent
        rec.update(last=pi.status, received=pi.amount_received.amount_minor)
        if rng.random() < 0.1:
            other_c = pb.ConfirmPaymentIntentRequest(payment_intent_id=pi.payment_intent_id,
                                                     payment_method="5555555555554444",
                                                     idempotency_key=f"{k}-confirm")
            await self.reuse(stub.ConfirmPaymentIntent, other_c, md, f"{k}-confirm")
        if pi.status == pb.PAYMENT_INTENT_STATUS_REQUIRES_CAPTURE:
            part = max(1, p.amount - rng.randint(0, p.amount // 4))
            cap = pb.CapturePaymentIntentRequest(payment_intent_id=pi.payment_intent_id,
                                                 amount_to_capture=pb.Money(currency_code="USD",
                                                                            value=f"{part / 100:.2f}"),
                                                 idempotency_key=f"{k}-capture")
            code, body = await self.call("CapturePaymentIntent", stub.CapturePaymentIntent, cap, md,
                                         f"{k}-capture", rng)
            if code != "OK":
                self.errors.append(f"capture {pi.payment_intent_id}: {code} {body[:200]!r}")
                return
            pi = pb.CapturePaymentIntentResponse.FromString(body).payment_intent
            rec.update(last=pi.status, received=pi.amount_received.amount_minor)
        if p.refund and pi.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED:
            amt = max(1, pi.amount_received.amount_minor // 3)
            ref = pb.RefundPaymentRequest(payment_intent_id=pi.payment_intent_id,
                                          amount=pb.Money(currency_code="USD", value=f"{amt / 100:.2f}"),
                                          idempotency_key=f"{k}-refund")
            code, body = await self.call("RefundPayment", stub.RefundPayment, ref, md, f"{k}-refund", rng)
            if code != "OK":
                self.errors.append(f"refund {pi.payment_intent_id}: {code} {body[:200]!r}")
                return
            pi = pb.RefundPaymentResponse.FromString(body).payment_intent
            rec.update(last=pi.status, refunded=pi.amount_refunded.amount_minor)

    async def run(self, progress: Callable[[int], None], timeout_share: float) -> float:
        import grpc
        from sysdesign.payments.v1 import payments_pb2_grpc as pbg

        chans = [grpc.aio.insecure_channel(self.addr, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(8)]
        stubs = [pbg.PaymentServiceStub(c) for c in chans]
        sem = asyncio.Semaphore(self.clients)
        stop = asyncio.Event()

        async def toggler() -> None:
            """timeout_after_charge for ``timeout_share`` of every 5 s."""
            loop = asyncio.get_running_loop()
            while not stop.is_set() and timeout_share > 0:
                await loop.run_in_executor(None, lambda: self.psp.faults(timeout_after_charge=True))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5 * timeout_share)
                await loop.run_in_executor(None, lambda: self.psp.faults(timeout_after_charge=False))
                if stop.is_set():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 5 * (1 - timeout_share))

        async def one(p: _Plan) -> None:
            async with sem:
                try:
                    await self.flow(p, stubs[p.index % len(stubs)])
                except HarnessError as exc:
                    self.errors.append(str(exc))
                self.done += 1
                progress(self.done)

        start = time.perf_counter()
        tog = asyncio.create_task(toggler())
        try:
            await asyncio.gather(*(one(p) for p in self.plans))
        finally:
            stop.set()
            await tog
            for c in chans:
                await c.close()
        return time.perf_counter() - start


async def _final_states(addr: str, intents: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import grpc
    from sysdesign.payments.v1 import payments_pb2 as pb
    from sysdesign.payments.v1 import payments_pb2_grpc as pbg

    out: dict[str, Any] = {}
    sem = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pbg.PaymentServiceStub(ch)

        async def one(iid: str, rec: dict[str, Any]) -> None:
            async with sem:
                for _ in range(20):
                    try:
                        out[iid] = (await stub.GetPaymentIntent(pb.GetPaymentIntentRequest(payment_intent_id=iid),
                                                                metadata=_md(rec["token"]), timeout=30)).payment_intent
                        return
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.5)

        await asyncio.gather(*(one(i, r) for i, r in intents.items()))
    return out


async def _work_left(stack: Stack) -> int:
    from servers.payments.tables import PAYMENT_WORK, WORK_BUCKETS

    store = _open_store(stack)
    try:
        n = 0
        for b in range(WORK_BUCKETS):
            n += len((await store.slice(PAYMENT_WORK, {"bucket": b}, limit=100_000)).rows)
        return n
    finally:
        await store.close()


def _drain(stack: Stack, timeout_s: float) -> tuple[float, int]:
    """Waits until the work index is empty (or ``timeout_s``): (seconds waited, intents left)."""
    t = time.perf_counter()
    left = asyncio.run(_work_left(stack))
    while left and time.perf_counter() - t < timeout_s:
        time.sleep(1.0)
        left = asyncio.run(_work_left(stack))
    return time.perf_counter() - t, left


def _audit(addr: str, token: str, dates: list[str]) -> Any:
    import grpc
    from sysdesign.payments.v1 import payments_pb2 as pb
    from sysdesign.payments.v1 import payments_pb2_grpc as pbg

    with grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 256 << 20)]) as ch:
        return pbg.LedgerServiceStub(ch).Audit(pb.AuditRequest(settlement_dates=dates), metadata=_md(token),
                                               timeout=1800)


def _soak(o: PaymentsBenchOptions, r: dict[str, Any], stack: Stack, psp: SimPspProcess,
          customers: list[tuple[int, str]], op_token: str, ui: ProgressUI) -> Scenario:
    from sysdesign.payments.v1 import payments_pb2 as pb

    n, clients = r["intents"], r["clients"]
    sc = Scenario("soak", f"soak: {n:,} intents from {clients:,} clients, every fault switch on")
    day0 = _today()
    psp.faults(**SOAK_FAULTS)
    soak = _Soak(stack.grpc_addr, psp, customers, n, clients, o.seed + 3, secrets.token_hex(4))
    cpu = CpuWindow()
    with ui.phase(f"soak: {n:,} intents under faults"):
        count = ui.count("soak: intents done", n)
        run_s = asyncio.run(soak.run(count, r["timeout_share"]))
    faults_after = psp.request("GET", "/_sim/faults")
    psp.faults(timeout_after_charge=False)
    with ui.phase("soak: the reconciler settles"):
        t = time.perf_counter()
        step = ui.step("soak: work index emptying", r["settle_timeout_s"])
        left = asyncio.run(_work_left(stack))
        while left and time.perf_counter() - t < r["settle_timeout_s"]:
            time.sleep(1.0)
            left = asyncio.run(_work_left(stack))
            step((time.perf_counter() - t) / r["settle_timeout_s"])
        settle_s = time.perf_counter() - t
        finals = asyncio.run(_final_states(stack.grpc_addr, soak.intents))
    window = cpu.close()
    with ui.phase("soak: the audit, with today's settlement report"):
        dates = sorted({day0, _today()})
        t = time.perf_counter()
        audit = _audit(stack.grpc_addr, op_token, dates)
        audit_s = time.perf_counter() - t
    with ui.phase("soak: charges at the processor"):
        charges: Counter[str] = Counter()
        refunds: Counter[str] = Counter()
        for d in dates:
            text = psp.request("GET", f"/v1/reports/settlement?date={d}")
            for row in csv.DictReader(io.StringIO(text)):
                (charges if row["reporting_category"] == "charge" else refunds)[row["merchant_reference"]] += 1
        succeeded = [i for i, v in finals.items() if v.status == pb.PAYMENT_INTENT_STATUS_SUCCEEDED]
        others = [i for i in soak.intents if i not in set(succeeded)]
        wrong_charges = [i for i in succeeded if charges.get(i, 0) != 1] + [i for i in others if charges.get(i, 0)]
        sample = random.Random(o.seed).sample(sorted(soak.intents), min(r["search_sample"], len(soak.intents)))
        searched_bad: list[str] = []
        for iid in sample:
            res = psp.request("GET", "/v1/payment_intents/search?query=" +
                              urllib.parse.quote(f"metadata['ref']:'{iid}'"))
            got = sum(1 for x in res["data"] if int(x.get("amount_received") or 0) > 0)
            want = 1 if iid in set(succeeded) else 0
            if got != want:
                searched_bad.append(f"{iid}: {got} charged intents at the processor, want {want}")
    inconsistent = [k for k, kl in soak.keys.items() if len(set(kl.answers)) > 1]
    gave_up = [k for k, kl in soak.keys.items() if kl.gave_up]
    processing = [i for i, v in finals.items() if v.status == pb.PAYMENT_INTENT_STATUS_PROCESSING]
    missing = [i for i in soak.intents if i not in finals]
    # What each client was last answered is what the intent is now (a refund or a capture it saw is there).
    drift = [i for i, v in finals.items() if v.status != soak.intents[i]["last"]
             or v.amount_received.amount_minor != soak.intents[i]["received"]
             or v.amount_refunded.amount_minor != soak.intents[i]["refunded"]]
    expected = {"auto": pb.PAYMENT_INTENT_STATUS_SUCCEEDED, "manual": pb.PAYMENT_INTENT_STATUS_SUCCEEDED,
                "declined": pb.PAYMENT_INTENT_STATUS_REQUIRES_PAYMENT_METHOD}
    wrong_end = [i for i, v in finals.items() if v.status != expected[soak.intents[i]["flow"]]]
    unsettled = len(set(processing) | set(missing)) + left
    retries = sum(kl.retries for kl in soak.keys.values())
    sc.rows += [
        Row("audit findings", float(len(audit.findings)), target_op="<=", target=0, target_on="value",
            note=f"LedgerService.Audit with settlement dates {', '.join(dates)}"),
        Row("keys answered two ways", float(len(inconsistent)), target_op="<=", target=0, target_on="value"),
        Row("reused keys with other parameters not refused", float(len(soak.reuse_not_refused)),
            target_op="<=", target=0, target_on="value"),
        Row("intents with a charge count other than 1 (succeeded) or 0 (others)",
            float(len(wrong_charges) + len(searched_bad)), target_op="<=", target=0, target_on="value"),
        Row("intents left unsettled", float(unsettled), target_op="<=", target=0, target_on="value"),
        Row("intents not as their client was last told", float(len(drift)), target_op="<=", target=0,
            target_on="value"),
        Row("intents not in their flow's end state", float(len(wrong_end) + len(soak.errors)), target_op="<=",
            target=0, target_on="value", note="succeeded for a good card, requires_payment_method for a decline"),
        Row("calls that got no answer within 120 s", float(len(gave_up)), target_op="<=", target=0,
            target_on="value"),
        Row("intents per second through the faults", round(len(soak.intents) / run_s, 1), "/s"),
        Row("retries (same key, same request)", float(retries)),
        Row("time for the reconciler to settle", round(settle_s, 1), "s"),
    ]
    sc.notes.append(f"{len(soak.intents):,} intents in {run_s:.1f} s: {len(succeeded):,} succeeded, "
                    f"{sum(refunds.values()):,} refunds; answers {dict(soak.codes)}")
    sc.notes.append(f"faults: {json.dumps({k: v for k, v in faults_after.items() if v})}; timeout_after_charge on "
                    f"{r['timeout_share']:.0%} of the time (1 s of every 5 s by default)")
    sc.notes.append(f"keys replayed or reused: {len(soak.keys):,} keys, {soak.reuse_checked:,} reused with other "
                    f"parameters; the processor's settlement report counted, {len(sample):,} intents also looked "
                    f"up with /v1/payment_intents/search; audit took {audit_s:.1f} s over "
                    f"{audit.intents_checked:,} intents and {audit.settlement_rows_checked:,} settlement rows")
    for name, items in (("audit finding", [f"{f.kind} {f.subject}: {f.detail}" for f in audit.findings]),
                        ("inconsistent key", inconsistent), ("reused key", soak.reuse_not_refused),
                        ("wrong charge count", wrong_charges + searched_bad), ("processing", processing),
                        ("drift", drift), ("wrong end state", wrong_end), ("client error", soak.errors)):
        for item in items[:5]:
            sc.notes.append(f"{name}: {item}")
    sc.details = {
        "intents": len(soak.intents), "run_s": round(run_s, 2), "settle_s": round(settle_s, 2),
        "audit_s": round(audit_s, 2), "succeeded": len(succeeded), "refunds": sum(refunds.values()),
        "codes": dict(soak.codes), "retries": retries, "keys": len(soak.keys), "reuse_checked": soak.reuse_checked,
        "audit_findings": [{"kind": f.kind, "subject": f.subject, "detail": f.detail} for f in audit.findings],
        "audit_intents_checked": audit.intents_checked, "settlement_rows_checked": audit.settlement_rows_checked,
        "inconsistent_keys": inconsistent[:100], "reuse_not_refused": soak.reuse_not_refused[:100],
        "wrong_charges": wrong_charges[:100], "searched": len(sample), "searched_bad": searched_bad[:100],
        "processing": processing[:100], "work_left": left, "missing": missing[:100], "drift": drift[:100],
        "wrong_end": wrong_end[:100], "client_errors": soak.errors[:100], "gave_up": gave_up[:100],
        "faults": faults_after, "timeout_share": r["timeout_share"], "cpu": window,
        "flows": dict(Counter(p.flow for p in soak.plans)),
    }
    return sc


# --------------------------------------------------------------------------- run


def run(o: PaymentsBenchOptions, console: Console) -> RunReport:
    r = o.resolved()
    report = RunReport("payments", command_line(), {**r, "quick": o.quick, "scenarios": ",".join(o.scenarios)},
                       machine=machine_info())
    root = Path(tempfile.mkdtemp(prefix="sysdesign-bench-payments-"))
    secret = secrets.token_urlsafe(48).encode()
    stack = Stack(root / "data")
    psp = SimPspProcess(root / "psp", f"{stack.http_base}/webhooks/psp", o.seed)
    cpu = CpuWindow()
    ui = ProgressUI(console, 1 + sum({"confirm": 3, "ledger": 3, "soak": 4}[s] for s in o.scenarios))
    try:
        with ui:
            with ui.phase("sysdesign sim psp and sysdesign up"):
                psp.start()
                stack.extra_env = {
                    "SYSDESIGN_TOKEN_SECRET": secret.decode(), "SYSDESIGN_ACCESS_LOG": "0",
                    "SYSDESIGN_PSP_URL": psp.url, "SYSDESIGN_PSP_SECRET_KEY": PSP_KEY,
                    "SYSDESIGN_PSP_WEBHOOK_SECRET": PSP_WHSEC, "SYSDESIGN_PAYMENTS_OPERATORS": OPERATOR,
                    **o.extra_env}
                stack.start()
            customers = _mint(secret, CUSTOMER_BASE, r["customers"], "bpay")
            op_token = _operator_token(secret)
            for name in o.scenarios:
                try:
                    if name == "confirm":
                        sc = _confirm(o, r, stack, customers, ui)
                    elif name == "ledger":
                        sc = _ledger(o, r, stack, op_token, ui)
                    else:
                        sc = _soak(o, r, stack, psp, customers, op_token, ui)
                except Exception as exc:  # the scenario is reported as not measured; the others still run
                    sc = Scenario(name, name, error=f"{type(exc).__name__}: {exc}")
                report.scenarios.append(sc)
                report.measurements[name] = sc.details
                report.measurements.setdefault("rss_after", {})[name] = stack.rss().to_dict()
    except HarnessError as exc:
        report.error = str(exc)
    finally:
        stack.stop()
        psp.stop()
        report.measurements["cpu"] = cpu.close()
        if o.keep_data:
            console.print(f"data kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report.finished = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    return report


def plot(report: RunReport, path: Path) -> Path | None:
    """Confirm and transfer step searches against their floors; the soak's outcome."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    colors = {"confirm": "tab:blue", "ledger": "tab:green"}
    top = 1.0
    for key in ("confirm", "ledger"):
        m = report.measurements.get(key) or {}
        steps = sorted((m.get("search") or {}).get("steps", []), key=lambda st: st["offered_rps"])
        if not steps:
            continue
        offered = [st["offered_rps"] for st in steps]
        top = max(top, *offered)
        label = "ConfirmPaymentIntent" if key == "confirm" else "CreateTransfer"
        ax1.plot(offered, [st["achieved_rps"] for st in steps], marker="o", color=colors[key], label=label)
        ax1.axhline(m["floor"]["per_s"], color=colors[key], linestyle="--", linewidth=1,
                    label=f"{label} floor (raw writes) {m['floor']['per_s']:,.0f}/s")
        ax2.plot(offered, [st["latency"]["p99_ms"] for st in steps], marker="o", color=colors[key],
                 label=f"{label} p99")
        ax2.plot(offered, [st["latency"]["p50_ms"] for st in steps], marker=".", linestyle=":", color=colors[key],
                 label=f"{label} p50")
    ax1.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1)
    ax1.set(xlabel="offered (/s)", ylabel="achieved (/s)", yscale="log", title="throughput against raw writes")
    ax1.legend(fontsize="small")
    ax2.set(xlabel="offered (/s)", ylabel="ms from the scheduled time", yscale="log", title="latency")
    ax2.legend(fontsize="small")
    soak = report.measurements.get("soak") or {}
    if soak:
        labels = ["audit\nfindings", "keys two\nways", "reuse not\nrefused", "wrong\ncharges", "unsettled"]
        vals = [len(soak["audit_findings"]), len(soak["inconsistent_keys"]), len(soak["reuse_not_refused"]),
                len(soak["wrong_charges"]) + len(soak["searched_bad"]),
                len(soak["processing"]) + len(soak["missing"]) + soak["work_left"]]
        ax3.bar(labels, vals, color=["tab:red" if v else "tab:green" for v in vals])
        for i, v in enumerate(vals):
            ax3.text(i, v, str(v), ha="center", va="bottom")
        ax3.set_ylim(0, max(1, *vals) * 1.15)
        ax3.set(ylabel="count (target 0)", title=f"soak: {soak['intents']:,} intents, {soak['retries']:,} retries, "
                                                 f"{soak['succeeded']:,} succeeded")
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(report: RunReport, out: Path) -> tuple[Path, Path, Path | None]:
    """``payments.json``, ``payments.md`` and ``payments.png`` in ``out`` (the names docs/bench/ keeps)."""
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "payments.json", out / "payments.md"
    jpath.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    md = to_markdown(report)
    png = plot(report, out / "payments.png")
    if png is not None:
        md += "\n![confirm and transfer throughput against raw table writes, latency, the soak's outcome]" \
              "(payments.png)\n"
    mpath.write_text(md)
    return jpath, mpath, png


def main(options: PaymentsBenchOptions | None = None) -> int:
    """Exit code: 0 when it measured (targets met or not), 1 on a harness error, 130 on Ctrl-C."""
    o = options or PaymentsBenchOptions()
    console = Console()
    try:
        report = run(o, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted")
        return 130
    console.print()
    print_report(report, console)
    jpath, mpath, png = write(report, Path(o.out_dir))
    console.print(f"results: {jpath}  {mpath}  {png or '(no plot)'}")
    failed = [s.key for s in report.scenarios if s.error]
    if report.error or failed:
        console.print(f"[bold red]harness error:[/] {report.error or ', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--intents", type=int)
    p.add_argument("--clients", type=int)
    p.add_argument("--out", default="bench-results")
    a = p.parse_args()
    raise SystemExit(main(PaymentsBenchOptions(
        quick=a.quick, scenarios=tuple(x for x in a.scenarios.split(",") if x), intents=a.intents,
        clients=a.clients, out_dir=Path(a.out))))
