"""The demo, end to end on local components: `make demo` runs this.

Starts anvil, deploys the test token, funds a fresh crawler wallet, starts the demo news
site, runs `scrapy crawl news` (which pays for articles and settles when it closes), then
prints the spend report, checks every payee's on-chain balance against what the
publisher accepted, and reconciles the settlement transfers as the publisher would: each
commitment it accepted must be marked paid.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from eth_account import Account
from web3 import Web3

from scrapy_x402.devchain import Anvil, TestUSD
from scrapy_x402.paywall import CommitmentBook, reconcile_transaction

HERE = Path(__file__).resolve().parent
DEMO = HERE / ".demo"
WIRE_PRICE = 15_000  # 0.015 tUSD per wire article, paid with `exact`


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def start_site(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, *args], cwd=HERE, env=env, stdout=subprocess.PIPE, text=True
    )
    return process, process.stdout.readline().strip()


def main() -> int:
    shutil.rmtree(DEMO, ignore_errors=True)
    DEMO.mkdir()
    with Anvil() as chain:
        token = TestUSD.deploy(chain, chain.new_account())
        crawler = chain.new_account()
        token.mint(crawler.address, 5_000_000)  # 5 tUSD
        payees = [Account.create().address for _ in range(4)]
        network = f"eip155:{chain.chain_id}"
        banner(f"anvil at {chain.url}; tUSD at {token.address}; crawler wallet {crawler.address}")

        # The wire service sells with `exact`, through the reference x402 SDK and its facilitator.
        facilitator_env = {**os.environ, "FACILITATOR_KEY": chain.new_account().key.hex()}
        wire, wire_url = start_site(
            [
                "exact_site.py",
                "--rpc-url",
                chain.url,
                "--network",
                network,
                "--token",
                token.address,
                "--payee",
                payees[3],
                "--price",
                str(WIRE_PRICE),
            ],
            facilitator_env,
        )
        site, url = start_site(
            [
                "demo_site.py",
                "--network",
                network,
                "--token",
                token.address,
                "--payees",
                ",".join(payees[:3]),
                "--port",
                "0",
                "--book",
                str(DEMO / "publisher-book.jsonl"),
                "--wire",
                wire_url,
            ]
        )
        try:
            banner(
                f"demo news site at {url} (deferred), wire service at {wire_url} (exact); crawling"
            )
            env = {
                **os.environ,
                "X402_PRIVATE_KEY": crawler.key.hex(),
                "DEMO_RPC_URL": chain.url,
                "DEMO_TOKEN": token.address,
                "DEMO_NETWORK": network,
            }
            crawl = subprocess.run(
                [sys.executable, "-m", "scrapy", "crawl", "news", "-a", f"site={url}"],
                cwd=HERE,
                env=env,
                capture_output=True,
                text=True,
            )
            for line in crawl.stderr.splitlines():  # the x402 lines of the crawl's log and stats
                if "[scrapy_x402." in line or line.startswith(" 'x402/"):
                    print(line)
            if crawl.returncode != 0:
                print(crawl.stderr[-3000:])
                return crawl.returncode
            banner("scrapy x402 report")
            subprocess.run(
                [sys.executable, "-m", "scrapy", "x402", "report"], cwd=HERE, env=env, check=True
            )
        finally:
            for process in (site, wire):
                process.terminate()
                process.wait(10)

        banner("on-chain balances against what the publishers accepted")
        owed: dict[str, int] = defaultdict(int)
        for line in (DEMO / "publisher-book.jsonl").read_text().splitlines():
            entry = json.loads(line)
            owed[entry["payee"]] += int(entry["amount"])
        owed[payees[3]] = 4 * WIRE_PRICE  # the wire service's four articles, paid at once
        ok = True
        for payee in payees:
            balance = token.balance_of(payee)
            ok &= balance == owed[payee]
            print(
                f"{payee}  accepted {owed[payee] / 1e6:.6f} tUSD  on-chain {balance / 1e6:.6f} tUSD  "
                f"{'OK' if balance == owed[payee] else 'MISMATCH'}"
            )
        ok &= reconcile_settlements(chain, token, payees[:3])
        items = (DEMO / "articles.jsonl").read_text().splitlines()
        print(
            f"\n{len(items)} articles scraped into {DEMO / 'articles.jsonl'}, each with its payment."
        )
        return 0 if ok else 1


def reconcile_settlements(chain: Anvil, token: TestUSD, payees: list[str]) -> bool:
    """The news site's side of settlement: find the token transfers to its payees on chain,
    reconcile each against its book (the ids the transfer lists), and check that every
    commitment it accepted is now paid."""
    banner("the publisher reconciles the settlement transfers against its book")
    book = CommitmentBook(str(DEMO / "publisher-book.sqlite3"))
    transfer_topic = "0x" + Web3.keccak(text="Transfer(address,address,uint256)").hex()
    tx_hashes: set[str] = set()
    for payee in payees:
        to_payee = "0x" + bytes(12).hex() + payee[2:].lower()
        logs = chain.w3.eth.get_logs(
            {
                "address": Web3.to_checksum_address(token.address),
                "fromBlock": 0,
                "topics": [transfer_topic, None, to_payee],
            }
        )
        tx_hashes |= {log["transactionHash"].to_0x_hex() for log in logs}
    for tx_hash in sorted(tx_hashes):
        result = reconcile_transaction(chain.w3, book, tx_hash)
        print(
            f"{tx_hash}  {result.outcome}: {len(result.paid)} commitments paid"
            + (f", {result.credit} credited ({result.reason})" if result.credit else "")
        )
    accepted = [entry["id"] for entry in book.all()]
    unpaid = [i for i in accepted if book.paid_by(i) is None]
    print(
        f"{len(accepted) - len(unpaid)} of {len(accepted)} accepted commitments marked paid  "
        f"{'OK' if accepted and not unpaid else 'MISMATCH'}"
    )
    return bool(accepted) and not unpaid


if __name__ == "__main__":
    sys.exit(main())
