"""Interoperability with the reference implementation: the crawler pays `exact` (EIP-3009)
to a server made of the x402 SDK alone, whose own facilitator settles on anvil."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_x402.devchain import Anvil, TestUSD
from scrapy_x402.ledger import Status, open_ledger
from tests.mockserver import ROOT
from tests.test_crawl import crawl

NETWORK = "eip155:84532"  # a chain id the SDK knows by its v1 name too (base-sepolia)
PRICE = 10_000  # 0.01 tUSD


@pytest.fixture(scope="module")
def sdk_chain() -> Iterator[Anvil]:
    with Anvil(chain_id=84532) as anvil:
        yield anvil


@pytest.fixture
def sdk_server(sdk_chain) -> Iterator[dict[str, Any]]:
    token = TestUSD.deploy(sdk_chain, sdk_chain.new_account())
    payee = Account.create().address
    args = [
        "--rpc-url",
        sdk_chain.url,
        "--network",
        NETWORK,
        "--token",
        token.address,
        "--payee",
        payee,
        "--price",
        str(PRICE),
    ]
    env = {**os.environ, "FACILITATOR_KEY": sdk_chain.new_account().key.hex()}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "example_project" / "exact_site.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    try:
        yield {"url": url, "token": token, "payee": payee}
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


@deferred_f_from_coro_f
async def test_pays_the_reference_server_with_exact(tmp_path, sdk_chain, sdk_server, monkeypatch):
    token, payee = sdk_server["token"], sdk_server["payee"]
    payer = sdk_chain.new_account()
    token.mint(payer.address, 1_000_000)
    monkeypatch.setenv("X402_PRIVATE_KEY", payer.key.hex())
    settings = {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_ASSETS": token.asset_setting(),
        "X402_RPC_URLS": {NETWORK: sdk_chain.url},
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        "ROBOTSTXT_OBEY": False,
    }
    pages = 5
    crawler, items = await crawl(
        settings, [f"{sdk_server['url']}/articles/{n}" for n in range(pages)]
    )

    stats = crawler.stats.get_stats()
    assert len(items) == pages
    assert stats["x402/payment_count"] == pages
    assert token.balance_of(payee) == pages * PRICE  # exactly N x price, on-chain
    assert token.balance_of(payer.address) == 1_000_000 - pages * PRICE
    assert "x402/settlement/confirmed" not in stats  # already settled by the server
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    rows = list(ledger._execute("SELECT scheme, status, settlement_id FROM x402_payments"))
    ledger.close()
    assert len(rows) == pages
    assert {(scheme, status) for scheme, status, _ in rows} == {("exact", Status.SETTLED)}
    for *_, tx_hash in rows:  # each recorded transaction is real and paid the payee
        receipt = sdk_chain.w3.eth.get_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        assert receipt["logs"][-1]["address"] == token.address
