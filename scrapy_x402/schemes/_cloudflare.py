"""What Cloudflare's two payment forms share: refusals, and its ``crawler-error`` codes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached

from scrapy_x402._assets import CLOUDFLARE
from scrapy_x402._protocol import Offer

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.http import Response

    from scrapy_x402._payer import Payer

logger = logging.getLogger(__name__)

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
    try:
        path = urlsplit(offer.resource or "").path
    except ValueError:  # a resource that is not a URL: what it costs cannot be told
        return "resource_url"
    if path in FREE_PATHS:
        return "free_path"
    return None


def count_crawler_error(payer: Payer, request: Request, response: Response) -> None:
    """Cloudflare's error codes: each counted; CrawlerForbidden ends paying the domain."""
    from scrapy_x402._payer import stat_name  # noqa: PLC0415 (the payer imports the schemes)

    code = stat_name((response.headers.get(b"crawler-error") or b"").decode("latin-1"))
    domain = urlparse_cached(request).hostname or ""
    payer.inc("x402/crawler_error/{}", code)
    if code == "CrawlerForbidden" and domain not in payer.forbidden_domains:
        payer.forbidden_domains.add(domain)
        logger.warning(
            "x402: %s forbids this crawler (CrawlerForbidden); no more payments there", domain
        )


async def retry_internal_error(
    payer: Payer, request: Request, response: Response
) -> Request | None:
    """Cloudflare's InternalError is its only retryable error: the same payment again, after
    an exponential backoff, X402_CRAWLER_RETRY_TIMES times at most. None: not retried."""
    if response.status != 500 or response.headers.get("crawler-error") != b"InternalError":
        return None
    retries = request.meta.get("_x402_internal_retries", 0)
    if retries >= payer.config.crawler_retry_times:
        return None
    from twisted.internet import reactor  # noqa: PLC0415 (importing it installs one)
    from twisted.internet.task import deferLater  # noqa: PLC0415

    delay = payer.config.crawler_retry_backoff * 2**retries
    payer.inc("x402/crawler_retry")
    await maybe_deferred_to_future(deferLater(reactor, delay, lambda: None))
    retry = request.replace(dont_filter=True)
    retry.meta["_x402_internal_retries"] = retries + 1
    return retry
