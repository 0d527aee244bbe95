from __future__ import annotations

import json
import sqlite3
import time

from twisted.web.resource import Resource
from twisted.web.server import Request

from scrapy_x402.schemes.deferred import Commitment

STATUS_PATH = "/.well-known/x402-deferred/"


class CommitmentBook:
    """The publisher's durable record of the commitments it accepted: what it is owed, what
    it reconciles transfers against, and what it answers clients who ask (after a crash)
    whether a commitment was accepted. One SQLite file, shareable by several processes."""

    def __init__(self, path: str):
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_accepted (id TEXT PRIMARY KEY, payer TEXT NOT NULL, "
            "payee TEXT NOT NULL, token TEXT NOT NULL, chain_id INTEGER NOT NULL, "
            "amount TEXT NOT NULL, url TEXT NOT NULL, accepted_at INTEGER NOT NULL)"
        )

    def record(self, commitment: Commitment, url: str) -> None:
        """Call before serving the page (PaywallResource's on_accept does)."""
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
