"""The ``deferred`` scheme on EVM: signed commitments now, one bulk transfer per payee later.

docs/deferred-scheme.md is the specification; this module is both sides' implementation of
its EIP-712 part: building, signing, recovering and identifying commitments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_account.messages import SignableMessage, encode_typed_data
from eth_utils import is_hex_address, to_checksum_address

from scrapy_x402._networks import evm_chain_id
from scrapy_x402._protocol import InvalidChallenge, Offer, parse_atomic
from scrapy_x402.ledger import Status
from scrapy_x402.schemes._base import (
    Confirmation,
    SignedPayment,
    X402Scheme,
    hex0x,
    is_bytes32,
    random_nonce,
    validity,
)
from scrapy_x402.schemes._eip712 import (
    address_word,
    bytes32,
    digest,
    domain_separator,
    keccak,
    recover,
    signer_for,
    word,
)

DOMAIN_NAME = "x402 deferred"
DOMAIN_VERSION = "1"
COMMITMENT_TYPE = [
    {"name": "payer", "type": "address"},
    {"name": "payee", "type": "address"},
    {"name": "token", "type": "address"},
    {"name": "amount", "type": "uint256"},
    {"name": "resource", "type": "bytes32"},
    {"name": "nonce", "type": "bytes32"},
    {"name": "validUntil", "type": "uint256"},
]
COMMITMENT_TYPEHASH = keccak(
    b"Commitment(address payer,address payee,address token,uint256 amount,bytes32 resource,"
    b"bytes32 nonce,uint256 validUntil)"
)
EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
]


class InvalidCommitment(ValueError):
    """A payload that is not a well-formed commitment."""


def resource_hash(url: str) -> str:
    return "0x" + keccak(url.encode("utf-8")).hex()


@dataclass(frozen=True)
class Commitment:
    chain_id: int
    payer: str
    payee: str
    token: str
    amount: int
    resource: str  # 0x-hex keccak256 of the resource URL
    nonce: str  # 0x-hex, 32 bytes
    valid_until: int  # unix seconds

    def typed_data(self) -> dict[str, Any]:
        return {
            "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, "Commitment": COMMITMENT_TYPE},
            "primaryType": "Commitment",
            "domain": {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id},
            "message": {
                "payer": self.payer,
                "payee": self.payee,
                "token": self.token,
                "amount": self.amount,
                "resource": bytes.fromhex(self.resource[2:]),
                "nonce": bytes.fromhex(self.nonce[2:]),
                "validUntil": self.valid_until,
            },
        }

    def signable(self) -> SignableMessage:
        """eth-account's encoding of the same typed data (the reference; not on the hot path)."""
        return encode_typed_data(full_message=self.typed_data())

    def digest(self) -> bytes:
        """The EIP-712 digest: what is signed."""
        struct_hash = keccak(
            COMMITMENT_TYPEHASH
            + address_word(self.payer)
            + address_word(self.payee)
            + address_word(self.token)
            + word(self.amount)
            + bytes32(self.resource)
            + bytes32(self.nonce)
            + word(self.valid_until)
        )
        return digest(domain_separator(DOMAIN_NAME, DOMAIN_VERSION, self.chain_id), struct_hash)

    @property
    def id(self) -> str:
        """The EIP-712 digest, in hex: the commitment's id everywhere."""
        return hex0x(self.digest())

    def to_json(self) -> dict[str, str]:
        return {
            "payer": self.payer,
            "payee": self.payee,
            "token": self.token,
            "amount": str(self.amount),
            "resource": self.resource,
            "nonce": self.nonce,
            "validUntil": str(self.valid_until),
        }

    @classmethod
    def from_json(cls, chain_id: int, data: Any) -> Commitment:
        if not isinstance(data, Mapping):
            raise InvalidCommitment("commitment is not an object")
        addresses = [data.get(k) for k in ("payer", "payee", "token")]
        if not all(isinstance(a, str) and is_hex_address(a) for a in addresses):
            raise InvalidCommitment("payer, payee or token is not an address")
        try:  # decimal strings (the spec's grammar); uint256, and validUntil in 64 bits
            amount = parse_atomic(data.get("amount"))
            valid_until = parse_atomic(data.get("validUntil"), "validUntil", 1, 2**64 - 1)
        except InvalidChallenge as e:
            raise InvalidCommitment(e.reason) from None
        resource, nonce = _bytes32(data.get("resource")), _bytes32(data.get("nonce"))
        payer, payee, token = (to_checksum_address(a) for a in addresses)
        return cls(chain_id, payer, payee, token, amount, resource, nonce, valid_until)

    def recover_signer(self, signature: str) -> str:
        try:
            return to_checksum_address(
                recover(self.digest(), bytes.fromhex(signature.removeprefix("0x")))
            )
        except Exception:  # malformed hex, length, v or point: all "cannot be recovered"
            raise InvalidCommitment("signature cannot be recovered") from None


def _bytes32(value: Any) -> str:
    if not is_bytes32(value):
        raise InvalidCommitment("resource or nonce is not 32 bytes of hex")
    return value.lower()


class DeferredScheme(X402Scheme):
    name = "deferred"
    held_until_expiry = False  # a commitment moves nothing by itself: only we settle it
    needs_wallet = True

    def refusal(self, offer: Offer) -> str | None:
        return None if evm_chain_id(offer.network) is not None else "network"

    def confirmation(
        self, receipt: Mapping[str, Any] | None, payment_id: str, signed_amount: int
    ) -> Confirmation | None:
        """Only a receipt naming the commitment makes it owed (docs: section 6)."""
        extra = (receipt or {}).get("extra")
        if isinstance(extra, Mapping) and str(extra.get("commitmentId", "")).lower() == payment_id:
            return Confirmation(Status.ACCEPTED)
        return None

    def collected(self, w3: Any, asset: str, payload: Mapping[str, Any]) -> bool:
        return False  # never held: nobody but us can collect a commitment

    def sign(
        self, account: Any, offer: Offer, resource_url: str, now: int, max_timeout: int
    ) -> SignedPayment:
        chain_id = evm_chain_id(offer.network)
        assert chain_id is not None
        commitment = Commitment(
            chain_id=chain_id,
            payer=account.address,
            payee=offer.pay_to,
            token=offer.asset,
            amount=offer.amount,
            resource=resource_hash(resource_url),
            nonce=random_nonce(),
            valid_until=validity(offer, now, max_timeout),
        )
        message_digest = commitment.digest()
        signature = signer_for(bytes(account.key)).sign(message_digest)
        payload = {"signature": hex0x(signature), "commitment": commitment.to_json()}
        return SignedPayment(hex0x(message_digest), payload, commitment.valid_until)


# Ids one settlement transfer may list: 16,000 bytes of calldata (docs section 8 says why).
MAX_SETTLEMENT_IDS = 500
TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")  # ERC-20 transfer(address,uint256)


def settlement_calldata(payee: str, total: int, commitment_ids: list[str]) -> bytes:
    """A settlement transfer's input: ``transfer(payee, total) ‖ ids`` (docs section 8). The
    token ignores the trailing ids; the payee reads them to reconcile (section 9)."""
    arguments = address_word(payee) + total.to_bytes(32, "big")
    return TRANSFER_SELECTOR + arguments + settlement_ids(commitment_ids)


def settlement_ids(commitment_ids: list[str]) -> bytes:
    """The ids a transfer pays, 32 bytes each, strictly ascending: appended to its calldata,
    they make the transaction its own manifest (docs section 8)."""
    ids = sorted(_id_bytes(i) for i in commitment_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("a commitment id is listed twice")
    return b"".join(ids)


def settlement_reference(commitment_ids: list[str]) -> bytes:
    """Version 1's trailing bytes: keccak256 of the sorted ids (publishers still read it)."""
    return keccak(b"".join(sorted(_id_bytes(i) for i in commitment_ids)))


def _id_bytes(commitment_id: str) -> bytes:
    raw = bytes.fromhex(commitment_id.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError(f"{commitment_id!r} is not a 32-byte commitment id")
    return raw
