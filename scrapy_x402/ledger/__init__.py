"""The payment ledger: every payment from reservation to settlement.

``Ledger`` holds all the SQL (portable: no vendor types, amounts as decimal strings since
uint256 does not fit in 64-bit integers). Back-ends only provide a connection.
"""

from __future__ import annotations

from scrapy_x402.ledger._base import (
    HeldPayment,
    IllegalTransition,
    InDoubt,
    Ledger,
    OwedTotal,
    PaymentRecord,
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
    "HeldPayment",
    "IllegalTransition",
    "InDoubt",
    "Ledger",
    "OwedTotal",
    "PaymentRecord",
    "SQLiteLedger",
    "Settlement",
    "SettlementStatus",
    "StatementLine",
    "Status",
    "SummaryRow",
    "open_ledger",
]
