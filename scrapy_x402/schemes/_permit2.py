"""Permit2 signature transfers, as x402's `exact` (assetTransferMethod permit2) and `upto`
schemes use them: a PermitWitnessTransferFrom whose spender is one of x402's proxies."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from eth_account.messages import encode_typed_data
from web3 import Web3

from scrapy_x402._chain import PERMIT2, ChainReader, permit2_nonce_used, token_allowance
from scrapy_x402.schemes._base import SignedPayment, hex0x

logger = logging.getLogger(__name__)

EXACT_PROXY = "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"
UPTO_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
EXACT_WITNESS = [{"name": "to", "type": "address"}, {"name": "validAfter", "type": "uint256"}]
UPTO_WITNESS = [
    {"name": "to", "type": "address"},
    {"name": "facilitator", "type": "address"},
    {"name": "validAfter", "type": "uint256"},
]
_TYPES = {
    "EIP712Domain": [  # Permit2's domain has no version
        {"name": "name", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "PermitWitnessTransferFrom": [
        {"name": "permitted", "type": "TokenPermissions"},
        {"name": "spender", "type": "address"},
        {"name": "nonce", "type": "uint256"},
        {"name": "deadline", "type": "uint256"},
        {"name": "witness", "type": "Witness"},
    ],
    "TokenPermissions": [
        {"name": "token", "type": "address"},
        {"name": "amount", "type": "uint256"},
    ],
}


def sign_permit2(
    account: Any,
    chain_id: int,
    token: str,
    amount: int,
    spender: str,
    deadline: int,
    witness: dict[str, Any],
    witness_type: list[dict[str, str]],
) -> SignedPayment:
    """Sign a transfer of at most ``amount`` of ``token`` that only ``spender`` can execute,
    before ``deadline``, bound to ``witness``. Payload as x402's reference clients send it."""
    nonce = int.from_bytes(os.urandom(32), "big")
    typed = {
        "types": {**_TYPES, "Witness": witness_type},
        "primaryType": "PermitWitnessTransferFrom",
        "domain": {"name": "Permit2", "chainId": chain_id, "verifyingContract": PERMIT2},
        "message": {
            "permitted": {"token": token, "amount": amount},
            "spender": spender,
            "nonce": nonce,
            "deadline": deadline,
            "witness": witness,
        },
    }
    signed = account.sign_message(encode_typed_data(full_message=typed))
    authorization = {
        "from": account.address,
        "permitted": {"token": token, "amount": str(amount)},
        "spender": spender,
        "nonce": str(nonce),
        "deadline": str(deadline),
        "witness": {k: str(v) if isinstance(v, int) else v for k, v in witness.items()},
    }
    return SignedPayment(
        hex0x(signed.message_hash),
        {"permit2Authorization": authorization, "signature": hex0x(signed.signature)},
        deadline,
    )


class Permit2Allowances:
    """What the wallet has allowed Permit2 to move, per (network, token): read from the chain
    once, then reduced by every Permit2 payment signed in this crawl."""

    UNLIMITED = 2**255  # an `approve(max)` is treated as never running out

    def __init__(self, chain: ChainReader, payer: str):
        self.chain = chain
        self.payer = payer
        self._left: dict[tuple[str, str], int] = {}
        self._warned: set[tuple[str, str]] = set()

    def refusal(self, network: str, token: str, amount: int) -> str | None:
        key = (network, token)
        if key not in self._left:
            w3 = self.chain.get(network)
            if w3 is None:
                return self._refuse(
                    key, "permit2_no_rpc", f"X402_RPC_URLS has no URL for {network}"
                )
            self._left[key] = token_allowance(w3, token, self.payer, PERMIT2)
        if self._left[key] < amount:
            return self._refuse(
                key,
                "permit2_allowance",
                f"the wallet allows Permit2 ({PERMIT2}) to move {self._left[key]} of {token}; "
                "approve Permit2 for that token to pay these offers",
            )
        return None

    def spend(self, network: str, token: str, amount: int) -> None:
        if self._left[(network, token)] < self.UNLIMITED:
            self._left[(network, token)] -= amount

    def _refuse(self, key: tuple[str, str], reason: str, why: str) -> str:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("x402: Permit2 offers for %s on %s are skipped: %s", key[1], key[0], why)
        return reason


def permit2_collected(w3: Web3, payload: Mapping[str, Any]) -> bool:
    authorization = payload["permit2Authorization"]
    return permit2_nonce_used(w3, authorization["from"], int(authorization["nonce"]))
