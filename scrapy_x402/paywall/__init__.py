"""The publisher's side of the ``deferred`` scheme.

``DeferredVerifier`` checks payment headers with signature recovery alone (no chain access)
and can be called from any Python web server; ``PaywallResource`` protects a Twisted resource
with it; ``PayerPolicy`` decides to whom it extends credit. docs/deferred-scheme.md
specifies what they check.
"""

from scrapy_x402.paywall._book import STATUS_PATH, CommitmentBook, CommitmentStatusResource, Debt
from scrapy_x402.paywall._policy import PayerPolicy
from scrapy_x402.paywall._resource import PaywallResource, Policy, request_url
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
    "Debt",
    "DeferredVerifier",
    "MemoryNonceStore",
    "NonceStore",
    "PayerPolicy",
    "PaymentRejected",
    "PaywallResource",
    "Policy",
    "SQLiteNonceStore",
    "request_url",
    "settlement_reference",
]
