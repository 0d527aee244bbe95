"""Settlement: 10,000 accepted commitments across 100 payees, settled on anvil. The figure is
the number of transactions (one per payee) and the wall time.

    python -m bench.settlement
"""

from __future__ import annotations

import os
import tempfile
import time
from decimal import Decimal

from eth_account import Account

from bench._common import ROOT, machine, result
from scrapy_x402._assets import AssetTable
from scrapy_x402._settlement import Settler
from scrapy_x402.devchain import Anvil, TestUSD
from scrapy_x402.ledger import PaymentRecord, Status, open_ledger
from scrapy_x402.payments import Limits, PaymentBook

COMMITMENTS = 10_000
PAYEES = 100
PRICE = 1_000  # 0.001 tUSD


def main() -> None:
    print(f"# settlement of {COMMITMENTS} commitments to {PAYEES} payees, {machine()}")
    with Anvil() as chain, tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        token = TestUSD.deploy(chain, chain.new_account())
        payer = chain.new_account()
        token.mint(payer.address, COMMITMENTS * PRICE)
        payees = [Account.create().address for _ in range(PAYEES)]
        ledger = open_ledger(os.path.join(tmp, "ledger.sqlite3"))
        book = PaymentBook(ledger)
        limits = Limits(budget=Decimal(COMMITMENTS), total=None)
        with ledger.transaction():  # written at once: the setup, not the figure
            for i in range(COMMITMENTS):
                pid = "0x" + os.urandom(32).hex()
                record = PaymentRecord(
                    pid,
                    "bench",
                    "deferred",
                    f"eip155:{chain.chain_id}",
                    token.address,
                    payer.address,
                    payees[i % PAYEES],
                    PRICE,
                    Decimal("0.001"),
                    "news.example",
                    "news.example",
                    f"https://news.example/{i}",
                    {},
                    0,
                )
                assert book.reserve(record, limits) is None
                assert book.confirm(pid, Status.ACCEPTED, receipt={})
        nonce_before = chain.w3.eth.get_transaction_count(payer.address)
        settler = Settler(
            book,
            payer,
            {f"eip155:{chain.chain_id}": chain.url},
            AssetTable(token.asset_setting()),
        )
        start = time.perf_counter()
        outcomes = settler.settle()
        elapsed = time.perf_counter() - start
        transactions = chain.w3.eth.get_transaction_count(payer.address) - nonce_before
        confirmed = sum(o.payment_count for o in outcomes if o.status == "confirmed")
        paid = sum(token.balance_of(p) for p in payees)
        assert confirmed == COMMITMENTS and paid == COMMITMENTS * PRICE, (confirmed, paid)
        assert settler.settle() == []  # nothing left to pay
        ledger.close()
    print(
        f"{transactions} transactions for {PAYEES} payees in {elapsed:.2f} s; "
        f"every payee received exactly what it was owed"
    )
    result("settlement_transactions", transactions)
    result("settlement_payees", PAYEES)
    result("settlement_seconds", elapsed)


if __name__ == "__main__":
    main()
