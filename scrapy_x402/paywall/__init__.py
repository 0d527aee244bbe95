"""The publisher's side of the ``deferred`` scheme.

``DeferredVerifier`` checks payment headers with signature recovery alone (no chain access)
and can be called from any Python web server; ``PaywallResource`` protects a Twisted resource
with it. docs/deferred-scheme.md specifies what both check.
"""

from scrapy_x402.paywall._book import STATUS_PATH, CommitmentBook, CommitmentStatusResource
from scrapy_x402.paywall._resource import PaywallResource
from scrapy_x402.paywall._verifier import (
    DeferredVerifier,
    MemoryNonceStore,
    NonceStore,
    PaymentRejected,
    SQLiteNonceStore,
)
from scrapy_x402.schemes.deferred import Commitment, settlement_reference

__all__ = [
    "STATUS_PATH",
    "Commitment",
    "CommitmentBook",
    "CommitmentStatusResource",
    "DeferredVerifier",
    "MemoryNonceStore",
    "NonceStore",
    "PaymentRejected",
    "PaywallResource",
    "SQLiteNonceStore",
    "settlement_reference",
]
