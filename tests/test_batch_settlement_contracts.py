"""The batch-settlement contract doubles (contracts/X402BatchSettlementLite.sol) checked against
the reference SDK's own code: its client signs the deposit and the vouchers, its facilitator
verifies and mines the deposit, claims, settles and refunds on anvil. The refusals are the
contract's: each one is shown to revert on-chain, with the rule's own reason."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from eth_account import Account
from web3.logs import DISCARD
from x402 import x402ClientSync
from x402.http.clients import x402_requests
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement import constants as sdk_constants
from x402.mechanisms.evm.batch_settlement.abi import BATCH_SETTLEMENT_ABI
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
    sign_refund,
)
from x402.mechanisms.evm.batch_settlement.client import (
    BatchSettlementEvmScheme,
    BatchSettlementEvmSchemeOptions,
    RefundOptions,
    create_batch_settlement_eip3009_deposit_payload,
    sign_voucher,
)
from x402.mechanisms.evm.batch_settlement.facilitator import (
    BatchSettlementEvmFacilitator,
)
from x402.mechanisms.evm.batch_settlement.facilitator.claim import (
    build_voucher_claim_args,
)
from x402.mechanisms.evm.batch_settlement.facilitator.deposit_eip3009 import (
    build_eip3009_deposit_collector_data,
)
from x402.mechanisms.evm.batch_settlement.facilitator.utils import (
    to_contract_channel_config,
)
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig,
    ClaimPayload,
    EnrichedRefundPayload,
    SettlePayload,
    VoucherClaim,
    VoucherFields,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentPayload, PaymentRequirements, SettleResponse

from scrapy_x402.devchain import (
    BATCH_SETTLEMENT,
    ERC3009_DEPOSIT_COLLECTOR,
    PERMIT2,
    PERMIT2_DEPOSIT_COLLECTOR,
    Anvil,
    TestUSD,
    _artifact,
)
from tests.batch_site import sdk_batch_site

PRICE = 10_000  # 0.01 tUSD per page
PAGES = 3
WITHDRAW_DELAY = 900


def test_the_doubles_sit_where_the_sdk_expects_them() -> None:
    assert BATCH_SETTLEMENT == sdk_constants.BATCH_SETTLEMENT_ADDRESS
    assert ERC3009_DEPOSIT_COLLECTOR == sdk_constants.ERC3009_DEPOSIT_COLLECTOR_ADDRESS
    assert PERMIT2_DEPOSIT_COLLECTOR == sdk_constants.PERMIT2_DEPOSIT_COLLECTOR_ADDRESS


class Channel:
    """One payer's channel to one receiver, driven by the SDK's client and facilitator."""

    def __init__(
        self,
        chain: Anvil,
        token: TestUSD,
        payer: Any,
        options: BatchSettlementEvmSchemeOptions | None = None,
        **extra: Any,
    ):
        chain.install_batch_settlement()
        self.chain, self.token, self.payer = chain, token, payer
        self.network = f"eip155:{chain.chain_id}"
        self.receiver = Account.create().address
        self.authorizer = LocalAuthorizerSigner(Account.create())
        self.facilitator = BatchSettlementEvmFacilitator(
            FacilitatorWeb3Signer(private_key=chain.new_account().key.hex(), rpc_url=chain.url),
            authorizer_signer=self.authorizer,
        )
        self.requirements = PaymentRequirements(
            scheme="batch-settlement",
            network=self.network,
            asset=token.address,
            amount=str(PRICE),
            pay_to=self.receiver,
            max_timeout_seconds=300,
            extra={
                "name": "Test USD",
                "version": "2",
                "receiverAuthorizer": self.authorizer.address,
                "withdrawDelay": WITHDRAW_DELAY,
                **extra,
            },
        )
        self.client = BatchSettlementEvmScheme(payer, options)
        self.config = self.client.build_channel_config(self.requirements)
        self.id = compute_channel_id(self.config, self.network)
        self.contract = chain.w3.eth.contract(
            address=BATCH_SETTLEMENT, abi=_artifact("X402BatchSettlementLite")["abi"]
        )

    def pay(self, payload: dict[str, Any]) -> PaymentPayload:
        return PaymentPayload(payload=payload, accepted=self.requirements)

    def open(self) -> int:
        """The SDK client's first payment (a deposit), verified and mined by the facilitator."""
        payload = self.client.create_payment_payload(self.requirements)
        assert payload["type"] == "deposit"
        assert payload["voucher"]["maxClaimableAmount"] == str(PRICE)
        verified = self.facilitator.verify(self.pay(payload), self.requirements)
        assert verified.is_valid, verified
        settled = self.facilitator.settle(self.pay(payload), self.requirements)
        assert settled.success, settled
        return int(payload["deposit"]["amount"])

    def voucher(self, cumulative: int, signer: Any = None) -> VoucherFields:
        return sign_voucher(
            EthAccountSigner(signer or self.payer), self.id, cumulative, self.network
        )

    def claim_row(self, voucher: VoucherFields, total: int) -> VoucherClaim:
        return VoucherClaim(
            channel=self.config,
            max_claimable_amount=voucher.max_claimable_amount,
            signature=voucher.signature,
            total_claimed=str(total),
        )

    def claim(self, *rows: VoucherClaim, signature: str | None = None) -> SettleResponse:
        payload = ClaimPayload(claims=list(rows), claim_authorizer_signature=signature)
        return self.facilitator.settle(self.pay(payload.to_dict()), self.requirements)

    def settle(self) -> SettleResponse:
        payload = SettlePayload(receiver=self.receiver, token=self.token.address)
        return self.facilitator.settle(self.pay(payload.to_dict()), self.requirements)

    def state(self) -> tuple[int, int]:
        balance, claimed = self.contract.functions.channels(bytes.fromhex(self.id[2:])).call()
        return int(balance), int(claimed)

    def call(self, sender: Any, function: str, *args: Any) -> None:
        data = self.contract.encode_abi(function, list(args))
        self.chain.transact(sender, {"to": BATCH_SETTLEMENT, "data": data})


@pytest.fixture
def channel(chain: Anvil, token: TestUSD, payer: Any) -> Channel:
    return Channel(chain, token, payer)


def refused(response: SettleResponse, reason: str) -> bool:
    """The facilitator simulates each claim on-chain first: a refusal is the contract's revert."""
    return not response.success and reason in (response.error_message or "")


def test_deposit_vouchers_claim_settle_and_refund_with_the_sdk(channel: Channel) -> None:
    token, payer = channel.token, channel.payer
    funds = token.balance_of(payer.address)
    deposit = channel.open()
    assert deposit >= PAGES * PRICE
    assert token.balance_of(payer.address) == funds - deposit
    assert token.balance_of(BATCH_SETTLEMENT) >= deposit
    assert channel.state() == (deposit, 0)
    assert channel.contract.functions.getChannelId(
        to_contract_channel_config(channel.config)
    ).call() == bytes.fromhex(channel.id[2:])

    # One cumulative voucher per page, each accepted by the SDK's facilitator.
    vouchers = [channel.voucher(page * PRICE) for page in range(1, PAGES + 1)]
    for voucher in vouchers[1:]:
        payload = {
            "type": "voucher",
            "channelConfig": channel.config.to_dict(),
            "voucher": voucher.to_dict(),
        }
        assert channel.facilitator.verify(channel.pay(payload), channel.requirements).is_valid

    # The receiver claims the last voucher only (cumulative), then sweeps it in one transfer.
    claimed = channel.claim(channel.claim_row(vouchers[-1], PAGES * PRICE))
    assert claimed.success, claimed
    assert channel.state() == (deposit, PAGES * PRICE)
    assert channel.contract.functions.receivers(channel.receiver, token.address).call() == [
        PAGES * PRICE,
        0,
    ]
    settled = channel.settle()
    assert settled.success, settled
    # The SDK reads the amount from the Settled event when its signer exposes web3 (this one
    # does not: amount ""), so decode the double's event with the SDK's ABI here.
    sdk_view = channel.chain.w3.eth.contract(address=BATCH_SETTLEMENT, abi=BATCH_SETTLEMENT_ABI)
    receipt = channel.chain.w3.eth.get_transaction_receipt(settled.transaction)
    (event,) = sdk_view.events.Settled().process_receipt(receipt, errors=DISCARD)
    assert event.args.receiver == channel.receiver and event.args.amount == PAGES * PRICE
    assert token.balance_of(channel.receiver) == PAGES * PRICE
    assert channel.settle().error_reason == "invalid_batch_settlement_evm_nothing_to_settle"

    # Cooperative refund as the SDK facilitator sends it: multicall[claim, refundWithSignature].
    zero_charge = channel.voucher(PAGES * PRICE)
    refund = EnrichedRefundPayload(
        channel_config=channel.config,
        voucher=zero_charge,
        amount=str(deposit - PAGES * PRICE),
        refund_nonce="0",
        claims=[channel.claim_row(zero_charge, PAGES * PRICE)],
    )
    refunded = channel.facilitator.settle(channel.pay(refund.to_dict()), channel.requirements)
    assert refunded.success, refunded
    assert refunded.amount == str(deposit - PAGES * PRICE)
    assert token.balance_of(payer.address) == funds - PAGES * PRICE
    assert channel.state() == (PAGES * PRICE, PAGES * PRICE)
    assert channel.contract.functions.refundNonce(bytes.fromhex(channel.id[2:])).call() == 1

    # The contract itself refuses a replayed refund signature (the nonce moved on) and one not
    # signed by the receiverAuthorizer (the facilitator would not even send these).
    config = to_contract_channel_config(channel.config)
    old = sign_refund(channel.authorizer, channel.id, 1, 0, channel.network)
    with pytest.raises(Exception, match="refund: wrong nonce"):
        channel.call(payer, "refundWithSignature", config, 1, 0, bytes.fromhex(old[2:]))
    forged = sign_refund(LocalAuthorizerSigner(payer), channel.id, 1, 1, channel.network)
    with pytest.raises(Exception, match="refund: bad authorizer signature"):
        channel.call(payer, "refundWithSignature", config, 1, 1, bytes.fromhex(forged[2:]))


def test_the_contract_refuses_claims_the_vouchers_do_not_back(channel: Channel) -> None:
    deposit = channel.open()
    stranger = Account.create()

    forged = channel.voucher(PRICE, signer=stranger)
    assert refused(channel.claim(channel.claim_row(forged, PRICE)), "bad voucher signature")

    two_pages = channel.voucher(2 * PRICE)
    assert refused(
        channel.claim(channel.claim_row(two_pages, 2 * PRICE + 1)), "claim: above the voucher"
    )

    beyond = channel.voucher(deposit + PRICE)
    assert refused(
        channel.claim(channel.claim_row(beyond, deposit + PRICE)), "claim: above the balance"
    )

    # A batch signature by anyone but the channel's receiverAuthorizer is refused.
    row = channel.claim_row(two_pages, 2 * PRICE)
    other = sign_claim_batch(LocalAuthorizerSigner(stranger), [row], channel.network)
    assert refused(channel.claim(row, signature=other), "bad authorizer signature")

    assert channel.claim(row).success
    one_page = channel.voucher(PRICE)
    assert refused(channel.claim(channel.claim_row(one_page, PRICE)), "below totalClaimed")
    # Presenting the claimed total again moves nothing.
    assert channel.claim(row).success
    assert channel.state() == (deposit, 2 * PRICE)

    # claim() without a batch signature is for the receiver side only.
    args = build_voucher_claim_args([channel.claim_row(channel.voucher(3 * PRICE), 3 * PRICE)])
    with pytest.raises(Exception, match="claim: not the receiver"):
        channel.call(channel.payer, "claim", args)
    assert channel.state() == (deposit, 2 * PRICE)


def test_deposits_outside_the_withdraw_delay_bounds_are_refused(channel: Channel) -> None:
    for delay in (899, 2_592_001):
        config = ChannelConfig(**{**vars(channel.config), "withdraw_delay": delay})
        payload = create_batch_settlement_eip3009_deposit_payload(
            EthAccountSigner(channel.payer), channel.requirements, config, 5 * PRICE, PRICE
        )
        with pytest.raises(Exception, match="withdrawDelay out of range"):
            channel.call(
                channel.payer,
                "deposit",
                to_contract_channel_config(config),
                5 * PRICE,
                sdk_constants.ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
                build_eip3009_deposit_collector_data(payload),
            )


def test_a_permit2_deposit_goes_through_the_permit2_collector(
    chain: Anvil, token: TestUSD, payer: Any
) -> None:
    chain.install_permit2()
    token.approve(payer, PERMIT2)
    channel = Channel(chain, token, payer, assetTransferMethod="permit2")
    funds = token.balance_of(payer.address)
    deposit = channel.open()
    assert token.balance_of(payer.address) == funds - deposit
    assert channel.state() == (deposit, 0)
    assert channel.claim(channel.claim_row(channel.voucher(PRICE), PRICE)).success
    assert channel.settle().success
    assert token.balance_of(channel.receiver) == PRICE


def test_a_deposit_authorization_is_bound_to_its_channel_and_collector(channel: Channel) -> None:
    payload = create_batch_settlement_eip3009_deposit_payload(
        EthAccountSigner(channel.payer), channel.requirements, channel.config, 5 * PRICE, PRICE
    )
    data = build_eip3009_deposit_collector_data(payload)
    other = ChannelConfig(**{**vars(channel.config), "salt": "0x" + "11" * 32})
    with pytest.raises(Exception, match="TestUSD: invalid signature"):  # nonce binds channelId
        channel.call(
            channel.payer,
            "deposit",
            to_contract_channel_config(other),
            5 * PRICE,
            ERC3009_DEPOSIT_COLLECTOR,
            data,
        )
    collector = channel.chain.w3.eth.contract(
        address=ERC3009_DEPOSIT_COLLECTOR, abi=_artifact("ERC3009DepositCollectorLite")["abi"]
    )
    call = collector.encode_abi(
        "collect",
        [
            channel.payer.address,
            channel.token.address,
            5 * PRICE,
            bytes.fromhex(channel.id[2:]),
            data,
        ],
    )
    with pytest.raises(Exception, match="only the settlement contract"):
        channel.chain.transact(channel.payer, {"to": ERC3009_DEPOSIT_COLLECTOR, "data": call})
    assert channel.state() == (0, 0)


@pytest.fixture
def own_chain() -> Iterator[Anvil]:
    """A chain of its own: this test moves the clock forward."""
    with Anvil() as anvil:
        yield anvil


def test_timed_withdrawal_waits_for_the_delay_and_the_receiver_may_claim_meanwhile(
    own_chain: Anvil,
) -> None:
    token = TestUSD.deploy(own_chain, own_chain.new_account())
    payer = own_chain.new_account()
    token.mint(payer.address, 1_000_000)
    channel = Channel(own_chain, token, payer)
    deposit = channel.open()
    config = to_contract_channel_config(channel.config)

    with pytest.raises(Exception, match="above unclaimed escrow"):
        channel.call(payer, "initiateWithdraw", config, deposit + 1)
    channel.call(payer, "initiateWithdraw", config, deposit)
    with pytest.raises(Exception, match="delay not over"):
        channel.call(payer, "finalizeWithdraw", config)
    with pytest.raises(Exception, match="not the payer"):
        channel.call(own_chain.new_account(), "finalizeWithdraw", config)

    # During the grace period the receiver still claims what the payer signed.
    assert channel.claim(channel.claim_row(channel.voucher(2 * PRICE), 2 * PRICE)).success

    own_chain.w3.provider.make_request("evm_increaseTime", [WITHDRAW_DELAY])  # type: ignore[arg-type]
    own_chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    channel.call(payer, "finalizeWithdraw", config)
    assert token.balance_of(payer.address) == 1_000_000 - 2 * PRICE
    assert channel.state() == (2 * PRICE, 2 * PRICE)
    assert channel.settle().success
    assert token.balance_of(channel.receiver) == 2 * PRICE
    assert token.balance_of(BATCH_SETTLEMENT) == 0


ZERO = "0x" + "00" * 20


@pytest.mark.parametrize("authorizer", ["separate key", "zero: the payer signs"])
def test_the_voucher_signer_is_the_one_the_config_commits_to(
    chain: Anvil, token: TestUSD, payer: Any, authorizer: str
) -> None:
    voucher_key = Account.create() if authorizer == "separate key" else payer
    if voucher_key is payer:
        options = BatchSettlementEvmSchemeOptions(payer_authorizer=ZERO)
    else:
        options = BatchSettlementEvmSchemeOptions(voucher_signer=EthAccountSigner(voucher_key))
    channel = Channel(chain, token, payer, options)
    expected = ZERO if voucher_key is payer else voucher_key.address
    assert channel.config.payer_authorizer.lower() == expected.lower()
    channel.open()

    # The SignatureChecker path (zero payerAuthorizer) still refuses another EOA's voucher.
    other = payer if voucher_key is not payer else Account.create()
    row = channel.claim_row(channel.voucher(PRICE, signer=other), PRICE)
    assert refused(channel.claim(row), "bad voucher signature")
    assert channel.claim(
        channel.claim_row(channel.voucher(PRICE, signer=voucher_key), PRICE)
    ).success
    assert channel.state()[1] == PRICE


class _Fetched:
    """What the SDK client's refund needs of an HTTP response (its default fetch needs httpx)."""

    def __init__(self, response: requests.Response):
        self.status = response.status_code
        self.headers = dict(response.headers)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)


def test_end_to_end_with_the_sdk_http_server_and_client(chain: Anvil, token: TestUSD, payer: Any):
    """The SDK's Flask middleware and batch-settlement server, its facilitator and its requests
    client, all on the doubles: pages are served on vouchers, the receiver's channel manager
    claims and settles, and the client's cooperative refund returns the unused deposit."""
    with sdk_batch_site(chain, token, PRICE) as publisher:
        site, network, receiver = publisher.url, publisher.network, publisher.receiver
        client_scheme = BatchSettlementEvmScheme(payer)
        client = x402ClientSync().register(network, client_scheme)
        client.set_spend_controls({"allowed_assets": True})  # TestUSD is no SDK default asset
        session = x402_requests(client)
        funds = token.balance_of(payer.address)
        for page in range(PAGES):
            response = session.get(f"{site}/articles/{page}")
            assert response.status_code == 200 and response.text == f"article {page}"
        deposited = funds - token.balance_of(payer.address)
        assert deposited >= PAGES * PRICE  # one deposit, then vouchers only
        assert token.balance_of(BATCH_SETTLEMENT) >= deposited

        publisher.manager.claim_and_settle()
        assert token.balance_of(receiver) == PAGES * PRICE

        fetch = lambda url, headers: _Fetched(requests.get(url, headers=headers, timeout=30))  # noqa: E731
        refunded = client_scheme.refund(f"{site}/articles/0", RefundOptions(fetch=fetch))
        assert refunded.success, refunded
        assert token.balance_of(payer.address) == funds - PAGES * PRICE
