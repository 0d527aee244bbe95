"""scrapy-x402: pay per page in Scrapy crawls with x402."""

from scrapy_x402._addon import Addon
from scrapy_x402._botauth import X402BotAuthMiddleware
from scrapy_x402._config import X402Config
from scrapy_x402._extension import X402Settlement
from scrapy_x402._middleware import X402DownloaderMiddleware, X402SigningMiddleware
from scrapy_x402._protocol import Challenge, InvalidChallenge, Offer, parse_challenge
from scrapy_x402._receipts import X402ReceiptMiddleware
from scrapy_x402._version import __version__

__all__ = [
    "Addon",
    "Challenge",
    "InvalidChallenge",
    "Offer",
    "X402BotAuthMiddleware",
    "X402Config",
    "X402DownloaderMiddleware",
    "X402ReceiptMiddleware",
    "X402Settlement",
    "X402SigningMiddleware",
    "__version__",
    "parse_challenge",
]
