"""The extension: at the end of a crawl, summarise what it spent and settle what is owed."""

from __future__ import annotations

import logging
from collections import defaultdict
from decimal import Decimal
from typing import TYPE_CHECKING

from scrapy import signals
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.threads import deferToThread

from scrapy_x402._session import X402Session
from scrapy_x402._settlement import Settler
from scrapy_x402.ledger import Status

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)


class X402Settlement:
    def __init__(self, crawler: Crawler):
        self.crawler = crawler
        self.session = X402Session.for_crawler(crawler)
        crawler.signals.connect(self.spider_closed, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> X402Settlement:
        return cls(crawler)

    async def spider_closed(self, reason: str) -> None:
        session, stats = self.session, self.crawler.stats
        assert stats is not None
        store = session.store
        in_doubt = await session.ledger.run(store.in_doubt, run_id=session.run_id)
        if in_doubt and not session.config.jobdir:
            logger.warning(
                "x402: %d payments of this crawl are in doubt (their outcome was not recorded); "
                "they stay counted: `scrapy x402 settle --resolve-in-doubt` asks their publishers",
                len(in_doubt),
            )
        spent: dict[str, Decimal] = defaultdict(Decimal)
        pages: dict[str, int] = defaultdict(int)
        for row in await session.ledger.run(store.summary, run_id=session.run_id):
            if row.status in (Status.ACCEPTED, Status.SETTLING, Status.SETTLED):
                spent[row.domain] += row.usd
                pages[row.domain] += row.count
        for domain in sorted(spent):
            logger.info("x402: %s: %d paid pages, %s USD", domain, pages[domain], spent[domain])
        # A number for monitoring; the ledger has the exact amounts.
        stats.set_value("x402/spent_usd", float(sum(spent.values(), Decimal(0))))
        if not session.config.settle_on_close or session.account is None:
            return
        settler = Settler.from_config(session.book, session.account, session.config)
        # Chain calls and waits for confirmations run in a thread, never on the reactor.
        outcomes = await maybe_deferred_to_future(deferToThread(settler.settle))
        for outcome in outcomes:
            stats.inc_value(f"x402/settlement/{outcome.status}")
            if outcome.status == "confirmed":
                stats.inc_value("x402/settled_payment_count", outcome.payment_count)
            elif outcome.status == "skipped":
                logger.warning(
                    "x402: %d payments to %s stay owed: %s",
                    outcome.payment_count,
                    outcome.payee,
                    outcome.reason,
                )
