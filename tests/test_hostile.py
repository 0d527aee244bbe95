"""Hostile publishers (tests/mockserver/hostile.py): whatever they do, nothing is paid beyond the
budget and the offer first accepted, each case has its own stat, and the crawl goes on."""

from __future__ import annotations

import pytest
from eth_account import Account
from scrapy.utils.defer import deferred_f_from_coro_f

from scrapy_x402.ledger import Status
from tests.mockserver import MockServer
from tests.test_crawl import crawl, ledger_rows


class Hostile(MockServer):
    module = "tests.mockserver.hostile"


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
    "drip": ("x402/payment_failed/DownloadTimeoutError", {Status.FAILED}),
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
