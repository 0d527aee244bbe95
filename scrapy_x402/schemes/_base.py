from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping

    from scrapy_x402._protocol import Offer


@dataclass(frozen=True)
class SignedPayment:
    id: str  # ledger id of the payment: the digest that was signed
    payload: dict[str, Any]  # the scheme payload placed in the payment header
    valid_until: int  # after this, the signature can no longer be collected


@dataclass(frozen=True)
class Confirmation:
    status: str  # the ledger status the receipt proves: accepted (owed) or settled
    transaction: str | None = None


class Scheme(Protocol):
    name: str
    # True when anyone holding the signature can collect it until it expires (exact):
    # then a payment that was not confirmed stays counted against the budget until then.
    held_until_expiry: bool

    def refusal(self, offer: Offer) -> str | None:
        """Why this scheme cannot pay ``offer``, or None when it can."""

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment: ...

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str
    ) -> Confirmation | None:
        """What a success response's receipt proves about the payment, if anything."""


def hex0x(data: bytes) -> str:
    return "0x" + bytes(data).hex()


def random_nonce() -> str:
    return "0x" + os.urandom(32).hex()


def validity(offer: Offer, now: int, max_timeout: int) -> int:
    """When a signature for ``offer`` stops being valid: the offer's timeout, capped."""
    return now + min(offer.max_timeout_seconds or max_timeout, max_timeout)
