"""Reconciliation (docs/deferred-scheme.md section 9): which commitments a settlement transfer
pays, read from the transfer itself.

A settlement's calldata is ``transfer(payee, value) ‖ id₁ ‖ … ‖ idₙ``: the ids it pays, 32
bytes each, strictly ascending. ``reconcile`` checks that tokens really moved from the payer to
the payee (successful transaction to the token, with the token's ``Transfer`` log), then looks
each id up once: linear in n, and an id the publisher does not know costs only that id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from eth_utils import to_checksum_address
from web3.exceptions import TransactionNotFound

from scrapy_x402.schemes._eip712 import keccak
from scrapy_x402.schemes.deferred import TRANSFER_SELECTOR, settlement_reference

if TYPE_CHECKING:
    from scrapy_x402.paywall._book import CommitmentBook

logger = logging.getLogger(__name__)

TRANSFER_TOPIC = keccak(b"Transfer(address,address,uint256)")

# What reconcile decided (Reconciliation.outcome).
PAID = "paid"  # every listed commitment paid, and the value is exactly theirs
PARTLY_MATCHED = "partly matched"  # the matching ones paid; the rest of the value credited
CREDITED = "credited"  # nothing paid: the whole value is a credit of the payer
NOT_A_SETTLEMENT = "not a settlement"  # no tokens of ours moved: nothing recorded
ALREADY_RECONCILED = "already reconciled"  # nothing changed
NOT_FINAL = "not final"  # not mined, or not deep enough yet: nothing recorded

MAX_REASONS = 10  # unmatched ids explained one by one in a credit's reason; all are recorded


@dataclass(frozen=True)
class Reconciliation:
    """What ``reconcile`` decided about one transaction, and wrote to the book."""

    tx_hash: str
    outcome: str
    paid: tuple[str, ...] = ()  # commitment ids marked paid by this call
    credit: int = 0  # atomic units recorded as a credit of the payer by this call
    unmatched: tuple[str, ...] = ()  # listed ids (or a version-1 reference) not paid by it
    reason: str | None = None


@dataclass(frozen=True)
class _Transfer:
    """A successful ERC-20 transfer, proved by its transaction and the token's log."""

    tx_hash: str
    chain_id: int
    token: str
    payer: str
    payee: str
    value: int
    trailer: bytes  # the calldata after transfer's two arguments


class _NotASettlement(Exception):
    pass


def reconcile(
    book: CommitmentBook, tx: Mapping[str, Any], receipt: Mapping[str, Any], chain_id: int
) -> Reconciliation:
    """Mark paid the commitments a mined settlement transaction pays, and record the rest of
    its value as a credit of the payer. ``tx`` needs from, to, input and hash; ``receipt``
    status and logs (as web3 returns them, or with hex strings). Idempotent."""
    tx_hash = _hex(tx["hash"])
    try:
        transfer = _read_transfer(tx, receipt, chain_id)
        if not book.sells_for(transfer.payee, transfer.token, chain_id):
            raise _NotASettlement(
                f"no commitment to {transfer.payee} in token {transfer.token} was accepted here"
            )
    except _NotASettlement as e:
        logger.warning("x402 reconcile %s: not a settlement to this book: %s", tx_hash, e)
        return Reconciliation(tx_hash, NOT_A_SETTLEMENT, reason=str(e))
    for _ in range(3):  # another process may mark some of the ids paid between read and write
        if book.reconciled(tx_hash):
            return Reconciliation(tx_hash, ALREADY_RECONCILED)
        decided, credit = _decide(book, transfer)
        if book.mark_paid(tx_hash, list(decided.paid), credit):
            _log(decided)
            return decided
    raise RuntimeError(f"reconciling {tx_hash}: the book kept changing underneath")


def reconcile_transaction(
    w3: Any, book: CommitmentBook, tx_hash: str, confirmations: int = 1
) -> Reconciliation:
    """``reconcile`` a transaction read from a node, once ``confirmations`` blocks hold it."""
    try:
        receipt = w3.eth.get_transaction_receipt(tx_hash)
    except TransactionNotFound:
        return Reconciliation(tx_hash.lower(), NOT_FINAL, reason="not mined")
    if w3.eth.block_number - receipt["blockNumber"] + 1 < confirmations:
        return Reconciliation(tx_hash.lower(), NOT_FINAL, reason="not deep enough yet")
    return reconcile(book, w3.eth.get_transaction(tx_hash), receipt, w3.eth.chain_id)


def _read_transfer(tx: Mapping[str, Any], receipt: Mapping[str, Any], chain_id: int) -> _Transfer:
    """The transfer a transaction made, or _NotASettlement saying why it moved nothing of ours."""
    try:
        tx_hash = _hex(tx["hash"])
        if "transactionHash" in receipt and _hex(receipt["transactionHash"]) != tx_hash:
            raise _NotASettlement("the receipt is another transaction's")
        if _int(receipt["status"]) != 1:
            raise _NotASettlement("the transaction reverted: no tokens moved")
        if tx.get("chainId") is not None and _int(tx["chainId"]) != chain_id:
            raise _NotASettlement(f"signed for chain {_int(tx['chainId'])}, not {chain_id}")
        if tx.get("to") is None:
            raise _NotASettlement("it creates a contract")
        data = _bytes(tx.get("input", tx.get("data", b"")))
        payer, token = to_checksum_address(tx["from"]), to_checksum_address(tx["to"])
        if data[:4] != TRANSFER_SELECTOR or len(data) < 68 or any(data[4:16]):
            raise _NotASettlement("its input is not an ERC-20 transfer(address,uint256)")
        payee, value = to_checksum_address(data[16:36]), int.from_bytes(data[36:68], "big")
        if value == 0:
            raise _NotASettlement("it transfers nothing")
        if not any(_is_log_of(log, token, payer, payee, value) for log in receipt["logs"]):
            raise _NotASettlement(
                f"its receipt has no Transfer({payer}, {payee}, {value}) log of {token}"
            )
    except (KeyError, TypeError, ValueError) as e:
        raise _NotASettlement(f"malformed transaction or receipt ({e!r})") from None
    return _Transfer(tx_hash, chain_id, token, payer, payee, value, data[68:])


def _is_log_of(log: Mapping[str, Any], token: str, payer: str, payee: str, value: int) -> bool:
    topics = [_bytes(t) for t in log["topics"]]
    return (
        to_checksum_address(log["address"]) == token
        and len(topics) == 3
        and topics[0] == TRANSFER_TOPIC
        and topics[1] == bytes(12) + bytes.fromhex(payer[2:])
        and topics[2] == bytes(12) + bytes.fromhex(payee[2:])
        and int.from_bytes(_bytes(log["data"]), "big") == value
    )


def _decide(book: CommitmentBook, t: _Transfer) -> tuple[Reconciliation, dict[str, Any] | None]:
    """What the transfer pays: the Reconciliation, and the credit row to record (or None)."""
    ids, problem = _listed_ids(book, t)
    if problem:
        return _credit_all(t, problem, ids)
    known = book.commitments(ids)
    matching, unmatched, reasons = [], [], []
    for i in ids:
        why = _mismatch(known.get(i), t)
        if why:
            unmatched.append(i)
            reasons.append(f"{i}: {why}")
        else:
            matching.append(i)
    total = sum(known[i]["amount"] for i in matching)
    if total > t.value:
        return _credit_all(t, f"the commitments it names sum to {total}, more than it paid", ids)
    if not unmatched and total == t.value:
        return Reconciliation(t.tx_hash, PAID, tuple(matching)), None
    if len(reasons) > MAX_REASONS:
        reasons[MAX_REASONS:] = [f"and {len(reasons) - MAX_REASONS} more"]
    reason = "; ".join(reasons) or f"it paid {t.value - total} more than the commitments it names"
    decided = Reconciliation(
        t.tx_hash,
        PARTLY_MATCHED if matching else CREDITED,
        tuple(matching),
        t.value - total,
        tuple(unmatched),
        reason,
    )
    return decided, _credit_row(t, decided)


def _listed_ids(book: CommitmentBook, t: _Transfer) -> tuple[list[str], str | None]:
    """The ids the trailer lists, and what is wrong with the list (None: nothing)."""
    if len(t.trailer) % 32:
        return [], f"its {len(t.trailer)} trailing bytes are not a list of 32-byte ids"
    ids = ["0x" + t.trailer[k : k + 32].hex() for k in range(0, len(t.trailer), 32)]
    if not ids:
        return [], "it names no commitment"
    if len(ids) == 1 and not book.commitments(ids):
        # Not an id we know: a version-1 reference, keccak256 of the sorted ids it pays. It is
        # read as "everything the payer owes this payee"; a publisher never searches subsets.
        owed = sorted(book.unpaid(t.payer, t.payee, t.token, t.chain_id))
        if owed and settlement_reference(owed) == t.trailer:
            return owed, None
        return ids, "a version-1 reference that is not the hash of all the payer's unpaid ids"
    if any(a >= b for a, b in pairwise(ids)):
        return ids, "its ids are not strictly ascending (one is listed twice, or out of order)"
    return ids, None


def _mismatch(row: Mapping[str, Any] | None, t: _Transfer) -> str | None:
    """Why a listed commitment is not paid by this transfer (None: it is)."""
    if row is None:
        return "unknown (no page was served for it here)"
    for field, expected in (("payer", t.payer), ("payee", t.payee), ("token", t.token)):
        if str(row[field]).lower() != expected.lower():
            return f"its {field} is {row[field]}, not {expected}"
    if row["chain_id"] != t.chain_id:
        return f"it is for chain {row['chain_id']}, not {t.chain_id}"
    if row["paid_by"]:
        return f"already paid by {row['paid_by']}"
    return None


def _credit_all(t: _Transfer, reason: str, ids: list[str]) -> tuple[Reconciliation, dict[str, Any]]:
    decided = Reconciliation(t.tx_hash, CREDITED, (), t.value, tuple(ids), reason)
    return decided, _credit_row(t, decided)


def _credit_row(t: _Transfer, decided: Reconciliation) -> dict[str, Any]:
    return {
        "chain_id": t.chain_id,
        "token": t.token,
        "payer": t.payer,
        "payee": t.payee,
        "amount": decided.credit,
        "reason": decided.reason,
        "unmatched": decided.unmatched,
    }


def _log(decided: Reconciliation) -> None:
    if decided.outcome == PAID:
        logger.info("x402 reconcile %s: %d commitments paid", decided.tx_hash, len(decided.paid))
    else:
        logger.warning(
            "x402 reconcile %s: %d commitments paid, %d credited to the payer: %s",
            decided.tx_hash,
            len(decided.paid),
            decided.credit,
            decided.reason,
        )


def _bytes(value: Any) -> bytes:
    """Bytes from web3's HexBytes or a 0x-hex string."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    raise TypeError(f"expected bytes or hex, got {type(value).__name__}")


def _int(value: Any) -> int:
    """An int from web3, or from a JSON-RPC hex quantity."""
    return int(value, 16) if isinstance(value, str) else int(value)


def _hex(value: Any) -> str:
    return "0x" + _bytes(value).hex()
