"""Permit2 signature transfers, as x402's `exact` (assetTransferMethod permit2) and `upto`
schemes use them: a PermitWitnessTransferFrom whose spender is one of x402's proxies."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from eth_account.messages import encode_typed_data
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from web3 import Web3

from scrapy_x402._chain import PERMIT2, ChainReader, permit2_nonce_used, token_allowance
from scrapy_x402._redact import redact
from scrapy_x402.schemes._base import SignedPayment, hex0x

if TYPE_CHECKING:
    from scrapy_x402._protocol import Offer

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
    once (in a thread), then reduced by every Permit2 payment signed in this crawl and given
    back for those never sent. A read that fails is not retried for RETRY_AFTER seconds:
    meanwhile those offers are refused, each refusal counted, without a chain call."""

    UNLIMITED = 2**255  # an `approve(max)` is treated as never running out
    RETRY_AFTER = 60.0

    def __init__(self, chain: ChainReader, payer: str):
        self.chain = chain
        self.payer = payer
        self._left: dict[tuple[str, str], int] = {}
        self._failed: dict[tuple[str, str], float] = {}  # when a read last failed
        self._reading: dict[tuple[str, str], Deferred[None]] = {}
        self._warned: set[tuple[str, str]] = set()

    async def load(self, network: str, token: str) -> None:
        """Read the allowance, unless known, being read, or failed less than RETRY_AFTER ago."""
        key = (network, token)
        if key in self._left or time.monotonic() - self._failed.get(key, -1e9) < self.RETRY_AFTER:
            return
        if key not in self._reading:
            self._reading[key] = deferToThread(self._read, key)
        waiter: Deferred[None] = Deferred()
        self._reading[key].addBoth(lambda _: waiter.callback(None))
        await maybe_deferred_to_future(waiter)

    def _read(self, key: tuple[str, str]) -> None:
        try:
            w3 = self.chain.get(key[0])
            if w3 is not None:
                self._left[key] = token_allowance(w3, key[1], self.payer, PERMIT2)
        except Exception as e:
            self._failed[key] = time.monotonic()
            logger.warning(
                "x402: cannot read the wallet's Permit2 allowance for %s on %s (%s); "
                "Permit2 offers there are refused for %d s",
                key[1],
                key[0],
                redact(str(e), self.chain.rpc_urls.values()),
                self.RETRY_AFTER,
            )
        finally:
            self._reading.pop(key, None)

    def refusal(self, network: str, token: str, amount: int) -> str | None:
        key = (network, token)
        if network not in self.chain.rpc_urls:
            return self._refuse(key, "permit2_no_rpc", f"X402_RPC_URLS has no URL for {network}")
        if key not in self._left:
            return "permit2_allowance_unknown"  # the read failed (or was never made)
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

    def give_back(self, network: str, token: str, amount: int) -> None:
        if (network, token) in self._left and self._left[(network, token)] < self.UNLIMITED:
            self._left[(network, token)] += amount

    def give_back_signed(self, network: str, payload: Mapping[str, Any]) -> None:
        permitted = payload["permit2Authorization"]["permitted"]
        self.give_back(network, permitted["token"], int(permitted["amount"]))

    def _refuse(self, key: tuple[str, str], reason: str, why: str) -> str:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("x402: Permit2 offers for %s on %s are skipped: %s", key[1], key[0], why)
        return reason


class Permit2Spending:
    """What ``exact`` (with assetTransferMethod permit2) and ``upto`` share: the wallet's
    Permit2 allowance, read off the reactor, spent by signing, given back for signatures never
    sent or expired unused."""

    permit2: Permit2Allowances | None

    def _uses_permit2(self, offer: Offer) -> bool:
        return True

    async def prepare(self, offer: Offer) -> None:
        if self.permit2 is not None and self._uses_permit2(offer):
            await self.permit2.load(offer.network, offer.asset)

    def discard(self, offer: Offer) -> None:
        if self.permit2 is not None and self._uses_permit2(offer):
            self.permit2.give_back(offer.network, offer.asset, offer.amount)

    def expired(self, network: str, payload: Mapping[str, Any]) -> None:
        if self.permit2 is not None and "permit2Authorization" in payload:
            self.permit2.give_back_signed(network, payload)


def permit2_collected(w3: Web3, payload: Mapping[str, Any]) -> bool:
    authorization = payload["permit2Authorization"]
    return permit2_nonce_used(w3, authorization["from"], int(authorization["nonce"]))
