"""Interoperability with the reference implementation: the crawler pays `exact` (EIP-3009)
to a server made of the x402 SDK alone, whose own facilitator settles on anvil."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_x402.devchain import PERMIT2, Anvil, TestUSD
from scrapy_x402.ledger import Status, open_ledger
from scrapy_x402.schemes import ExactScheme
from tests.mockserver import ROOT
from tests.test_crawl import crawl

NETWORK = "eip155:84532"  # a chain id the SDK knows by its v1 name too (base-sepolia)
PRICE = 10_000  # 0.01 tUSD


@pytest.fixture(scope="module")
def sdk_chain() -> Iterator[Anvil]:
    with Anvil(chain_id=84532) as anvil:
        yield anvil


@pytest.fixture
def sdk_site(sdk_chain) -> Iterator[Callable[..., dict[str, Any]]]:
    """Starts publishers built from the SDK alone (example_project/exact_site.py)."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        *options: str, price: int = PRICE, script: Path = ROOT / "example_project" / "exact_site.py"
    ) -> dict[str, Any]:
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
            str(price),
            *options,
        ]
        env = {**os.environ, "FACILITATOR_KEY": sdk_chain.new_account().key.hex()}
        process = subprocess.Popen(
            [sys.executable, str(script), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        processes.append(process)
        assert process.stdout is not None
        return {"url": process.stdout.readline().strip(), "token": token, "payee": payee}

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture
def sdk_server(sdk_site) -> dict[str, Any]:
    return sdk_site()


def crawl_settings(tmp_path, chain, token, **settings: Any) -> dict[str, Any]:
    return {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_ASSETS": token.asset_setting(),
        "X402_RPC_URLS": {NETWORK: chain.url},
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        **settings,
    }


def ledger_rows(settings: dict[str, Any]) -> list[tuple[Any, ...]]:
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    try:
        return list(
            ledger.query("SELECT scheme, status, settlement_id, amount, usd FROM x402_payments")
        )
    finally:
        ledger.close()


def funded_payer(chain, token, monkeypatch, amount=1_000_000):
    payer = chain.new_account()
    token.mint(payer.address, amount)
    monkeypatch.setenv("X402_PRIVATE_KEY", payer.key.hex())
    return payer


@deferred_f_from_coro_f
async def test_pays_the_reference_server_with_exact(tmp_path, sdk_chain, sdk_server, monkeypatch):
    token, payee = sdk_server["token"], sdk_server["payee"]
    payer = funded_payer(sdk_chain, token, monkeypatch)
    settings = crawl_settings(tmp_path, sdk_chain, token, X402_ITEM_RECEIPT_FIELD="x402")
    pages = 5
    crawler, items = await crawl(
        settings, [f"{sdk_server['url']}/articles/{n}" for n in range(pages)]
    )

    stats = crawler.stats.get_stats()
    assert len(items) == pages
    # Each item carries the payment that bought its page: paid at once, with its transaction.
    assert {(i["x402"]["status"], i["x402"]["scheme"]) for i in items} == {("settled", "exact")}
    assert all(i["x402"]["transaction"].startswith("0x") for i in items)
    assert stats["x402/payment_count"] == pages
    assert token.balance_of(payee) == pages * PRICE  # exactly N x price, on-chain
    assert token.balance_of(payer.address) == 1_000_000 - pages * PRICE
    assert "x402/settlement/confirmed" not in stats  # already settled by the server
    rows = ledger_rows(settings)
    assert len(rows) == pages
    assert {r[:2] for r in rows} == {("exact", Status.SETTLED)}
    for _, _, tx_hash, *_ in rows:  # each recorded transaction is real and paid the payee
        receipt = sdk_chain.w3.eth.get_transaction_receipt(tx_hash)
        assert receipt["status"] == 1
        assert receipt["logs"][-1]["address"] == token.address


@deferred_f_from_coro_f
async def test_a_refusal_holds_the_authorization_and_insufficient_funds_stops_the_network(
    tmp_path, sdk_chain, sdk_server, monkeypatch, caplog
):
    broke = sdk_chain.new_account()  # gas, but no tokens: the SDK's facilitator refuses
    monkeypatch.setenv("X402_PRIVATE_KEY", broke.key.hex())
    # One page at a time, so the refusal comes before the next page's 402.
    settings = crawl_settings(tmp_path, sdk_chain, sdk_server["token"], CONCURRENT_REQUESTS=1)
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
    [(status, reason)] = list(ledger.query("SELECT status, reason FROM x402_payments"))
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


@deferred_f_from_coro_f
async def test_pays_exact_with_permit2(tmp_path, sdk_chain, sdk_site, monkeypatch):
    sdk_chain.install_permit2()
    site = sdk_site("--transfer-method", "permit2")
    token, payee = site["token"], site["payee"]
    payer = funded_payer(sdk_chain, token, monkeypatch)
    token.approve(payer, PERMIT2)
    settings = crawl_settings(tmp_path, sdk_chain, token)
    _, items = await crawl(settings, [f"{site['url']}/articles/{n}" for n in range(3)])
    assert len(items) == 3
    assert token.balance_of(payee) == 3 * PRICE
    assert {r[:2] for r in ledger_rows(settings)} == {("exact", Status.SETTLED)}
    # The chain shows each signed Permit2 nonce used: what releases or keeps a held payment.
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    payloads = [json.loads(p) for (p,) in ledger.query("SELECT payload FROM x402_payments")]
    ledger.close()
    scheme = ExactScheme()
    assert all(scheme.collected(sdk_chain.w3, token.address, p) for p in payloads)
    unused = {
        **payloads[0],
        "permit2Authorization": {**payloads[0]["permit2Authorization"], "nonce": "7"},
    }
    assert not scheme.collected(sdk_chain.w3, token.address, unused)


@deferred_f_from_coro_f
async def test_permit2_offers_are_skipped_without_allowance(
    tmp_path, sdk_chain, sdk_site, monkeypatch, caplog
):
    sdk_chain.install_permit2()
    site = sdk_site("--transfer-method", "permit2")
    funded_payer(sdk_chain, site["token"], monkeypatch)  # no approve(Permit2)
    settings = crawl_settings(tmp_path, sdk_chain, site["token"])
    crawler, items = await crawl(settings, [f"{site['url']}/articles/{n}" for n in range(3)])
    stats = crawler.stats.get_stats()
    assert items == [] and "x402/payment_signed" not in stats
    assert stats["x402/offer_refused/permit2_allowance"] == 3
    warnings = [r.getMessage() for r in caplog.records if "Permit2 offers for" in r.getMessage()]
    assert len(warnings) == 1 and "approve Permit2" in warnings[0]


async def upto_crawl(tmp_path, sdk_chain, sdk_site, monkeypatch, charge: int, **site: Any):
    """Six pages that may cost up to 0.01 each, one at a time, from a budget of 0.02."""
    sdk_chain.install_permit2()
    started = sdk_site("--scheme", "upto", "--charge", str(charge), price=10_000, **site)
    payer = funded_payer(sdk_chain, started["token"], monkeypatch)
    started["token"].approve(payer, PERMIT2)
    settings = crawl_settings(
        tmp_path,
        sdk_chain,
        started["token"],
        X402_SCHEMES=["upto"],
        CONCURRENT_REQUESTS=1,
        X402_BUDGETS={"127.0.0.1": "0.02"},
    )
    crawler, items = await crawl(settings, [f"{started['url']}/articles/{n}" for n in range(6)])
    return crawler, items, started, ledger_rows(settings)


@deferred_f_from_coro_f
async def test_upto_reserves_the_maximum_and_trues_up_to_the_receipt(
    tmp_path, sdk_chain, sdk_site, monkeypatch
):
    # Each page costs 0.004: reserved 0.01, trued up to 0.004, ... the fourth reservation
    # (0.012 + 0.01) does not fit.
    crawler, items, site, rows = await upto_crawl(
        tmp_path, sdk_chain, sdk_site, monkeypatch, charge=4000
    )
    stats = crawler.stats.get_stats()
    assert len(items) == 3
    assert stats["x402/budget_exceeded/127.0.0.1"] == 3
    assert stats["x402/spent_usd/127.0.0.1"] == 0.012000
    assert site["token"].balance_of(site["payee"]) == 3 * 4000
    assert {(r[0], r[1], r[3], r[4]) for r in rows} == {
        ("upto", Status.SETTLED, "4000", "0.004000")
    }
    assert all(items[i]["title"] for i in range(3))


@deferred_f_from_coro_f
async def test_an_upto_receipt_claiming_less_than_the_chain_moved_is_not_believed(
    tmp_path, sdk_chain, sdk_site, monkeypatch
):
    """The facilitator settles the whole maximum (0.01) but the receipt says 1 unit: what is
    counted is what the transaction spending our signature moved, so the budget holds."""
    crawler, items, site, rows = await upto_crawl(
        tmp_path,
        sdk_chain,
        sdk_site,
        monkeypatch,
        charge=10_000,
        script=ROOT / "tests" / "lying_sdk_site.py",
    )
    assert len(items) == 2
    assert site["token"].balance_of(site["payee"]) == 20_000  # the budget, not a unit more
    assert crawler.stats.get_value("x402/receipt_mismatch/amount") == 2
    assert {(r[1], r[3]) for r in rows} == {(Status.SETTLED, "10000")}
