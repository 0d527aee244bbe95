"""Our batch-settlement signing primitives (scrapy_x402/schemes/_channels.py) checked by code we
did not write: eth-account's EIP-712 encoder, the reference SDK's channel id, facilitator
(verify, deposit, claim, settle) and HTTP server (its refund path and corrective 402), on anvil
with the contract doubles at the canonical addresses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import requests
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner
from x402.mechanisms.evm.batch_settlement.encoding import build_erc3009_deposit_nonce
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.facilitator.utils import to_contract_channel_config
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig as SdkChannelConfig,
)
from x402.mechanisms.evm.batch_settlement.types import (
    ClaimPayload,
    SettlePayload,
    VoucherClaim,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.schemas import PaymentPayload, PaymentRequirements

from scrapy_x402._protocol import (
    InvalidChallenge,
    Offer,
    b64json_decode,
    b64json_encode,
    parse_challenge,
    payment_header,
)
from scrapy_x402.devchain import BATCH_SETTLEMENT, Anvil, TestUSD, _artifact
from scrapy_x402.schemes._channels import (
    ChannelConfig,
    channel_id,
    deposit_nonce,
    deposit_payload,
    new_salt,
    refund_payload,
    sign_voucher,
    verify_voucher_state,
    voucher_digest,
    voucher_payload,
)
from tests.batch_site import sdk_batch_site

PRICE = 10_000
DEPOSIT = 10 * PRICE
WITHDRAW_DELAY = 900


def offer_of(requirements: dict[str, Any]) -> Offer:
    """Our parser's view of a 402 carrying ``requirements``."""
    header = b64json_encode({"x402Version": 2, "accepts": [requirements]})
    return parse_challenge(header.encode(), b"").offers[0]


def sdk_config(config: ChannelConfig) -> SdkChannelConfig:
    return SdkChannelConfig.from_dict(config.to_json())


class Publisher:
    """A receiver whose receiverAuthorizer key the SDK facilitator holds."""

    def __init__(self, chain: Anvil, token: TestUSD):
        chain.install_batch_settlement()
        self.chain, self.token = chain, token
        self.network = f"eip155:{chain.chain_id}"
        self.receiver = Account.create().address
        self.authorizer = LocalAuthorizerSigner(Account.create())
        self.facilitator = BatchSettlementEvmFacilitator(
            FacilitatorWeb3Signer(private_key=chain.new_account().key.hex(), rpc_url=chain.url),
            authorizer_signer=self.authorizer,
        )
        self.raw = {
            "scheme": "batch-settlement",
            "network": self.network,
            "amount": str(PRICE),
            "asset": token.address,
            "payTo": self.receiver,
            "maxTimeoutSeconds": 300,
            "extra": {
                "name": "Test USD",
                "version": "2",
                "receiverAuthorizer": self.authorizer.address,
                "withdrawDelay": WITHDRAW_DELAY,
            },
        }
        self.requirements = PaymentRequirements.model_validate(self.raw)
        self.offer = offer_of(self.raw)
        self.contract = chain.w3.eth.contract(
            address=to_checksum_address(BATCH_SETTLEMENT),
            abi=_artifact("X402BatchSettlementLite")["abi"],
        )

    def pay(self, payload: dict[str, Any]) -> PaymentPayload:
        return PaymentPayload(payload=payload, accepted=self.requirements)

    def state(self, config: ChannelConfig) -> tuple[int, int]:
        channel = bytes.fromhex(channel_id(config, self.chain.chain_id)[2:])
        balance, claimed = self.contract.functions.channels(channel).call()
        return int(balance), int(claimed)


@pytest.fixture
def publisher(chain: Anvil, token: TestUSD) -> Publisher:
    return Publisher(chain, token)


def test_channel_id_is_the_contracts_and_the_sdks(publisher: Publisher, payer: Any) -> None:
    chain_id = publisher.chain.chain_id
    for authorizer in (payer.address, Account.create().address, "0x" + "00" * 20):
        config = ChannelConfig.from_offer(publisher.offer, payer.address, authorizer, new_salt())
        ours = channel_id(config, chain_id)
        assert ours == compute_channel_id(sdk_config(config), publisher.network).lower()
        on_chain = publisher.contract.functions.getChannelId(
            to_contract_channel_config(sdk_config(config))
        ).call()
        assert ours == "0x" + on_chain.hex()
    other_chain = channel_id(config, chain_id + 1)
    assert other_chain != ours


def test_digests_match_eth_accounts_encoder(publisher: Publisher, payer: Any) -> None:
    chain_id = publisher.chain.chain_id
    config = ChannelConfig.from_offer(publisher.offer, payer.address, payer.address, new_salt())
    domain = {
        "name": "x402 Batch Settlement",
        "version": "1",
        "chainId": chain_id,
        "verifyingContract": BATCH_SETTLEMENT,
    }
    types = {
        "ChannelConfig": [
            {"name": "payer", "type": "address"},
            {"name": "payerAuthorizer", "type": "address"},
            {"name": "receiver", "type": "address"},
            {"name": "receiverAuthorizer", "type": "address"},
            {"name": "token", "type": "address"},
            {"name": "withdrawDelay", "type": "uint40"},
            {"name": "salt", "type": "bytes32"},
        ]
    }
    message = {**config.to_json(), "salt": bytes.fromhex(config.salt[2:])}
    signable = encode_typed_data(domain, types, message)
    reference = keccak(b"\x19\x01" + signable.header + signable.body)
    assert channel_id(config, chain_id) == "0x" + reference.hex()

    channel = channel_id(config, chain_id)
    for amount in (0, 1, PRICE, 2**128 - 1):
        voucher_types = {
            "Voucher": [
                {"name": "channelId", "type": "bytes32"},
                {"name": "maxClaimableAmount", "type": "uint128"},
            ]
        }
        signable = encode_typed_data(
            domain,
            voucher_types,
            {"channelId": bytes.fromhex(channel[2:]), "maxClaimableAmount": amount},
        )
        assert voucher_digest(channel, amount, chain_id) == keccak(
            b"\x19\x01" + signable.header + signable.body
        )
        signature = sign_voucher(bytes(payer.key), channel, amount, chain_id)
        assert Account.recover_message(signable, signature=signature) == payer.address
    with pytest.raises(ValueError, match="2\\*\\*128"):
        voucher_digest(channel, 2**128, chain_id)
    with pytest.raises(ValueError, match="int"):
        voucher_digest(channel, 1.0, chain_id)  # type: ignore[arg-type]

    # The deposit nonce as the SDK derives it.
    payload = deposit_payload(
        bytes(payer.key),
        bytes(payer.key),
        config,
        publisher.offer,
        chain_id,
        DEPOSIT,
        PRICE,
        int(time.time()),
    )
    salt = payload["deposit"]["authorization"]["erc3009Authorization"]["salt"]
    assert deposit_nonce(channel, salt) == build_erc3009_deposit_nonce(channel, salt)


@pytest.mark.parametrize("voucher_key", ["payer", "separate payerAuthorizer"])
def test_deposit_and_cumulative_vouchers_pass_the_sdk_facilitator_and_are_claimed(
    publisher: Publisher, token: TestUSD, payer: Any, voucher_key: str
) -> None:
    chain_id = publisher.chain.chain_id
    signer = payer if voucher_key == "payer" else Account.create()
    config = ChannelConfig.from_offer(publisher.offer, payer.address, signer.address, new_salt())
    funds = token.balance_of(payer.address)

    first = deposit_payload(
        bytes(payer.key),
        bytes(signer.key),
        config,
        publisher.offer,
        chain_id,
        DEPOSIT,
        PRICE,
        int(time.time()),
    )
    verified = publisher.facilitator.verify(publisher.pay(first), publisher.requirements)
    assert verified.is_valid, verified
    settled = publisher.facilitator.settle(publisher.pay(first), publisher.requirements)
    assert settled.success, settled
    assert publisher.state(config) == (DEPOSIT, 0)
    assert token.balance_of(payer.address) == funds - DEPOSIT

    vouchers = [voucher_payload(bytes(signer.key), config, n * PRICE, chain_id) for n in (2, 3)]
    for payload in vouchers:
        verified = publisher.facilitator.verify(publisher.pay(payload), publisher.requirements)
        assert verified.is_valid, verified
    # A voucher by any other key is refused by the facilitator.
    stranger = voucher_payload(bytes(Account.create().key), config, 4 * PRICE, chain_id)
    assert not publisher.facilitator.verify(
        publisher.pay(stranger), publisher.requirements
    ).is_valid

    # The receiver claims the last cumulative voucher (the facilitator signs as
    # receiverAuthorizer) and sweeps it to the payee.
    last = vouchers[-1]["voucher"]
    row = VoucherClaim(
        channel=sdk_config(config),
        max_claimable_amount=last["maxClaimableAmount"],
        signature=last["signature"],
        total_claimed=str(3 * PRICE),
    )
    claim = ClaimPayload(claims=[row]).to_dict()
    claimed = publisher.facilitator.settle(publisher.pay(claim), publisher.requirements)
    assert claimed.success, claimed
    assert publisher.state(config) == (DEPOSIT, 3 * PRICE)
    sweep = SettlePayload(receiver=publisher.receiver, token=token.address).to_dict()
    assert publisher.facilitator.settle(publisher.pay(sweep), publisher.requirements).success
    assert token.balance_of(publisher.receiver) == 3 * PRICE


@pytest.fixture
def site(chain: Anvil, token: TestUSD) -> Iterator[tuple[str, Any]]:
    """The SDK's Flask middleware with its batch-settlement server scheme and facilitator."""
    with sdk_batch_site(chain, token, PRICE) as publisher:
        yield publisher.url, publisher.manager


def test_the_sdk_server_serves_our_vouchers_and_refunds_our_deposit(
    site: tuple[str, Any], chain: Anvil, token: TestUSD, payer: Any
) -> None:
    url, manager = site
    probe = requests.get(f"{url}/articles/0", timeout=30)
    assert probe.status_code == 402
    challenge = parse_challenge(probe.headers["PAYMENT-REQUIRED"].encode(), probe.content)
    (offer,) = challenge.offers
    chain_id = chain.chain_id
    voucher_key = Account.create()
    config = ChannelConfig.from_offer(offer, payer.address, voucher_key.address, new_salt())
    funds = token.balance_of(payer.address)

    def get(page: int, payload: dict[str, Any]) -> requests.Response:
        name, value = payment_header(challenge, offer, payload)
        return requests.get(f"{url}/articles/{page}", headers={name: value}, timeout=30)

    key, vkey = bytes(payer.key), bytes(voucher_key.key)
    pages = 3
    first = deposit_payload(key, vkey, config, offer, chain_id, DEPOSIT, PRICE, int(time.time()))
    assert get(0, first).text == "article 0"
    for page in range(1, pages):
        assert get(page, voucher_payload(vkey, config, (page + 1) * PRICE, chain_id)).ok

    # A voucher that skips ahead gets the corrective 402; its signed state is ours, and only
    # the charged amount is adopted.
    wrong = get(9, voucher_payload(vkey, config, (pages + 2) * PRICE, chain_id))
    assert wrong.status_code == 402
    extra = b64json_decode(wrong.headers["PAYMENT-REQUIRED"])["accepts"][0]["extra"]
    assert (
        verify_voucher_state(
            config, chain_id, extra["channelState"], extra["voucherState"], (pages + 2) * PRICE
        )
        == pages * PRICE
    )

    manager.claim_and_settle()
    assert token.balance_of(offer.pay_to) == pages * PRICE

    # A partial refund, then the rest: a zero-charge voucher at the charged total each time.
    for amount, refunded in ((PRICE, PRICE), (None, DEPOSIT - (pages + 1) * PRICE)):
        refund = get(0, refund_payload(vkey, config, pages * PRICE, chain_id, amount))
        receipt = b64json_decode(refund.headers["PAYMENT-RESPONSE"])
        assert receipt["success"] is True, receipt
        assert int(receipt["amount"]) == refunded
    assert token.balance_of(payer.address) == funds - pages * PRICE


@pytest.fixture
def config() -> ChannelConfig:
    return ChannelConfig(
        payer=Account.create().address,
        payerAuthorizer=Account.create().address,
        receiver=Account.create().address,
        receiverAuthorizer=Account.create().address,
        token=Account.create().address,
        withdrawDelay=WITHDRAW_DELAY,
        salt=new_salt(),
    )


def test_verify_voucher_state_adopts_only_our_own_signed_state(config: ChannelConfig) -> None:
    ours = Account.create()
    config = replace(config, payerAuthorizer=ours.address)
    chain_id = 31337
    channel = channel_id(config, chain_id)

    def states(
        charged: int, signed: int, key: bytes, for_channel: str = channel
    ) -> tuple[dict[str, str], dict[str, str]]:
        channel_state = {"channelId": channel, "chargedCumulativeAmount": str(charged)}
        signature = sign_voucher(key, for_channel, signed, chain_id)
        return channel_state, {"signedMaxClaimable": str(signed), "signature": signature}

    own = bytes(ours.key)
    assert verify_voucher_state(
        config, chain_id, *states(3 * PRICE, 3 * PRICE, own), 4 * PRICE
    ) == (3 * PRICE)
    assert (
        verify_voucher_state(config, chain_id, *states(PRICE, 2 * PRICE, own), 2 * PRICE) == PRICE
    )

    refusals = {
        "forged": states(PRICE, PRICE, bytes(Account.create().key)),
        "another channel": states(PRICE, PRICE, own, "0x" + "ab" * 32),
        "above what we signed": states(5 * PRICE, 5 * PRICE, own),
        "charged above the voucher": states(3 * PRICE, 2 * PRICE, own),
    }
    for name, (channel_state, voucher_state) in refusals.items():
        with pytest.raises(InvalidChallenge):
            verify_voucher_state(config, chain_id, channel_state, voucher_state, 4 * PRICE)
            pytest.fail(name)
    channel_state, voucher_state = states(PRICE, PRICE, own)
    with pytest.raises(InvalidChallenge, match="below the claimed"):
        verify_voucher_state(config, chain_id, channel_state, voucher_state, PRICE, 2 * PRICE)
    with pytest.raises(InvalidChallenge, match="another channel"):
        verify_voucher_state(
            config, chain_id, {**channel_state, "channelId": "0x" + "00" * 32}, voucher_state, PRICE
        )
    for bad in ("0x", "0x" + "zz" * 65, None, "0x" + "00" * 65):
        with pytest.raises(InvalidChallenge, match="cannot be recovered"):
            verify_voucher_state(
                config, chain_id, channel_state, {**voucher_state, "signature": bad}, PRICE
            )


@pytest.mark.parametrize(
    "extra",
    [
        {"withdrawDelay": 899},
        {"withdrawDelay": 2_592_001},
        {"withdrawDelay": 900.0},
        {"withdrawDelay": "900"},
        {"withdrawDelay": True},
        {"receiverAuthorizer": None},
        {"receiverAuthorizer": "0x" + "00" * 20},
        {"receiverAuthorizer": "0x1234"},
    ],
)
def test_malformed_offers_raise_invalid_challenge(extra: dict[str, Any]) -> None:
    raw = {
        "scheme": "batch-settlement",
        "network": "eip155:31337",
        "amount": str(PRICE),
        "asset": Account.create().address,
        "payTo": Account.create().address,
        "maxTimeoutSeconds": 300,
        "extra": {
            "name": "Test USD",
            "version": "2",
            "receiverAuthorizer": Account.create().address,
            "withdrawDelay": WITHDRAW_DELAY,
        },
    }
    payer = Account.create().address
    assert ChannelConfig.from_offer(offer_of(raw), payer, payer, new_salt()).withdrawDelay == 900
    raw["extra"] = {k: v for k, v in {**raw["extra"], **extra}.items() if v is not None}
    with pytest.raises(InvalidChallenge, match="batch-settlement offer"):
        ChannelConfig.from_offer(offer_of(raw), payer, payer, new_salt())


@pytest.mark.parametrize("salt", ["0x" + "  " + "ab" * 31, "0x" + "ab" * 32 + "\n", "ab" * 33])
def test_a_salt_that_is_not_exactly_32_bytes_of_hex_is_refused(salt: str) -> None:
    """bytes.fromhex skips spaces: "0x  abab…" would pass as 31 bytes."""
    payer = Account.create().address
    raw = {
        "scheme": "batch-settlement",
        "network": "eip155:31337",
        "amount": str(PRICE),
        "asset": payer,
        "payTo": payer,
        "maxTimeoutSeconds": 300,
        "extra": {
            "name": "Test USD",
            "version": "2",
            "receiverAuthorizer": payer,
            "withdrawDelay": WITHDRAW_DELAY,
        },
    }
    with pytest.raises(InvalidChallenge, match="bytes32"):
        ChannelConfig.from_offer(offer_of(raw), payer, payer, salt)
