from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping

from twisted.web.server import Request

from scrapy_x402.paywall._book import CommitmentBook
from scrapy_x402.paywall._verifier import NonceStore
from scrapy_x402.schemes.deferred import Commitment


class PayerPolicy:
    """A ready-made ``PaywallResource`` policy: to whom the publisher extends credit.

    Each rule is off unless given; the first that fails is the 402's errorReason:

    - ``payers``: only these addresses may pay (``payer_not_allowed``);
    - ``identity`` and ``identities``: ``identity(request)`` returns the request's verified
      Web Bot Auth key id (None: unsigned or not verified), ``identities`` maps a key id to
      the payer addresses it may pay with; every payer must come with such an identity
      (``identity_required``, ``identity_mismatch``);
    - ``max_debt_age``: refuse a payer who still owes a page served more than this many
      seconds ago (``overdue_debt``);
    - ``credit_limit``: refuse a commitment that would take what the payer owes, unpaid, in
      its token past this many atomic units (``credit_limit_exceeded``).

    Debts are read from ``book``: commitments served and not yet marked paid by
    reconciliation. With ``nonces`` (the verifiers' nonce store), the payer's commitments
    still in flight count too, each at the price of the one being decided, so concurrent
    requests cannot pass the limit together (within one process; processes sharing a
    SQLiteNonceStore may each let one through at the same instant).
    """

    def __init__(
        self,
        book: CommitmentBook | None = None,
        *,
        payers: Collection[str] | None = None,
        credit_limit: int | None = None,
        max_debt_age: float | None = None,
        identity: Callable[[Request], str | None] | None = None,
        identities: Mapping[str, Collection[str]] | None = None,
        nonces: NonceStore | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if book is None and (credit_limit is not None or max_debt_age is not None):
            raise ValueError("credit_limit and max_debt_age read debts from a CommitmentBook")
        if (identity is None) != (identities is None):
            raise ValueError("identity and identities go together")
        self.book = book
        self.payers = None if payers is None else {p.lower() for p in payers}
        self.credit_limit = credit_limit
        self.max_debt_age = max_debt_age
        self.identity = identity
        self.identities = {k: {p.lower() for p in v} for k, v in (identities or {}).items()}
        self.nonces = nonces
        self._clock = clock

    def __call__(self, commitment: Commitment, request: Request) -> str | None:
        payer = commitment.payer.lower()
        if self.payers is not None and payer not in self.payers:
            return "payer_not_allowed"
        if self.identity is not None:
            keyid = self.identity(request)
            if keyid is None:
                return "identity_required"
            if payer not in self.identities.get(keyid, ()):
                return "identity_mismatch"
        if self.book is None:
            return None
        debt = self.book.debt(commitment.payer, commitment.chain_id, commitment.token)
        if (
            self.max_debt_age is not None
            and debt.since is not None
            and debt.since < self._clock() - self.max_debt_age
        ):
            return "overdue_debt"
        if self.credit_limit is not None:
            in_flight = self.nonces.in_flight_count(payer) if self.nonces is not None else 0
            if debt.total + (in_flight + 1) * commitment.amount > self.credit_limit:
                return "credit_limit_exceeded"
        return None
