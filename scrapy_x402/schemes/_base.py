from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from scrapy_x402._protocol import payment_header

if TYPE_CHECKING:
    from scrapy_x402._protocol import Challenge, Offer


@dataclass(frozen=True)
class SignedPayment:
    id: str  # ledger id of the payment: the digest that was signed
    payload: dict[str, Any]  # the scheme payload placed in the payment header
    valid_until: int  # after this, the signature can no longer be collected


@dataclass(frozen=True)
class Confirmation:
    status: str  # the ledger status the receipt proves: accepted (owed) or settled
    transaction: str | None = None
    amount: int | None = None  # what was actually charged, when less than signed (upto)


class Scheme(Protocol):
    name: str
    # True when anyone holding the signature can collect it until it expires (exact):
    # then a payment that was not confirmed stays counted against the budget until then.
    held_until_expiry: bool
    needs_wallet: bool  # signs with the EVM wallet (else Cloudflare bills the operator)
    # A receipt may report less than was signed, and the chain shows what moved (upto).
    charge_on_chain: bool

    def refusal(self, offer: Offer) -> str | None:
        """Why this scheme cannot pay ``offer``, or None when it can."""

    async def prepare(self, offer: Offer) -> None:
        """Read what ``refusal`` needs to know about ``offer`` from the chain (off the reactor)."""

    def discard(self, offer: Offer) -> None:
        """A signature for ``offer`` was never sent: give back what signing it took."""

    def expired(self, network: str, payload: Mapping[str, Any]) -> None:
        """A held signature expired unused: give back what signing it took."""

    def charged(
        self, w3: Any, asset: str, payee: str, payload: Mapping[str, Any], transaction: str
    ) -> int | None:
        """What the chain shows a settled payment cost, when a receipt says less than was
        signed; None: it cannot tell, and the whole signed amount stays counted."""

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment: ...

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """What a success response's receipt proves about the payment, if anything."""

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        """For a held payment: whether the chain shows its signature used."""

    def headers(
        self,
        challenge: Challenge,
        offer: Offer,
        signed: SignedPayment,
        extensions: Mapping[str, Any],
    ) -> dict[str, str]:
        """The request headers that carry the payment."""


class SchemeBase:
    """Hooks a scheme needs only when it reads the chain or spends an allowance."""

    charge_on_chain = False

    async def prepare(self, offer: Offer) -> None:
        return None

    def discard(self, offer: Offer) -> None:
        return None

    def expired(self, network: str, payload: Mapping[str, Any]) -> None:
        return None

    def charged(
        self, w3: Any, asset: str, payee: str, payload: Mapping[str, Any], transaction: str
    ) -> int | None:
        return None


class X402Scheme(SchemeBase):
    """Schemes paid with an x402 payment header (v2 PAYMENT-SIGNATURE, v1 X-PAYMENT)."""

    def headers(
        self,
        challenge: Challenge,
        offer: Offer,
        signed: SignedPayment,
        extensions: Mapping[str, Any],
    ) -> dict[str, str]:
        name, value = payment_header(challenge, offer, signed.payload, extensions)
        return {name: value}


def hex0x(data: bytes) -> str:
    return "0x" + bytes(data).hex()


def random_nonce() -> str:
    return "0x" + os.urandom(32).hex()


def validity(offer: Offer, now: int, max_timeout: int) -> int:
    """When a signature for ``offer`` stops being valid: the offer's timeout, capped."""
    return now + min(offer.max_timeout_seconds or max_timeout, max_timeout)


_BYTES32 = re.compile(r"0x[0-9a-fA-F]{64}")


def is_bytes32(value: Any) -> bool:
    """0x and 64 hex digits, nothing else (fullmatch: ``bytes.fromhex`` would skip spaces,
    ``$`` would allow a final newline): hashes, nonces, salts, ids."""
    return isinstance(value, str) and _BYTES32.fullmatch(value) is not None


def settled_transaction(receipt: Mapping[str, Any] | None) -> str | None:
    """The transaction of a SettlementResponse that says the payment succeeded on-chain."""
    receipt = receipt or {}
    transaction = receipt.get("transaction")
    if receipt.get("success") is True and is_bytes32(transaction):
        return str(transaction).lower()
    return None
