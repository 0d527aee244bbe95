"""Payment schemes the crawler can pay with, by their x402 ``scheme`` name."""

from __future__ import annotations

from scrapy_x402.schemes.deferred import DeferredScheme, SignedPayment

SCHEMES = {DeferredScheme.name: DeferredScheme()}

__all__ = ["SCHEMES", "DeferredScheme", "SignedPayment"]
