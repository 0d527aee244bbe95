"""Payment schemes the crawler can pay with, by their x402 ``scheme`` name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scrapy_x402.schemes._base import Confirmation, Scheme, SignedPayment
from scrapy_x402.schemes._permit2 import Permit2Allowances
from scrapy_x402.schemes.batch_settlement import BatchSettlementScheme
from scrapy_x402.schemes.deferred import DeferredScheme
from scrapy_x402.schemes.exact import ExactScheme
from scrapy_x402.schemes.pay_per_crawl import PayPerCrawlScheme
from scrapy_x402.schemes.upto import UptoScheme

if TYPE_CHECKING:
    from scrapy_x402._chain import ChainReader

SCHEME_NAMES = ("deferred", "exact", "upto", "batch-settlement", "pay-per-crawl")
_CLASSES = (DeferredScheme, ExactScheme, UptoScheme, BatchSettlementScheme, PayPerCrawlScheme)
# Signed transfers anyone holding the signature can collect until they expire.
HELD_SCHEMES = frozenset(s.name for s in _CLASSES if s.held_until_expiry)


def build_schemes(
    chain: ChainReader,
    payer: str,
    *,
    bot_identity: bool = False,
    price_header: str = "crawler-max-price",
) -> dict[str, Scheme]:
    """The schemes of one crawl; Permit2 payments share one view of the wallet's allowances."""
    permit2 = Permit2Allowances(chain, payer)
    return {
        "deferred": DeferredScheme(),
        "exact": ExactScheme(permit2),
        "upto": UptoScheme(permit2),
        "batch-settlement": BatchSettlementScheme(bot_identity),
        "pay-per-crawl": PayPerCrawlScheme(price_header, bot_identity),
    }


__all__ = [
    "HELD_SCHEMES",
    "SCHEME_NAMES",
    "BatchSettlementScheme",
    "Confirmation",
    "DeferredScheme",
    "ExactScheme",
    "PayPerCrawlScheme",
    "Scheme",
    "SignedPayment",
    "UptoScheme",
    "build_schemes",
]
