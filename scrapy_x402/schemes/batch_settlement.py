"""x402 ``batch-settlement`` on ``cloudflare:402``: a deferred, credit-backed payment.
Cloudflare is the merchant of record and bills the crawler operator later, so the payload is
just the amount and asset, and the request's Web Bot Auth signature (which covers the
PAYMENT-SIGNATURE header) is what binds it to the crawler. Owed (accepted) until an invoice
settles it; nothing moves on-chain. (The EVM payment-channel binding is not supported.)"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from scrapy_x402._assets import CLOUDFLARE
from scrapy_x402._protocol import UNKNOWN_AMOUNT, InvalidChallenge, Offer, parse_atomic
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import Confirmation, SignedPayment, X402Scheme
from scrapy_x402.schemes._cloudflare import VALIDITY, cloudflare_refusal

logger = logging.getLogger(__name__)


class BatchSettlementScheme(X402Scheme):
    name = "batch-settlement"
    held_until_expiry = False  # Cloudflare bills only what it served
    needs_wallet = False

    def __init__(self, identity: bool = False):
        self.identity = identity

    def refusal(self, offer: Offer) -> str | None:
        # Only cloudflare:402: the EVM payment-channel binding is not supported.
        reason = cloudflare_refusal(offer, self.identity)
        if reason is None and offer.amount == UNKNOWN_AMOUNT:
            return "amount_unknown"
        return reason

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment:
        payload = {"amount": str(offer.amount), "asset": offer.asset}
        return SignedPayment("cf-" + os.urandom(16).hex(), payload, now + VALIDITY)

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """Cloudflare's receipt ``{amount, asset, network, timestamp}``: owed for its amount
        (never more than offered)."""
        receipt = receipt or {}
        if receipt.get("network") != CLOUDFLARE or "timestamp" not in receipt:
            return None
        try:
            amount = parse_atomic(receipt.get("amount"), "receipt amount")
        except InvalidChallenge:
            logger.warning("x402: Cloudflare receipt for %s has no usable amount", payment_id)
            return Confirmation(Status.ACCEPTED)
        return Confirmation(Status.ACCEPTED, amount=min(amount, signed_amount))

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        return False
