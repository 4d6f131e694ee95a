"""Currencies the ledger knows (ISO 4217) and their minor-unit exponents.

Amounts are always integers of the currency's minor unit (cents for USD,
yen for JPY, fils for KWD): ``10.50 USD`` is ``1050``.
"""

from __future__ import annotations

# ISO 4217 code -> exponent of its minor unit.
CURRENCIES: dict[str, int] = {
    "USD": 2, "EUR": 2, "GBP": 2, "CHF": 2, "CAD": 2, "AUD": 2, "INR": 2, "BRL": 2,
    "JPY": 0, "KRW": 0, "CLP": 0, "ISK": 0,
    "KWD": 3, "BHD": 3, "JOD": 3, "OMR": 3, "TND": 3,
}

# The largest amount (and running balance) a bigint column holds.
MAX_AMOUNT = 2**63 - 1


def exponent(currency: str) -> int:
    """The minor-unit exponent of a known currency; KeyError otherwise."""
    return CURRENCIES[currency]


def is_known(currency: str) -> bool:
    return currency in CURRENCIES


def format_minor(amount: int, currency: str) -> str:
    """``1050, "USD"`` -> ``"10.50 USD"`` (for messages and reports)."""
    exp = CURRENCIES[currency]
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**exp)
    return f"{sign}{whole}.{frac:0{exp}d} {currency}" if exp else f"{sign}{whole} {currency}"
