"""The middleware on hand-made 402 responses: what it pays, refuses, logs and counts."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from typing import Any

import pytest
from eth_account import Account
from scrapy import Request
from scrapy.exceptions import NotConfigured
from scrapy.http import Response
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.misc import build_from_crawler
from scrapy.utils.test import get_crawler

from scrapy_x402 import X402DownloaderMiddleware
from scrapy_x402._protocol import b64json_decode, b64json_encode
from scrapy_x402.ledger import Status, open_ledger

USDC_SEPOLIA = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYEE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
URL = "https://news.example/a/1"


@pytest.fixture
def settings(tmp_path, monkeypatch) -> dict[str, Any]:
    monkeypatch.setenv("X402_PRIVATE_KEY", Account.create().key.hex())
    return {"X402_LEDGER_URI": str(tmp_path / "l.sqlite3"), "X402_BUDGETS": {"news.example": "1"}}


def middleware(settings: dict[str, Any]) -> tuple[X402DownloaderMiddleware, Any]:
    crawler = get_crawler(settings_dict={**PAYING, **settings})
    return build_from_crawler(X402DownloaderMiddleware, crawler), crawler


# Both halves of the paying middleware, as the add-on enables them.
PAYING = {
    "DOWNLOADER_MIDDLEWARES": {
        "scrapy_x402.X402DownloaderMiddleware": 545,
        "scrapy_x402.X402SigningMiddleware": 950,
    }
}


def spent(mw: X402DownloaderMiddleware, key: str) -> Decimal:
    """What the store counts against a budget of the middleware's crawl."""
    return mw.session.store.spent_by_budget(mw.session.run_id).get(key, Decimal(0))


def offer(amount="10000", network="eip155:84532", asset=USDC_SEPOLIA, **kw):
    return {
        "scheme": "deferred",
        "network": network,
        "amount": amount,
        "asset": asset,
        "payTo": PAYEE,
        "maxTimeoutSeconds": 60,
        **kw,
    }


def response402(*offers, url=URL, **headers) -> Response:
    terms = {"x402Version": 2, "resource": {"url": url}, "accepts": list(offers)}
    return Response(
        url,
        status=402,
        request=Request(url),
        headers={"PAYMENT-REQUIRED": b64json_encode(terms), **headers},
    )


def test_not_configured_without_a_key_or_when_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    with pytest.raises(NotConfigured, match="X402_PRIVATE_KEY"):
        middleware({"X402_LEDGER_URI": str(tmp_path / "l.sqlite3")})
    with pytest.raises(NotConfigured, match="X402_ENABLED"):
        middleware({"X402_ENABLED": False})


@deferred_f_from_coro_f
async def test_pays_the_cheapest_acceptable_offer_and_records_it_first(settings):
    mw, crawler = middleware(settings)
    candidates = [
        offer("30000"),
        offer("100", network="eip155:8453", asset=USDC_BASE),  # mainnet: refused
        offer("50", asset="0x" + "12" * 20),  # no peg: refused
        offer("20000"),
        offer("10", scheme="barter"),  # not a scheme we know
    ]
    response = response402(*candidates)
    paid = await mw.process_response(response.request, response)
    assert isinstance(paid, Request) and paid.dont_filter
    assert paid.meta["dont_redirect"]  # the payment never follows a redirect elsewhere
    sent = b64json_decode(paid.headers["PAYMENT-SIGNATURE"])
    assert sent["x402Version"] == 2
    assert sent["accepted"] == candidates[3]  # echoed verbatim
    assert sent["resource"] == {"url": URL}
    assert sent["payload"]["commitment"]["amount"] == "20000"
    # The ledger holds it, reserved and committed, before the request can leave.
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    assert ledger.get_status(paid.meta["_x402_payment"]) == Status.RESERVED
    assert ledger.spent_by_budget(mw.session.run_id) == {"news.example": Decimal("0.02")}
    stats = crawler.stats.get_stats()
    assert stats["x402/offer_refused/mainnet"] == 1
    assert stats["x402/offer_refused/asset"] == 1
    assert stats["x402/offer_refused/scheme"] == 1


@deferred_f_from_coro_f
async def test_mainnet_is_paid_only_when_allowed(settings, caplog):
    mw, _ = middleware({**settings, "X402_ALLOW_MAINNET": True})
    response = response402(offer(network="eip155:8453", asset=USDC_BASE))
    assert isinstance(await mw.process_response(response.request, response), Request)
    assert "X402_ALLOW_MAINNET is set" in caplog.text


@deferred_f_from_coro_f
async def test_v1_terms_are_paid_with_x_payment(settings):
    mw, _ = middleware(settings)
    body = json.dumps(
        {
            "x402Version": 1,
            "accepts": [
                {**offer(), "network": "base-sepolia", "maxAmountRequired": "5000", "resource": URL}
            ],
        }
    )
    response = Response(URL, status=402, body=body.encode(), request=Request(URL))
    paid = await mw.process_response(response.request, response)
    sent = b64json_decode(paid.headers["X-PAYMENT"])
    assert (sent["x402Version"], sent["network"], sent["scheme"]) == (1, "base-sepolia", "deferred")
    assert b"PAYMENT-SIGNATURE" not in paid.headers


@deferred_f_from_coro_f
async def test_malformed_terms_are_logged_once_per_domain_and_cost_nothing(settings, caplog):
    mw, crawler = middleware(settings)
    for _ in range(3):
        bad = response402(offer(amount="0.50"))
        assert await mw.process_response(bad.request, bad) is bad
    warnings = [r for r in caplog.records if "unreadable payment terms" in r.getMessage()]
    assert len(warnings) == 1 and "news.example" in warnings[0].getMessage()
    assert crawler.stats.get_value("x402/invalid_challenge") == 3
    assert crawler.stats.get_value("x402/payment_signed") is None


@deferred_f_from_coro_f
async def test_opt_out_price_caps_and_unlisted_domains(settings):
    mw, crawler = middleware(settings)
    response = response402(offer())
    response.request.meta["x402_dont_pay"] = True
    assert await mw.process_response(response.request, response) is response
    expensive = response402(offer("200000"))  # 0.20 > default X402_MAX_PRICE 0.10
    assert await mw.process_response(expensive.request, expensive) is expensive
    expensive.request.meta["x402_max_price"] = "0.25"
    assert isinstance(await mw.process_response(expensive.request, expensive), Request)
    elsewhere = response402(offer(), url="https://other.example/x")  # default budget 0
    assert await mw.process_response(elsewhere.request, elsewhere) is elsewhere
    stats = crawler.stats.get_stats()
    assert stats["x402/offer_refused/max_price"] == 1
    assert stats["x402/budget_exceeded/other.example"] == 1


@deferred_f_from_coro_f
async def test_budget_exhaustion_warns_once(settings, caplog):
    mw, crawler = middleware({**settings, "X402_BUDGETS": {"news.example": "0.02"}})
    results = []
    for n in range(5):
        r = response402(offer(), url=f"{URL}{n}")
        results.append(await mw.process_response(r.request, r))
    assert [isinstance(r, Request) for r in results] == [True, True, False, False, False]
    assert crawler.stats.get_value("x402/budget_exceeded/news.example") == 3
    assert caplog.text.count("the budget for news.example (0.02 USD) is spent") == 1
    assert [r.levelno for r in caplog.records if "is spent" in r.getMessage()] == [logging.WARNING]


@deferred_f_from_coro_f
async def test_paid_responses_settle_the_reservation(settings):
    mw, crawler = middleware({**settings, "X402_BUDGETS": {"news.example": "0.02"}})
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    first = response402(offer())
    paid = await mw.process_response(first.request, first)
    refusal = b64json_encode({"success": False, "errorReason": "expired"})
    refused = Response(URL, status=402, request=paid, headers={"PAYMENT-RESPONSE": refusal})
    assert await mw.process_response(paid, refused) is refused  # passed on, not paid again
    assert ledger.get_status(paid.meta["x402_payment"]["id"]) == Status.REJECTED
    assert crawler.stats.get_value("x402/payment_rejected/expired") == 1
    # The refused reservation was released: two more pages fit in 0.02.
    again = [
        await mw.process_response(r.request, r)
        for r in (response402(offer()), response402(offer()))
    ]
    receipt = {"success": True, "extra": {"commitmentId": again[0].meta["_x402_payment"]}}
    served = Response(
        URL, status=200, request=again[0], headers={"PAYMENT-RESPONSE": b64json_encode(receipt)}
    )
    await mw.process_response(again[0], served)
    assert ledger.get_status(again[0].meta["x402_payment"]["id"]) == Status.ACCEPTED
    failed = Response(URL, status=500, request=again[1])
    await mw.process_response(again[1], failed)
    assert ledger.get_status(again[1].meta["x402_payment"]["id"]) == Status.FAILED
    assert spent(mw, "news.example") == mw.session.budgets.limit("news.example") / 2


@deferred_f_from_coro_f
async def test_a_page_served_without_a_receipt_for_the_payment_is_not_owed(settings, caplog):
    mw, crawler = middleware(settings)
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    for receipt in (None, {"success": True, "extra": {"commitmentId": "0x" + "00" * 32}}):
        first = response402(offer())
        paid = await mw.process_response(first.request, first)
        headers = {"PAYMENT-RESPONSE": b64json_encode(receipt)} if receipt else {}
        served = Response(URL, status=200, request=paid, headers=headers)
        assert await mw.process_response(paid, served) is served
        assert ledger.get_status(paid.meta["x402_payment"]["id"]) == Status.FAILED
    assert crawler.stats.get_value("x402/payment_failed/no_receipt") == 2
    assert spent(mw, "news.example") == 0
    assert caplog.text.count("without a receipt confirming the payment") == 1


@deferred_f_from_coro_f
async def test_insufficient_funds_stops_paying_on_that_network(settings, caplog):
    mw, crawler = middleware(settings)
    refusal = b64json_encode({"success": False, "errorReason": "insufficient_funds"})
    first = response402(offer(), url=f"{URL}1")
    paid = await mw.process_response(first.request, first)
    refused = Response(paid.url, status=402, request=paid, headers={"PAYMENT-RESPONSE": refusal})
    assert await mw.process_response(paid, refused) is refused
    # The refusal stops the network: the next page is not even signed.
    second = response402(offer(), url=f"{URL}2")
    assert await mw.process_response(second.request, second) is second
    assert crawler.stats.get_value("x402/payment_signed") == 1
    assert crawler.stats.get_value("x402/offer_refused/insufficient_funds") == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "insufficient funds on eip155:84532" in errors[0].getMessage()
    assert "(news.example said so: insufficient_funds)" in errors[0].getMessage()


@pytest.mark.parametrize(
    ("policy", "chosen"), [("cheapest", "exact"), ("scheme_order", "deferred")]
)
@deferred_f_from_coro_f
async def test_offer_policy_across_schemes(settings, policy, chosen):
    mw, _ = middleware({**settings, "X402_OFFER_POLICY": policy})
    exact = offer("5000", scheme="exact", extra={"name": "USDC", "version": "2"})
    response = response402(offer("10000"), exact)
    paid = await mw.process_response(response.request, response)
    assert b64json_decode(paid.headers["PAYMENT-SIGNATURE"])["accepted"]["scheme"] == chosen


@deferred_f_from_coro_f
async def test_payment_identifier_is_echoed_with_the_payment_id(settings):
    mw, _ = middleware(settings)
    declared = {"info": {"required": False}, "schema": {"type": "object"}}
    terms = {
        "x402Version": 2,
        "resource": {"url": URL},
        "accepts": [offer()],
        "extensions": {"payment-identifier": declared},
    }
    response = Response(
        URL, status=402, request=Request(URL), headers={"PAYMENT-REQUIRED": b64json_encode(terms)}
    )
    paid = await mw.process_response(response.request, response)
    sent = b64json_decode(paid.headers["PAYMENT-SIGNATURE"])["extensions"]["payment-identifier"]
    assert sent["info"] == {"required": False, "id": paid.meta["_x402_payment"][2:]}
    assert sent["schema"] == declared["schema"]


class CountingRPC:
    """An RPC endpoint that is down: every call answers 502, and is counted."""

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self
        self.calls = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.calls += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(502)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v2/KEY"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@deferred_f_from_coro_f
async def test_a_dead_rpc_refuses_permit2_offers_once_and_never_raises(settings, caplog):
    rpc = CountingRPC()
    try:
        mw, crawler = middleware({**settings, "X402_RPC_URLS": {"eip155:84532": rpc.url}})
        permit2 = offer(
            scheme="exact", extra={"name": "USDC", "version": "2", "assetTransferMethod": "permit2"}
        )
        for _ in range(3):
            response = response402(permit2)
            assert await mw.process_response(response.request, response) is response  # unpaid
            if _ == 0:
                calls = rpc.calls
        assert calls >= 1 and rpc.calls == calls  # read once, the failure remembered
    finally:
        rpc.close()
    assert crawler.stats.get_value("x402/offer_refused/permit2_allowance_unknown") == 3
    assert caplog.text.count("cannot read the wallet's Permit2 allowance") == 1
    assert "KEY" not in caplog.text  # the RPC URL's secret path is never shown


@deferred_f_from_coro_f
async def test_server_text_never_grows_logs_or_stats_without_bound(settings, caplog):
    from scrapy_x402._payer import MAX_STAT_PARTS, MAX_TERMS

    mw, crawler = middleware({**settings, "X402_BUDGETS": {"news.example": "100"}})
    for n in range(MAX_STAT_PARTS + 50):
        response = response402(offer())
        paid = await mw.process_response(response.request, response)
        refused = response402(
            offer(),
            **{
                "PAYMENT-RESPONSE": b64json_encode({"success": False, "errorReason": f"no way {n}"})
            },
        )
        await mw.process_response(paid, refused)
    stats = crawler.stats.get_stats()
    family = [k for k in stats if k.startswith("x402/payment_rejected/")]
    assert len(family) <= MAX_STAT_PARTS + 1  # ...then "other"
    assert sum(stats[k] for k in family) == MAX_STAT_PARTS + 50
    assert caplog.text.count("refused a payment") <= MAX_STAT_PARTS + 1
    for n in range(MAX_TERMS + 10):
        response = response402(offer(), url=f"https://news.example/s{n}/1")
        await mw.process_response(response.request, response)
    assert len(mw.payer.terms) == MAX_TERMS
