"""Cloudflare pay-per-crawl, header form, against a local edge that verifies Web Bot Auth
signatures with its own verifier."""

from __future__ import annotations

import json
from typing import Any

import pytest
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_x402._webbotauth import BotIdentity
from scrapy_x402.ledger import Status, open_ledger
from tests.mockserver import MockServer
from tests.test_crawl import crawl


class Edge(MockServer):
    module = "tests.edgeserver.site"


@pytest.fixture
def identity() -> BotIdentity:
    return BotIdentity.generate()


@pytest.fixture
def cloudflare_settings(tmp_path, identity, monkeypatch) -> dict[str, Any]:
    # No wallet: Cloudflare bills the operator, identified by its Web Bot Auth key.
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("X402_BOT_AUTH_KEY", identity.private_jwk()["d"])
    return {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_SCHEMES": ["pay-per-crawl"],
        "X402_SIGNATURE_AGENT": "https://crawler.example",
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        "ROBOTSTXT_OBEY": False,
    }


def edge(tmp_path, identity, **config: Any) -> Edge:
    return Edge({"keys": [identity.public_jwk()], "price_cents": 1, **config}, tmp_path)


def rows(settings: dict[str, Any]) -> list[tuple[Any, ...]]:
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    try:
        return list(
            ledger.query("SELECT scheme, network, status, amount, usd, reason FROM x402_payments")
        )
    finally:
        ledger.close()


@pytest.mark.parametrize("header", ["crawler-max-price", "crawler-exact-price"])
@deferred_f_from_coro_f
async def test_pays_crawler_price_within_budget(tmp_path, identity, cloudflare_settings, header):
    settings = {
        **cloudflare_settings,
        "X402_BUDGETS": {"127.0.0.1": "0.03"},
        "X402_CRAWLER_PRICE_HEADER": header,
        "CONCURRENT_REQUESTS": 1,
    }
    with edge(tmp_path, identity) as server:
        crawler, items = await crawl(settings, [f"{server.url}/ppc/{n}" for n in range(5)])
        charged = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == 3 == len(charged)  # 0.03 at 0.01 a page
    assert {c["header"] for c in charged} == {header}
    assert stats["x402/budget_exceeded/127.0.0.1"] == 2
    assert stats["x402/spent_usd/127.0.0.1"] == 0.03
    assert (
        rows(settings)
        == [("pay-per-crawl", "cloudflare:402", Status.ACCEPTED, "1", "0.01", None)] * 3
    )
    # The edge verified every paid request's signature, price header covered (or it answers 401).
    assert "x402/crawler_error/InvalidSignature" not in stats
    assert "x402/settlement/confirmed" not in stats  # Cloudflare invoices: nothing on-chain


@deferred_f_from_coro_f
async def test_every_request_to_chosen_domains_is_signed(tmp_path, identity, cloudflare_settings):
    settings = {**cloudflare_settings, "X402_BOT_AUTH_DOMAINS": ["127.0.0.1"]}
    with edge(tmp_path, identity, price_free_paths=False) as server:
        crawler, items = await crawl(settings, [f"{server.url}/robots.txt", f"{server.url}/ppc/1"])
    stats = crawler.stats.get_stats()
    assert len(items) == 2
    assert stats["x402/bot_auth/signed"] == 3  # robots.txt, the 402'd request, its paid retry


@deferred_f_from_coro_f
async def test_crawler_error_codes(tmp_path, identity, cloudflare_settings, caplog):
    settings = {
        **cloudflare_settings,
        "CONCURRENT_REQUESTS": 1,
        "X402_CRAWLER_RETRY_BACKOFF": 0.01,
        "X402_BUDGETS": {"127.0.0.1": "1", "localhost": "1"},
    }
    with edge(tmp_path, identity) as server:
        other_host = server.url.replace("127.0.0.1", "localhost")
        urls = [
            f"{other_host}/forbidden/1",
            f"{other_host}/forbidden/2",
            f"{server.url}/flaky/1",
            f"{server.url}/payment-failed/1",
        ]
        crawler, items = await crawl(settings, urls)
        charged = server.accepted()
    stats = crawler.stats.get_stats()
    # CrawlerForbidden on a paid request stops paying that domain, and only that one.
    assert stats["x402/crawler_error/CrawlerForbidden"] == 1
    assert caplog.text.count("localhost forbids this crawler") == 1
    assert stats["x402/offer_refused/crawler_forbidden"] == 1
    # InternalError is retried, after a backoff, with the same price: charged once.
    assert stats["x402/crawler_error/InternalError"] == 1
    assert stats["x402/crawler_retry"] == 1
    assert [c["url"].rsplit("/", 2)[-2] for c in charged] == ["flaky"]
    assert [i["url"].rsplit("/", 2)[-2] for i in items] == ["flaky"]
    # Other codes are counted and not retried after a payment.
    assert stats["x402/crawler_error/PaymentFailed"] == 1
    assert "retry/count" not in stats
    statuses = {r[2] for r in rows(settings)}
    assert statuses == {
        Status.ACCEPTED,
        Status.FAILED,
    }  # flaky accepted; forbidden, payment-failed not


@deferred_f_from_coro_f
async def test_free_paths_are_never_paid(tmp_path, identity, cloudflare_settings):
    with edge(tmp_path, identity, price_free_paths=True) as server:
        crawler, items = await crawl(
            cloudflare_settings,
            [
                f"{server.url}/robots.txt",
                f"{server.url}/sitemap.xml",
                f"{server.url}/.well-known/security.txt",
            ],
        )
    stats = crawler.stats.get_stats()
    assert items == [] and "x402/payment_signed" not in stats
    assert stats["x402/offer_refused/free_path"] == 3


@deferred_f_from_coro_f
async def test_no_identity_no_payment(tmp_path, identity, cloudflare_settings, monkeypatch):
    from eth_account import Account

    monkeypatch.delenv("X402_BOT_AUTH_KEY")
    monkeypatch.setenv("X402_PRIVATE_KEY", Account.create().key.hex())  # a wallet, but no identity
    with edge(tmp_path, identity) as server:
        crawler, items = await crawl(cloudflare_settings, [f"{server.url}/ppc/1"])
    assert items == []
    assert crawler.stats.get_value("x402/offer_refused/no_bot_identity") == 1


@deferred_f_from_coro_f
async def test_batch_settlement_on_cloudflare_402(tmp_path, identity, cloudflare_settings):
    settings = {
        **cloudflare_settings,
        "X402_SCHEMES": ["batch-settlement"],
        "CONCURRENT_REQUESTS": 1,
    }
    with edge(tmp_path, identity, price_cents=2) as server:
        crawler, items = await crawl(settings, [f"{server.url}/x402/{n}" for n in range(3)])
        charged = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == 3 == len(charged)
    # No price until the crawler is recognised: each page is asked again, signed, then paid.
    assert stats["x402/signed_retry"] == 3
    assert stats["x402/payment_count"] == 3
    assert (
        rows(settings)
        == [("batch-settlement", "cloudflare:402", Status.ACCEPTED, "2", "0.02", None)] * 3
    )
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    receipts = [json.loads(r) for (r,) in ledger.query("SELECT receipt FROM x402_payments")]
    ledger.close()
    assert all(set(r) == {"amount", "asset", "network", "timestamp"} for r in receipts)


def test_edge_accepts_a_pre_authorised_request(tmp_path, identity):
    """Both forms may be paid on the first request (the crawler's pre-authorised flow)."""
    import urllib.request

    with edge(tmp_path, identity) as server:
        url = f"{server.url}/ppc/9"
        headers = {"crawler-max-price": "USD 0.05"}
        headers.update(identity.sign_request("GET", url, headers))
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
            assert response.headers["crawler-charged"] == "USD 0.01"


@deferred_f_from_coro_f
async def test_statement_and_invoice_settlement(tmp_path, identity, cloudflare_settings):
    import datetime
    import os
    import subprocess
    import sys

    settings = {
        **cloudflare_settings,
        "X402_SCHEMES": ["pay-per-crawl", "batch-settlement"],
        "CONCURRENT_REQUESTS": 1,
    }
    with edge(tmp_path, identity) as server:
        await crawl(
            settings, [f"{server.url}/ppc/1", f"{server.url}/ppc/2", f"{server.url}/x402/3"]
        )
    month = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m")

    def x402(*args: str, **env: str) -> str:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "scrapy",
                "x402",
                *args,
                "--ledger",
                settings["X402_LEDGER_URI"],
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=tmp_path,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    csv_lines = x402("report", "--statement", month).splitlines()
    assert csv_lines[0] == "date,domain,url,amount_usd,receipt_timestamp,status,invoice,payment_id"
    assert len(csv_lines) == 4
    assert all(
        ",127.0.0.1," in line and ",0.01,20" in line and ",owed,," in line for line in csv_lines[1:]
    )
    statement = json.loads(x402("report", "--statement", month, "--json"))
    assert statement["total_usd"] == "0.03" and len(statement["lines"]) == 3
    assert all(line["receipt_timestamp"] for line in statement["lines"])
    # Settlement does not pay Cloudflare on-chain; the invoice settles the month.
    from eth_account import Account

    wallet = Account.create().key.hex()  # on-chain settlement needs one; it pays nothing here
    assert "Nothing is owed on-chain." in x402("settle", X402_PRIVATE_KEY=wallet)
    assert "Marked 3 Cloudflare charges" in x402("settle", "--invoice", "INV-77", "--period", month)
    settled = json.loads(x402("report", "--statement", month, "--json"))
    assert {(line["status"], line["invoice"]) for line in settled["lines"]} == {
        ("settled", "INV-77")
    }
    assert "Marked 0 Cloudflare charges" in x402("settle", "--invoice", "INV-78", "--period", month)


@deferred_f_from_coro_f
async def test_without_a_wallet_only_cloudflare_is_paid(tmp_path, identity, cloudflare_settings):
    from tests.test_middleware import PAYING, offer, response402

    settings = {**cloudflare_settings, "X402_SCHEMES": ["deferred", "pay-per-crawl"]}
    with edge(tmp_path, identity) as server:
        _, items = await crawl(settings, [f"{server.url}/ppc/1"])
    assert len(items) == 1
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    [(payer,)] = list(ledger.query("SELECT payer FROM x402_payments"))
    ledger.close()
    assert payer == f"web-bot-auth:{identity.keyid}"
    # An EVM offer is refused for want of a wallet.
    from scrapy.utils.misc import build_from_crawler
    from scrapy.utils.test import get_crawler

    from scrapy_x402 import X402DownloaderMiddleware

    probe = get_crawler(settings_dict={**settings, "ADDONS": {}, **PAYING})
    mw = build_from_crawler(X402DownloaderMiddleware, probe)
    evm = response402(offer())
    assert await mw.process_response(evm.request, evm) is evm
    assert probe.stats.get_value("x402/offer_refused/no_wallet") == 1
