"""Signing: payments signed per second against raw secp256k1 signing of a 32-byte hash with
the same library (coincurve), same process, same machine.

    python bench/signing.py
"""

from __future__ import annotations

import os
import time

import coincurve
from eth_account import Account

from bench._common import machine, result
from scrapy_x402._protocol import Offer
from scrapy_x402.schemes import DeferredScheme, ExactScheme

N = 20_000
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"


def rate(fn) -> float:
    fn()  # warm caches
    start = time.perf_counter()
    for _ in range(N):
        fn()
    return N / (time.perf_counter() - start)


def main() -> None:
    print(f"# signing, {N} each, {machine()}")
    account = Account.create()
    key = coincurve.PrivateKey(account.key)
    digest = os.urandom(32)
    now = int(time.time())
    offer = Offer(
        "deferred",
        "eip155:84532",
        10_000,
        TOKEN,
        Account.create().address,
        60,
        "https://news.example/a/1",
        {"name": "USD Coin", "version": "2"},
        {},
    )
    deferred, exact = DeferredScheme(), ExactScheme()
    raw = rate(lambda: key.sign_recoverable(digest, hasher=None))
    commitments = rate(lambda: deferred.sign(account, offer, offer.resource or "", now, 300))
    authorizations = rate(lambda: exact.sign(account, offer, "", now, 300))
    print(f"raw secp256k1 (coincurve): {raw:,.0f}/s")
    print(f"deferred commitments:      {commitments:,.0f}/s")
    print(f"exact authorizations:      {authorizations:,.0f}/s")
    result("signing_raw_per_s", round(raw))
    result("signing_deferred_per_s", round(commitments))
    result("signing_exact_per_s", round(authorizations))
    result("signing_ratio_deferred", commitments / raw)
    result("signing_ratio_exact", authorizations / raw)


if __name__ == "__main__":
    main()
