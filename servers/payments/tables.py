"""Ledger tables (the table port: Cassandra's model, SQLite by default).

Every row that decides something is claimed ``IF NOT EXISTS`` (a lightweight
transaction) and never written again; the index rows (accounts by currency,
transfers in flight) are plain writes and deletes, never mixed with LWTs on
one row. See servers/payments/ledger.py for how they fit together.
"""

from servers.storage.table import Table

ACCOUNTS = Table(
    name="ledger_accounts",
    partition_key=("account_id",),
    columns={
        "account_id": "bigint", "code": "text", "currency": "text", "flags": "int", "created_ms": "bigint",
    },
    comment="ledger accounts: kind, currency and flags (immutable)",
)

# The index partitions are per book (one ledger; "main" unless told): the audit
# and recover() walk one book. Account and transfer ids are global.

# Buckets of the accounts-by-currency index: enough that no partition grows
# without bound for a large book, few enough for the audit to walk.
ACCOUNT_BUCKETS = 16

ACCOUNTS_BY_CURRENCY = Table(
    name="ledger_accounts_by_currency",
    partition_key=("book", "currency", "bucket"),
    clustering=("account_id",),
    columns={"book": "text", "currency": "text", "bucket": "int", "account_id": "bigint"},
    comment="index of ledger accounts per currency (bucketed), for the audit",
)

ACCOUNT_LOG = Table(
    name="ledger_account_log",
    partition_key=("account_id",),
    clustering=("seq",),
    columns={
        "account_id": "bigint", "seq": "bigint",
        # The transfer this row applies (0 for the opening row), its side
        # ("d" debit, "c" credit) and what it did: open, single, pending, post,
        # void, undo:single, undo:pending or refused.
        "transfer_id": "bigint", "side": "text", "op": "text",
        "amount": "bigint", "pending_amount": "bigint",
        # The account's balances after this row.
        "debits_posted": "bigint", "credits_posted": "bigint",
        "debits_pending": "bigint", "credits_pending": "bigint",
        "at_ms": "bigint",
    },
    comment="each ledger account's entries, claimed IF NOT EXISTS by seq; each carries the balances after it",
)

TRANSFERS = Table(
    name="ledger_transfers",
    partition_key=("transfer_id",),
    clustering=("step",),
    columns={
        "transfer_id": "bigint", "step": "text",
        # step "intent": what the caller asked for.
        "kind": "text", "debit_account_id": "bigint", "credit_account_id": "bigint", "amount": "bigint",
        "currency": "text", "code": "text", "reference": "text", "pending_id": "bigint",
        "timeout_at_ms": "bigint", "fingerprint": "text",
        # The tail seq of each account's log when the intent was written: an
        # application of this transfer can only come after it.
        "debit_from_seq": "bigint", "credit_from_seq": "bigint",
        # step "outcome": posted, pending, voided or refused (with the reason).
        "status": "text", "reason": "text", "debit_seq": "bigint", "credit_seq": "bigint",
        # step "resolution" of a pending transfer: the post or void that resolved it.
        "resolver_id": "bigint",
        "at_ms": "bigint",
    },
    comment="ledger transfers: the intent, its outcome, and for a pending one its single resolution",
)

INFLIGHT_BUCKETS = 16

TRANSFERS_IN_FLIGHT = Table(
    name="ledger_transfers_in_flight",
    partition_key=("book", "bucket"),
    clustering=("transfer_id",),
    columns={"book": "text", "bucket": "int", "transfer_id": "bigint", "at_ms": "bigint"},
    comment="transfers begun and not yet decided: what recover() completes",
)

LEDGER_TABLES = [ACCOUNTS, ACCOUNTS_BY_CURRENCY, ACCOUNT_LOG, TRANSFERS, TRANSFERS_IN_FLIGHT]

# -- payment intents (servers/payments/intents.py) -------------------------------------
#
# An intent is an immutable header (who, how much, how it is captured) and a
# log of its transitions, each the next row claimed IF NOT EXISTS on its seq,
# carrying the intent's whole mutable state and named by its operation
# ("begin:3", "done:3"), as rides do. A row that starts a processor call
# carries the request and its key (``pending``); a row that ends one carries
# the ledger transfers it books (``book``): the outbox the reconciler completes.

PAYMENT_INTENTS = Table(
    name="payment_intents",
    partition_key=("intent_id",),
    columns={
        "intent_id": "bigint", "customer_id": "bigint", "currency": "text", "amount": "bigint",
        "capture_method": "int", "description": "text", "metadata": "text", "create_ms": "bigint",
    },
    comment="payment intents: customer, amount and capture method (immutable)",
)

PAYMENT_INTENT_LOG = Table(
    name="payment_intent_log",
    partition_key=("intent_id",),
    clustering=("seq",),
    columns={
        "intent_id": "bigint", "seq": "int", "op": "text", "status": "int", "at_ms": "bigint",
        # How many processor operations were begun (each names its key by this number).
        "n": "int",
        "payment_method": "text", "psp_id": "text",
        "capturable": "bigint", "received": "bigint", "refunded": "bigint",
        # JSON: [{"id", "amount", "reason", "at_ms"}, ...]
        "refunds": "text",
        # The last processor refusal: its type (card_error: a decline), code and message.
        "error_type": "text", "error_code": "text", "decline_code": "text", "error_message": "text",
        "cancellation_reason": "text",
        # JSON: the processor request in flight (servers/payments/processor.py Request), or "".
        "pending": "text",
        # JSON: the ledger transfers this row books, in order, or "".
        "book": "text",
        # A row that changes the status carries its PaymentIntentEvent (servers/platform/events.py).
        "event": "text",
    },
    comment="each payment intent's transitions; the last row is the intent now",
)

PAYMENT_INTENTS_BY_CUSTOMER = Table(
    name="payment_intents_by_customer",
    partition_key=("customer_id",),
    clustering=("intent_id",),
    descending=True,
    columns={"customer_id": "bigint", "intent_id": "bigint"},
    comment="a customer's payment intents, newest first",
)

WORK_BUCKETS = 16

PAYMENT_WORK = Table(
    name="payment_work",
    partition_key=("bucket",),
    clustering=("intent_id",),
    columns={"bucket": "int", "intent_id": "bigint", "at_ms": "bigint"},
    comment="intents with a processor call or a ledger booking not finished: what the reconciler walks",
)

INTENT_DAY_BUCKETS = 8

PAYMENT_INTENTS_BY_DAY = Table(
    name="payment_intents_by_day",
    partition_key=("day", "bucket"),
    clustering=("intent_id",),
    columns={"day": "text", "bucket": "int", "intent_id": "bigint"},
    comment="payment intents by the UTC day they were created: what the audit walks",
)

PAYMENT_WEBHOOK_EVENTS = Table(
    name="payment_webhook_events",
    partition_key=("event_id",),
    columns={"event_id": "text", "type": "text", "intent_id": "bigint", "received_ms": "bigint"},
    comment="processor webhook events already received (claimed IF NOT EXISTS: each is applied once)",
)

INTENT_TABLES = [PAYMENT_INTENTS, PAYMENT_INTENT_LOG, PAYMENT_INTENTS_BY_CUSTOMER, PAYMENT_WORK,
                 PAYMENT_INTENTS_BY_DAY, PAYMENT_WEBHOOK_EVENTS]

TABLES = LEDGER_TABLES + INTENT_TABLES
