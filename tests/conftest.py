from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from scrapy import Spider
from scrapy.http import Response

from scrapy_x402.devchain import Anvil, TestUSD

PAYER_FUNDS = 100_000_000  # 100 tUSD


@pytest.fixture(scope="session")
def chain() -> Iterator[Anvil]:
    with Anvil() as anvil:
        yield anvil


@pytest.fixture(scope="session")
def token(chain: Anvil) -> TestUSD:
    return TestUSD.deploy(chain, chain.new_account())


@pytest.fixture
def payer(chain: Anvil, token: TestUSD) -> Any:
    """The crawler's wallet: gas money and 100 tUSD."""
    account = chain.new_account()
    token.mint(account.address, PAYER_FUNDS)
    return account


@pytest.fixture
def payees() -> list[str]:
    return [Account.create().address for _ in range(3)]


@pytest.fixture
def x402_settings(tmp_path, payer, token, chain, monkeypatch) -> dict[str, Any]:
    # The key goes through the environment so that no settings repr in a test report shows it.
    monkeypatch.setenv("X402_PRIVATE_KEY", payer.key.hex())
    return {
        "ADDONS": {"scrapy_x402.Addon": 500},
        "X402_ASSETS": token.asset_setting(),
        "X402_RPC_URLS": {"eip155:31337": chain.url},
        "X402_LEDGER_URI": str(tmp_path / "ledger.sqlite3"),
        "X402_DEFAULT_BUDGET": "10",
        "ROBOTSTXT_OBEY": False,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "DEBUG",
    }


class UrlsSpider(Spider):
    """Fetches the URLs it is given; one item per page served."""

    name = "urls"

    def __init__(self, urls: list[str], **kwargs: Any):
        super().__init__(**kwargs)
        self.start_urls = urls

    def parse(self, response: Response) -> Any:
        yield {"url": response.url, "title": response.css("title::text").get()}
