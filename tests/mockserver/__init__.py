"""A paywalled site in a subprocess, built on scrapy_x402.paywall (Scrapy's mockserver pattern:
the child prints its address; the parent reads it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class MockServer:
    module = "tests.mockserver.site"

    def __init__(self, config: dict[str, Any], tmp_path: Path):
        self.config_path = tmp_path / "mockserver.json"
        self.book = tmp_path / "publisher-book.jsonl"
        self.config_path.write_text(json.dumps({**config, "book": str(self.book)}))
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> MockServer:
        self._process = subprocess.Popen(
            [sys.executable, "-m", self.module, str(self.config_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError("the mock server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process is not None and self._process.stdout is not None
        self._process.terminate()
        self._process.wait(10)
        self._process.stdout.close()

    def served(self) -> list[dict[str, str]]:
        """The publisher's CommitmentBook: commitments whose pages it served (owed)."""
        from scrapy_x402.paywall import CommitmentBook

        return CommitmentBook(str(self.book) + ".sqlite3").all()

    def release(self, code: int = 200, stop: bool = False) -> int:
        """Answer the requests a ``hold`` section holds with ``code`` (and with ``stop``, hold
        no more): how many there were."""
        import urllib.request

        query = f"code={code}" + ("&stop=1" if stop else "")
        with urllib.request.urlopen(f"{self.url}/release?{query}") as response:
            return int(response.read())

    def pending(self) -> int:
        """How many requests the site has not answered yet (held or delayed pages)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/pending") as response:
            return int(response.read())

    def accepted(self) -> list[dict[str, Any]]:
        """The publisher's log of what it is owed: a line per commitment as its page was
        served (deferred), or per charge (the edge server)."""
        if not self.book.exists():
            return []
        return [json.loads(line) for line in self.book.read_text().splitlines()]
