"""Shared by the benchmark scripts: servers in their own processes, and result lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account

from scrapy_x402.devchain import Anvil, TestUSD

ROOT = Path(__file__).resolve().parent.parent


def result(name: str, value: float | int | str) -> None:
    """One figure, in the form compared across commits: ``RESULT <name> <value>``."""
    if isinstance(value, float):
        value = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    print(f"RESULT {name} {value}", flush=True)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


@contextmanager
def server(args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """A server script that prints its URL on its first line, stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"{args[0]} did not start")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class PaidWorld:
    """A local chain with a test token, a funded payer and its payees, and a scratch folder."""

    chain: Any
    token: Any
    payer: Any
    payees: list[str]
    tmp: Path

    @property
    def network(self) -> str:
        return f"eip155:{self.chain.chain_id}"

    @property
    def env(self) -> dict[str, str]:
        return {"X402_PRIVATE_KEY": self.payer.key.hex()}

    def site_args(self) -> list[str]:
        """bench/site.py selling pages to these payees for this token."""
        network, token, payees = self.network, self.token.address, ",".join(self.payees)
        return ["bench/site.py", "--network", network, "--token", token, "--payees", payees]

    def settings(self, name: str, rpc: str | None = None, **extra: Any) -> dict[str, Any]:
        """A paying crawl's settings, with its own ledger ``name``."""
        return {
            "ADDONS": {"scrapy_x402.Addon": 500},
            "X402_ASSETS": self.token.asset_setting(),
            "X402_RPC_URLS": {self.network: rpc or self.chain.url},
            "X402_BUDGETS": {"127.0.0.1": "1000000"},
            "X402_LEDGER_URI": str(self.tmp / f"{name}.sqlite3"),
            **extra,
        }


@contextmanager
def paid_world(payees: int) -> Iterator[PaidWorld]:
    with Anvil() as chain, tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        token = TestUSD.deploy(chain, chain.new_account())
        payer = chain.new_account()
        token.mint(payer.address, 10**12)
        yield PaidWorld(
            chain, token, payer, [Account.create().address for _ in range(payees)], Path(tmp)
        )
