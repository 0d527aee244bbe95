from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
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


TOTAL_KEY = "*"  # the budget row of X402_MAX_TOTAL


class SettlementStatus:
    """Where a settlement transaction stands; only the chain moves it on (the transitions are
    declared in ``scrapy_x402.payments``)."""

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


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow (or another process made first); nothing
    was written."""

    def __init__(self, subject: str, current: str | None, wanted: str):
        super().__init__(f"{subject}: {current} -> {wanted} is not allowed")
        self.subject = subject
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
    valid_until: int | None = None


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


SCHEMA_VERSION = 2
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS x402_meta (
        name VARCHAR(64) PRIMARY KEY,
        value TEXT NOT NULL
    )""",
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
        settlement_id VARCHAR(66),
        counted BIGINT NOT NULL DEFAULT 0
    )""",
    # What each budget of a run has counted (reserved, owed, held or paid), in COUNT_UNITS:
    # the store enforces budgets with a conditional update of these rows.
    """CREATE TABLE IF NOT EXISTS x402_budgets (
        run_id VARCHAR(64) NOT NULL,
        budget_key VARCHAR(255) NOT NULL,
        spent BIGINT NOT NULL,
        PRIMARY KEY (run_id, budget_key)
    )""",
    "CREATE INDEX IF NOT EXISTS x402_payments_owed ON x402_payments (status, network, asset, payee)",
    "CREATE INDEX IF NOT EXISTS x402_payments_run ON x402_payments (run_id, status, valid_until)",
    "CREATE INDEX IF NOT EXISTS x402_payments_settlement ON x402_payments (settlement_id)",
    "CREATE INDEX IF NOT EXISTS x402_payments_url ON x402_payments (run_id, url)",
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
COUNT_UNITS = 10**9  # budgets count nano-USD: integers, so the store can compare them


def counted_units(usd: Decimal) -> int:
    """What a payment of ``usd`` counts against a budget: rounded up, never down."""
    return int((usd * COUNT_UNITS).to_integral_value(rounding=ROUND_CEILING))


class SchemaTooNew(Exception):
    pass


_SETTLEMENT_COLUMNS = (
    "id, network, asset, payer, payee, amount, payment_count, status, raw_tx, tx_nonce, reason, "
    "block_number"
)


class Ledger(ABC):
    """The store: a DB-API connection with ``?`` placeholders, its schema, and every read.

    Writes of payment status and budgets belong to ``scrapy_x402.payments.PaymentBook``;
    they run inside ``transaction()``. Safe to share between threads: one at a time.
    """

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (inside a transaction, for writes) and return its cursor."""

    @abstractmethod
    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one read and return all its rows."""

    @abstractmethod
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group statements atomically and durably; nested, a savepoint of the outer one."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    def _create_schema(self) -> None:
        with self.transaction():
            version = self._version()
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"this ledger was written by a newer scrapy-x402 (schema {version}, "
                    f"this one knows {SCHEMA_VERSION}); upgrade scrapy-x402 to use it"
                )
            if version == 1:
                self.execute(
                    "ALTER TABLE x402_payments ADD COLUMN counted BIGINT NOT NULL DEFAULT 0"
                )
            for statement in SCHEMA:
                self.execute(statement)
            if "block_number" not in (self._columns("x402_settlements") or set()):
                self.execute("ALTER TABLE x402_settlements ADD COLUMN block_number BIGINT")
            if version == 1:
                self._count_v1_payments()
            if version < SCHEMA_VERSION:
                self.execute("DELETE FROM x402_meta WHERE name = 'schema_version'")
                self.execute(
                    "INSERT INTO x402_meta (name, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    def _version(self) -> int:
        """0: a new ledger; 1: written before budgets were counted in the store."""
        try:
            rows = self.query("SELECT value FROM x402_meta WHERE name = 'schema_version'")
        except Exception:  # no x402_meta table
            rows = []
        if rows:
            return int(rows[0][0])
        try:
            self.query("SELECT id FROM x402_payments LIMIT 1")
        except Exception:
            return 0
        return 1

    def _columns(self, table: str) -> set[str] | None:
        try:
            return {c[0] for c in self.execute(f"SELECT * FROM {table} WHERE 1 = 0").description}
        except Exception:  # no such table
            return None

    def _count_v1_payments(self) -> None:
        """Schema 1 kept budgets in memory: count its payments into x402_budgets once."""
        placeholders = ", ".join("?" for _ in Status.COUNTED)
        spent: dict[tuple[str, str], int] = defaultdict(int)
        for pid, run_id, key, usd in self.query(
            f"SELECT id, run_id, budget_key, usd FROM x402_payments WHERE status IN ({placeholders})",
            Status.COUNTED,
        ):
            units = counted_units(Decimal(usd))
            self.execute("UPDATE x402_payments SET counted = ? WHERE id = ?", (units, pid))
            spent[(run_id, key)] += units
            spent[(run_id, TOTAL_KEY)] += units
        for (run_id, key), units in spent.items():
            self.execute(
                "INSERT INTO x402_budgets (run_id, budget_key, spent) VALUES (?, ?, ?)",
                (run_id, key, units),
            )

    # -- reads -----------------------------------------------------------------------

    def get_status(self, payment_id: str) -> str | None:
        rows = self.query("SELECT status FROM x402_payments WHERE id = ?", (payment_id,))
        return rows[0][0] if rows else None

    def paid_for(self, run_id: str, url: str) -> bool:
        """Whether the run holds a payment for ``url`` that was (or may have been) served."""
        statuses = (Status.RESERVED, Status.ACCEPTED, Status.SETTLING, Status.SETTLED)
        return bool(
            self.query(
                "SELECT 1 FROM x402_payments WHERE run_id = ? AND url = ? "
                f"AND status IN ({', '.join('?' for _ in statuses)}) LIMIT 1",
                (run_id, url, *statuses),
            )
        )

    def spent_by_budget(self, run_id: str) -> dict[str, Decimal]:
        """USD counted against each budget of one run (reserved, owed, held or paid)."""
        return {
            key: Decimal(spent) / COUNT_UNITS
            for key, spent in self.query(
                "SELECT budget_key, spent FROM x402_budgets WHERE run_id = ? AND budget_key != ?",
                (run_id, TOTAL_KEY),
            )
            if spent
        }

    def expired_holds(self, run_id: str | None, now: int) -> list[HeldPayment]:
        """Held payments (of one run, or all) whose signatures can no longer be collected."""
        sql = (
            "SELECT id, scheme, budget_key, usd, network, asset, payer, payload "
            "FROM x402_payments WHERE status = ? AND valid_until < ?"
        )
        params: list[Any] = [Status.HELD, now]
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", [*params, run_id]
        return [
            HeldPayment(r[0], r[1], r[2], Decimal(r[3]), r[4], r[5], r[6], json.loads(r[7]))
            for r in self.query(sql, params)
        ]

    def owed(self, payer: str, max_payments: int | None = None) -> list[OwedTotal]:
        """Accepted payments not yet in a settlement, totalled per (network, asset, payee), in
        parts of at most ``max_payments`` payments (in id order) when it is given."""
        groups: dict[tuple[str, str, str], list[tuple[str, int]]] = defaultdict(list)
        for pid, network, asset, payee, amount in self.query(
            "SELECT id, network, asset, payee, amount FROM x402_payments "
            "WHERE payer = ? AND status = ? AND settlement_id IS NULL ORDER BY id",
            (payer, Status.ACCEPTED),
        ):
            groups[(network, asset, payee)].append((pid, int(amount)))
        totals = []
        for (network, asset, payee), rows in sorted(groups.items()):
            size = max_payments or len(rows)
            for part in (rows[start : start + size] for start in range(0, len(rows), size)):
                amount, ids = sum(a for _, a in part), tuple(pid for pid, _ in part)
                totals.append(OwedTotal(network, asset, payer, payee, amount, ids))
        return totals

    def in_doubt(
        self, run_id: str | None = None, expired_before: int | None = None
    ) -> list[InDoubt]:
        """Reserved payments (of one run, or all; only those expired before a time)."""
        sql = "SELECT id, scheme, url, budget_key, usd, valid_until FROM x402_payments "
        sql += "WHERE status = ?"
        params: list[Any] = [Status.RESERVED]
        if run_id is not None:
            sql, params = sql + " AND run_id = ?", [*params, run_id]
        if expired_before is not None:
            sql, params = sql + " AND valid_until < ?", [*params, expired_before]
        return [
            InDoubt(r[0], r[1], r[2], r[3], Decimal(r[4]), r[5])
            for r in self.query(sql + " ORDER BY id", params)
        ]

    def summary(self, run_id: str | None = None) -> list[SummaryRow]:
        """Count, amount and USD per (domain, payee, network, asset, scheme, status)."""
        sql = "SELECT domain, payee, network, asset, scheme, status, amount, usd FROM x402_payments"
        params: tuple[str, ...] = ()
        if run_id is not None:
            sql, params = sql + " WHERE run_id = ?", (run_id,)
        rows: dict[tuple[str, ...], SummaryRow] = {}
        for *key_fields, amount, usd in self.query(sql, params):
            key = tuple(key_fields)
            row = rows.setdefault(key, SummaryRow(*key))
            row.count += 1
            row.amount += int(amount)
            row.usd += Decimal(usd)
        return [rows[k] for k in sorted(rows)]

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
            for r in self.query(
                "SELECT id, created_at, domain, url, amount, usd, status, receipt, settlement_id "
                "FROM x402_payments WHERE network = ? AND status IN (?, ?) "
                "AND created_at >= ? AND created_at < ? ORDER BY created_at, id",
                (network, Status.ACCEPTED, Status.SETTLED, start, end),
            )
        ]

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
            for r in self.query(sql + " ORDER BY created_at, id", params)
        ]

    def settlement_status(self, settlement_id: str) -> str | None:
        rows = self.query("SELECT status FROM x402_settlements WHERE id = ?", (settlement_id,))
        return SettlementStatus.LEGACY.get(rows[0][0], rows[0][0]) if rows else None

    def payment_ids(self, settlement_id: str) -> list[str]:
        return [
            r[0]
            for r in self.query(
                "SELECT id FROM x402_payments WHERE settlement_id = ? ORDER BY id", (settlement_id,)
            )
        ]
