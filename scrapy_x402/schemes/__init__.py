"""Payment schemes the crawler can pay with, by their x402 ``scheme`` name."""

from __future__ import annotations

from scrapy_x402.schemes._base import Confirmation, Scheme, SignedPayment
from scrapy_x402.schemes.deferred import DeferredScheme
from scrapy_x402.schemes.exact import ExactScheme

SCHEMES: dict[str, Scheme] = {s.name: s for s in (DeferredScheme(), ExactScheme())}

__all__ = ["SCHEMES", "Confirmation", "DeferredScheme", "ExactScheme", "Scheme", "SignedPayment"]
