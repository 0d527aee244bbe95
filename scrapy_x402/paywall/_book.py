from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from twisted.web.resource import Resource
from twisted.web.server import Request

from scrapy_x402.schemes.deferred import Commitment

if TYPE_CHECKING:
    from scrapy_x402.paywall._verifier import NonceStore

STATUS_PATH = "/.well-known/x402-deferred/"


class Debt(NamedTuple):
    """What a payer owes in one token: the sum of its unpaid commitments, and when the
    oldest of them was served (None: nothing owed)."""

    total: int
    since: int | None


class CommitmentBook:
    """The publisher's durable record of the commitments whose 2xx it sent (``x402_accepted``:
    what it is owed), of which of them a reconciled transfer paid (``x402_paid``), and what it
    answers clients who ask (after a crash) whether a commitment was accepted. One SQLite
    file, shareable by several processes."""

    def __init__(self, path: str):
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_accepted (id TEXT PRIMARY KEY, payer TEXT NOT NULL, "
            "payee TEXT NOT NULL, token TEXT NOT NULL, chain_id INTEGER NOT NULL, "
            "amount TEXT NOT NULL, url TEXT NOT NULL, accepted_at INTEGER NOT NULL)"
        )
        self._conn.execute(
            "CREATE INDEX IF NOT EXISTS x402_accepted_payer ON x402_accepted (payer, token)"
        )
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_paid "
            "(id TEXT PRIMARY KEY, tx_hash TEXT NOT NULL, paid_at INTEGER NOT NULL)"
        )
        # Reconciliation (paywall/_reconcile.py): what a settlement paid beyond the commitments
        # it names, one row per transaction, and the paid ids found by their transaction.
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_credits (tx_hash TEXT PRIMARY KEY, "
            "chain_id INTEGER NOT NULL, token TEXT NOT NULL, payer TEXT NOT NULL, "
            "payee TEXT NOT NULL, amount TEXT NOT NULL, reason TEXT NOT NULL, "
            "unmatched TEXT NOT NULL, credited_at INTEGER NOT NULL)"
        )
        self._conn.execute("CREATE INDEX IF NOT EXISTS x402_paid_tx ON x402_paid (tx_hash)")

    def record(self, commitment: Commitment, url: str) -> None:
        """The commitment is owed: PaywallResource calls this as the 2xx status line of its
        page is sent (docs section 6), never earlier."""
        self._conn.execute(
            "INSERT OR IGNORE INTO x402_accepted VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                commitment.id,
                commitment.payer,
                commitment.payee,
                commitment.token,
                commitment.chain_id,
                str(commitment.amount),
                url,
                int(time.time()),
            ),
        )

    def accepted(self, commitment_id: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM x402_accepted WHERE id = ?", (commitment_id.lower(),)
        ).fetchone()
        return row is not None

    def debt(self, payer: str, chain_id: int, token: str) -> Debt:
        """What ``payer`` owes in ``token``: served and not paid by a reconciled transfer."""
        rows = self._conn.execute(
            "SELECT amount, accepted_at FROM x402_accepted AS a WHERE payer = ? AND token = ? "
            "AND chain_id = ? AND NOT EXISTS (SELECT 1 FROM x402_paid AS p WHERE p.id = a.id)",
            (payer, token, chain_id),
        ).fetchall()
        return Debt(sum(int(a) for a, _ in rows), min((t for _, t in rows), default=None))

    def all(self) -> list[dict[str, str]]:
        columns = ("id", "payer", "payee", "token", "chain_id", "amount", "url", "accepted_at")
        return [
            dict(zip(columns, row, strict=True))
            for row in self._conn.execute("SELECT * FROM x402_accepted ORDER BY accepted_at, id")
        ]

    # -- reconciliation (paywall/_reconcile.py) ------------------------------------------

    def commitments(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The accepted commitments among ``ids``: payer, payee, token, chain_id, amount (int)
        and paid_by (the transaction that paid it, or None)."""
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), 500):  # within SQLite's limit on parameters
            part = ids[start : start + 500]
            for row in self._conn.execute(
                "SELECT a.id, a.payer, a.payee, a.token, a.chain_id, a.amount, p.tx_hash "
                "FROM x402_accepted a LEFT JOIN x402_paid p ON p.id = a.id "
                f"WHERE a.id IN ({', '.join('?' * len(part))})",
                part,
            ):
                found[row[0]] = {
                    "payer": row[1],
                    "payee": row[2],
                    "token": row[3],
                    "chain_id": row[4],
                    "amount": int(row[5]),
                    "paid_by": row[6],
                }
        return found

    def unpaid(self, payer: str, payee: str, token: str, chain_id: int) -> dict[str, int]:
        """Accepted, unpaid commitments of ``payer`` to ``payee``: id -> amount."""
        rows = self._conn.execute(
            "SELECT a.id, a.amount FROM x402_accepted a LEFT JOIN x402_paid p ON p.id = a.id "
            "WHERE p.id IS NULL AND a.payer = ? AND a.payee = ? AND a.token = ? "
            "AND a.chain_id = ?",
            (payer, payee, token, chain_id),
        )
        return {i: int(amount) for i, amount in rows}

    def sells_for(self, payee: str, token: str, chain_id: int) -> bool:
        """Whether any commitment to ``payee`` in ``token`` was accepted."""
        row = self._conn.execute(
            "SELECT 1 FROM x402_accepted WHERE payee = ? AND token = ? AND chain_id = ? LIMIT 1",
            (payee, token, chain_id),
        ).fetchone()
        return row is not None

    def reconciled(self, tx_hash: str) -> bool:
        """Whether a settlement transaction was reconciled (it paid or credited something)."""
        return any(
            self._conn.execute(
                f"SELECT 1 FROM {table} WHERE tx_hash = ? LIMIT 1", (tx_hash,)
            ).fetchone()
            for table in ("x402_paid", "x402_credits")
        )

    def paid_by(self, commitment_id: str) -> str | None:
        """The transaction that paid a commitment, or None."""
        row = self._conn.execute(
            "SELECT tx_hash FROM x402_paid WHERE id = ?", (commitment_id.lower(),)
        ).fetchone()
        return row[0] if row else None

    def mark_paid(self, tx_hash: str, ids: list[str], credit: dict[str, Any] | None = None) -> bool:
        """Mark ``ids`` paid by ``tx_hash`` and record its ``credit`` (chain_id, token, payer,
        payee, amount, reason, unmatched ids), all or nothing: False, and nothing written, if
        the transaction was reconciled already or one of the ids is paid."""
        now = int(time.time())
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if self.reconciled(tx_hash):
                self._conn.execute("ROLLBACK")
                return False
            self._conn.executemany(
                "INSERT INTO x402_paid VALUES (?, ?, ?)", [(i, tx_hash, now) for i in ids]
            )
            if credit is not None:
                self._conn.execute(
                    "INSERT INTO x402_credits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        tx_hash,
                        credit["chain_id"],
                        credit["token"],
                        credit["payer"],
                        credit["payee"],
                        str(credit["amount"]),
                        credit["reason"],
                        json.dumps(list(credit["unmatched"])),
                        now,
                    ),
                )
        except sqlite3.IntegrityError:  # paid meanwhile, by another transaction
            self._conn.execute("ROLLBACK")
            return False
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return True

    def credits(self, payer: str | None = None) -> list[dict[str, Any]]:
        """Settlement value not matched to commitments, per transaction (of one payer, or all)."""
        columns = ("tx_hash", "chain_id", "token", "payer", "payee", "amount", "reason")
        sql = "SELECT tx_hash, chain_id, token, payer, payee, amount, reason, unmatched "
        sql += "FROM x402_credits" + (" WHERE payer = ?" if payer else "") + " ORDER BY rowid"
        return [
            {
                **dict(zip(columns, row[:7], strict=True)),
                "amount": int(row[5]),
                "unmatched": json.loads(row[7]),
            }
            for row in self._conn.execute(sql, (payer,) if payer else ())
        ]


class CommitmentStatusResource(Resource):
    """``GET /.well-known/x402-deferred/<commitment id>`` → ``{"id", "accepted", "inFlight"}``:
    lets a client that crashed learn whether a commitment it sent was accepted (docs section
    7). ``nonces``: the nonce stores of the verifiers, to say whether a request presenting the
    commitment is still being answered (then "not accepted" is not final)."""

    isLeaf = True

    def __init__(self, book: CommitmentBook, nonces: Iterable[NonceStore] = ()):
        super().__init__()
        self.book = book
        self.nonces = list(nonces)

    def render_GET(self, request: Request) -> bytes:
        commitment_id = (
            request.postpath[-1].decode("ascii", "replace").lower() if request.postpath else ""
        )
        request.setHeader("Content-Type", "application/json")
        if len(commitment_id) != 66 or not commitment_id.startswith("0x"):
            request.setResponseCode(400)
            return b'{"error": "not a commitment id"}'
        # In flight first, then the book: a serving process writes the book before it marks
        # the nonce served, so read in this order no answer is "not served" during a 2xx.
        in_flight = any(n.in_flight(commitment_id) for n in self.nonces)
        accepted = self.book.accepted(commitment_id)
        in_flight = in_flight and not accepted
        return json.dumps(
            {"id": commitment_id, "accepted": accepted, "inFlight": in_flight}
        ).encode()
