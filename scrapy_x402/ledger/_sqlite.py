from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scrapy_x402.ledger._base import Ledger


class SQLiteLedger(Ledger):
    """A SQLite file in WAL mode; every commit is fsynced before it returns.

    One connection, used by one thread at a time (a lock): the crawl's ledger thread, or a
    settlement thread, or a command. A transaction opened inside another is a savepoint of
    it, so the ledger thread can commit many payments with one fsync.
    """

    def __init__(self, path: str):
        self.path = path
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so a crawl and a
        # `scrapy x402 settle` running at the same time serialise their writes.
        self._conn = sqlite3.connect(
            Path(path).expanduser(), timeout=30, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._lock = threading.RLock()
        self._depth = 0
        self._create_schema()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            outer = self._depth == 0
            self._conn.execute("BEGIN IMMEDIATE" if outer else f"SAVEPOINT x402_{self._depth}")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                else:
                    self._conn.execute(f"ROLLBACK TO x402_{self._depth}")
                    self._conn.execute(f"RELEASE x402_{self._depth}")
                raise
            self._depth -= 1
            if not outer:
                self._conn.execute(f"RELEASE x402_{self._depth}")
                return
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT leaves nothing half-open for the next transaction.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()
