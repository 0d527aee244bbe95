"""The downloader middleware that signs requests with the crawler's Web Bot Auth identity."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.exceptions import IgnoreRequest, NotConfigured
from scrapy.utils.httpobj import urlparse_cached

from scrapy_x402._assets import CLOUDFLARE
from scrapy_x402._config import X402Config
from scrapy_x402._hosts import HostPatterns
from scrapy_x402._webbotauth import PAYMENT_HEADERS, SIGNATURE_HEADERS, BotIdentity, Unsignable

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)


def load_identity(config: X402Config) -> BotIdentity | None:
    if not config.bot_auth_key:
        return None
    return BotIdentity.load(
        config.bot_auth_key,
        agent=config.signature_agent,
        syntax=config.signature_agent_syntax,
        label=config.bot_auth_label,
        validity=config.bot_auth_validity,
    )


class X402BotAuthMiddleware:
    """Signs every request to X402_BOT_AUTH_DOMAINS, every request that carries a payment,
    and any request with ``meta["x402_sign"] = True`` (RFC 9421, tag web-bot-auth). Every
    request loses the signature headers it came with (an earlier attempt's, or those a redirect
    copied from another host's request) before it is signed again, or sent unsigned."""

    def __init__(self, crawler: Crawler):
        config = X402Config.from_settings(crawler.settings)
        if not config.enabled:
            raise NotConfigured("X402_ENABLED is False")
        identity = load_identity(config)
        if identity is None:
            raise NotConfigured  # opt-in: silent without X402_BOT_AUTH_KEY
        self.crawler = crawler
        self.identity = identity
        self.domains = HostPatterns(config.bot_auth_domains)
        self.stats = crawler.stats
        logger.info(
            "x402: signing requests as keyid %s, agent %s, for %s",
            identity.keyid,
            config.signature_agent,
            list(config.bot_auth_domains),
        )

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> X402BotAuthMiddleware:
        return cls(crawler)

    async def process_request(self, request: Request) -> None:
        for name in SIGNATURE_HEADERS:
            request.headers.pop(name, None)
        if not self._wanted(request):
            return
        headers = {
            k.decode("latin-1"): b", ".join(v).decode("latin-1") for k, v in request.headers.items()
        }
        try:
            added = self.identity.sign_request(request.method, request.url, headers)
        except Unsignable as e:
            await self._unsignable(request, str(e))
            return
        for name, value in added.items():
            request.headers[name] = value
        self.stats.inc_value("x402/bot_auth/signed")

    def _wanted(self, request: Request) -> bool:
        if request.meta.get("x402_sign") or self.domains.match(
            urlparse_cached(request).hostname or ""
        ):
            return True
        return any(name in request.headers for name in PAYMENT_HEADERS)

    async def _unsignable(self, request: Request, reason: str) -> None:
        """Sent unsigned, said and counted; but a payment that only a signature binds to the
        crawler (Cloudflare's) never leaves without it: the request is dropped, and its
        payment recorded as never sent."""
        from scrapy_x402._payer import Payer, is_paid  # noqa: PLC0415 (the payer imports us)

        self.stats.inc_value("x402/bot_auth/unsignable")
        payment = request.meta.get("x402_payment")
        if is_paid(request) and isinstance(payment, dict) and payment.get("network") == CLOUDFLARE:
            logger.warning(
                "x402: cannot sign %s (%s); its payment needs the signature: not sent",
                _shown(request),
                reason,
            )
            await Payer.for_crawler(self.crawler).unsent(request, "unsignable")
            raise IgnoreRequest("x402: unsignable request with a Cloudflare payment")
        logger.warning("x402: cannot sign %s (%s); sent unsigned", _shown(request), reason)


def _shown(request: Request) -> str:
    """The request for a log line: cut short, non-printable characters escaped."""
    return repr(f"{request.method} {request.url}"[:200])
