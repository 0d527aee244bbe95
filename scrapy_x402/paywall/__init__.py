"""The publisher's side of the ``deferred`` scheme.

``DeferredVerifier`` checks payment headers with signature recovery alone (no chain access)
and can be called from any Python web server; ``PaywallResource`` protects a Twisted resource
with it; ``PayerPolicy`` decides to whom it extends credit; ``reconcile`` tells which
commitments a settlement transfer pays. docs/deferred-scheme.md specifies what they check.
"""

from scrapy_x402.paywall._book import STATUS_PATH, CommitmentBook, CommitmentStatusResource, Debt
from scrapy_x402.paywall._policy import PayerPolicy
from scrapy_x402.paywall._reconcile import Reconciliation, reconcile, reconcile_transaction
from scrapy_x402.paywall._resource import PaywallResource, Policy, request_url
from scrapy_x402.paywall._verifier import (
    DeferredVerifier,
    MemoryNonceStore,
    NonceStore,
    PaymentRejected,
    SQLiteNonceStore,
)
from scrapy_x402.schemes.deferred import (
    MAX_SETTLEMENT_IDS,
    Commitment,
    settlement_ids,
    settlement_reference,
)

__all__ = [
    "MAX_SETTLEMENT_IDS",
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
    "Reconciliation",
    "SQLiteNonceStore",
    "reconcile",
    "reconcile_transaction",
    "request_url",
    "settlement_ids",
    "settlement_reference",
]
