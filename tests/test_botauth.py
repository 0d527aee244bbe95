"""The Web Bot Auth middleware in real crawls: what leaves for a third party after a redirect
or a refresh, and what happens to a request that cannot be signed. The site is the local
Cloudflare stand-in (tests/edgeserver), which verifies every signature with its own verifier;
the third party is a second one, on another port and another host name (localhost)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from scrapy import Request, Spider, signals
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_x402._webbotauth import BotIdentity
from scrapy_x402.ledger import Status, open_ledger
from tests.mockserver import MockServer

# What must never reach a host the request was not signed or paid for.
IDENTITY_HEADERS = {"signature", "signature-input", "signature-agent"}
PAYMENT_HEADERS = {"payment-signature", "x-payment", "crawler-max-price", "crawler-exact-price"}


class Edge(MockServer):
    module = "tests.edgeserver.site"

    def received(self) -> list[dict[str, Any]]:
        """What /echo/ pages were sent: their URL and request headers."""
        path = Path(str(self.book) + ".received.jsonl")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class ChainSpider(Spider):
    """Fetches its steps one after the other (each once the previous one ended), so that a
    step can count on what the earlier ones taught the crawler (pre-authorised terms)."""

    name = "chain"

    def __init__(self, steps: list[tuple[str, dict[str, str]]], **kwargs: Any):
        super().__init__(**kwargs)
        self.steps = steps

    async def start(self) -> Any:
        yield self.step(0)

    def step(self, index: int) -> Request:
        url, headers = self.steps[index]
        return Request(
            url,
            headers=headers,
            callback=self.parse,
            errback=self.failed,
            cb_kwargs={"index": index},
            dont_filter=True,
        )

    def parse(self, response: Any, index: int) -> Any:
        yield {"url": response.url, "title": response.css("title::text").get()}
        yield from self.following(index)

    def failed(self, failure: Any) -> Any:
        yield from self.following(failure.request.cb_kwargs["index"])

    def following(self, index: int) -> Any:
        if index + 1 < len(self.steps):
            yield self.step(index + 1)


async def crawl(settings: dict[str, Any], steps: list[tuple[str, dict[str, str]]]) -> Any:
    crawler = get_crawler(ChainSpider, settings)
    items: list[dict[str, Any]] = []

    def collect(item: dict[str, Any]) -> None:
        items.append(item)

    crawler.signals.connect(collect, signal=signals.item_scraped, weak=False)
    await crawler.crawl_async(steps=steps)
    return crawler, items


@pytest.fixture
def identity() -> BotIdentity:
    return BotIdentity.generate()


@pytest.fixture
def settings(tmp_path, identity, monkeypatch) -> dict[str, Any]:
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    monkeypatch.setenv("X402_BOT_AUTH_KEY", identity.private_jwk()["d"])
    return {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_SCHEMES": ["pay-per-crawl"],
        "X402_SIGNATURE_AGENT": "https://crawler.example",
        "X402_BOT_AUTH_DOMAINS": ["127.0.0.1"],  # the site; the third party is "localhost"
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_BUDGETS": {"127.0.0.1": "1"},
        "ROBOTSTXT_OBEY": False,
        "TELNETCONSOLE_ENABLED": False,
    }


def edge(directory: Path, identity: BotIdentity) -> Edge:
    directory.mkdir()
    return Edge({"keys": [identity.public_jwk()], "price_cents": 1}, directory)


def payments(settings: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    try:
        return list(ledger.query("SELECT url, status, reason FROM x402_payments ORDER BY url"))
    finally:
        ledger.close()


@deferred_f_from_coro_f
async def test_nothing_signed_or_paid_for_a_site_reaches_the_host_it_sends_the_crawler_to(
    tmp_path, identity, settings
):
    with edge(tmp_path / "site", identity) as site, edge(tmp_path / "third", identity) as third:
        a, b = site.url, third.url.replace("127.0.0.1", "localhost")
        steps = [
            # Signed because the site is in X402_BOT_AUTH_DOMAINS, then sent elsewhere.
            (f"{a}/redirect/1?to={b}/echo/signed", {}),
            # A price header that no payment of this crawl made (set by the spider).
            (f"{a}/redirect/2?to={b}/echo/spider-price", {"crawler-max-price": "USD 0.05"}),
            # Paid after its 402: the terms of /ppc/* are known from here on.
            (f"{a}/ppc/1", {}),
            # Pre-authorised (signed crawler-max-price), answered with a redirect.
            (f"{a}/ppc/2?to={b}/echo/preauthorised", {}),
            # Pre-authorised, charged, and served with a meta refresh to the third party.
            (f"{a}/ppc/3?refresh={b}/echo/refreshed", {}),
        ]
        crawler, items = await crawl(settings, steps)
        received = third.received()
        charged = site.accepted()

    # The third party got nothing of ours, and was reached by the redirects only.
    for request in received:
        assert not (IDENTITY_HEADERS | PAYMENT_HEADERS) & set(request["headers"]), request
    assert sorted(r["url"].rsplit("/", 1)[1] for r in received) == [
        "preauthorised",
        "signed",
        "spider-price",
    ]
    # The page paid for is the one served with the refresh, not the one it points to.
    assert sorted(i["title"] for i in items) == [
        "/echo/preauthorised",
        "/echo/signed",
        "/echo/spider-price",
        "/ppc/1",
        "/ppc/3",
    ]
    assert sorted(c["url"].split("?")[0].rsplit("/", 1)[1] for c in charged) == ["1", "3"]
    # The book: the redirected payment was not served (released), the others owed.
    book = [
        (url.split("?")[0].rsplit("/", 1)[1], status, why)
        for url, status, why in payments(settings)
    ]
    assert book == [
        ("1", Status.ACCEPTED, None),
        ("2", Status.FAILED, "http_302"),
        ("3", Status.ACCEPTED, None),
    ]
    stats = crawler.stats.get_stats()
    assert stats["x402/preauthorized"] == 2
    assert stats["x402/payment_header_dropped"] == 1
    assert "x402/crawler_error/InvalidSignature" not in stats  # the site verified every one


@deferred_f_from_coro_f
async def test_a_request_that_cannot_be_signed(tmp_path, identity, settings, caplog):
    """Scrapy keeps a malformed percent escape in a URL, which RFC 9421 cannot sign. Such a
    request goes unsigned (one WARNING, counted), but a Cloudflare payment, which only the
    signature binds to the crawler, never leaves unsigned: the request is dropped and the
    payment recorded as never sent."""
    caplog.set_level(logging.DEBUG)
    with edge(tmp_path / "site", identity) as site:
        steps = [(f"{site.url}/robots.txt?q=%zz", {}), (f"{site.url}/ppc/%zz", {})]
        crawler, items = await crawl(settings, steps)
        charged = site.accepted()

    assert [i["title"] for i in items] == ["/robots.txt"]  # free: served unsigned
    assert charged == []
    stats = crawler.stats.get_stats()
    # robots.txt, the first /ppc/%zz (answered 402), and its paid retry (never sent)
    assert stats["x402/bot_auth/unsignable"] == 3
    assert stats["x402/payment_unsent"] == 1
    assert [(status, reason) for _, status, reason in payments(settings)] == [
        (Status.FAILED, "unsignable")
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "cannot sign" in w]) == 3
    assert sum("not sent" in w for w in warnings) == 1
    assert identity.private_jwk()["d"] not in caplog.text
    assert "Traceback" not in caplog.text


async def paid_after_a_402(tmp_path: Path, monkeypatch: Any) -> tuple[Any, Any, Any]:
    """The crawler, its signing middleware (950) and a request paid by the 402 cycle (545)
    that has not left yet."""
    from eth_account import Account
    from scrapy.utils.misc import build_from_crawler

    from scrapy_x402 import X402DownloaderMiddleware, X402SigningMiddleware
    from tests.test_middleware import PAYING, offer, response402

    monkeypatch.setenv("X402_PRIVATE_KEY", Account.create().key.hex())
    settings = {
        **PAYING,
        "X402_LEDGER_URI": str(tmp_path / "l.sqlite3"),
        "X402_BUDGETS": {"news.example": "1"},
    }
    crawler = get_crawler(settings_dict=settings)
    paying = build_from_crawler(X402DownloaderMiddleware, crawler)
    leaving = build_from_crawler(X402SigningMiddleware, crawler)
    answer = response402(offer())
    return crawler, leaving, await paying.process_response(answer.request, answer)


def status_of(crawler: Any, payment_id: str) -> str | None:
    ledger = open_ledger(crawler.settings["X402_LEDGER_URI"])
    try:
        return ledger.get_status(payment_id)
    finally:
        ledger.close()


@deferred_f_from_coro_f
async def test_a_payment_copied_onto_a_request_for_another_url_is_not_sent(tmp_path, monkeypatch):
    """Whatever copies a paid request to another URL (here, as a middleware between the two
    halves might): the payment header does not leave with it, and the book keeps the payment
    reserved, in doubt, since what its own URL answered was never seen. A retry of the same
    URL keeps it."""
    from scrapy_x402._payer import is_paid

    crawler, leaving, paid = await paid_after_a_402(tmp_path, monkeypatch)
    await leaving.process_request(paid)  # it leaves, for its URL
    payment_id = paid.meta["_x402_payment"]

    retry = paid.replace(dont_filter=True)
    await leaving.process_request(retry)
    assert is_paid(retry) and b"PAYMENT-SIGNATURE" in retry.headers

    moved = paid.replace(url="https://elsewhere.example/x")
    await leaving.process_request(moved)
    assert not is_paid(moved) and b"PAYMENT-SIGNATURE" not in moved.headers
    assert crawler.stats.get_value("x402/payment_not_forwarded") == 1
    assert status_of(crawler, payment_id) == Status.RESERVED


@deferred_f_from_coro_f
async def test_a_paid_request_pointed_elsewhere_before_it_leaves_goes_without_its_payment(
    tmp_path, monkeypatch
):
    """A middleware that rewrites URLs (a mirror, a rendering service) between the 402 cycle
    (545) and the request's departure (950): the payment was made for the first URL, so it
    never leaves with the rewritten request, and, never sent, it is released."""
    from scrapy_x402._payer import is_paid

    crawler, leaving, paid = await paid_after_a_402(tmp_path, monkeypatch)
    payment_id = paid.meta["_x402_payment"]
    mirrored = paid.replace(url="https://mirror.example/news/1")
    await leaving.process_request(mirrored)
    assert not is_paid(mirrored) and b"PAYMENT-SIGNATURE" not in mirrored.headers
    assert crawler.stats.get_value("x402/payment_not_forwarded") == 1
    assert status_of(crawler, payment_id) == Status.FAILED  # never sent: nothing to collect
