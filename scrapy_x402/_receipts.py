"""Writes the payment behind a paid response into the items scraped from it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from itemadapter import ItemAdapter
from scrapy.exceptions import NotConfigured
from scrapy.spidermiddlewares.base import BaseSpiderMiddleware

from scrapy_x402.ledger import Status

if TYPE_CHECKING:
    from scrapy.crawler import Crawler
    from scrapy.http import Response

logger = logging.getLogger(__name__)


class X402ReceiptMiddleware(BaseSpiderMiddleware):
    def __init__(self, crawler: Crawler):
        super().__init__(crawler)
        self.field = crawler.settings.get("X402_ITEM_RECEIPT_FIELD")
        if not self.field:
            raise NotConfigured  # opt-in: silent when unset
        self._warned = False

    def get_processed_item(self, item: Any, response: Response | None) -> Any:
        payment = response.meta.get("x402_payment") if response is not None else None
        # Owed (deferred, Cloudflare) or paid at once (exact, upto): both were confirmed.
        if payment is None or payment.get("status") not in (Status.ACCEPTED, Status.SETTLED):
            return item
        adapter = ItemAdapter(item)
        if adapter.is_item(item):
            try:
                adapter[self.field] = dict(payment)
            except KeyError:
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "x402: %s items have no field %r (X402_ITEM_RECEIPT_FIELD)",
                        type(item).__name__,
                        self.field,
                    )
        return item
