from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scrapy_x402.ledger._base import Ledger


class SQLiteLedger(Ledger):
    """A SQLite file in WAL mode; every transaction is fsynced before it returns."""

    def __init__(self, path: str):
        self.path = path
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so a crawl and a
        # `scrapy x402 settle` running at the same time serialise their writes.
        self._conn = sqlite3.connect(Path(path).expanduser(), timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._depth = 0
        self._create_schema()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._depth:  # nested: part of the outer transaction
            yield
            return
        self._conn.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            self._depth -= 1

    def close(self) -> None:
        self._conn.close()
