"""Cloudflare pay-per-crawl, header form: the crawler answers ``crawler-price`` with
``crawler-max-price`` (or ``crawler-exact-price``) in a request signed with Web Bot Auth, and a
success says ``crawler-charged``. Cloudflare bills the crawler operator later: the payment is
owed (accepted) until an invoice settles it; nothing moves on-chain."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from scrapy_x402._protocol import (
    Challenge,
    InvalidChallenge,
    Offer,
    format_usd_cents,
    parse_usd_cents,
)
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import Confirmation, SchemeBase, SignedPayment
from scrapy_x402.schemes._cloudflare import VALIDITY, cloudflare_refusal

logger = logging.getLogger(__name__)


class PayPerCrawlScheme(SchemeBase):
    name = "pay-per-crawl"
    held_until_expiry = False  # only successful responses are billed
    needs_wallet = False

    def __init__(self, header: str = "crawler-max-price", identity: bool = False):
        self.header = header
        self.identity = identity

    def refusal(self, offer: Offer) -> str | None:
        return cloudflare_refusal(offer, self.identity)

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment:
        payment_id = "ppc-" + os.urandom(16).hex()
        return SignedPayment(
            payment_id, {self.header: format_usd_cents(offer.amount)}, now + VALIDITY
        )

    def headers(
        self,
        challenge: Challenge,
        offer: Offer,
        signed: SignedPayment,
        extensions: Mapping[str, Any],
    ) -> dict[str, str]:
        return dict(signed.payload)

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """``crawler-charged`` on a success: owed to Cloudflare for what it says, at most
        what was offered."""
        charged = (receipt or {}).get("crawler-charged")
        if not isinstance(charged, str):
            return None
        try:
            cents = parse_usd_cents(charged)
        except InvalidChallenge:
            logger.warning(
                "x402: unreadable crawler-charged %r; counting the price offered", charged[:40]
            )
            return Confirmation(Status.ACCEPTED)
        return Confirmation(Status.ACCEPTED, amount=min(cents, signed_amount))

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        return False
