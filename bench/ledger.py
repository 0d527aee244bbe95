"""Ledger: payments recorded durably per second, and the crawler process's peak memory after
10,000 vs 100,000 paid pages (each count in a fresh process, through the real middlewares).

Durable payments are ``PaymentBook.reserve`` calls (a signed payment counted against its
budget and written, before its request may leave), measured two ways: one transaction (one
fsync) per call, and the way a crawl makes them, ``CONCURRENT`` coroutines on the asyncio
reactor each awaiting ``LedgerThread.run(book.reserve, ...)``, which commits the calls that
arrive together as one group (one fsync).

    python -m bench.ledger
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal

from bench._common import ROOT, machine, result
from scrapy_x402.ledger import PaymentRecord, open_ledger
from scrapy_x402.payments import Limits, PaymentBook

N = 20_000
CONCURRENT = 32  # requests in flight at CONCURRENT_REQUESTS = 32
LIMITS = Limits(budget=Decimal(10**9), total=None)


def record(i: int) -> PaymentRecord:
    return PaymentRecord(
        id=f"0x{i:064x}",
        run_id="bench",
        scheme="deferred",
        network="eip155:84532",
        asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        payer="0x" + "11" * 20,
        payee="0x" + "22" * 20,
        amount=10_000,
        usd=Decimal("0.01"),
        domain="news.example",
        budget_key="news.example",
        url=f"https://news.example/a/{i}",
        payload={"signature": "0x" + "ab" * 65, "commitment": {"nonce": "0x" + "cd" * 32}},
        valid_until=1_900_000_000,
    )


def one_per_transaction(path: str) -> float:
    """Payments/s with one reserve per transaction, in this thread."""
    ledger = open_ledger(path)
    book = PaymentBook(ledger)
    start = time.perf_counter()
    for i in range(N):
        assert book.reserve(record(i), LIMITS) is None
    elapsed = time.perf_counter() - start
    ledger.close()
    return N / elapsed


def grouped(path: str) -> tuple[float, float]:
    """Payments/s through the ledger's thread with CONCURRENT callers, and the mean number
    of payments per commit."""
    from scrapy.utils.reactor import install_reactor  # noqa: PLC0415

    install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")
    from scrapy.utils.defer import deferred_from_coro  # noqa: PLC0415
    from twisted.internet import reactor  # noqa: PLC0415

    from scrapy_x402._ledger_thread import LedgerThread  # noqa: PLC0415

    ledger = open_ledger(path)
    book = PaymentBook(ledger)
    thread = LedgerThread(ledger)
    groups = 0
    commit = thread._commit  # counted, not changed: one call is one fsync

    def counting(group):  # type: ignore[no-untyped-def]
        nonlocal groups
        groups += 1
        commit(group)

    thread._commit = counting  # type: ignore[method-assign]

    async def caller(first: int) -> None:
        for i in range(first, N, CONCURRENT):
            assert await thread.run(book.reserve, record(i), LIMITS) is None

    timing: dict[str, float] = {}

    async def run() -> None:
        await thread.run(lambda: None)  # the thread is up
        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(CONCURRENT)))
        timing["elapsed"] = time.perf_counter() - start
        await thread.close()

    done = deferred_from_coro(run())
    done.addBoth(lambda outcome: (reactor.stop(), outcome)[1])  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if done.result is not None:
        done.result.raiseException()
    check = open_ledger(path)  # the thread closed its connection
    written = check.query("SELECT COUNT(*) FROM x402_payments")
    check.close()
    assert written == [(N,)], written
    return N / timing["elapsed"], N / groups


def peak_memory(pages: int) -> tuple[float, int]:
    """Run ``pages`` payments through the middleware in a fresh process: (peak RSS MiB, ledger bytes)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench._memory", str(pages)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    print(f"# ledger, {machine()}")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        one = one_per_transaction(os.path.join(tmp, "one.sqlite3"))
        rate, per_commit = grouped(os.path.join(tmp, "grouped.sqlite3"))
    print(f"one reserve per transaction (fsync):           {one:,.0f}/s")
    print(
        f"ledger thread, {CONCURRENT} concurrent callers, group commit: {rate:,.0f}/s "
        f"({per_commit:.1f} payments per fsync)"
    )
    result("ledger_durable_per_s_single", round(one))
    result("ledger_durable_per_s", round(rate))
    small, small_file = peak_memory(10_000)
    large, large_file = peak_memory(100_000)
    print(
        f"peak RSS after  10,000 paid pages: {small:.1f} MiB (ledger file {small_file / 2**20:.1f} MiB)"
    )
    print(
        f"peak RSS after 100,000 paid pages: {large:.1f} MiB (ledger file {large_file / 2**20:.1f} MiB)"
    )
    result("ledger_peak_rss_mib_10k", small)
    result("ledger_peak_rss_mib_100k", large)
    result("ledger_peak_rss_growth", large / small)


if __name__ == "__main__":
    main()
