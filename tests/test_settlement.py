"""Settlement on a real anvil node: bulk, idempotent, and safe across crashes."""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
from eth_account import Account

from scrapy_x402._assets import AssetTable
from scrapy_x402._settlement import Settler
from scrapy_x402.ledger import PaymentRecord, Status, open_ledger


@pytest.fixture
def ledger(tmp_path):
    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    yield ledger
    ledger.close()


def owe(ledger, payer, token, payee, amount, count=1):
    ids = []
    for _ in range(count):
        pid = "0x" + os.urandom(32).hex()
        ledger.add(
            PaymentRecord(
                pid,
                "run",
                "deferred",
                "eip155:31337",
                token.address,
                payer.address,
                payee,
                amount,
                Decimal(amount) / 10**6,
                "a.example",
                "a.example",
                "http://a.example/",
                {},
                0,
            )
        )
        ledger.resolve(pid, Status.ACCEPTED, receipt={})
        ids.append(pid)
    return ids


def settler(ledger, payer, chain, token, rpc=None, **kwargs):
    return Settler(
        ledger,
        payer,
        {"eip155:31337": rpc or chain.url},
        AssetTable(token.asset_setting()),
        **kwargs,
    )


def record(s, chain, owed):
    """A transfer signed and recorded as settle() does, then left unsent (a crash)."""
    nonce = chain.w3.eth.get_transaction_count(owed.payer, "pending")
    settlement = s._sign_transfer(chain.w3, owed, nonce, s._fees(chain.w3))
    assert s.ledger.begin_settlement(settlement, owed.payment_ids)
    return settlement


def test_one_transfer_per_payee_and_a_second_settle_pays_nothing(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 1_000, count=5)
    owe(ledger, payer, token, payees[1], 7_000, count=2)
    s = settler(ledger, payer, chain, token)
    planned = s.settle(dry_run=True)
    assert sorted((o.status, o.amount, o.payment_count) for o in planned) == [
        ("planned", 5_000, 5),
        ("planned", 14_000, 2),
    ]
    assert token.balance_of(payees[0]) == 0  # dry run sent nothing
    nonce_before = chain.w3.eth.get_transaction_count(payer.address)
    outcomes = s.settle()
    assert sorted(o.status for o in outcomes) == ["confirmed", "confirmed"]
    assert chain.w3.eth.get_transaction_count(payer.address) == nonce_before + 2
    assert (token.balance_of(payees[0]), token.balance_of(payees[1])) == (5_000, 14_000)
    assert s.settle() == []
    assert (token.balance_of(payees[0]), token.balance_of(payees[1])) == (5_000, 14_000)


def test_transfer_carries_the_reference_of_the_commitments_it_pays(
    ledger, payer, chain, token, payees
):
    from scrapy_x402.paywall import settlement_reference

    ids = owe(ledger, payer, token, payees[0], 1_000, count=3)
    [outcome] = settler(ledger, payer, chain, token).settle()
    tx = chain.w3.eth.get_transaction(outcome.tx_hash)
    assert bytes(tx["input"])[-32:] == settlement_reference(ids)


def test_crash_after_broadcast_before_recording_pays_once(ledger, payer, chain, token, payees):
    ids = owe(ledger, payer, token, payees[0], 3_000, count=2)
    owed = ledger.owed(payer.address)[0]
    settlement = record(settler(ledger, payer, chain, token), chain, owed)
    chain.w3.eth.send_raw_transaction(settlement.raw_tx)
    # ...the process dies here. A new run reads the chain instead of paying again.
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [(o.status, o.tx_hash) for o in outcomes] == [("confirmed", settlement.id)]
    assert token.balance_of(payees[0]) == 6_000
    assert {ledger.get_status(i) for i in ids} == {Status.SETTLED}


def test_crash_before_broadcast_rebroadcasts_the_same_transaction(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 2_000)
    owed = ledger.owed(payer.address)[0]
    settlement = record(settler(ledger, payer, chain, token), chain, owed)  # never sent
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [(o.status, o.tx_hash) for o in outcomes] == [("confirmed", settlement.id)]
    assert token.balance_of(payees[0]) == 2_000


def test_a_replaced_transaction_is_detected_and_paid_again_once(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 4_000)
    owed = ledger.owed(payer.address)[0]
    record(settler(ledger, payer, chain, token), chain, owed)  # never sent
    chain.transact(payer, {"to": payer.address, "value": 0})  # uses the stale nonce
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [o.status for o in outcomes] == ["replaced", "confirmed"]
    assert token.balance_of(payees[0]) == 4_000


def test_guards_leave_payments_owed(ledger, payer, chain, token, payees):
    owe(ledger, payer, token, payees[0], 10**12)  # more than the payer holds
    [outcome] = settler(ledger, payer, chain, token).settle()
    assert outcome.status == "failed" and "balance" in outcome.reason
    assert len(ledger.owed(payer.address)) == 1 and ledger.settlements() == []
    wrong_chain = Settler(ledger, payer, {"eip155:84532": chain.url}, AssetTable({}))
    ledger._execute("UPDATE x402_payments SET network = 'eip155:84532'")
    [outcome] = wrong_chain.settle()
    assert outcome.status == "failed" and "chain id 31337" in outcome.reason
    [outcome] = Settler(ledger, payer, {}, AssetTable({})).settle()
    assert outcome.status == "skipped" and "no RPC URL" in outcome.reason
    assert len(ledger.owed(payer.address)) == 1


def test_only_the_wallets_own_debts_are_settled(ledger, payer, chain, token, payees):
    owe(ledger, payer, token, payees[0], 1_000)
    assert settler(ledger, Account.create(), chain, token).settle() == []


def test_gas_price_cap_is_honoured(ledger, payer, chain, token, payees):
    from scrapy.settings import Settings

    from scrapy_x402 import X402Config

    owe(ledger, payer, token, payees[0], 1_000)
    rpc = {"X402_RPC_URLS": {"eip155:31337": chain.url}, "X402_ASSETS": token.asset_setting()}
    capped = X402Config.from_settings(Settings({**rpc, "X402_MAX_GAS_PRICE": "0.000000001"}))
    assert capped.max_gas_price == 1  # wei
    [outcome] = Settler.from_config(ledger, payer, capped).settle()
    assert outcome.status == "failed" and "X402_MAX_GAS_PRICE" in outcome.reason
    assert ledger.settlements() == [] and len(ledger.owed(payer.address)) == 1  # nothing sent
    generous = X402Config.from_settings(Settings({**rpc, "X402_MAX_GAS_PRICE": "1000"}))
    [outcome] = Settler.from_config(ledger, payer, generous).settle()
    assert outcome.status == "confirmed"
    tx = chain.w3.eth.get_transaction(outcome.tx_hash)
    assert tx["maxFeePerGas"] <= 1000 * 10**9


def test_a_reverted_transfer_leaves_the_payments_owed_and_is_never_doubled(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 5_000)
    thief = chain.new_account()
    token.approve(payer, thief.address)
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        slow = Settler(ledger, payer, {"eip155:31337": chain.url}, AssetTable({}), timeout=1)
        [pending] = slow.settle()  # broadcast, not mined yet
        assert pending.status == "pending"
        # In the same block, ahead of it (higher fee), the payer's tokens leave.
        drain = token.contract.encode_abi(
            "transferFrom", [payer.address, thief.address, token.balance_of(payer.address)]
        )
        tx = {
            "from": thief.address,
            "to": token.address,
            "data": drain,
            "chainId": chain.chain_id,
            "nonce": chain.w3.eth.get_transaction_count(thief.address),
            "gas": 100_000,
            "maxFeePerGas": 10**12,
            "maxPriorityFeePerGas": 10**11,
        }
        del tx["from"]
        chain.w3.eth.send_raw_transaction(thief.sign_transaction(tx).raw_transaction)
        chain.w3.provider.make_request("evm_mine", [])
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
    reverted, resend = settler(ledger, payer, chain, token).settle()
    assert (reverted.status, reverted.tx_hash, reverted.reason) == (
        "reverted",
        pending.tx_hash,
        "transaction reverted",
    )  # owed again...
    assert resend.status == "failed" and "balance" in resend.reason  # ...not paid without funds
    assert token.balance_of(payees[0]) == 0 and len(ledger.owed(payer.address)) == 1
    token.mint(payer.address, 5_000)
    [outcome] = settler(ledger, payer, chain, token).settle()
    assert outcome.status == "confirmed"
    assert token.balance_of(payees[0]) == 5_000  # paid once


def test_an_rpc_timeout_after_accepting_the_transfer_pays_once(ledger, payer, chain, token, payees):
    owe(ledger, payer, token, payees[0], 7_000)
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        slow = Settler(ledger, payer, {"eip155:31337": chain.url}, AssetTable({}), timeout=1)
        [outcome] = slow.settle()
        assert outcome.status == "pending"  # accepted by the node, fate unknown yet
        assert token.balance_of(payees[0]) == 0
        again = settler(ledger, payer, chain, token, timeout=1).settle()
        assert [(o.status, o.tx_hash) for o in again] == [("pending", outcome.tx_hash)]
        chain.w3.provider.make_request("evm_mine", [])
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [(o.status, o.tx_hash) for o in outcomes] == [("confirmed", outcome.tx_hash)]
    assert token.balance_of(payees[0]) == 7_000
    assert settler(ledger, payer, chain, token).settle() == []
