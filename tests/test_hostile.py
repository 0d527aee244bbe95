"""Hostile publishers (tests/mockserver/hostile.py): whatever they do, nothing is paid beyond the
budget and the offer first accepted, each case has its own stat, and the crawl goes on."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import pytest
from eth_account import Account
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_x402._protocol import b64json_decode
from scrapy_x402._webbotauth import BotIdentity
from scrapy_x402.ledger import Status, open_ledger
from scrapy_x402.schemes import DeferredScheme
from tests.mockserver import MockServer
from tests.test_crawl import crawl, ledger_rows, sections


class Hostile(MockServer):
    module = "tests.mockserver.hostile"


ASSET = "0x" + "11" * 20  # the deferred side of the server is not used by Cloudflare's cases


CASES = {
    # case: (stat that names what happened, what the ledger may hold for the page)
    "payee-change": ("x402/payment_rejected/wrong_payee", {Status.REJECTED}),
    "price-raise": ("x402/payment_rejected/underpaid", {Status.REJECTED}),
    "forever": ("x402/payment_rejected/payment_required", {Status.REJECTED}),
    "receipt-lies": ("x402/receipt_mismatch/amount", {Status.SETTLED}),
    "mainnet": ("x402/offer_refused/mainnet", set()),
    "many-offers": ("x402/invalid_challenge", set()),
    "binary": ("x402/invalid_challenge", set()),
    "huge-header": ("downloader/exception_count", set()),
    # A 200 status line, then the body dripped past the timeout: maybe owed, so in doubt.
    "drip": ("x402/payment_in_doubt/DownloadTimeoutError", {Status.RESERVED}),
    # Malformed input after a payment: the outcome is recorded (never left reserved), one
    # line and a stat say why, and process_response never raises.
    "receipt-nested": ("x402/payment_failed/invalid_receipt", {Status.FAILED}),
    "receipt-amount": ("x402/receipt_mismatch/amount", {Status.SETTLED}),
    "refusal-nested": ("x402/payment_rejected/refused", {Status.REJECTED}),
    "refusal-amount": ("x402/payment_rejected/refused", {Status.REJECTED}),
    "refusal-version": ("x402/payment_rejected/refused", {Status.REJECTED}),
}


@pytest.mark.parametrize("case", list(CASES))
@deferred_f_from_coro_f
async def test_hostile_publisher(case, tmp_path, x402_settings, token, payees, caplog):
    stat, statuses = CASES[case]
    config = {
        "network": "eip155:31337",
        "asset": token.address,
        "payee": payees[0],
        "other_payee": Account.create().address,
    }
    settings = {
        **x402_settings,
        "X402_BUDGETS": {"127.0.0.1": "0.01"},
        "DOWNLOAD_TIMEOUT": 2,
        "RETRY_TIMES": 0,
        "X402_PREAUTHORIZE": False,
    }
    with Hostile(config, tmp_path) as server:
        urls = [
            f"{server.url}/hostile/{case}/1",
            f"{server.url}/hostile/{case}/2",
            f"{server.url}/hostile/fair/1",
        ]
        crawler, items = await crawl(settings, urls)
    stats = crawler.stats.get_stats()
    assert stats.get(stat, 0) >= 1, sorted(
        k for k in stats if k.startswith(("x402", "downloader/exc"))
    )
    rows = ledger_rows(settings)
    # Never more than one payment per page, never for more than the offer first accepted,
    # never beyond the budget (0.01 at 0.001 a page).
    assert len({r[4] for r in rows}) == len(rows)
    assert all(int(r[3]) == 1_000 for r in rows)
    counted = [r for r in rows if r[1] in (Status.ACCEPTED, Status.SETTLED, Status.RESERVED)]
    assert sum(int(r[3]) for r in counted) <= 10_000
    assert {r[1] for r in rows if "/fair/" not in r[4]} <= statuses
    # The crawl went on: the fair page was paid and served.
    assert any(i["url"].endswith("/hostile/fair/1") for i in items)
    assert token.balance_of(payees[0]) == 1_000 * len([r for r in rows if r[1] == Status.SETTLED])
    assert not stats.get("x402/internal_error")
    if case.startswith(("receipt-", "refusal-")):
        assert "Traceback" not in caplog.text  # whatever was sent, nothing raised
    if case == "receipt-nested":
        assert stats["x402/invalid_receipt"] == 2
        assert caplog.text.count("unreadable receipt from 127.0.0.1") == 1


@deferred_f_from_coro_f
async def test_a_charge_dated_past_year_9999_is_recorded(tmp_path, monkeypatch, caplog):
    """Cloudflare's header form: ``crawler-charged`` with a Date no datetime holds is still a
    charge (owed), without a timestamp; one line and a stat say so."""
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("X402_BOT_AUTH_KEY", BotIdentity.generate().private_jwk()["d"])
    settings = {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_SCHEMES": ["pay-per-crawl"],
        "X402_SIGNATURE_AGENT": "https://crawler.example",
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        "X402_PREAUTHORIZE": False,
        "ROBOTSTXT_OBEY": False,
    }
    config = {"network": "eip155:31337", "asset": ASSET, "payee": ASSET, "other_payee": ASSET}
    with Hostile(config, tmp_path) as server:
        urls = [f"{server.url}/hostile/cf-date/{n}" for n in range(2)]
        crawler, items = await crawl(settings, urls)
        charged = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == len(charged) == 2
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    try:
        rows = list(ledger.query("SELECT status, amount, receipt FROM x402_payments"))
    finally:
        ledger.close()
    assert [(status, amount) for status, amount, _ in rows] == [(Status.ACCEPTED, "1")] * 2
    assert all(json.loads(receipt) == {"crawler-charged": "USD 0.01"} for *_, receipt in rows)
    assert stats["x402/invalid_receipt"] == 2
    assert caplog.text.count("unreadable receipt from 127.0.0.1 (Date") == 1
    assert "Traceback" not in caplog.text


@deferred_f_from_coro_f
async def test_a_bug_while_reading_a_paid_response_still_records_its_outcome(
    tmp_path, x402_settings, token, payees, monkeypatch, caplog
):
    """The last-resort guard: an exception nobody foresaw while reading a paid response
    (here, injected into the scheme's receipt check) records the payment as not confirmed,
    like a page without a receipt, instead of leaving it reserved; the page reaches the
    spider and the traceback is logged, once per response."""

    def broken(self, receipt, payment_id, signed_amount):
        raise RuntimeError("a bug in reading receipts")

    monkeypatch.setattr(DeferredScheme, "confirmation", broken)
    config = {"network": "eip155:31337", "asset": token.address, "payee": payees[0]}
    config["other_payee"] = payees[1]
    settings = {**x402_settings, "X402_PREAUTHORIZE": False}
    with Hostile(config, tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/hostile/fair/{n}" for n in range(2)])
        served = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(served) == len(items) == 2
    assert stats["x402/internal_error"] == 2
    assert stats["x402/payment_failed/internal_error"] == 2
    assert {r[1] for r in ledger_rows(settings)} == {Status.FAILED}  # not left reserved
    assert caplog.text.count("RuntimeError: a bug in reading receipts") == 2


@pytest.mark.parametrize(
    "payment",
    [
        b"[" * 2000,  # 2000 levels in a 2.7 KB header: RecursionError, a 500, before
        b'{"x402Version": 2, "payload": ' * 40 + b"{}" + b"}" * 40,
        b'{"x402Version": 2, "accepted": {"scheme": "deferred", "network": "\\ud800"}, '
        b'"payload": {}}',
    ],
)
def test_the_paywall_refuses_a_malformed_payment_as_invalid(tmp_path, token, payees, payment):
    """A hostile client: the publisher's verifier shares the crawler's decoder, so a payment
    nested too deep (or holding a lone surrogate) is ``invalid_payload``, a 402, never a 500."""
    with MockServer(sections(token, payees), tmp_path) as server:
        request = urllib.request.Request(
            f"{server.url}/news/1", headers={"PAYMENT-SIGNATURE": base64.b64encode(payment)}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
        refused = answer.value
        receipt = refused.headers["PAYMENT-RESPONSE"]
        refused.close()
    assert refused.code == 402
    assert b64json_decode(receipt)["errorReason"] == "invalid_payload"
