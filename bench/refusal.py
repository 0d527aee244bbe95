"""Budget refusals on a big ledger: what a refused reservation and the expired-holds check
(made when a budget refuses) cost with 1,000 and with 200,000 payments in the ledger.

Both read only indexed rows (the budget's row; held payments by run, status and expiry), so
neither grows with the ledger.

    python -m bench.refusal
"""

from __future__ import annotations

import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench._common import machine, result
from scrapy_x402.ledger import PaymentRecord, Status, open_ledger
from scrapy_x402.payments import Limits, PaymentBook

TRIES = 2_000
STATUSES = (Status.ACCEPTED, Status.SETTLED, Status.FAILED, Status.HELD, Status.REJECTED)


def record(i: int, run: str, key: str = "news.example") -> PaymentRecord:
    return PaymentRecord(
        id=f"0x{i:064x}",
        run_id=run,
        scheme="exact" if i % 5 == 3 else "deferred",
        network="eip155:84532",
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        payer="0x" + "11" * 20,
        payee="0x" + f"{i % 100:040x}",
        amount=10_000,
        usd=Decimal("0.01"),
        domain=key,
        budget_key=key,
        url=f"https://news.example/a/{i}",
        payload={"signature": "0x" + "ab" * 65},
        valid_until=2_000_000_000,
    )


def fill(book: PaymentBook, rows: int) -> None:
    """``rows`` payments of the crawl's own run, on another budget, in every status (held
    ones not expired yet), a transaction per 5,000."""
    plenty = Limits(Decimal(10**9), None)
    for start in range(0, rows, 5_000):
        with book.store.transaction():
            for i in range(start, min(start + 5_000, rows)):
                payment = record(i, "now", "archive.example")
                book.reserve(payment, plenty)
                status = STATUSES[i % len(STATUSES)]
                if status in (Status.ACCEPTED, Status.SETTLED):
                    book.confirm(payment.id, status)
                else:
                    book.not_served(payment.id, "bench", refused=status == Status.REJECTED)


def measure(rows: int) -> tuple[float, float]:
    """Median µs of a refused reservation, and of the expired-holds query, at ``rows``."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = open_ledger(str(Path(tmp) / "ledger.sqlite3"))
        book = PaymentBook(ledger)
        fill(book, rows)
        full = Limits(Decimal("0.01"), None)
        assert book.reserve(record(10**9, "now"), full) is None  # the budget is now spent
        refusals, sweeps = [], []
        for i in range(TRIES):
            started = time.perf_counter()
            assert book.reserve(record(10**9 + 1 + i, "now"), full) == "news.example"
            refusals.append(time.perf_counter() - started)
            started = time.perf_counter()
            ledger.expired_holds("now", int(time.time()))
            sweeps.append(time.perf_counter() - started)
        ledger.close()
    return statistics.median(refusals) * 1e6, statistics.median(sweeps) * 1e6


def main() -> None:
    print(f"# budget refusals on a big ledger ({machine()})")
    small, small_sweep = measure(1_000)
    big, big_sweep = measure(200_000)
    print(f"refused reservation: {small:.0f} µs with 1,000 payments, {big:.0f} µs with 200,000")
    print(f"expired-holds query: {small_sweep:.0f} µs with 1,000, {big_sweep:.0f} µs with 200,000")
    result("refusal_us_200k", big)
    result("refusal_growth_200k_vs_1k", big / small)
    result("expired_holds_query_us_200k", big_sweep)


if __name__ == "__main__":
    main()
