"""The payment ledger (the store): every payment from reservation to settlement.

``Ledger`` holds the schema and every read (portable SQL: no vendor types, amounts as decimal
strings since uint256 does not fit in 64-bit integers); back-ends provide a connection. What
changes a payment's status or a budget is ``scrapy_x402.payments.PaymentBook``.
"""

from __future__ import annotations

from scrapy_x402.ledger._base import (
    TOTAL_KEY,
    HeldPayment,
    IllegalTransition,
    InDoubt,
    Ledger,
    OwedTotal,
    PaymentRecord,
    SchemaTooNew,
    Settlement,
    SettlementStatus,
    StatementLine,
    Status,
    SummaryRow,
)
from scrapy_x402.ledger._sqlite import SQLiteLedger


def open_ledger(uri: str) -> Ledger:
    """Open the ledger at ``uri``: ``sqlite:///abs/path``, ``sqlite:rel/path`` or a file path."""
    if uri.startswith("sqlite:"):
        return SQLiteLedger(uri.removeprefix("sqlite:").removeprefix("//"))
    if "://" in uri:
        raise ValueError(
            f"X402_LEDGER_URI {uri.split('://', maxsplit=1)[0]}:// is not supported; use a SQLite file path"
        )
    return SQLiteLedger(uri)


__all__ = [
    "TOTAL_KEY",
    "HeldPayment",
    "IllegalTransition",
    "InDoubt",
    "Ledger",
    "OwedTotal",
    "PaymentRecord",
    "SQLiteLedger",
    "SchemaTooNew",
    "Settlement",
    "SettlementStatus",
    "StatementLine",
    "Status",
    "SummaryRow",
    "open_ledger",
]
