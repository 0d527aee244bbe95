"""Interoperability with the reference implementation: the crawler pays `exact` (EIP-3009)
to a server made of the x402 SDK alone, whose own facilitator settles on anvil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


@deferred_f_from_coro_f
async def test_a_refusal_holds_the_authorization_and_insufficient_funds_stops_the_network(
    tmp_path, sdk_chain, sdk_server, monkeypatch, caplog
):
    broke = sdk_chain.new_account()  # gas, but no tokens: the SDK's facilitator refuses
    monkeypatch.setenv("X402_PRIVATE_KEY", broke.key.hex())
    settings = {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_ASSETS": sdk_server["token"].asset_setting(),
        "X402_RPC_URLS": {NETWORK: sdk_chain.url},
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        "CONCURRENT_REQUESTS": 1,  # so the refusal comes before the next page's 402
    }
    crawler, items = await crawl(settings, [f"{sdk_server['url']}/articles/{n}" for n in range(3)])
    stats = crawler.stats.get_stats()
    assert items == []
    assert stats["x402/payment_signed"] == 1
    assert stats["x402/payment_rejected/invalid_exact_evm_insufficient_balance"] == 1
    assert stats["x402/offer_refused/insufficient_funds"] == 2
    assert stats["x402/payment_held"] == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"x402: the wallet has insufficient funds on {NETWORK} (127.0.0.1 said so: "
        "invalid_exact_evm_insufficient_balance); "
        "no more payments on that network in this crawl"
    ]
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    [(status, reason)] = list(ledger._execute("SELECT status, reason FROM x402_payments"))
    ledger.close()
    # Signed and refused, but collectable until it expires: it still counts.
    assert (status, reason) == (Status.HELD, "invalid_exact_evm_insufficient_balance")


def test_v1_exact_payment_verifies_with_the_reference_facilitator(sdk_chain, payer_on_sdk_chain):
    """Our X-PAYMENT for a v1 `base-sepolia` offer, checked by the SDK's own v1 facilitator
    (the SDK's HTTP server speaks only v2, so v1 is checked at the facilitator)."""
    from x402 import x402FacilitatorSync
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator
    from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

    from scrapy_x402._protocol import b64json_decode, parse_challenge, payment_header
    from scrapy_x402.schemes import ExactScheme

    token, payer = payer_on_sdk_chain
    offer = {
        "scheme": "exact",
        "network": "base-sepolia",
        "maxAmountRequired": "2500",
        "resource": "http://pub.example/a",
        "description": "",
        "mimeType": "text/html",
        "payTo": Account.create().address,
        "maxTimeoutSeconds": 60,
        "asset": token.address,
        "extra": {"name": "Test USD", "version": "2"},
    }
    challenge = parse_challenge(None, json.dumps({"x402Version": 1, "accepts": [offer]}).encode())
    signed = ExactScheme().sign(
        payer, challenge.offers[0], offer["resource"], int(time.time()), 300
    )
    name, value = payment_header(challenge, challenge.offers[0], signed.payload)
    assert name == "X-PAYMENT"

    facilitator = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(
        private_key=sdk_chain.new_account().key.hex(), rpc_url=sdk_chain.url
    )
    register_exact_evm_facilitator(facilitator, signer, networks=NETWORK)
    result = facilitator.verify(
        PaymentPayloadV1.model_validate(b64json_decode(value)),
        PaymentRequirementsV1.model_validate(offer),
    )
    assert result.is_valid, result
    assert result.payer.lower() == payer.address.lower()


@pytest.fixture
def payer_on_sdk_chain(sdk_chain):
    token = TestUSD.deploy(sdk_chain, sdk_chain.new_account())
    payer = sdk_chain.new_account()
    token.mint(payer.address, 1_000_000)
    return token, payer
