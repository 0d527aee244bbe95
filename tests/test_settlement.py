"""Settlement on a real anvil node: bulk, idempotent, and safe across crashes."""

from __future__ import annotations

import logging
import os
import time
from decimal import Decimal

import pytest
from eth_account import Account

from scrapy_x402._assets import AssetTable
from scrapy_x402._settlement import Settler
from scrapy_x402.ledger import PaymentRecord, Status, open_ledger
from scrapy_x402.payments import Limits, PaymentBook
from tests.rpcproxy import RPCProxy


@pytest.fixture
def ledger(tmp_path):
    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    yield ledger
    ledger.close()


def owe(ledger, payer, token, payee, amount, count=1, ids=None):
    """Accepted payments (commitments) of ``payer`` to ``payee``: ``count`` new ones, or
    the given ``ids``."""
    given, ids = ids, []
    for given_id in given or [None] * count:
        pid = given_id or "0x" + os.urandom(32).hex()
        book = PaymentBook(ledger)
        record = PaymentRecord(
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
        assert book.reserve(record, Limits(Decimal(10**9), None)) is None
        assert book.confirm(pid, Status.ACCEPTED, receipt={})
        ids.append(pid)
    return ids


def settler(ledger, payer, chain, token, rpc=None, **kwargs):
    return Settler(
        PaymentBook(ledger),
        payer,
        {"eip155:31337": rpc or chain.url},
        AssetTable(token.asset_setting()),
        **kwargs,
    )


def record(s, chain, owed):
    """A transfer signed and recorded as settle() does, then left unsent (a crash)."""
    nonce = chain.w3.eth.get_transaction_count(owed.payer, "pending")
    settlement = s._sign_transfer(chain.w3, owed, nonce, s._fees(chain.w3))
    assert s.book.settle_begin(settlement, owed.payment_ids)
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


def test_transfer_lists_the_ids_of_the_commitments_it_pays(ledger, payer, chain, token, payees):
    ids = owe(ledger, payer, token, payees[0], 1_000, count=3)
    [outcome] = settler(ledger, payer, chain, token).settle()
    data = bytes(chain.w3.eth.get_transaction(outcome.tx_hash)["input"])
    # transfer(payee, total) ‖ id₁ ‖ id₂ ‖ id₃, strictly ascending (docs section 8)
    assert data[:68].hex() == token.contract.encode_abi("transfer", [payees[0], 3_000])[2:]
    assert data[68:] == b"".join(bytes.fromhex(i[2:]) for i in sorted(ids))
    assert token.balance_of(payees[0]) == 3_000  # the token ignored the ids


def test_a_payee_owed_more_than_one_transfer_may_list_gets_several(
    ledger, payer, chain, token, payees
):
    from scrapy_x402.paywall import MAX_SETTLEMENT_IDS

    ids = owe(ledger, payer, token, payees[0], 10, count=MAX_SETTLEMENT_IDS + 1)
    nonce = chain.w3.eth.get_transaction_count(payer.address)
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [(o.status, o.payment_count) for o in outcomes] == [
        ("confirmed", MAX_SETTLEMENT_IDS),
        ("confirmed", 1),
    ]
    txs = [chain.w3.eth.get_transaction(o.tx_hash) for o in outcomes]
    assert [tx["nonce"] for tx in txs] == [nonce, nonce + 1]
    listed = [bytes(tx["input"])[68:] for tx in txs]
    assert len(listed[0]) == 32 * MAX_SETTLEMENT_IDS  # 16,000 bytes of calldata: mined
    assert b"".join(listed) == b"".join(bytes.fromhex(i[2:]) for i in sorted(ids))
    assert token.balance_of(payees[0]) == 10 * len(ids)
    assert {ledger.get_status(i) for i in ids} == {Status.SETTLED}


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
    wrong_chain = Settler(PaymentBook(ledger), payer, {"eip155:84532": chain.url}, AssetTable({}))
    ledger.execute("UPDATE x402_payments SET network = 'eip155:84532'")
    [outcome] = wrong_chain.settle()
    assert outcome.status == "failed" and "chain id 31337" in outcome.reason
    [outcome] = Settler(PaymentBook(ledger), payer, {}, AssetTable({})).settle()
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
    [outcome] = Settler.from_config(PaymentBook(ledger), payer, capped).settle()
    assert outcome.status == "failed" and "X402_MAX_GAS_PRICE" in outcome.reason
    assert ledger.settlements() == [] and len(ledger.owed(payer.address)) == 1  # nothing sent
    generous = X402Config.from_settings(Settings({**rpc, "X402_MAX_GAS_PRICE": "1000"}))
    [outcome] = Settler.from_config(PaymentBook(ledger), payer, generous).settle()
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
        slow = Settler(
            PaymentBook(ledger), payer, {"eip155:31337": chain.url}, AssetTable({}), timeout=1
        )
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
        slow = Settler(
            PaymentBook(ledger), payer, {"eip155:31337": chain.url}, AssetTable({}), timeout=1
        )
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


# -- issue 9: never pay twice, whatever the RPC does ------------------------------------


def automine(chain, on):
    chain.w3.provider.make_request("evm_setAutomine", [on])


@pytest.mark.parametrize("fault", ["forward_then_502", "drop_after_forwarding"])
def test_a_lost_answer_to_the_broadcast_pays_once(fault, ledger, payer, chain, token, payees):
    owe(ledger, payer, token, payees[0], 2_500, count=2)
    with RPCProxy(chain.url) as proxy:
        if fault == "forward_then_502":
            proxy.forward_then_502("eth_sendRawTransaction")
        else:
            proxy.drop("eth_sendRawTransaction", forward=True)
        outcomes = settler(ledger, payer, chain, token, rpc=proxy.url).settle()
        again = settler(ledger, payer, chain, token, rpc=proxy.url).settle()
        sends = proxy.calls.count("eth_sendRawTransaction")
    assert token.balance_of(payees[0]) == 5_000  # the node took it once; paid once
    assert [o.status for o in outcomes] == ["confirmed"] and again == []
    assert sends == 1  # no silent client retry of a transfer


def test_a_transfer_mined_between_two_reads_of_recovery_is_not_paid_again(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 4_000)
    owed = ledger.owed(payer.address)[0]
    automine(chain, False)
    try:
        settlement = record(settler(ledger, payer, chain, token), chain, owed)
        chain.w3.eth.send_raw_transaction(settlement.raw_tx)  # in the mempool; then a crash
        with RPCProxy(chain.url) as proxy:
            # The node says "no receipt yet", then mines it before the next call.
            proxy.after("eth_getTransactionReceipt", lambda params: proxy.node("evm_mine"))
            outcomes = settler(ledger, payer, chain, token, rpc=proxy.url, timeout=2).settle()
    finally:
        automine(chain, True)
    assert [(o.status, o.tx_hash) for o in outcomes] == [("confirmed", settlement.id)]
    assert token.balance_of(payees[0]) == 4_000
    assert chain.w3.eth.get_transaction_count(payer.address) == settlement.tx_nonce + 1


def test_settlement_status_moves_only_along_its_transition_table(
    ledger, payer, chain, token, payees
):
    from scrapy_x402.ledger import IllegalTransition

    ids = owe(ledger, payer, token, payees[0], 1_000, count=2)
    settlement = record(settler(ledger, payer, chain, token), chain, ledger.owed(payer.address)[0])
    with pytest.raises(IllegalTransition, match="signed -> confirmed"):
        PaymentBook(ledger).settle_end(settlement.id, "confirmed")  # never seen mined
    assert [s.status for s in ledger.settlements()] == ["signed"]  # nothing written
    assert {ledger.get_status(i) for i in ids} == {Status.SETTLING}
    PaymentBook(ledger).settle_mark(settlement.id, "broadcast")
    PaymentBook(ledger).settle_mark(settlement.id, "observed", block=41)
    PaymentBook(ledger).settle_mark(settlement.id, "broadcast")  # a reorg took block 41 away
    PaymentBook(ledger).settle_mark(settlement.id, "observed", block=42)
    PaymentBook(ledger).settle_end(settlement.id, "confirmed")
    with pytest.raises(IllegalTransition, match="confirmed -> replaced"):
        PaymentBook(ledger).settle_end(settlement.id, "replaced")
    assert [(s.status, s.block_number) for s in ledger.settlements()] == [("confirmed", 42)]
    assert {ledger.get_status(i) for i in ids} == {Status.SETTLED}


def test_a_settlement_another_process_finished_is_followed_and_the_clash_counted(
    tmp_path, ledger, payer, chain, token, payees, caplog
):
    owe(ledger, payer, token, payees[0], 3_000)
    settlement = record(settler(ledger, payer, chain, token), chain, ledger.owed(payer.address)[0])
    receipt = chain.w3.eth.wait_for_transaction_receipt(
        chain.w3.eth.send_raw_transaction(settlement.raw_tx)
    )

    def other_settle(params):  # a second `scrapy x402 settle`, done first
        other = open_ledger(str(tmp_path / "ledger.sqlite3"))
        PaymentBook(other).settle_mark(settlement.id, "observed", receipt["blockNumber"])
        PaymentBook(other).settle_end(settlement.id, "confirmed")
        other.close()

    with RPCProxy(chain.url) as proxy:
        proxy.after("eth_getTransactionReceipt", other_settle)
        watcher = settler(ledger, payer, chain, token, rpc=proxy.url)
        [outcome] = watcher.settle()
    assert (outcome.status, watcher.illegal_transitions) == ("confirmed", 1)
    assert "confirmed -> observed is not allowed" in caplog.text
    assert token.balance_of(payees[0]) == 3_000


def test_a_pending_settlement_of_an_old_ledger_is_recovered(
    tmp_path, ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 8_000)
    settlement = record(settler(ledger, payer, chain, token), chain, ledger.owed(payer.address)[0])
    chain.w3.eth.send_raw_transaction(settlement.raw_tx)
    # As the previous version left it: no block_number column, status "pending".
    ledger.execute("ALTER TABLE x402_settlements DROP COLUMN block_number")
    ledger.execute("UPDATE x402_settlements SET status = 'pending'")
    ledger.close()
    old = open_ledger(str(tmp_path / "ledger.sqlite3"))
    try:
        assert [s.status for s in old.settlements("signed")] == ["signed"]
        outcomes = settler(old, payer, chain, token).settle()
        assert [(o.status, o.tx_hash) for o in outcomes] == [("confirmed", settlement.id)]
    finally:
        old.close()
    assert token.balance_of(payees[0]) == 8_000


def test_a_transfer_is_final_only_at_the_configured_depth(ledger, payer, chain, token, payees):
    from scrapy.settings import Settings

    from scrapy_x402 import X402Config

    rpc = {"X402_RPC_URLS": {"eip155:31337": chain.url}, "X402_ASSETS": token.asset_setting()}
    assert X402Config.from_settings(Settings(rpc)).confirmations is None
    config = X402Config.from_settings(
        Settings({**rpc, "X402_CONFIRMATIONS": "2", "X402_SETTLEMENT_TIMEOUT": 1})
    )
    assert config.confirmations == 2
    ids = owe(ledger, payer, token, payees[0], 1_500)
    [outcome] = Settler.from_config(
        PaymentBook(ledger), payer, config
    ).settle()  # mined: 1 confirmation
    receipt = chain.w3.eth.get_transaction_receipt(outcome.tx_hash)
    assert outcome.status == "pending"
    assert [(s.status, s.block_number) for s in ledger.settlements()] == [
        ("observed", receipt["blockNumber"])
    ]
    assert ledger.get_status(ids[0]) == Status.SETTLING and ledger.owed(payer.address) == []
    chain.w3.provider.make_request("evm_mine", [])
    [outcome] = Settler.from_config(PaymentBook(ledger), payer, config).settle()
    assert outcome.status == "confirmed" and ledger.get_status(ids[0]) == Status.SETTLED
    default = settler(ledger, payer, chain, token)
    assert [default.depth(n) for n in ("eip155:31337", "eip155:1337", "eip155:84532")] == [1, 1, 3]


def test_a_reorged_transfer_falls_back_to_broadcast_and_is_paid_once(
    ledger, payer, chain, token, payees
):
    owe(ledger, payer, token, payees[0], 6_000)
    snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]
    [first] = settler(ledger, payer, chain, token, confirmations=2, timeout=1).settle()
    assert first.status == "pending" and ledger.settlements()[0].status == "observed"
    chain.w3.provider.make_request("evm_revert", [snapshot])  # its block is gone
    assert token.balance_of(payees[0]) == 0
    with RPCProxy(chain.url) as proxy:
        proxy.after("eth_sendRawTransaction", lambda params: proxy.node("evm_mine"))
        [outcome] = settler(ledger, payer, chain, token, rpc=proxy.url, confirmations=2).settle()
        assert proxy.calls.count("eth_sendRawTransaction") == 1  # the same bytes again
    assert (outcome.status, outcome.tx_hash) == ("confirmed", first.tx_hash)
    assert token.balance_of(payees[0]) == 6_000


def test_many_payees_are_sent_together_and_awaited_under_one_deadline(
    ledger, payer, chain, token, payees, caplog
):
    for n, payee in enumerate(payees, 1):
        owe(ledger, payer, token, payee, 1_000 * n)
    first_nonce = chain.w3.eth.get_transaction_count(payer.address, "pending")
    automine(chain, False)
    try:
        with RPCProxy(chain.url) as proxy:
            started = time.monotonic()
            outcomes = settler(ledger, payer, chain, token, rpc=proxy.url, timeout=2).settle()
            elapsed = time.monotonic() - started
            calls = list(proxy.calls)
        nonces = [chain.w3.eth.get_transaction(o.tx_hash)["nonce"] for o in outcomes]
        chain.w3.provider.make_request("evm_mine", [])
    finally:
        automine(chain, True)
    sends = [i for i, method in enumerate(calls) if method == "eth_sendRawTransaction"]
    receipts = [i for i, method in enumerate(calls) if method == "eth_getTransactionReceipt"]
    assert len(sends) == 3 and max(sends) < min(receipts)  # all sent before any wait
    assert [o.status for o in outcomes] == ["pending"] * 3
    assert elapsed < 4  # one 2 s deadline for the three, not 2 s each
    assert sorted(nonces) == [first_nonce, first_nonce + 1, first_nonce + 2]
    caplog.set_level(logging.INFO, "scrapy_x402")
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [o.status for o in outcomes] == ["confirmed"] * 3
    assert "x402 settlement: 3 of 3 confirmed" in caplog.messages
    assert [token.balance_of(p) for p in payees] == [1_000, 2_000, 3_000]


def test_the_balance_must_cover_every_transfer_of_a_token_before_any_is_sent(
    ledger, payer, chain, token, payees
):
    half = token.balance_of(payer.address) // 2
    owe(ledger, payer, token, payees[0], half + 1)  # each is affordable, not both
    owe(ledger, payer, token, payees[1], half + 1)
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [o.status for o in outcomes] == ["failed", "failed"]
    assert all("balance" in o.reason for o in outcomes)
    assert ledger.settlements() == [] and len(ledger.owed(payer.address)) == 2
    assert token.balance_of(payees[0]) == token.balance_of(payees[1]) == 0


def test_a_payment_no_longer_owed_skips_its_transfer_and_the_others_go_on(
    ledger, payer, chain, token, payees, monkeypatch
):
    ids = owe(ledger, payer, token, payees[0], 1_000, count=2)
    owe(ledger, payer, token, payees[1], 2_000)
    stale = ledger.owed(payer.address)
    # Settled meanwhile (another settle run): the list this run read is out of date.
    ledger.execute("UPDATE x402_payments SET status = 'settled' WHERE id = ?", (ids[0],))
    monkeypatch.setattr(ledger, "owed", lambda payer, max_payments=None: stale)
    outcomes = {o.payee: o for o in settler(ledger, payer, chain, token).settle()}
    assert outcomes[payees[0]].status == "skipped"
    assert "no longer" in outcomes[payees[0]].reason
    assert outcomes[payees[1]].status == "confirmed"
    assert ledger.get_status(ids[1]) == Status.ACCEPTED  # untouched: still owed
    assert [s.payee for s in ledger.settlements()] == [payees[1]]
    assert (token.balance_of(payees[0]), token.balance_of(payees[1])) == (0, 2_000)


def test_rpc_keys_stay_out_of_logs_outcomes_and_the_ledger(
    ledger, payer, chain, token, payees, caplog
):
    secret = "SUPERSECRETKEY123"
    caplog.set_level(logging.DEBUG)
    owe(ledger, payer, token, payees[0], 1_000)
    owe(ledger, payer, token, payees[1], 2_000)
    with RPCProxy(chain.url, path=f"/v2/{secret}") as proxy:
        proxy.answer_502("eth_sendRawTransaction", times=1_000)
        outcomes = settler(ledger, payer, chain, token, rpc=proxy.url, timeout=1).settle()
        assert [o.status for o in outcomes] == ["pending", "pending"]
        owe(ledger, payer, token, payees[2], 3_000)
        proxy.stop()  # now connections are refused
        outcomes += settler(ledger, payer, chain, token, rpc=proxy.url, timeout=1).settle()
    assert sorted(o.status for o in outcomes) == ["failed"] + ["pending"] * 4
    reasons = " ".join(o.reason or "" for o in outcomes)
    assert "502" in reasons and "127.0.0.1" in reasons and "/…" in reasons  # still useful
    assert secret not in repr(outcomes)
    assert secret not in caplog.text
    for record in caplog.records:
        assert secret not in record.getMessage() and secret not in (record.exc_text or "")
    tables = [r[0] for r in ledger.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    for table in tables:
        assert secret not in repr(ledger.query(f"SELECT * FROM {table}"))


def test_a_lagging_node_never_makes_a_mined_transfer_look_replaced(
    ledger, payer, chain, token, payees
):
    """Behind a load balancer, the node answering receipts and transactions has not seen a
    transfer mined three blocks ago, while the one answering nonces has: the transfer's nonce
    is used, yet nothing is known of it. Only the transaction that used the nonce can prove a
    replacement; here it is ours, so nothing is paid again."""
    owe(ledger, payer, token, payees[0], 4_000)
    settlement = record(settler(ledger, payer, chain, token), chain, ledger.owed(payer.address)[0])
    chain.w3.eth.send_raw_transaction(settlement.raw_tx)  # mined; then the process died
    for _ in range(3):
        chain.w3.provider.make_request("evm_mine", [])
    with RPCProxy(chain.url) as proxy:
        for method in ("eth_getTransactionReceipt", "eth_getTransactionByHash"):
            proxy.lag(method, times=1_000)
        [outcome] = settler(
            ledger, payer, chain, token, rpc=proxy.url, timeout=1, confirmations=3
        ).settle()
    assert outcome.status == "pending"  # its fate is not known yet: it stays counted...
    assert token.balance_of(payees[0]) == 4_000  # ...and is not paid a second time
    [outcome] = settler(ledger, payer, chain, token, confirmations=3).settle()
    assert (outcome.status, outcome.tx_hash) == ("confirmed", settlement.id)
    assert token.balance_of(payees[0]) == 4_000
