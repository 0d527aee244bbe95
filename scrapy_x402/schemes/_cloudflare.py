"""What Cloudflare's two payment forms share."""

from __future__ import annotations

from urllib.parse import urlsplit

from scrapy_x402._assets import CLOUDFLARE
from scrapy_x402._protocol import Offer

# Cloudflare never charges for these; a 402 on them is not paid.
FREE_PATHS = frozenset(
    {"/robots.txt", "/sitemap.xml", "/security.txt", "/.well-known/security.txt"}
)
VALIDITY = 60  # Cloudflare charges when it serves: a payment is good for one request


def cloudflare_refusal(offer: Offer, identity: bool) -> str | None:
    if offer.network != CLOUDFLARE:
        return "network"
    if not identity:
        return "no_bot_identity"  # the payment must be covered by a Web Bot Auth signature
    if urlsplit(offer.resource or "").path in FREE_PATHS:
        return "free_path"
    return None
