"""The payment lifecycle: the one owner of payment statuses and of the budgets they count
against.

Every change of a payment's status goes through a ``PaymentBook`` method named for the event
(reserve, confirm, not_served, unsent, expire, collected, resend, settle_begin, settle_mark,
settle_end, invoice); so does every change of a settlement's (``SETTLEMENT_TRANSITIONS``).
Each one checks the move against ``TRANSITIONS``, changes the row and the budget counters in one
transaction of the store, and says whether it happened. Budgets are enforced by the store: a
reservation is a conditional update (``spent + amount <= limit``), so processes sharing a store
share its budgets with no other coordination.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from scrapy_x402.ledger import (
    IllegalTransition,
    Ledger,
    PaymentRecord,
    Settlement,
    SettlementStatus,
    Status,
)
from scrapy_x402.ledger._base import COUNT_UNITS, TOTAL_KEY, counted_units
from scrapy_x402.schemes import HELD_SCHEMES

logger = logging.getLogger(__name__)

# What a transition does to the budgets the payment counts against.
RESERVE = "reserve"  # count the payment's amount, only if its budget and the total allow it
CHARGE = "charge"  # count what was charged: the amount reserved, or less (upto)
KEEP = "keep"  # still counted, unchanged
RELEASE = "release"  # no longer counted: the money can never move

NEW = None  # the status of a payment not yet in the book

TRANSITIONS: dict[tuple[str | None, str], str] = {
    (NEW, Status.RESERVED): RESERVE,  # signed; the paid request may leave
    (Status.RESERVED, Status.ACCEPTED): CHARGE,  # served: owed (deferred, Cloudflare)
    (Status.RESERVED, Status.SETTLED): CHARGE,  # served and paid at once (exact, upto)
    (Status.RESERVED, Status.REJECTED): RELEASE,  # refused by the publisher
    (Status.RESERVED, Status.FAILED): RELEASE,  # never served
    (Status.RESERVED, Status.HELD): KEEP,  # not served, but collectable until it expires
    (Status.HELD, Status.HELD): KEEP,  # a held payment sent again, and again not served
    (Status.HELD, Status.SETTLED): CHARGE,  # collected after all
    (Status.HELD, Status.EXPIRED): RELEASE,  # expired, and the chain shows it unused
    (Status.FAILED, Status.RESERVED): RESERVE,  # a resumed crawl sends it again
    (Status.REJECTED, Status.RESERVED): RESERVE,
    (Status.ACCEPTED, Status.SETTLING): KEEP,  # in a settlement transaction
    (Status.SETTLING, Status.SETTLED): KEEP,  # its settlement is confirmed
    (Status.SETTLING, Status.ACCEPTED): KEEP,  # its settlement reverted or was replaced
    (Status.ACCEPTED, Status.SETTLED): KEEP,  # an invoice paid it (Cloudflare)
}

_S = SettlementStatus
# A settlement transaction: only what the chain shows moves it on.
SETTLEMENT_TRANSITIONS: dict[str, frozenset[str]] = {
    _S.SIGNED: frozenset({_S.BROADCAST, _S.OBSERVED, _S.REPLACED}),
    _S.BROADCAST: frozenset({_S.OBSERVED, _S.REPLACED}),
    # observed -> observed: a reorg moved it to another block; -> broadcast: out of any.
    _S.OBSERVED: frozenset({_S.OBSERVED, _S.BROADCAST, _S.CONFIRMED, _S.REVERTED}),
    _S.CONFIRMED: frozenset(),
    _S.REVERTED: frozenset(),
    _S.REPLACED: frozenset(),
    _S.FAILED: frozenset(),
}
# What a settlement's final status does to its payments.
SETTLEMENT_PAYMENTS_AFTER = {
    _S.CONFIRMED: Status.SETTLED,
    _S.REVERTED: Status.ACCEPTED,
    _S.REPLACED: Status.ACCEPTED,
}

_UNLIMITED = 2**62


@dataclass(frozen=True)
class Limits:
    """What a reservation may count up to, in USD: its budget, and X402_MAX_TOTAL."""

    budget: Decimal
    total: Decimal | None


class PaymentBook:
    def __init__(self, store: Ledger, on_invalid: Callable[[str], None] | None = None):
        self.store = store
        self.invalid_transitions = 0
        self._on_invalid = on_invalid

    # -- events ------------------------------------------------------------------------

    def reserve(self, record: PaymentRecord, limits: Limits) -> str | None:
        """Record a signed payment as reserved, counted against its budget and the total:
        None, or the budget key (or ``TOTAL_KEY``) that refused it; then nothing changed."""
        units = counted_units(record.usd)
        now = int(time.time())
        try:
            with self.store.transaction():
                self._count(record.run_id, record.budget_key, units, limits)
                self._insert(record, units, now)
        except _Refused as refused:
            return str(refused)
        return None

    def confirm(
        self,
        payment_id: str,
        status: str,
        *,
        receipt: dict[str, Any] | None = None,
        transaction: str | None = None,
        amount: int | None = None,
        usd: Decimal | None = None,
        reason: str | None = None,
    ) -> bool:
        """The page was served: owed (``accepted``) or paid at once (``settled``, with the
        ``transaction``); ``amount``/``usd`` when less than signed was charged (upto)."""
        fields: dict[str, Any] = {"reason": reason}
        if receipt is not None:
            fields["receipt"] = json.dumps(receipt, sort_keys=True)
        if transaction is not None:
            fields["settlement_id"] = transaction
        if amount is not None:
            fields["amount"] = str(amount)
        if usd is not None:
            fields["usd"] = str(usd)
        return self._move(
            payment_id,
            (Status.RESERVED, Status.HELD),
            status,
            fields,
            charged=None if usd is None else counted_units(usd),
        )

    def not_served(self, payment_id: str, reason: str, *, refused: bool = False) -> str | None:
        """The page was not served (``refused``: the publisher said no). A signed transfer
        stays held, and counted; anything else is released. The new status, or None."""
        row = self._row(payment_id)
        if row is None:
            self._invalid(f"{payment_id}: no such payment")
            return None
        if row.scheme in HELD_SCHEMES:
            status = Status.HELD
        else:
            status = Status.REJECTED if refused else Status.FAILED
        moved = self._move(
            payment_id, (Status.RESERVED, Status.HELD), status, {"reason": reason[:200]}
        )
        return status if moved else None

    def unsent(self, payment_id: str, reason: str) -> bool:
        """The payment never left the machine (a cache answered): nothing can collect it."""
        return self._move(payment_id, (Status.RESERVED,), Status.FAILED, {"reason": reason})

    def expire(self, payment_id: str, reason: str) -> bool:
        """A held signature expired and the chain shows it unused: release it."""
        return self._move(payment_id, (Status.HELD,), Status.EXPIRED, {"reason": reason})

    def collected(self, payment_id: str, reason: str) -> bool:
        """A held signature was used on-chain after all: the money moved."""
        return self._move(payment_id, (Status.HELD,), Status.SETTLED, {"reason": reason})

    def resend(self, payment_id: str, limits: Limits) -> bool:
        """A resumed crawl is sending a payment signed by an earlier process. True when it
        may leave: still counted (reserved, held), or counted again now (it was released and
        the budget still has room). False: it must not leave (already served, expired...)."""
        row = self._row(payment_id)
        if row is None:
            return False
        if row.status in (Status.RESERVED, Status.HELD):
            return True
        if row.status not in (Status.FAILED, Status.REJECTED):
            return False
        try:
            return self._move(payment_id, (row.status,), Status.RESERVED, {"reason": None}, limits)
        except _Refused:
            return False

    def invoice(self, network: str, start: int, end: int, invoice: str) -> int:
        """Mark a period's owed payments on an invoiced network settled by ``invoice``."""
        with self.store.transaction():
            ids = [
                r[0]
                for r in self.store.query(
                    "SELECT id FROM x402_payments WHERE network = ? AND status = ? "
                    "AND created_at >= ? AND created_at < ?",
                    (network, Status.ACCEPTED, start, end),
                )
            ]
            for pid in ids:
                self._move(
                    pid, (Status.ACCEPTED,), Status.SETTLED, {"settlement_id": f"invoice:{invoice}"}
                )
        return len(ids)

    # -- settlement ----------------------------------------------------------------------

    def settle_begin(self, s: Settlement, payment_ids: Sequence[str]) -> bool:
        """Record a signed, not yet broadcast transfer and move the payments it covers to
        settling, all or none: False (nothing written) if one of them is no longer owed."""
        now = int(time.time())
        try:
            with self.store.transaction():
                self.store.execute(
                    "INSERT INTO x402_settlements (id, network, asset, payer, payee, amount, "
                    "payment_count, status, raw_tx, tx_nonce, reason, block_number, created_at, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.id,
                        s.network,
                        s.asset,
                        s.payer,
                        s.payee,
                        str(s.amount),
                        s.payment_count,
                        SettlementStatus.SIGNED,
                        s.raw_tx,
                        s.tx_nonce,
                        None,
                        None,
                        now,
                        now,
                    ),
                )
                for pid in payment_ids:
                    if not self._move(
                        pid, (Status.ACCEPTED,), Status.SETTLING, {"settlement_id": s.id}
                    ):
                        raise _Abort
        except _Abort:
            logger.warning("x402: a payment of settlement %s is no longer owed; not sent", s.id)
            return False
        return True

    def settle_mark(self, settlement_id: str, status: str, block: int | None = None) -> None:
        """An open settlement seen broadcast, or mined in ``block`` (observed)."""
        if status not in SettlementStatus.OPEN:
            raise ValueError(f"{status} is not an open settlement status")
        with self.store.transaction():
            self._move_settlement(settlement_id, status, "block_number", block)

    def settle_end(self, settlement_id: str, status: str, reason: str | None = None) -> None:
        """Confirmed: its payments are settled. Reverted or replaced: they are owed again."""
        payments = SETTLEMENT_PAYMENTS_AFTER[status]
        with self.store.transaction():
            self._move_settlement(settlement_id, status, "reason", reason)
            # What the chain shows is recorded even if a payment is not where it should be
            # (logged and counted by _move).
            for pid in self.store.payment_ids(settlement_id):
                fields = {} if payments == Status.SETTLED else {"settlement_id": None}
                self._move(pid, (Status.SETTLING,), payments, fields)

    def _move_settlement(self, settlement_id: str, status: str, column: str, value: Any) -> None:
        """The one place a settlement's status is written: checked against its transitions."""
        current = self.store.settlement_status(settlement_id)
        if current is None or status not in SETTLEMENT_TRANSITIONS[current]:
            self._invalid(f"settlement {settlement_id}: {current} -> {status}")
            raise IllegalTransition(f"settlement {settlement_id}", current, status)
        self.store.execute(
            f"UPDATE x402_settlements SET status = ?, {column} = ?, updated_at = ? WHERE id = ?",
            (status, value, int(time.time()), settlement_id),
        )

    # -- the one place that writes -------------------------------------------------------

    def _move(
        self,
        payment_id: str,
        expected: tuple[str, ...],
        to: str,
        fields: dict[str, Any],
        limits: Limits | None = None,
        charged: int | None = None,
    ) -> bool:
        with self.store.transaction():
            row = self._row(payment_id)
            if row is None or row.status not in expected:
                self._invalid(
                    f"{payment_id}: {row.status if row else 'unknown'} -> {to} "
                    f"(expected from {', '.join(expected)})"
                )
                return False
            effect = TRANSITIONS.get((row.status, to))
            if effect is None:
                self._invalid(f"{payment_id}: {row.status} -> {to} is not a transition")
                return False
            counted = row.counted
            if effect == RESERVE:  # raises _Refused: this transaction is rolled back
                assert limits is not None
                counted = counted_units(row.usd)
                self._count(row.run_id, row.budget_key, counted, limits)
            elif effect == RELEASE:
                self._uncount(row.run_id, row.budget_key, counted)
                counted = 0
            elif effect == CHARGE and charged is not None and charged < counted:
                self._uncount(row.run_id, row.budget_key, counted - charged)
                counted = charged
            assignments = ", ".join(f"{name} = ?" for name in fields)
            cursor = self.store.execute(
                f"UPDATE x402_payments SET status = ?, counted = ?, updated_at = ?"
                f"{', ' + assignments if assignments else ''} WHERE id = ? AND status = ?",
                (to, counted, int(time.time()), *fields.values(), payment_id, row.status),
            )
            if cursor.rowcount != 1:  # moved meanwhile by another process
                raise IllegalTransition(f"payment {payment_id} (moved meanwhile)", row.status, to)
        return True

    def _count(self, run_id: str, key: str, units: int, limits: Limits) -> None:
        """Count ``units`` against a budget and the total, if both allow it (the store
        decides: a conditional update); else raise _Refused, for the caller's transaction to
        roll back what was counted."""
        for budget, limit in ((key, limits.budget), (TOTAL_KEY, limits.total)):
            if not self._count_one(run_id, budget, units, _limit_units(limit)):
                raise _Refused(budget)

    def _count_one(self, run_id: str, budget: str, units: int, limit: int) -> bool:
        add = (
            "UPDATE x402_budgets SET spent = spent + ? "
            "WHERE run_id = ? AND budget_key = ? AND spent + ? <= ?"
        )
        if self.store.execute(add, (units, run_id, budget, units, limit)).rowcount == 1:
            return True
        if self.store.query(
            "SELECT 1 FROM x402_budgets WHERE run_id = ? AND budget_key = ?", (run_id, budget)
        ):
            return False  # the budget is there, and has no room
        self.store.execute(
            "INSERT INTO x402_budgets (run_id, budget_key, spent) VALUES (?, ?, 0)",
            (run_id, budget),
        )
        return self.store.execute(add, (units, run_id, budget, units, limit)).rowcount == 1

    def _insert(self, record: PaymentRecord, units: int, now: int) -> None:
        self.store.execute(
            "INSERT INTO x402_payments (id, run_id, created_at, updated_at, status, scheme, "
            "network, asset, payer, payee, amount, usd, domain, budget_key, url, "
            "valid_until, payload, counted) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.run_id,
                now,
                now,
                Status.RESERVED,
                record.scheme,
                record.network,
                record.asset,
                record.payer,
                record.payee,
                str(record.amount),
                str(record.usd),
                record.domain,
                record.budget_key,
                record.url,
                record.valid_until,
                json.dumps(record.payload, sort_keys=True),
                units,
            ),
        )

    def _uncount(self, run_id: str, key: str, units: int) -> None:
        for budget in (key, TOTAL_KEY):
            self.store.execute(
                "UPDATE x402_budgets SET spent = spent - ? WHERE run_id = ? AND budget_key = ?",
                (units, run_id, budget),
            )

    def _row(self, payment_id: str) -> _Row | None:
        rows = self.store.query(
            "SELECT status, counted, run_id, budget_key, usd, scheme FROM x402_payments "
            "WHERE id = ?",
            (payment_id,),
        )
        if not rows:
            return None
        status, counted, run_id, key, usd, scheme = rows[0]
        return _Row(status, int(counted), run_id, key, Decimal(usd), scheme)

    def _invalid(self, what: str) -> None:
        self.invalid_transitions += 1
        logger.error("x402: impossible payment transition: %s", what)
        if self._on_invalid is not None:
            self._on_invalid(what)


@dataclass(frozen=True)
class _Row:
    status: str
    counted: int
    run_id: str
    budget_key: str
    usd: Decimal
    scheme: str


class _Abort(Exception):
    pass


class _Refused(Exception):
    pass


def _limit_units(limit: Decimal | None) -> int:
    if limit is None:
        return _UNLIMITED
    return min(int((limit * COUNT_UNITS).to_integral_value(rounding=ROUND_FLOOR)), _UNLIMITED)
