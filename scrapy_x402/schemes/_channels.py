"""Signing primitives of x402 ``batch-settlement`` on EVM (payment channels, cumulative
vouchers); the spec is ``specs/schemes/batch-settlement/scheme_batch_settlement_evm.md`` of
the x402 Foundation. Pure functions, no I/O: the channel config an offer implies, its id,
vouchers, the deposit / voucher / refund payloads, and the check of a corrective 402's
signed voucher state. (``batch_settlement.py`` is Cloudflare's credit-backed rail.)

Amounts are ints within uint128, addresses checksummed; JSON numbers leave as decimal strings.
What a server sent and cannot be trusted raises InvalidChallenge; a bad amount of our own
(out of uint128, not an int) raises ValueError.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from eth_utils import is_hex_address, to_checksum_address

from scrapy_x402._protocol import InvalidChallenge, Offer, parse_atomic
from scrapy_x402.schemes._base import hex0x, is_bytes32
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

# CREATE2 deployments, the same address on every chain.
BATCH_SETTLEMENT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR = "0x4020806089470a89826cB9fB1f4059150b550004"
DOMAIN_NAME = "x402 Batch Settlement"
DOMAIN_VERSION = "1"
MIN_WITHDRAW_DELAY = 900  # 15 minutes
MAX_WITHDRAW_DELAY = 2_592_000  # 30 days
UINT128_MAX = 2**128 - 1
ZERO_ADDRESS = "0x" + "00" * 20

CHANNEL_CONFIG_TYPEHASH = keccak(
    b"ChannelConfig(address payer,address payerAuthorizer,address receiver,"
    b"address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
)
VOUCHER_TYPEHASH = keccak(b"Voucher(bytes32 channelId,uint128 maxClaimableAmount)")
RECEIVE_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"ReceiveWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"
    b"uint256 validBefore,bytes32 nonce)"
)


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or not is_hex_address(value):
        raise InvalidChallenge(f"{what} is not an address")
    return to_checksum_address(value)


def _bytes32(value: Any, what: str) -> str:
    if not is_bytes32(value):
        raise InvalidChallenge(f"{what} is not a 0x-prefixed bytes32")
    return str(value).lower()


def _uint128(value: int, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= UINT128_MAX:
        raise ValueError(f"{what} must be an int in [{minimum}, 2**128 - 1]")
    return value


@dataclass(frozen=True)
class ChannelConfig:
    """The immutable identity of a channel; its EIP-712 hash is the channel id."""

    payer: str
    payerAuthorizer: str  # signs the vouchers; the zero address: the payer does (EIP-1271)
    receiver: str
    receiverAuthorizer: str
    token: str
    withdrawDelay: int  # seconds
    salt: str  # 0x-hex bytes32: several channels with the same parties

    @classmethod
    def from_offer(
        cls, offer: Offer, payer: str, payer_authorizer: str, salt: str
    ) -> ChannelConfig:
        """The spec's mapping: payTo -> receiver, asset -> token, extra.receiverAuthorizer and
        extra.withdrawDelay as given; payer, payerAuthorizer and salt are ours. An offer whose
        extra does not name them validly raises InvalidChallenge."""
        extra = offer.extra
        delay = extra.get("withdrawDelay")
        if isinstance(delay, bool) or not isinstance(delay, int):
            raise InvalidChallenge("batch-settlement offer's extra.withdrawDelay is not an integer")
        if not MIN_WITHDRAW_DELAY <= delay <= MAX_WITHDRAW_DELAY:
            raise InvalidChallenge(
                f"batch-settlement offer's extra.withdrawDelay {delay} is outside "
                f"{MIN_WITHDRAW_DELAY}..{MAX_WITHDRAW_DELAY} s"
            )
        authorizer = _address(
            extra.get("receiverAuthorizer"), "batch-settlement offer's extra.receiverAuthorizer"
        )
        if int(authorizer, 16) == 0:
            raise InvalidChallenge("batch-settlement offer's extra.receiverAuthorizer is zero")
        return cls(
            payer=to_checksum_address(payer),
            payerAuthorizer=to_checksum_address(payer_authorizer),
            receiver=_address(offer.pay_to, "batch-settlement offer's payTo"),
            receiverAuthorizer=authorizer,
            token=_address(offer.asset, "batch-settlement offer's asset"),
            withdrawDelay=delay,
            salt=_bytes32(salt, "channel salt"),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def new_salt() -> str:
    return hex0x(os.urandom(32))


def _domain(chain_id: int) -> bytes:
    return domain_separator(DOMAIN_NAME, DOMAIN_VERSION, chain_id, BATCH_SETTLEMENT)


def channel_id(config: ChannelConfig, chain_id: int) -> str:
    """The EIP-712 hash of ``config`` under the x402 Batch Settlement domain of ``chain_id``."""
    struct_hash = keccak(
        CHANNEL_CONFIG_TYPEHASH
        + address_word(config.payer)
        + address_word(config.payerAuthorizer)
        + address_word(config.receiver)
        + address_word(config.receiverAuthorizer)
        + address_word(config.token)
        + word(config.withdrawDelay)
        + bytes32(config.salt)
    )
    return hex0x(digest(_domain(chain_id), struct_hash))


def voucher_digest(channel: str, max_claimable: int, chain_id: int) -> bytes:
    struct_hash = keccak(
        VOUCHER_TYPEHASH + bytes32(channel) + word(_uint128(max_claimable, "maxClaimableAmount"))
    )
    return digest(_domain(chain_id), struct_hash)


def sign_voucher(key: bytes, channel: str, max_claimable: int, chain_id: int) -> str:
    """A ``Voucher(channelId, maxClaimableAmount)`` signature (65 bytes, 0x-hex): the
    receiver may claim up to ``max_claimable`` in total from the channel."""
    return hex0x(signer_for(key).sign(voucher_digest(channel, max_claimable, chain_id)))


def _voucher(
    key: bytes, config: ChannelConfig, max_claimable: int, chain_id: int
) -> dict[str, str]:
    channel = channel_id(config, chain_id)
    return {
        "channelId": channel,
        "maxClaimableAmount": str(max_claimable),
        "signature": sign_voucher(key, channel, max_claimable, chain_id),
    }


def voucher_payload(
    voucher_key: bytes, config: ChannelConfig, max_claimable: int, chain_id: int
) -> dict[str, Any]:
    """A later request's payload: the cumulative voucher (charged so far + this price)."""
    _uint128(max_claimable, "maxClaimableAmount", minimum=1)
    return {
        "type": "voucher",
        "channelConfig": config.to_json(),
        "voucher": _voucher(voucher_key, config, max_claimable, chain_id),
    }


def deposit_nonce(channel: str, deposit_salt: str) -> str:
    """The EIP-3009 nonce of a deposit: keccak256(abi.encode(bytes32 channelId, uint256 salt)),
    so an authorization can only fund its own channel."""
    return hex0x(keccak(bytes32(channel) + bytes32(deposit_salt)))


def deposit_payload(
    payer_key: bytes,
    voucher_key: bytes,
    config: ChannelConfig,
    offer: Offer,
    chain_id: int,
    amount: int,
    max_claimable: int,
    now: int,
    deposit_salt: str | None = None,
) -> dict[str, Any]:
    """The first request's payload (or a top-up): an EIP-3009 ReceiveWithAuthorization of
    ``amount`` from the payer to the deposit collector, valid for the offer's
    maxTimeoutSeconds, plus the cumulative voucher."""
    _uint128(amount, "deposit amount", minimum=1)
    _uint128(max_claimable, "maxClaimableAmount", minimum=1)
    name, version = offer.extra.get("name"), offer.extra.get("version")
    if not (isinstance(name, str) and isinstance(version, str)):
        raise InvalidChallenge("batch-settlement offer has no token domain (extra.name/version)")
    if offer.max_timeout_seconds is None:
        raise InvalidChallenge("batch-settlement offer has no maxTimeoutSeconds")
    salt = _bytes32(deposit_salt or new_salt(), "deposit salt")
    valid_before = now + offer.max_timeout_seconds
    struct_hash = keccak(
        RECEIVE_WITH_AUTHORIZATION_TYPEHASH
        + address_word(config.payer)
        + address_word(ERC3009_DEPOSIT_COLLECTOR)
        + word(amount)
        + word(0)  # validAfter: at once, as the reference client does
        + word(valid_before)
        + bytes32(deposit_nonce(channel_id(config, chain_id), salt))
    )
    token_domain = domain_separator(name, version, chain_id, config.token)
    signature = signer_for(payer_key).sign(digest(token_domain, struct_hash))
    return {
        "type": "deposit",
        "channelConfig": config.to_json(),
        "voucher": _voucher(voucher_key, config, max_claimable, chain_id),
        "deposit": {
            "amount": str(amount),
            "authorization": {
                "erc3009Authorization": {
                    "validAfter": "0",
                    "validBefore": str(valid_before),
                    "salt": salt,
                    "signature": hex0x(signature),
                }
            },
        },
    }


def refund_payload(
    voucher_key: bytes,
    config: ChannelConfig,
    charged: int,
    chain_id: int,
    amount: int | None = None,
) -> dict[str, Any]:
    """A cooperative refund: a zero-charge voucher at the charged cumulative amount (no new
    money) and, for a partial refund, the amount; without it the server refunds the rest."""
    _uint128(charged, "charged cumulative amount")
    payload: dict[str, Any] = {
        "type": "refund",
        "channelConfig": config.to_json(),
        "voucher": _voucher(voucher_key, config, charged, chain_id),
    }
    if amount is not None:
        payload["amount"] = str(_uint128(amount, "refund amount", minimum=1))
    return payload


def verify_voucher_state(
    config: ChannelConfig,
    chain_id: int,
    channel_state: Any,
    voucher_state: Any,
    highest_signed: int,
    total_claimed: int = 0,
) -> int:
    """The charged cumulative amount a corrective 402 asks us to adopt, once its
    ``voucherState.signature`` proves to be our own voucher signer's over (this channel,
    ``signedMaxClaimable``); never above ``highest_signed`` (the most we ever signed on this
    channel) nor below ``total_claimed`` (on-chain). Anything else raises InvalidChallenge."""
    if not isinstance(channel_state, Mapping) or not isinstance(voucher_state, Mapping):
        raise InvalidChallenge("corrective 402 without channelState and voucherState")
    channel = channel_id(config, chain_id)
    if str(channel_state.get("channelId", "")).lower() != channel:
        raise InvalidChallenge("corrective 402's channelState is for another channel")
    charged = parse_atomic(
        channel_state.get("chargedCumulativeAmount"),
        "chargedCumulativeAmount",
        minimum=0,
        maximum=UINT128_MAX,
    )
    signed = parse_atomic(
        voucher_state.get("signedMaxClaimable"), "signedMaxClaimable", 0, UINT128_MAX
    )
    signature = voucher_state.get("signature")
    try:
        if not (isinstance(signature, str) and signature[:2] == "0x"):
            raise ValueError("not 0x-hex")
        signer = recover(voucher_digest(channel, signed, chain_id), bytes.fromhex(signature[2:]))
    except Exception:  # malformed hex, length, v or point: not a signature of ours
        raise InvalidChallenge("corrective 402's voucher signature cannot be recovered") from None
    voucher_signer = config.payerAuthorizer if int(config.payerAuthorizer, 16) else config.payer
    if signer != voucher_signer.lower():
        raise InvalidChallenge("corrective 402's voucher is not signed by our voucher signer")
    if signed > highest_signed:
        raise InvalidChallenge("corrective 402's voucher is above the most we signed")
    if not total_claimed <= charged <= signed:
        raise InvalidChallenge(
            "corrective 402's charged amount is above its voucher or below the claimed total"
        )
    return charged
