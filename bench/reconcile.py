"""Reconciliation: the time a publisher takes to tell which commitments settlement transfers pay,
for a payer owing it 20, 1,000 and 10,000 commitments (docs/deferred-scheme.md section 9).

Per count, a fresh CommitmentBook holds the commitments; on anvil, the payer sends a
version-1 transfer whose reference matches nothing (before, a search over every subset of
the unpaid commitments; now one hash) and then the honest settlement, one transfer per 500
ids. The figures are the wall time of ``reconcile`` over those transactions, read from the
node beforehand (the book's work, not the node's).

    python -m bench.reconcile
"""

from __future__ import annotations

import os
import tempfile
import time

from eth_abi import encode as abi_encode
from eth_account import Account

from bench._common import ROOT, machine, result
from scrapy_x402.devchain import Anvil, TestUSD
from scrapy_x402.paywall import (
    MAX_SETTLEMENT_IDS,
    Commitment,
    CommitmentBook,
    reconcile,
    settlement_ids,
)

COUNTS = (20, 1_000, 10_000)
PRICE = 1_000  # 0.001 tUSD


def transfer(chain: Anvil, payer, token: TestUSD, payee: str, value: int, trailer: bytes):
    """A mined transfer(payee, value) ‖ trailer: its transaction and receipt."""
    data = bytes.fromhex("a9059cbb") + abi_encode(["address", "uint256"], [payee, value])
    receipt = chain.transact(payer, {"to": token.address, "data": data + trailer})
    tx_hash = receipt["transactionHash"]
    return chain.w3.eth.get_transaction(tx_hash), chain.w3.eth.get_transaction_receipt(tx_hash)


def served(book: CommitmentBook, payer: str, payee: str, token: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        commitment = Commitment(
            31337, payer, payee, token, PRICE, "0x" + os.urandom(32).hex(), f"0x{i:064x}", 2**40
        )
        book.record(commitment, f"https://news.example/{i}")
        ids.append(commitment.id)
    return sorted(ids)


def main() -> None:
    print(f"# reconciliation of {', '.join(map(str, COUNTS))} commitments, {machine()}")
    with Anvil() as chain, tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        token = TestUSD.deploy(chain, chain.new_account())
        payer = chain.new_account()
        token.mint(payer.address, 2 * sum(COUNTS) * PRICE)
        for count in COUNTS:
            payee = Account.create().address
            book = CommitmentBook(os.path.join(tmp, f"book-{count}.sqlite3"))
            ids = served(book, payer.address, payee, token.address, count)
            bogus = transfer(chain, payer, token, payee, PRICE, os.urandom(32))
            honest = [
                transfer(chain, payer, token, payee, len(part) * PRICE, settlement_ids(part))
                for part in (
                    ids[k : k + MAX_SETTLEMENT_IDS] for k in range(0, count, MAX_SETTLEMENT_IDS)
                )
            ]
            start = time.perf_counter()
            refused = reconcile(book, bogus[0], bogus[1], chain.chain_id)
            bogus_seconds = time.perf_counter() - start
            start = time.perf_counter()
            outcomes = [reconcile(book, tx, receipt, chain.chain_id) for tx, receipt in honest]
            seconds = time.perf_counter() - start
            assert refused.outcome == "credited", refused
            assert [o.outcome for o in outcomes] == ["paid"] * len(honest), outcomes
            assert all(book.paid_by(i) for i in ids)
            print(
                f"{count} commitments: {len(honest)} transfers reconciled in {seconds:.3f} s "
                f"({seconds / count * 1e6:.0f} µs per commitment); a version-1 reference "
                f"matching nothing refused in {bogus_seconds:.3f} s"
            )
            result(f"reconcile_seconds_{count}", seconds)
            result(f"reconcile_us_per_commitment_{count}", seconds / count * 1e6)
            result(f"reconcile_bogus_reference_seconds_{count}", bogus_seconds)


if __name__ == "__main__":
    main()
