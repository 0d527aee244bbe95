from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scrapy_x402.ledger._base import Ledger


class SQLiteLedger(Ledger):
    """A SQLite file in WAL mode; every commit is fsynced before it returns.

    Payments may be added in a batch (``add(..., commit=False)``) that one ``commit()`` makes
    durable: one fsync for all the payments signed in the same reactor turn.
    """

    def __init__(self, path: str):
        self.path = path
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so a crawl and a
        # `scrapy x402 settle` running at the same time serialise their writes.
        self._conn = sqlite3.connect(Path(path).expanduser(), timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._depth = 0
        self._batch = False
        self._create_schema()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self._depth:  # nested: part of the outer transaction
            yield
            return
        if self._batch:
            # Join the open batch under a savepoint, then commit all of it.
            self._conn.execute("SAVEPOINT x402")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK TO x402")
                self._conn.execute("RELEASE x402")
                raise
            finally:
                self._depth -= 1
            self._conn.execute("RELEASE x402")
            self.commit()
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

    def _begin_batch(self) -> None:
        if not self._batch:
            self._conn.execute("BEGIN IMMEDIATE")
            self._batch = True

    @property
    def pending(self) -> bool:
        return self._batch

    def commit(self) -> None:
        if self._batch:
            self._conn.execute("COMMIT")
            self._batch = False

    def close(self) -> None:
        self.commit()
        self._conn.close()
