"""The ``upto`` scheme on EVM: a Permit2 transfer of at most the offered amount that only the
named facilitator can execute; the server charges what the request actually cost and reports
it in the receipt. The budget reserves the maximum and is trued up to the receipt."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import is_hex_address, to_checksum_address

from scrapy_x402._networks import evm_chain_id
from scrapy_x402._protocol import InvalidChallenge, Offer, parse_atomic
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import (
    Confirmation,
    SignedPayment,
    X402Scheme,
    settled_transaction,
    validity,
)
from scrapy_x402.schemes._eip712 import keccak
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

# x402UptoPermit2Proxy.settle(permit, amount, owner, witness, signature)
SETTLE_ARGUMENTS = [
    "((address,uint256),uint256,uint256)",
    "uint256",
    "address",
    "(address,address,uint256)",
    "bytes",
]
SETTLE_SELECTOR = keccak(
    b"settle(((address,uint256),uint256,uint256),uint256,address,(address,address,uint256),bytes)"
)[:4]


class UptoScheme(Permit2Spending, X402Scheme):
    name = "upto"

    held_until_expiry = True
    needs_wallet = True
    charge_on_chain = True

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
        reported = (receipt or {}).get("amount")
        try:
            amount = parse_atomic(reported, "upto receipt amount", 0, signed_amount)
        except InvalidChallenge:
            # The chain cannot have moved more than was signed; without a usable amount the
            # whole maximum stays counted.
            logger.warning(
                "x402: upto receipt for %s reports amount %r; counting the maximum",
                payment_id,
                str(reported)[:40],
            )
            return Confirmation(Status.SETTLED, transaction)
        return Confirmation(Status.SETTLED, transaction, amount)

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        return permit2_collected(w3, payload)

    def charged(
        self, w3: Any, asset: str, payee: str, payload: Mapping[str, Any], transaction: str
    ) -> int | None:
        """A receipt's amount is the server's word. What counts is the amount of the upto
        proxy's ``settle`` call in ``transaction``, when that call spent exactly this signature
        (same owner, nonce, signature, payee) and succeeded; else None (the maximum stays)."""
        tx = w3.eth.get_transaction(transaction)
        data = bytes(tx["input"])
        if (tx["to"] or "").lower() != UPTO_PROXY.lower() or data[:4] != SETTLE_SELECTOR:
            return None
        permit, amount, owner, witness, signature = abi_decode(SETTLE_ARGUMENTS, data[4:])
        authorization = payload["permit2Authorization"]
        ours = (
            authorization["from"].lower(),
            int(authorization["nonce"]),
            payee.lower(),
            bytes.fromhex(payload["signature"][2:]),
        )
        if (owner.lower(), permit[1], witness[0].lower(), signature) != ours:
            return None
        if w3.eth.get_transaction_receipt(transaction)["status"] != 1:
            return None
        return int(amount)
