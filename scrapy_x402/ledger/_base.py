from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any


class Status:
    RESERVED = "reserved"  # signed and written; the paid request may be in flight
    ACCEPTED = "accepted"  # the publisher served the page: owed
    REJECTED = "rejected"  # the publisher refused it (402): never paid
    FAILED = "failed"  # no success response: not accepted, never paid
    HELD = "held"  # not confirmed, but collectable by others until it expires (exact)
    EXPIRED = "expired"  # a held payment that expired uncollected: never paid
    SETTLING = "settling"  # in a settlement transaction not yet confirmed
    SETTLED = "settled"  # paid on-chain

    COUNTED = (RESERVED, ACCEPTED, HELD, SETTLING, SETTLED)  # what budgets count as spent


class SettlementStatus:
    """Where a settlement transaction stands. Only the chain moves it on (see TRANSITIONS)."""

    SIGNED = "signed"  # recorded before broadcast: a node may or may not hold it
    BROADCAST = "broadcast"  # a node took it; in no block we know of
    OBSERVED = "observed"  # in block ``block_number``, not yet deep enough to be final
    CONFIRMED = "confirmed"  # succeeded, deep enough: its payments are settled
    REVERTED = "reverted"  # failed on-chain, deep enough: its payments are owed again
    REPLACED = "replaced"  # its nonce used, deep enough, by another transaction: owed again
    FAILED = "failed"  # old ledgers only: refused by the node, never sent

    # Could still be mined: its payments stay settling (counted, never owed twice).
    OPEN = (SIGNED, BROADCAST, OBSERVED)
    # Written by older versions for what is now "signed": recovered the same way.
    LEGACY = {"pending": SIGNED}

    TRANSITIONS: dict[str, frozenset[str]] = {
        SIGNED: frozenset({BROADCAST, OBSERVED, REPLACED}),
        BROADCAST: frozenset({OBSERVED, REPLACED}),
        # observed -> observed: a reorg moved it to another block; -> broadcast: out of any.
        OBSERVED: frozenset({OBSERVED, BROADCAST, CONFIRMED, REVERTED}),
        CONFIRMED: frozenset(),
        REVERTED: frozenset(),
        REPLACED: frozenset(),
        FAILED: frozenset(),
    }
    # What reaching a final status does to the settlement's payments.
    PAYMENTS_AFTER = {
        CONFIRMED: Status.SETTLED,
        REVERTED: Status.ACCEPTED,
        REPLACED: Status.ACCEPTED,
    }


class IllegalTransition(ValueError):
    """A settlement status change the state machine does not allow; nothing was written."""

    def __init__(self, settlement_id: str, current: str | None, wanted: str):
        super().__init__(f"settlement {settlement_id}: {current} -> {wanted} is not allowed")
        self.settlement_id = settlement_id
        self.current = current
        self.wanted = wanted


@dataclass(frozen=True)
class PaymentRecord:
    id: str
    run_id: str
    scheme: str
    network: str
    asset: str
    payer: str
    payee: str
    amount: int
    usd: Decimal
    domain: str
    budget_key: str
    url: str
    payload: dict[str, Any]
    valid_until: int


@dataclass(frozen=True)
class HeldPayment:
    id: str
    scheme: str
    budget_key: str
    usd: Decimal
    network: str
    asset: str
    payer: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class InDoubt:
    id: str
    scheme: str
    url: str
    budget_key: str
    usd: Decimal


@dataclass(frozen=True)
class OwedTotal:
    network: str
    asset: str
    payer: str
    payee: str
    amount: int
    payment_ids: tuple[str, ...]


@dataclass(frozen=True)
class Settlement:
    id: str  # the transaction hash
    network: str
    asset: str
    payer: str
    payee: str
    amount: int
    payment_count: int
    status: str  # a SettlementStatus
    raw_tx: str  # signed, so a crashed settlement can be re-broadcast unchanged
    tx_nonce: int
    reason: str | None = None
    block_number: int | None = None  # where it was last seen mined


@dataclass(frozen=True)
class StatementLine:
    id: str
    created_at: int
    domain: str
    url: str
    amount: int
    usd: Decimal
    status: str
    receipt: dict[str, Any]
    settled_by: str | None


@dataclass
class SummaryRow:
    domain: str
    payee: str
    network: str
    asset: str
    scheme: str
    status: str
    count: int = 0
    amount: int = 0
    usd: Decimal = Decimal(0)


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS x402_payments (
        id VARCHAR(66) PRIMARY KEY,
        run_id VARCHAR(64) NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL,
        scheme VARCHAR(32) NOT NULL,
        network VARCHAR(64) NOT NULL,
        asset VARCHAR(128) NOT NULL,
        payer VARCHAR(128) NOT NULL,
        payee VARCHAR(128) NOT NULL,
        amount VARCHAR(80) NOT NULL,
        usd VARCHAR(120) NOT NULL,
        domain VARCHAR(255) NOT NULL,
        budget_key VARCHAR(255) NOT NULL,
        url TEXT NOT NULL,
        valid_until BIGINT NOT NULL,
        payload TEXT NOT NULL,
        receipt TEXT,
        reason TEXT,
        settlement_id VARCHAR(66)
    )""",
    "CREATE INDEX IF NOT EXISTS x402_payments_owed ON x402_payments (status, network, asset, payee)",
    "CREATE INDEX IF NOT EXISTS x402_payments_run ON x402_payments (run_id)",
    """CREATE TABLE IF NOT EXISTS x402_settlements (
        id VARCHAR(66) PRIMARY KEY,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        status VARCHAR(16) NOT NULL,
        network VARCHAR(64) NOT NULL,
        asset VARCHAR(128) NOT NULL,
        payer VARCHAR(128) NOT NULL,
        payee VARCHAR(128) NOT NULL,
        amount VARCHAR(80) NOT NULL,
        payment_count INTEGER NOT NULL,
        raw_tx TEXT NOT NULL,
        tx_nonce BIGINT NOT NULL,
        reason TEXT,
        block_number BIGINT
    )""",
]

_SETTLEMENT_COLUMNS = (
    "id, network, asset, payer, payee, amount, payment_count, status, raw_tx, tx_nonce, reason, "
    "block_number"
)


class Ledger(ABC):
    """Portable SQL over a DB-API connection with ``?`` placeholders."""

    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement and return its cursor."""

    @abstractmethod
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Group statements atomically (and durably on exit)."""

    @abstractmethod
    def close(self) -> None:
        """Commit what is pending and close."""

    @abstractmethod
    def _begin_batch(self) -> None:
        """Open (or keep open) the transaction that batched adds go into."""

    @property
    @abstractmethod
    def pending(self) -> bool:
        """Whether batched adds wait for ``commit()``."""

    @abstractmethod
    def commit(self) -> None:
        """Make batched adds durable, all at once."""

    def _create_schema(self) -> None:
        with self._transaction():
            for statement in SCHEMA:
                self._execute(statement)
            columns = self._execute("SELECT * FROM x402_settlements WHERE 1 = 0").description
            if "block_number" not in {c[0] for c in columns}:  # a ledger from before it
                self._execute("ALTER TABLE x402_settlements ADD COLUMN block_number BIGINT")

    # -- payments ------------------------------------------------------------------

    def add(self, p: PaymentRecord, *, commit: bool = True) -> None:
        """Record a reserved payment: durably now, or (``commit=False``) at the next commit."""
        now = int(time.time())
        if commit:
            with self._transaction():
                self._insert(p, now)
        else:
            self._begin_batch()
            self._insert(p, now)

    @contextmanager
    def _batched(self) -> Iterator[None]:
        self._begin_batch()
        yield

    def _insert(self, p: PaymentRecord, now: int) -> None:
        self._execute(
            "INSERT INTO x402_payments (id, run_id, created_at, updated_at, status, scheme, "
            "network, asset, payer, payee, amount, usd, domain, budget_key, url, valid_until, "
            "payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                p.id,
                p.run_id,
                now,
                now,
                Status.RESERVED,
                p.scheme,
                p.network,
                p.asset,
                p.payer,
                p.payee,
                str(p.amount),
                str(p.usd),
                p.domain,
                p.budget_key,
                p.url,
                p.valid_until,
                json.dumps(p.payload, sort_keys=True),
            ),
        )

    def resolve(
        self,
        payment_id: str,
        status: str,
        *,
        receipt: dict[str, Any] | None = None,
        reason: str | None = None,
        transaction: str | None = None,
        amount: int | None = None,
        usd: Decimal | None = None,
        current: str = Status.RESERVED,
        commit: bool = True,
    ) -> bool:
        """Move a payment on from ``current``; False if it was not in that status.

        ``transaction`` is the hash of the transaction that paid it, when it was paid
        immediately (exact) rather than by a settlement of ours; ``amount`` and ``usd`` what
        was charged, when less than signed (upto). ``commit=False`` leaves it to the next
        ``commit()``, like a batched ``add``.
        """
        with self._transaction() if commit else self._batched():
            cursor = self._execute(
                "UPDATE x402_payments SET status = ?, receipt = COALESCE(?, receipt), "
                "reason = ?, settlement_id = COALESCE(?, settlement_id), "
                "amount = COALESCE(?, amount), usd = COALESCE(?, usd), updated_at = ? "
                "WHERE id = ? AND status = ?",
                (
                    status,
                    json.dumps(receipt, sort_keys=True) if receipt is not None else None,
                    reason,
                    transaction,
                    str(amount) if amount is not None else None,
                    str(usd) if usd is not None else None,
                    int(time.time()),
                    payment_id,
                    current,
                ),
            )
            return bool(cursor.rowcount == 1)

    def expired_holds(self, run_id: str, now: int) -> list[HeldPayment]:
        """A run's held payments whose signatures can no longer be collected."""
        return [
            HeldPayment(r[0], r[1], r[2], Decimal(r[3]), r[4], r[5], r[6], json.loads(r[7]))
            for r in self._execute(
                "SELECT id, scheme, budget_key, usd, network, asset, payer, payload "
                "FROM x402_payments "
                "WHERE run_id = ? AND status = ? AND valid_until < ?",
                (run_id, Status.HELD, now),
            )
        ]

    def get_status(self, payment_id: str) -> str | None:
        row = self._execute(
            "SELECT status FROM x402_payments WHERE id = ?", (payment_id,)
        ).fetchone()
        return row[0] if row else None

    def spent_by_budget(self, run_id: str) -> dict[str, Decimal]:
        """USD counted against each budget by one run (reserved, owed or paid)."""
        placeholders = ", ".join("?" for _ in Status.COUNTED)
        spent: dict[str, Decimal] = defaultdict(Decimal)
        for key, usd in self._execute(
            f"SELECT budget_key, usd FROM x402_payments WHERE run_id = ? AND status IN ({placeholders})",
            (run_id, *Status.COUNTED),
        ):
            spent[key] += Decimal(usd)
        return dict(spent)

    def owed(self, payer: str) -> list[OwedTotal]:
        """Accepted payments not yet in a settlement, totalled per (network, asset, payee)."""
        groups: dict[tuple[str, str, str], list[tuple[str, int]]] = defaultdict(list)
        for pid, network, asset, payee, amount in self._execute(
            "SELECT id, network, asset, payee, amount FROM x402_payments "
            "WHERE payer = ? AND status = ? AND settlement_id IS NULL ORDER BY id",
            (payer, Status.ACCEPTED),
        ):
            groups[(network, asset, payee)].append((pid, int(amount)))
        return [
            OwedTotal(
                network, asset, payer, payee, sum(a for _, a in rows), tuple(pid for pid, _ in rows)
            )
            for (network, asset, payee), rows in sorted(groups.items())
        ]

    def in_doubt(
        self, run_id: str | None = None, expired_before: int | None = None
    ) -> list[InDoubt]:
        """Reserved payments (of one run, or all; only those expired before a time)."""
        sql = "SELECT id, scheme, url, budget_key, usd FROM x402_payments WHERE status = ?"
        params: list[Any] = [Status.RESERVED]
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", [*params, run_id]
        if expired_before is not None:
            sql, params = sql + " AND valid_until < ?", [*params, expired_before]
        return [
            InDoubt(r[0], r[1], r[2], r[3], Decimal(r[4]))
            for r in self._execute(sql + " ORDER BY id", params)
        ]

    def summary(self, run_id: str | None = None) -> list[SummaryRow]:
        """Count, amount and USD per (domain, payee, network, asset, scheme, status)."""
        sql = "SELECT domain, payee, network, asset, scheme, status, amount, usd FROM x402_payments"
        params: tuple[str, ...] = ()
        if run_id is not None:
            sql, params = sql + " WHERE run_id = ?", (run_id,)
        rows: dict[tuple[str, ...], SummaryRow] = {}
        for *key_fields, amount, usd in self._execute(sql, params):
            key = tuple(key_fields)
            row = rows.setdefault(key, SummaryRow(*key))
            row.count += 1
            row.amount += int(amount)
            row.usd += Decimal(usd)
        return [rows[k] for k in sorted(rows)]

    # -- invoiced networks (Cloudflare) -------------------------------------------------

    def statement(self, network: str, start: int, end: int) -> list[StatementLine]:
        """What was charged on an invoiced network between two unix times (owed or settled)."""
        return [
            StatementLine(
                r[0],
                r[1],
                r[2],
                r[3],
                int(r[4]),
                Decimal(r[5]),
                r[6],
                json.loads(r[7]) if r[7] else {},
                r[8],
            )
            for r in self._execute(
                "SELECT id, created_at, domain, url, amount, usd, status, receipt, settlement_id "
                "FROM x402_payments WHERE network = ? AND status IN (?, ?) "
                "AND created_at >= ? AND created_at < ? ORDER BY created_at, id",
                (network, Status.ACCEPTED, Status.SETTLED, start, end),
            )
        ]

    def settle_by_invoice(self, network: str, start: int, end: int, invoice: str) -> int:
        """Mark a period's owed payments on an invoiced network settled by ``invoice``."""
        with self._transaction():
            return int(
                self._execute(
                    "UPDATE x402_payments SET status = ?, settlement_id = ?, updated_at = ? "
                    "WHERE network = ? AND status = ? AND created_at >= ? AND created_at < ?",
                    (
                        Status.SETTLED,
                        f"invoice:{invoice}",
                        int(time.time()),
                        network,
                        Status.ACCEPTED,
                        start,
                        end,
                    ),
                ).rowcount
            )

    # -- settlements ----------------------------------------------------------------

    def begin_settlement(self, s: Settlement, payment_ids: Sequence[str]) -> bool:
        """Record a signed, not yet broadcast transfer; its payments move from owed to settling.

        All or nothing: False, and nothing written, if one of them is no longer owed.
        """
        now = int(time.time())
        try:
            with self._transaction():
                self._execute(
                    f"INSERT INTO x402_settlements ({_SETTLEMENT_COLUMNS}, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    cursor = self._execute(
                        "UPDATE x402_payments SET status = ?, settlement_id = ?, updated_at = ? "
                        "WHERE id = ? AND status = ? AND settlement_id IS NULL",
                        (Status.SETTLING, s.id, now, pid, Status.ACCEPTED),
                    )
                    if cursor.rowcount != 1:
                        raise _NotOwed
        except _NotOwed:
            return False
        return True

    def mark_settlement(self, settlement_id: str, status: str, block: int | None = None) -> None:
        """An open settlement seen broadcast, or mined in ``block`` (observed)."""
        if status not in SettlementStatus.OPEN:
            raise ValueError(f"{status} is not an open settlement status")
        with self._transaction():
            self._move_settlement(settlement_id, status, "block_number = ?", block)

    def finish_settlement(self, settlement_id: str, status: str, reason: str | None = None) -> None:
        """Confirmed: its payments are settled. Reverted or replaced: they are owed again."""
        payments = SettlementStatus.PAYMENTS_AFTER[status]
        now = int(time.time())
        with self._transaction():
            self._move_settlement(settlement_id, status, "reason = ?", reason)
            if payments == Status.SETTLED:
                sql = "UPDATE x402_payments SET status = ?, updated_at = ? WHERE settlement_id = ?"
            else:  # owed again, by no settlement
                sql = (
                    "UPDATE x402_payments SET status = ?, updated_at = ?, settlement_id = NULL "
                    "WHERE settlement_id = ?"
                )
            self._execute(sql, (payments, now, settlement_id))

    def _move_settlement(
        self, settlement_id: str, status: str, assignment: str, value: Any
    ) -> None:
        """The one place a settlement's status is written: checked against TRANSITIONS."""
        row = self._execute(
            "SELECT status FROM x402_settlements WHERE id = ?", (settlement_id,)
        ).fetchone()
        current = SettlementStatus.LEGACY.get(row[0], row[0]) if row else None
        if current is None or status not in SettlementStatus.TRANSITIONS[current]:
            raise IllegalTransition(settlement_id, current, status)
        self._execute(
            f"UPDATE x402_settlements SET status = ?, {assignment}, updated_at = ? WHERE id = ?",
            (status, value, int(time.time()), settlement_id),
        )

    def settlements(self, status: str | None = None) -> list[Settlement]:
        """All settlements, or those in one status; old "pending" rows read as "signed"."""
        legacy = [old for old, new in SettlementStatus.LEGACY.items() if new == status]
        sql = f"SELECT {_SETTLEMENT_COLUMNS} FROM x402_settlements"
        params: tuple[str, ...] = ()
        if status:
            statuses = (status, *legacy)
            sql += f" WHERE status IN ({', '.join('?' for _ in statuses)})"
            params = statuses
        return [
            Settlement(
                id=r[0],
                network=r[1],
                asset=r[2],
                payer=r[3],
                payee=r[4],
                amount=int(r[5]),
                payment_count=r[6],
                status=SettlementStatus.LEGACY.get(r[7], r[7]),
                raw_tx=r[8],
                tx_nonce=r[9],
                reason=r[10],
                block_number=r[11],
            )
            for r in self._execute(sql + " ORDER BY created_at, id", params)
        ]

    def payment_ids(self, settlement_id: str) -> list[str]:
        return [
            r[0]
            for r in self._execute(
                "SELECT id FROM x402_payments WHERE settlement_id = ? ORDER BY id", (settlement_id,)
            )
        ]


class _NotOwed(Exception):
    """Rolls back a settlement whose payments are no longer all owed."""
