"""The ``upto`` scheme on EVM: a Permit2 transfer of at most the offered amount that only the
named facilitator can execute; the server charges what the request actually cost and reports
it in the receipt. The budget reserves the maximum and is trued up to the receipt."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from eth_utils import is_hex_address, to_checksum_address

from scrapy_x402._chain import transferred
from scrapy_x402._networks import evm_chain_id
from scrapy_x402._protocol import Offer
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import (
    Confirmation,
    SignedPayment,
    X402Scheme,
    settled_transaction,
    validity,
)
from scrapy_x402.schemes._permit2 import (
    UPTO_PROXY,
    UPTO_WITNESS,
    Permit2Allowances,
    Permit2Spending,
    permit2_collected,
    sign_permit2,
)
from scrapy_x402.schemes.exact import CLOCK_SKEW

logger = logging.getLogger(__name__)


class UptoScheme(Permit2Spending, X402Scheme):
    name = "upto"

    held_until_expiry = True
    needs_wallet = True

    def __init__(self, permit2: Permit2Allowances | None = None):
        self.permit2 = permit2

    def refusal(self, offer: Offer) -> str | None:
        if evm_chain_id(offer.network) is None:
            return "network"
        facilitator = offer.extra.get("facilitatorAddress")
        if not (isinstance(facilitator, str) and is_hex_address(facilitator)):
            return "upto_no_facilitator"
        if self.permit2 is None:
            return "permit2_no_rpc"
        return self.permit2.refusal(offer.network, offer.asset, offer.amount)

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment:
        chain_id = evm_chain_id(offer.network)
        assert chain_id is not None and self.permit2 is not None
        self.permit2.spend(offer.network, offer.asset, offer.amount)
        witness = {
            "to": offer.pay_to,
            "facilitator": to_checksum_address(offer.extra["facilitatorAddress"]),
            "validAfter": now - CLOCK_SKEW,
        }
        return sign_permit2(
            account,
            chain_id,
            offer.asset,
            offer.amount,
            UPTO_PROXY,
            validity(offer, now, max_timeout),
            witness,
            UPTO_WITNESS,
        )

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """Settled, for the amount the receipt reports (never more than was signed)."""
        transaction = settled_transaction(receipt)
        if transaction is None:
            return None
        reported = str((receipt or {}).get("amount", ""))
        if not reported.isdigit() or int(reported) > signed_amount:
            # The chain cannot have moved more than was signed; without a usable amount the
            # whole maximum stays counted.
            logger.warning(
                "x402: upto receipt for %s reports amount %r; counting the maximum",
                payment_id,
                reported[:40],
            )
            return Confirmation(Status.SETTLED, transaction)
        return Confirmation(Status.SETTLED, transaction, int(reported))

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        return permit2_collected(w3, payload)

    def charged(
        self, w3: Any, asset: str, payee: str, payload: Mapping[str, Any], transaction: str
    ) -> int | None:
        """A receipt's amount is the server's word: what counts is what the transaction that
        spent this signature moved to the payee."""
        payer = payload["permit2Authorization"]["from"]
        signature = bytes.fromhex(payload["signature"][2:])
        return transferred(w3, transaction, asset, payer, payee, signature)
