from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy_x402._botauth import X402BotAuthMiddleware
from scrapy_x402._extension import X402Settlement
from scrapy_x402._middleware import X402DownloaderMiddleware, X402SigningMiddleware
from scrapy_x402._receipts import X402ReceiptMiddleware

if TYPE_CHECKING:
    from scrapy.settings import BaseSettings

# After RetryMiddleware (550) in the response chain, so a paid request that fails is judged
# on its final response, and Retry resends the same payment rather than a new one.
DOWNLOADER_MIDDLEWARE_PRIORITY = 545
# After HttpCacheMiddleware (900) in the request chain, so a request the cache answers is never
# paid; before the Web Bot Auth signer, which covers the payment headers.
SIGNING_MIDDLEWARE_PRIORITY = 950
# Late in the request chain, so that it signs the request as it leaves.
BOT_AUTH_MIDDLEWARE_PRIORITY = 960
SPIDER_MIDDLEWARE_PRIORITY = 800
EXTENSION_PRIORITY = 0


class Addon:
    """``ADDONS = {"scrapy_x402.Addon": 500}`` enables every scrapy-x402 component."""

    def update_settings(self, settings: BaseSettings) -> None:
        settings.setdefault_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", X402DownloaderMiddleware, DOWNLOADER_MIDDLEWARE_PRIORITY
        )
        settings.setdefault_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", X402SigningMiddleware, SIGNING_MIDDLEWARE_PRIORITY
        )
        settings.setdefault_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", X402BotAuthMiddleware, BOT_AUTH_MIDDLEWARE_PRIORITY
        )
        settings.setdefault_in_component_priority_dict(
            "SPIDER_MIDDLEWARES", X402ReceiptMiddleware, SPIDER_MIDDLEWARE_PRIORITY
        )
        settings.setdefault_in_component_priority_dict(
            "EXTENSIONS", X402Settlement, EXTENSION_PRIORITY
        )
