"""Real crawls: Scrapy in-process, the paywall in a subprocess, settlement on anvil."""

from __future__ import annotations

import json
import logging
import os
import time
from decimal import Decimal
from typing import Any

import pytest
from scrapy import signals
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_x402.ledger import Status, open_ledger
from tests.conftest import UrlsSpider
from tests.mockserver import MockServer


def sections(token, payees, **overrides: dict[str, Any]) -> dict[str, Any]:
    config = {
        "network": "eip155:31337",
        "asset": token.address,
        "sections": {
            "news": {"payee": payees[0], "price": 10_000},  # 0.01 tUSD
            "science": {"payee": payees[1], "price": 25_000},  # 0.025 tUSD
        },
    }
    config["sections"].update(overrides)
    return config


async def crawl(settings: dict[str, Any], urls: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    crawler = get_crawler(UrlsSpider, settings)
    items: list[dict[str, Any]] = []

    def collect(item: dict[str, Any]) -> None:
        items.append(item)

    crawler.signals.connect(collect, signal=signals.item_scraped, weak=False)
    await crawler.crawl_async(urls=urls)
    return crawler, items


def ledger_rows(settings: dict[str, Any]) -> list[tuple[str, ...]]:
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    try:
        return list(
            ledger.query("SELECT id, status, payee, amount, url, settlement_id FROM x402_payments")
        )
    finally:
        ledger.close()


@deferred_f_from_coro_f
async def test_pays_pages_and_settles_one_transfer_per_payee(
    tmp_path, x402_settings, token, payer, payees, caplog
):
    caplog.set_level(logging.DEBUG)
    with MockServer(sections(token, payees), tmp_path) as server:
        urls = [f"{server.url}/news/{i}" for i in range(6)] + [
            f"{server.url}/science/{i}" for i in range(4)
        ]
        urls.append(f"{server.url}/free/1")
        crawler, items = await crawl({**x402_settings, "X402_ITEM_RECEIPT_FIELD": "x402"}, urls)
        accepted = server.accepted()

    stats = crawler.stats.get_stats()
    assert len(items) == 11
    assert stats["x402/payment_count"] == 10
    assert stats["x402/spent_usd/127.0.0.1"] == 0.160000
    assert stats["x402/settlement/confirmed"] == 2  # two payees: two transfers
    assert stats["x402/settled_payment_count"] == 10
    # The payees hold exactly what their pages cost; the payer paid exactly that.
    assert token.balance_of(payees[0]) == 6 * 10_000
    assert token.balance_of(payees[1]) == 4 * 25_000
    assert token.balance_of(payer.address) == 100_000_000 - 160_000
    # The ledger and the publisher agree on every commitment.
    rows = ledger_rows(x402_settings)
    assert {r[1] for r in rows} == {Status.SETTLED}
    assert sorted(r[0] for r in rows) == sorted(a["id"] for a in accepted)
    assert len({r[5] for r in rows}) == 2
    # Items from paid pages carry their receipt; the free page's item does not.
    paid = [i for i in items if "/free/" not in i["url"]]
    assert all(i["x402"]["status"] == "accepted" for i in paid)
    assert all(i["x402"]["receipt"]["extra"]["commitmentId"] == i["x402"]["id"] for i in paid)
    assert "x402" not in next(i for i in items if "/free/" in i["url"])
    # The key is nowhere: not in any log line (DEBUG, web3's included), stat, item or file.
    key = payer.key.hex().removeprefix("0x").lower()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for text in (caplog.text, repr(stats), repr(items), written.decode("latin-1")):
        assert key not in text.lower()


@deferred_f_from_coro_f
async def test_concurrent_pages_never_exceed_the_budget(tmp_path, x402_settings, token, payees):
    # 40 pages at 0.01 under a 0.13 budget, 16 in flight at once: exactly 13 are paid.
    settings = {
        **x402_settings,
        "X402_BUDGETS": {"127.0.0.1": "0.13"},
        "CONCURRENT_REQUESTS": 32,
        "CONCURRENT_REQUESTS_PER_DOMAIN": 16,
        "X402_SETTLE_ON_CLOSE": False,
    }
    with MockServer(sections(token, payees), tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/news/{i}" for i in range(40)])
        accepted = server.accepted()

    stats = crawler.stats.get_stats()
    assert len(items) == 13 == len(accepted)
    assert stats["x402/payment_signed"] == 13
    assert stats["x402/budget_exceeded/127.0.0.1"] == 27
    amounts = [Decimal(r[3]) for r in ledger_rows(settings) if r[1] != Status.REJECTED]
    assert sum(amounts) == 130_000


@deferred_f_from_coro_f
async def test_v1_body_offers_are_paid_with_x_payment(tmp_path, x402_settings, token, payees):
    config = sections(token, payees, legacy={"payee": payees[2], "price": 5_000, "version": 1})
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl(x402_settings, [f"{server.url}/legacy/{i}" for i in range(3)])
    assert len(items) == 3
    assert crawler.stats.get_value("x402/payment_count") == 3
    assert token.balance_of(payees[2]) == 15_000


@deferred_f_from_coro_f
async def test_refused_payment_is_released_and_not_retried(tmp_path, x402_settings, token, payees):
    config = sections(
        token, payees, closed={"payee": payees[2], "price": 5_000, "refuse": "price_not_acceptable"}
    )
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl(x402_settings, [f"{server.url}/closed/{i}" for i in range(3)])
    stats = crawler.stats.get_stats()
    assert items == []
    assert stats["x402/payment_signed"] == 3  # one signature per page, no loop
    assert stats["x402/payment_rejected/price_not_acceptable"] == 3
    assert stats["downloader/response_status_count/402"] == 6
    assert "x402/settlement/confirmed" not in stats
    rows = ledger_rows(x402_settings)
    assert {r[1] for r in rows} == {Status.REJECTED}
    assert token.balance_of(payees[2]) == 0


@deferred_f_from_coro_f
async def test_unpayable_402s_pass_through_and_sign_nothing(tmp_path, x402_settings, token, payees):
    settings = {**x402_settings, "X402_BUDGETS": {"127.0.0.1": "0.01"}, "X402_MAX_PRICE": "0.02"}
    with MockServer(sections(token, payees), tmp_path) as server:
        bad = [
            "not-base64",
            "decimal-amount",
            "negative-amount",
            "unknown-version",
            "many-offers",
            "html",
        ]
        urls = [f"{server.url}/bad/{case}" for case in bad]
        urls += [f"{server.url}/science/1"]  # 0.025: over X402_MAX_PRICE
        crawler, items = await crawl(settings, urls)
    stats = crawler.stats.get_stats()
    assert items == []
    assert stats["x402/invalid_challenge"] == len(bad)
    assert stats["x402/offer_refused/max_price"] == 1
    assert "x402/payment_signed" not in stats
    assert ledger_rows(settings) == []


@deferred_f_from_coro_f
async def test_dont_pay_and_per_request_max_price(tmp_path, x402_settings, token, payees):
    from scrapy import Request

    class MetaSpider(UrlsSpider):
        async def start(self):
            yield Request(self.start_urls[0], meta={"x402_dont_pay": True})
            yield Request(self.start_urls[1], meta={"x402_max_price": "0.005"})
            yield Request(self.start_urls[2], meta={"x402_max_price": "0.05"})

    with MockServer(sections(token, payees), tmp_path) as server:
        crawler = get_crawler(MetaSpider, x402_settings)
        await crawler.crawl_async(
            urls=[f"{server.url}/news/1", f"{server.url}/news/2", f"{server.url}/science/3"]
        )
    stats = crawler.stats.get_stats()
    assert stats["x402/payment_count"] == 1  # only science/3, allowed 0.05
    assert stats["x402/offer_refused/max_price"] == 1


@deferred_f_from_coro_f
async def test_resumed_crawl_keeps_counting_against_the_budget(
    tmp_path, x402_settings, token, payees
):
    settings = {
        **x402_settings,
        "JOBDIR": str(tmp_path / "job"),
        "X402_BUDGETS": {"127.0.0.1": "0.05"},
        "X402_SETTLE_ON_CLOSE": False,
    }
    del settings["X402_LEDGER_URI"]  # default: inside JOBDIR
    with MockServer(sections(token, payees), tmp_path) as server:
        first, _ = await crawl(settings, [f"{server.url}/news/{i}" for i in range(3)])
        second, _ = await crawl(settings, [f"{server.url}/news/{i}" for i in range(3, 9)])
    assert first.stats.get_value("x402/payment_count") == 3
    assert second.stats.get_value("x402/payment_count") == 2  # 0.05 - 0.03 left
    assert (tmp_path / "job" / "x402-ledger.sqlite3").exists()


@deferred_f_from_coro_f
async def test_global_cap_closes_the_spider(tmp_path, x402_settings, token, payees):
    settings = {
        **x402_settings,
        "X402_MAX_TOTAL": "0.03",
        "X402_CLOSE_ON_BUDGET_EXHAUSTED": True,
        "CONCURRENT_REQUESTS": 1,
        "X402_SETTLE_ON_CLOSE": False,
    }
    with MockServer(sections(token, payees), tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/news/{i}" for i in range(20)])
    assert crawler.stats.get_value("finish_reason") == "x402_budget_exhausted"
    assert crawler.stats.get_value("x402/payment_count") == 3
    assert len(items) == 3
    assert json.loads(json.dumps(crawler.stats.get_value("x402/spent_usd"))) == 0.03


@deferred_f_from_coro_f
async def test_a_retried_paid_request_resends_the_same_payment(
    tmp_path, x402_settings, token, payees
):
    config = sections(token, payees, flaky={"payee": payees[2], "price": 5_000, "fail_first": True})
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl(x402_settings, [f"{server.url}/flaky/{i}" for i in range(3)])
        accepted = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == 3
    assert stats["retry/count"] == 3  # each page failed once after payment
    assert stats["x402/payment_signed"] == 3  # and was retried with the same signature
    assert len(accepted) == 3 == len({a["id"] for a in accepted})  # owed once each
    assert token.balance_of(payees[2]) == 15_000  # each page paid once


@deferred_f_from_coro_f
async def test_known_terms_are_paid_on_the_first_request(tmp_path, x402_settings, token, payees):
    settings = {**x402_settings, "CONCURRENT_REQUESTS": 1}
    with MockServer(sections(token, payees), tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/news/{i}" for i in range(6)])
        accepted = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == 6 == len(accepted)
    assert stats["downloader/response_status_count/402"] == 1  # only the first page
    assert stats["x402/preauthorized"] == 5
    assert stats["x402/payment_signed"] == 6
    assert token.balance_of(payees[0]) == 6 * 10_000
    assert {r[1] for r in ledger_rows(settings)} == {Status.SETTLED}


@deferred_f_from_coro_f
async def test_stale_terms_fall_back_to_the_402_cycle(tmp_path, x402_settings, token, payees):
    # The price doubles after two pages: the third page's pre-authorised payment is refused
    # (underpaid), the stale terms are forgotten and the page is paid at the new price.
    config = sections(
        token,
        payees,
        news={"payee": payees[0], "price": 10_000, "price_after": {"count": 2, "price": 20_000}},
    )
    settings = {**x402_settings, "CONCURRENT_REQUESTS": 1}
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/news/{i}" for i in range(5)])
        accepted = server.accepted()
    stats = crawler.stats.get_stats()
    assert len(items) == 5 == len(accepted)
    assert stats["x402/preauthorized_refused"] == 1
    assert stats["x402/payment_rejected/underpaid"] == 1
    rows = ledger_rows(settings)
    paid = [int(r[3]) for r in rows if r[1] == Status.SETTLED]
    assert sorted(paid) == [10_000, 10_000, 20_000, 20_000, 20_000]  # one payment per page
    assert [r[1] for r in rows].count(Status.REJECTED) == 1  # the stale one, never paid
    assert stats["x402/spent_usd/127.0.0.1"] == 0.080000
    assert token.balance_of(payees[0]) == 80_000


@deferred_f_from_coro_f
async def test_preauthorization_can_be_turned_off(tmp_path, x402_settings, token, payees):
    settings = {
        **x402_settings,
        "CONCURRENT_REQUESTS": 1,
        "X402_PREAUTHORIZE": False,
        "X402_SETTLE_ON_CLOSE": False,
    }
    with MockServer(sections(token, payees), tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/news/{i}" for i in range(3)])
    assert len(items) == 3
    assert crawler.stats.get_value("downloader/response_status_count/402") == 3
    assert crawler.stats.get_value("x402/preauthorized") is None


class OrderedSpider(UrlsSpider):
    """Fetches its URLs one after another, repeats included (dont_filter), with extra meta."""

    name = "ordered"

    def __init__(self, urls: list[str], meta: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(urls, **kwargs)
        self.meta = meta or {}

    async def start(self) -> Any:
        from scrapy import Request

        for i, url in enumerate(self.start_urls):
            yield Request(url, dont_filter=True, priority=-i, meta=self.meta.get(url, {}))


async def crawl_in_order(settings, urls, meta=None):
    crawler = get_crawler(OrderedSpider, {**settings, "CONCURRENT_REQUESTS": 1})
    items: list[dict[str, Any]] = []

    def collect(item: dict[str, Any]) -> None:
        items.append(item)

    crawler.signals.connect(collect, signal=signals.item_scraped, weak=False)
    await crawler.crawl_async(urls=urls, meta=meta)
    return crawler, items


@deferred_f_from_coro_f
async def test_http_cache_never_keeps_a_402_and_a_cached_page_is_never_paid_again(
    tmp_path, x402_settings, token, payees
):
    settings = {
        **x402_settings,
        "HTTPCACHE_ENABLED": True,
        "HTTPCACHE_DIR": str(tmp_path / "cache"),
        "X402_SETTLE_ON_CLOSE": False,
    }
    with MockServer(sections(token, payees), tmp_path) as server:
        news = [f"{server.url}/news/{i}" for i in range(3)]
        # /news/0 a second time, pre-authorised terms known: the cache answers it.
        first, items = await crawl_in_order(settings, [*news, news[0]])
        assert len(items) == 4
        assert first.stats.get_value("x402/payment_count") == 3  # a 402 from the cache: never
        assert first.stats.get_value("x402/payment_signed") == 3  # the cached repeat: unpaid
        second, again = await crawl_in_order(settings, news)
        served = server.served()
    assert len(again) == 3
    assert second.stats.get_value("httpcache/hit") == 3
    assert second.stats.get_value("x402/payment_signed") is None  # paid once, cached after
    assert len(served) == 3 and len(ledger_rows(settings)) == 3


@deferred_f_from_coro_f
async def test_a_pre_authorised_request_follows_a_free_redirect(
    tmp_path, x402_settings, token, payees
):
    config = sections(
        token, payees, news={"payee": payees[0], "price": 10_000, "moved": {"old": "/free/new"}}
    )
    settings = {**x402_settings, "X402_SETTLE_ON_CLOSE": False}
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl_in_order(
            settings, [f"{server.url}/news/1", f"{server.url}/news/old"]
        )
    assert sorted(item["url"].rsplit("/", 2)[-2] for item in items) == ["free", "news"]
    stats = crawler.stats.get_stats()
    assert stats["x402/preauthorized"] == 1  # /news/old looked like a paid page...
    assert stats["x402/payment_failed/http_301"] == 1  # ...its payment was released...
    assert stats["x402/payment_count"] == 1  # ...and only /news/1 was paid for
    assert sorted(r[1] for r in ledger_rows(settings)) == [Status.ACCEPTED, Status.FAILED]


@deferred_f_from_coro_f
async def test_a_resumed_exact_payment_is_counted_once(tmp_path, x402_settings, token, payees):
    """A request restored from JOBDIR carries an exact payment its dead process left in
    doubt: held (it may be collected), sent again as it is, never counted twice."""
    from eth_account import Account

    from scrapy_x402.ledger import PaymentRecord
    from scrapy_x402.payments import Limits, PaymentBook
    from scrapy_x402.schemes import ExactScheme
    from tests.test_exact import offer_for

    jobdir = tmp_path / "job"
    jobdir.mkdir()
    (jobdir / "x402-run-id").write_text("run-before-the-crash")
    settings = {
        **x402_settings,
        "JOBDIR": str(jobdir),
        "X402_BUDGETS": {"127.0.0.1": "0.015"},  # the held payment and one page
        "X402_SETTLE_ON_CLOSE": False,
    }
    account = Account.from_key(os.environ["X402_PRIVATE_KEY"])
    with MockServer(
        sections(token, payees, news={"payee": payees[0], "price": 10_000}), tmp_path
    ) as server:
        held_url = f"{server.url}/free/held"
        signed = ExactScheme().sign(
            account, offer_for(token, payees[1]), held_url, int(time.time()), 300
        )
        ledger = open_ledger(settings["X402_LEDGER_URI"])
        PaymentBook(ledger).reserve(
            PaymentRecord(
                signed.id,
                "run-before-the-crash",
                "exact",
                "eip155:31337",
                token.address,
                account.address,
                payees[1],
                5_000,
                Decimal("0.005"),
                "127.0.0.1",
                "127.0.0.1",
                held_url,
                signed.payload,
                signed.valid_until,
            ),
            Limits(Decimal("0.015"), None),
        )
        ledger.close()
        payment = {
            "id": signed.id,
            "status": "reserved",
            "scheme": "exact",
            "network": "eip155:31337",
            "asset": token.address,
            "payee": payees[1],
            "amount": "5000",
            "usd": "0.005",
        }
        restored = {
            "_x402_payment": signed.id,
            "x402_payment": payment,
            "_x402_reserved": ("127.0.0.1", "0.005"),
        }
        crawler, items = await crawl_in_order(
            settings, [held_url, f"{server.url}/news/1"], meta={held_url: restored}
        )
    stats = crawler.stats.get_stats()
    assert len(items) == 2
    assert stats.get("x402/budget_exceeded/127.0.0.1") is None
    assert stats["x402/payment_count"] == 1  # /news/1 still fits: the held one counted once
    rows = {r[0]: r[1] for r in ledger_rows(settings)}
    assert rows[signed.id] == Status.HELD


@pytest.mark.parametrize("preauthorize", [True, False])
@deferred_f_from_coro_f
async def test_a_paid_request_never_revalidates_a_cached_copy(
    tmp_path, x402_settings, token, payees, preauthorize
):
    """With RFC 2616 caching, a stale copy would make the paid request conditional; the
    publisher would take the payment and answer 304, and the cache would hand back the copy.
    A paid request asks for the page itself: every payment the publisher took is counted."""
    settings = {
        **x402_settings,
        "HTTPCACHE_ENABLED": True,
        "HTTPCACHE_DIR": str(tmp_path / "cache"),
        "HTTPCACHE_POLICY": "scrapy.extensions.httpcache.RFC2616Policy",
        "X402_PREAUTHORIZE": preauthorize,
        "X402_BUDGETS": {"127.0.0.1": "0.02"},
        "X402_SETTLE_ON_CLOSE": False,
    }
    config = sections(token, payees, news={"payee": payees[0], "price": 10_000, "etag": True})
    with MockServer(config, tmp_path) as server:
        news = [f"{server.url}/news/{p}" for p in (0, 0, 0, 1, 2)]
        crawler, _ = await crawl_in_order(settings, news)
        served = {s["id"] for s in server.served()}
    counted = {r[0] for r in ledger_rows(settings) if r[1] in (Status.ACCEPTED, Status.RESERVED)}
    assert served == counted  # the ledger counts every payment the publisher took...
    assert len(served) == 2  # ...and the budget held: 0.02 USD
    assert crawler.stats.get_value("x402/payment_unsent") is None


@deferred_f_from_coro_f
async def test_a_paid_request_is_never_conditional_whoever_made_it_so(
    tmp_path, x402_settings, token, payees
):
    settings = {
        **x402_settings,
        "DEFAULT_REQUEST_HEADERS": {
            "If-None-Match": '"v1"',
            "If-Modified-Since": "Mon, 1 Jan 2024",
        },
        "X402_SETTLE_ON_CLOSE": False,
    }
    config = sections(token, payees, news={"payee": payees[0], "price": 10_000, "etag": True})
    with MockServer(config, tmp_path) as server:
        _, items = await crawl_in_order(settings, [f"{server.url}/news/{p}" for p in range(3)])
        served = {s["id"] for s in server.served()}
    assert len(items) == 3  # pages, not 304s
    assert served == {r[0] for r in ledger_rows(settings) if r[1] == Status.ACCEPTED}


@pytest.mark.parametrize(
    ("retry", "policy", "reason"),
    [
        (False, {}, "ResponseDataLossError"),
        (True, {}, "nonce_reused"),
        # The served page is now the payer's debt: the retry fails the credit check first.
        (True, {"credit_limit": 10_000}, "credit_limit_exceeded"),
    ],
    ids=["no_retry", "retried", "retried_over_credit"],
)
@deferred_f_from_coro_f
async def test_a_paid_page_cut_off_after_its_status_line_stays_in_doubt_until_asked(
    tmp_path, x402_settings, token, payees, retry, policy, reason
):
    """A publisher is owed the page once its 2xx status line is sent, even if the
    connection then drops (docs section 6). The crawler cannot know, so the payment stays
    reserved and counted, is not paid again (a retry of the same payment gets `nonce_reused`),
    and the publisher's status endpoint decides: here, owed."""
    from scrapy_x402._recovery import resolve_in_doubt
    from scrapy_x402.payments import PaymentBook

    cut = {"payee": payees[2], "price": 10_000, "cut": True, "policy": policy}
    config = sections(token, payees, cut=cut)
    settings = {**x402_settings, "RETRY_ENABLED": retry, "X402_SETTLE_ON_CLOSE": False}
    with MockServer(config, tmp_path) as server:
        crawler, items = await crawl(settings, [f"{server.url}/cut/1"])
        stats = crawler.stats.get_stats()
        assert items == []
        assert stats["x402/payment_signed"] == 1  # one commitment, never a second for the page
        assert "x402/payment_count" not in stats  # nothing confirmed
        assert stats[f"x402/payment_in_doubt/{reason}"] == 1
        assert not any(
            k.startswith(("x402/payment_failed", "x402/payment_rejected")) for k in stats
        )
        [(payment_id, status, *_)] = ledger_rows(settings)
        assert status == Status.RESERVED  # in doubt: counted against the budget, not paid
        assert [c["id"] for c in server.served()] == [payment_id]  # the publisher is owed it

        ledger = open_ledger(settings["X402_LEDGER_URI"])
        try:
            resolution = resolve_in_doubt(PaymentBook(ledger))  # what `settle` does
        finally:
            ledger.close()
    assert resolution.accepted == [payment_id]
    assert [row[1] for row in ledger_rows(settings)] == [Status.ACCEPTED]


@deferred_f_from_coro_f
async def test_a_first_presentation_refused_as_already_served_is_refused_not_in_doubt(
    tmp_path, x402_settings, token, payees
):
    """`nonce_reused` or `payment_in_flight` mean "an earlier attempt of yours" only for a
    payment presented before; said to a first presentation it is a plain refusal, or a
    publisher could lock a budget without serving anything."""
    config = sections(
        token, payees, evil={"payee": payees[2], "price": 10_000, "refuse": "nonce_reused"}
    )
    settings = {
        **x402_settings,
        "X402_BUDGETS": {"127.0.0.1": "0.03"},  # three pages
        "X402_SETTLE_ON_CLOSE": False,
        "X402_PREAUTHORIZE": False,
        "RETRY_ENABLED": False,
        "CONCURRENT_REQUESTS": 1,
    }
    with MockServer(config, tmp_path) as server:
        urls = [f"{server.url}/evil/{i}" for i in range(3)]
        urls += [f"{server.url}/news/{i}" for i in range(3)]
        crawler, items = await crawl(settings, urls)
    stats = crawler.stats.get_stats()
    assert stats["x402/payment_rejected/nonce_reused"] == 3
    assert not any(k.startswith("x402/payment_in_doubt") for k in stats)
    assert sorted(i["url"].rsplit("/", 2)[1] for i in items) == ["news"] * 3  # budget intact


class FailConnectingOnRetry:
    """Stands in for the network: a retry of a /cut/ page cannot connect (its SYNs dropped)."""

    def process_request(self, request: Any) -> None:
        from twisted.internet.error import TCPTimedOutError

        if request.meta.get("retry_times", 0) >= 1 and "/cut/" in request.url:
            raise TCPTimedOutError(110, "Connection timed out")


@deferred_f_from_coro_f
async def test_a_payment_is_in_doubt_if_any_attempt_may_have_been_served(
    tmp_path, x402_settings, token, payees
):
    """The first attempt got a 200 status line and was cut off; the retry never connected.
    The last failure alone says "never sent", but the first attempt may be owed."""
    config = sections(token, payees, cut={"payee": payees[2], "price": 10_000, "cut": True})
    settings = {
        **x402_settings,
        "X402_SETTLE_ON_CLOSE": False,
        "RETRY_TIMES": 1,
        "DOWNLOADER_MIDDLEWARES": {f"{__name__}.FailConnectingOnRetry": 999},
    }
    with MockServer(config, tmp_path) as server:
        crawler, _ = await crawl(settings, [f"{server.url}/cut/1"])
        served = server.served()
    stats = crawler.stats.get_stats()
    assert stats["x402/payment_in_doubt/TCPTimedOutError"] == 1
    [(payment_id, status, *_)] = ledger_rows(settings)
    assert status == Status.RESERVED
    assert [c["id"] for c in served] == [payment_id]
