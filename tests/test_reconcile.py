"""Reconciliation on a real anvil node: the publisher reads which commitments a settlement
transfer pays from the transfer itself (docs/deferred-scheme.md sections 8-9)."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from eth_abi import encode as abi_encode
from web3 import Web3

from scrapy_x402.devchain import TestUSD
from scrapy_x402.paywall import (
    MAX_SETTLEMENT_IDS,
    Commitment,
    CommitmentBook,
    reconcile,
    reconcile_transaction,
    settlement_ids,
    settlement_reference,
)
from tests.test_settlement import owe, settler


@pytest.fixture
def book(tmp_path):
    return CommitmentBook(str(tmp_path / "publisher.sqlite3"))


@pytest.fixture
def ledger(tmp_path):
    from scrapy_x402.ledger import open_ledger

    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    yield ledger
    ledger.close()


def served(book, payer, payee, token, amount, count=1, chain_id=31337):
    """Commitments whose pages the publisher served: in its book. Their ids, ascending."""
    ids = []
    for _ in range(count):
        commitment = Commitment(
            chain_id,
            payer.address,
            payee,
            token.address,
            amount,
            "0x" + os.urandom(32).hex(),
            "0x" + os.urandom(32).hex(),
            2_000_000_000,
        )
        book.record(commitment, f"https://news.example/{commitment.nonce}")
        ids.append(commitment.id)
    return sorted(ids)


def transfer(chain, sender, token_address, payee, value, trailer=b"", gas=None):
    """A transaction calling transfer(payee, value) with ``trailer`` after its arguments; its
    hash once mined (reverted or not)."""
    data = bytes.fromhex("a9059cbb") + abi_encode(["address", "uint256"], [payee, value]) + trailer
    tx = {
        "from": sender.address,
        "to": token_address,
        "data": data,
        "chainId": chain.chain_id,
        "nonce": chain.w3.eth.get_transaction_count(sender.address),
        "gasPrice": chain.w3.eth.gas_price,
    }
    tx["gas"] = gas or chain.w3.eth.estimate_gas(tx)
    del tx["from"]
    tx_hash = chain.w3.eth.send_raw_transaction(sender.sign_transaction(tx).raw_transaction)
    chain.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)
    return tx_hash.to_0x_hex()


def paid(book, ids):
    return {i: book.paid_by(i) for i in ids}


def test_an_honest_settlement_by_the_settler_is_reconciled_in_full(
    book, ledger, payer, chain, token, payees
):
    to_a = served(book, payer, payees[0], token, 1_000, count=3)
    to_b = served(book, payer, payees[1], token, 2_500, count=2)
    owe(ledger, payer, token, payees[0], 1_000, ids=to_a)
    owe(ledger, payer, token, payees[1], 2_500, ids=to_b)
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [o.status for o in outcomes] == ["confirmed", "confirmed"]
    results = {o.payee: reconcile_transaction(chain.w3, book, o.tx_hash) for o in outcomes}
    assert {p: (r.outcome, r.paid, r.credit) for p, r in results.items()} == {
        payees[0]: ("paid", tuple(to_a), 0),
        payees[1]: ("paid", tuple(to_b), 0),
    }
    assert paid(book, to_a) == dict.fromkeys(to_a, results[payees[0]].tx_hash)
    assert paid(book, to_b) == dict.fromkeys(to_b, results[payees[1]].tx_hash)
    assert book.unpaid(payer.address, payees[0], token.address, 31337) == {}
    assert book.credits() == []
    # Reconciling again changes nothing.
    again = reconcile_transaction(chain.w3, book, outcomes[0].tx_hash)
    assert (again.outcome, again.paid, again.credit) == ("already reconciled", (), 0)
    assert paid(book, to_a) == dict.fromkeys(to_a, results[payees[0]].tx_hash)
    assert book.credits() == []


def test_one_unknown_id_costs_only_that_id(book, ledger, payer, chain, token, payees):
    known = served(book, payer, payees[0], token, 1_000, count=3)
    unknown = "0x" + os.urandom(32).hex()  # the client thinks it was served; the book disagrees
    owe(ledger, payer, token, payees[0], 1_000, ids=[*known, unknown])
    [outcome] = settler(ledger, payer, chain, token).settle()
    result = reconcile_transaction(chain.w3, book, outcome.tx_hash)
    assert (result.outcome, result.paid, result.credit, result.unmatched) == (
        "partly matched",
        tuple(known),
        1_000,
        (unknown,),
    )
    assert unknown in result.reason and "unknown" in result.reason
    assert paid(book, known) == dict.fromkeys(known, outcome.tx_hash)
    [credit] = book.credits(payer.address)
    assert (credit["tx_hash"], credit["amount"], credit["payee"], credit["unmatched"]) == (
        outcome.tx_hash,
        1_000,
        payees[0],
        [unknown],
    )
    assert unknown in credit["reason"]
    again = reconcile_transaction(chain.w3, book, outcome.tx_hash)
    assert again.outcome == "already reconciled" and book.credits() == [credit]


def test_a_transfer_of_less_than_the_listed_commitments_pays_none_of_them(
    book, payer, chain, token, payees
):
    ids = served(book, payer, payees[0], token, 1_000, count=3)
    tx_hash = transfer(chain, payer, token.address, payees[0], 2_000, settlement_ids(ids))
    result = reconcile_transaction(chain.w3, book, tx_hash)
    assert (result.outcome, result.paid, result.credit) == ("credited", (), 2_000)
    assert "more than it paid" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids)  # all still unpaid
    assert [c["amount"] for c in book.credits(payer.address)] == [2_000]


def test_ids_of_another_payer_are_not_paid_by_this_one(book, chain, token, payees):
    victim, liar = chain.new_account(), chain.new_account()
    token.mint(liar.address, 10_000)
    theirs = served(book, victim, payees[0], token, 1_000, count=2)
    mine = served(book, liar, payees[0], token, 1_000)
    # The liar pays one of its own pages and lists the victim's as if it paid them too.
    trailer = settlement_ids([*theirs, *mine])
    tx_hash = transfer(chain, liar, token.address, payees[0], 3_000, trailer)
    result = reconcile_transaction(chain.w3, book, tx_hash)
    assert (result.outcome, result.paid, result.credit) == ("partly matched", tuple(mine), 2_000)
    assert set(result.unmatched) == set(theirs) and "its payer is" in result.reason
    assert paid(book, theirs) == dict.fromkeys(theirs)  # the victim still owes them
    assert book.credits(victim.address) == []
    assert [c["amount"] for c in book.credits(liar.address)] == [2_000]


def test_a_transfer_of_another_token_pays_nothing_and_credits_nothing(
    book, payer, chain, token, payees
):
    ids = served(book, payer, payees[0], token, 1_000, count=2)
    other = TestUSD.deploy(chain, chain.new_account(), name="Worthless")
    other.mint(payer.address, 10_000)
    tx_hash = transfer(chain, payer, other.address, payees[0], 2_000, settlement_ids(ids))
    result = reconcile_transaction(chain.w3, book, tx_hash)
    assert result.outcome == "not a settlement" and "no commitment" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids) and book.credits() == []


def test_a_reverted_transfer_pays_nothing(book, payer, chain, token, payees):
    ids = served(book, payer, payees[0], token, 1_000, count=2)
    too_much = token.balance_of(payer.address) + 1  # the token reverts
    trailer = settlement_ids(ids)
    tx_hash = transfer(chain, payer, token.address, payees[0], too_much, trailer, gas=200_000)
    assert chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 0
    result = reconcile_transaction(chain.w3, book, tx_hash)
    assert result.outcome == "not a settlement" and "reverted" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids) and book.credits() == []


def test_a_receipt_without_the_tokens_transfer_log_pays_nothing(book, payer, chain, token, payees):
    ids = served(book, payer, payees[0], token, 1_000, count=2)
    tx_hash = transfer(chain, payer, token.address, payees[0], 2_000, settlement_ids(ids))
    tx = chain.w3.eth.get_transaction(tx_hash)
    receipt = dict(chain.w3.eth.get_transaction_receipt(tx_hash))
    [log] = receipt["logs"]
    # A node (or a caller) that lies about the receipt: another amount, or no log at all.
    lying = {**dict(log), "data": abi_encode(["uint256"], [20_000])}
    for logs in ([lying], []):
        result = reconcile(book, tx, {**receipt, "logs": logs}, 31337)
        assert result.outcome == "not a settlement" and "no Transfer" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids) and book.credits() == []
    assert reconcile(book, tx, receipt, 84532).outcome == "not a settlement"  # another chain
    assert paid(book, ids) == dict.fromkeys(ids)
    assert reconcile(book, tx, receipt, 31337).outcome == "paid"


def test_duplicate_ids_pay_nothing(book, payer, chain, token, payees):
    ids = served(book, payer, payees[0], token, 1_000, count=2)
    listed = bytes.fromhex(ids[0][2:]) * 2 + bytes.fromhex(ids[1][2:])  # one id twice
    tx_hash = transfer(chain, payer, token.address, payees[0], 3_000, listed)
    result = reconcile_transaction(chain.w3, book, tx_hash)
    assert (result.outcome, result.paid, result.credit) == ("credited", (), 3_000)
    assert "strictly ascending" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids)
    with pytest.raises(ValueError, match="twice"):
        settlement_ids([ids[0], ids[0]])  # and our client never lists one twice


def test_an_id_already_paid_is_not_paid_again(book, payer, chain, token, payees):
    ids = served(book, payer, payees[0], token, 1_000, count=2)
    first = transfer(chain, payer, token.address, payees[0], 2_000, settlement_ids(ids))
    assert reconcile_transaction(chain.w3, book, first).outcome == "paid"
    second = transfer(chain, payer, token.address, payees[0], 1_000, settlement_ids(ids[:1]))
    result = reconcile_transaction(chain.w3, book, second)
    assert (result.outcome, result.credit) == ("credited", 1_000)
    assert f"already paid by {first}" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids, first)


def test_a_settlement_split_across_the_id_limit_is_reconciled_in_full(
    book, ledger, payer, chain, token, payees
):
    ids = served(book, payer, payees[0], token, 10, count=MAX_SETTLEMENT_IDS + 1)
    owe(ledger, payer, token, payees[0], 10, ids=ids)
    outcomes = settler(ledger, payer, chain, token).settle()
    assert [(o.status, o.payment_count) for o in outcomes] == [
        ("confirmed", MAX_SETTLEMENT_IDS),
        ("confirmed", 1),
    ]
    results = [reconcile_transaction(chain.w3, book, o.tx_hash) for o in outcomes]
    assert [(r.outcome, len(r.paid), r.credit) for r in results] == [
        ("paid", MAX_SETTLEMENT_IDS, 0),
        ("paid", 1, 0),
    ]
    assert book.unpaid(payer.address, payees[0], token.address, 31337) == {}


def test_a_version_1_reference_is_accepted_only_for_all_the_unpaid_commitments(
    book, payer, chain, token, payees
):
    # Spec version 1: transfer(payee, total) ‖ keccak256(sorted ids), 32 bytes.
    ids = served(book, payer, payees[0], token, 1_000, count=3)
    part = transfer(chain, payer, token.address, payees[0], 2_000, settlement_reference(ids[:2]))
    result = reconcile_transaction(chain.w3, book, part)  # would need a subset search: refused
    assert (result.outcome, result.paid, result.credit) == ("credited", (), 2_000)
    assert "version-1 reference" in result.reason
    assert paid(book, ids) == dict.fromkeys(ids)
    whole = transfer(chain, payer, token.address, payees[0], 3_000, settlement_reference(ids))
    result = reconcile_transaction(chain.w3, book, whole)
    assert (result.outcome, result.paid, result.credit) == ("paid", tuple(ids), 0)
    assert paid(book, ids) == dict.fromkeys(ids, whole)
    # Version 2 with one id has 32 trailing bytes too: a known id is read as an id.
    [one] = served(book, payer, payees[0], token, 1_000)
    single = transfer(chain, payer, token.address, payees[0], 1_000, settlement_ids([one]))
    assert reconcile_transaction(chain.w3, book, single).paid == (one,)


def test_the_spec_test_vector_settles_with_this_calldata():
    # docs/deferred-scheme.md section 10: the settlement of the test vector's commitment.
    payee = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
    commitment_id = "0x73a2cef5811b7d7770b9f2f7862757eb93f2f1d3a6eb269edd30037a92eb4771"
    data = (
        bytes.fromhex("a9059cbb")
        + abi_encode(["address", "uint256"], [payee, 10_000])
        + settlement_ids([commitment_id])
    )
    assert data.hex() == (
        "a9059cbb"
        "00000000000000000000000070997970c51812dc3a010c7d01b50e0d17dc79c8"
        "0000000000000000000000000000000000000000000000000000000000002710"
        "73a2cef5811b7d7770b9f2f7862757eb93f2f1d3a6eb269edd30037a92eb4771"
    )


def _reconcile_in_another_process(path, tx, receipt, barrier, outcomes):
    book = CommitmentBook(path)
    barrier.wait()
    outcomes.put(reconcile(book, tx, receipt, 31337).outcome)


def test_publisher_processes_reconciling_one_transfer_at_once_mark_it_once(
    book, tmp_path, payer, chain, token, payees
):
    ids = served(book, payer, payees[0], token, 1_000, count=3)
    tx_hash = transfer(chain, payer, token.address, payees[0], 3_000, settlement_ids(ids))
    # As a JSON-RPC client without web3 would pass them: hex strings.
    tx = json.loads(Web3.to_json(chain.w3.eth.get_transaction(tx_hash)))
    receipt = json.loads(Web3.to_json(chain.w3.eth.get_transaction_receipt(tx_hash)))
    context = multiprocessing.get_context("spawn")
    barrier, outcomes = context.Barrier(2), context.Queue()
    path = str(tmp_path / "publisher.sqlite3")
    processes = [
        context.Process(
            target=_reconcile_in_another_process, args=(path, tx, receipt, barrier, outcomes)
        )
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    results = sorted(outcomes.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(10)
    assert results == ["already reconciled", "paid"]
    assert paid(book, ids) == dict.fromkeys(ids, tx_hash) and book.credits() == []
