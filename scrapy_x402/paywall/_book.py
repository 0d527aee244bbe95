from __future__ import annotations

import json
import sqlite3
import time
from typing import NamedTuple

from twisted.web.resource import Resource
from twisted.web.server import Request

from scrapy_x402.schemes.deferred import Commitment

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


class CommitmentStatusResource(Resource):
    """``GET /.well-known/x402-deferred/<commitment id>`` → ``{"id", "accepted"}``: lets a
    client that crashed learn whether a commitment it sent was accepted (docs section 7)."""

    isLeaf = True

    def __init__(self, book: CommitmentBook):
        super().__init__()
        self.book = book

    def render_GET(self, request: Request) -> bytes:
        commitment_id = (
            request.postpath[-1].decode("ascii", "replace").lower() if request.postpath else ""
        )
        request.setHeader("Content-Type", "application/json")
        if len(commitment_id) != 66 or not commitment_id.startswith("0x"):
            request.setResponseCode(400)
            return b'{"error": "not a commitment id"}'
        return json.dumps(
            {"id": commitment_id, "accepted": self.book.accepted(commitment_id)}
        ).encode()
