"""The ``exact`` scheme on EVM: a signed transfer of the exact price that the server's
facilitator submits on-chain, by EIP-3009 TransferWithAuthorization (the default) or by Permit2
(``extra.assetTransferMethod = "permit2"``). Money moves at once; anyone holding the signature
can submit it until it expires, so an unconfirmed one stays counted until then."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scrapy_x402._chain import authorization_used
from scrapy_x402._networks import evm_chain_id
from scrapy_x402._protocol import Offer
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import (
    Confirmation,
    SignedPayment,
    X402Scheme,
    hex0x,
    random_nonce,
    settled_transaction,
    validity,
)
from scrapy_x402.schemes._eip712 import (
    address_word,
    bytes32,
    digest,
    domain_separator,
    keccak,
    signer_for,
    word,
)
from scrapy_x402.schemes._permit2 import (
    EXACT_PROXY,
    EXACT_WITNESS,
    Permit2Allowances,
    Permit2Spending,
    permit2_collected,
    sign_permit2,
)

TRANSFER_WITH_AUTHORIZATION = [
    {"name": "from", "type": "address"},
    {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"},
    {"name": "nonce", "type": "bytes32"},
]
TOKEN_DOMAIN = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
CLOCK_SKEW = 600  # validAfter lies this far in the past, so a server's slow clock still accepts


def authorization_typed_data(
    authorization: Mapping[str, Any], chain_id: int, token: str, name: str, version: str
) -> dict[str, Any]:
    message = {k: authorization[k] for k in ("from", "to")}
    message.update({k: int(authorization[k]) for k in ("value", "validAfter", "validBefore")})
    message["nonce"] = bytes.fromhex(str(authorization["nonce"])[2:])
    return {
        "types": {
            "EIP712Domain": TOKEN_DOMAIN,
            "TransferWithAuthorization": TRANSFER_WITH_AUTHORIZATION,
        },
        "primaryType": "TransferWithAuthorization",
        "domain": {
            "name": name,
            "version": version,
            "chainId": chain_id,
            "verifyingContract": token,
        },
        "message": message,
    }


TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


def authorization_digest(
    authorization: Mapping[str, Any], chain_id: int, token: str, name: str, version: str
) -> bytes:
    """The EIP-712 digest of ``authorization_typed_data``, computed directly (hot path)."""
    struct_hash = keccak(
        TRANSFER_WITH_AUTHORIZATION_TYPEHASH
        + address_word(authorization["from"])
        + address_word(authorization["to"])
        + word(int(authorization["value"]))
        + word(int(authorization["validAfter"]))
        + word(int(authorization["validBefore"]))
        + bytes32(authorization["nonce"])
    )
    return digest(domain_separator(name, version, chain_id, token), struct_hash)


def _uses_permit2(offer: Offer) -> bool:
    return offer.extra.get("assetTransferMethod") == "permit2"


class ExactScheme(Permit2Spending, X402Scheme):
    name = "exact"

    held_until_expiry = True
    needs_wallet = True

    def __init__(self, permit2: Permit2Allowances | None = None):
        self.permit2 = permit2

    def _uses_permit2(self, offer: Offer) -> bool:
        return _uses_permit2(offer)

    def refusal(self, offer: Offer) -> str | None:
        if evm_chain_id(offer.network) is None:
            return "network"
        method = offer.extra.get("assetTransferMethod", "eip3009")
        if method == "permit2":
            if self.permit2 is None:
                return "transfer_method_permit2"
            return self.permit2.refusal(offer.network, offer.asset, offer.amount)
        if method != "eip3009":
            return f"transfer_method_{method}"[:40]
        if not isinstance(offer.extra.get("name"), str) or not isinstance(
            offer.extra.get("version"), str
        ):
            return "token_domain_unknown"  # extra.name/version: the token's EIP-712 domain
        return None

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment:
        chain_id = evm_chain_id(offer.network)
        assert chain_id is not None
        if _uses_permit2(offer):
            assert self.permit2 is not None
            self.permit2.spend(offer.network, offer.asset, offer.amount)
            witness = {"to": offer.pay_to, "validAfter": now - CLOCK_SKEW}
            return sign_permit2(
                account,
                chain_id,
                offer.asset,
                offer.amount,
                EXACT_PROXY,
                validity(offer, now, max_timeout),
                witness,
                EXACT_WITNESS,
            )
        authorization = {
            "from": account.address,
            "to": offer.pay_to,
            "value": str(offer.amount),
            "validAfter": str(now - CLOCK_SKEW),
            "validBefore": str(validity(offer, now, max_timeout)),
            "nonce": random_nonce(),
        }
        message_digest = authorization_digest(
            authorization, chain_id, offer.asset, offer.extra["name"], offer.extra["version"]
        )
        signature = signer_for(bytes(account.key)).sign(message_digest)
        payload = {"signature": hex0x(signature), "authorization": authorization}
        return SignedPayment(hex0x(message_digest), payload, int(authorization["validBefore"]))

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """A receipt saying it succeeded, with the transaction that moved the money."""
        transaction = settled_transaction(receipt)
        return Confirmation(Status.SETTLED, transaction) if transaction else None

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        if "permit2Authorization" in payload:
            return permit2_collected(w3, payload)
        authorization = payload["authorization"]
        return authorization_used(w3, asset, authorization["from"], authorization["nonce"])
