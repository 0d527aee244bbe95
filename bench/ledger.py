"""Ledger: payments recorded durably per second, and the crawler process's peak memory after
10,000 vs 100,000 paid pages (each count in a fresh process, through the real middleware).

    python bench/ledger.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from decimal import Decimal

from bench._common import ROOT, machine, result
from scrapy_x402.ledger import PaymentRecord, open_ledger

N = 20_000
BATCH = 32  # payments signed in one reactor turn at CONCURRENT_REQUESTS = 32


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


def durable_rate(path: str, batch: int) -> float:
    ledger = open_ledger(path)
    start = time.perf_counter()
    for i in range(N):
        ledger.add(record(i), commit=batch == 1)
        if batch > 1 and (i + 1) % batch == 0:
            ledger.commit()  # what the middleware does once per reactor turn
    ledger.commit()
    elapsed = time.perf_counter() - start
    ledger.close()
    return N / elapsed


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
        one = durable_rate(os.path.join(tmp, "one.sqlite3"), 1)
        grouped = durable_rate(os.path.join(tmp, "grouped.sqlite3"), BATCH)
    print(f"one commit (fsync) per payment:   {one:,.0f}/s")
    print(f"group commit of {BATCH} per fsync:     {grouped:,.0f}/s")
    result("ledger_durable_per_s_single", round(one))
    result("ledger_durable_per_s", round(grouped))
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
