from decimal import Decimal

import pytest
from scrapy.settings import Settings

from scrapy_x402 import X402Config


def test_defaults_are_safe():
    c = X402Config.from_settings(Settings())
    assert c.enabled and c.settle_on_close and not c.allow_mainnet
    assert c.default_budget == Decimal(0) and c.max_total is None
    assert c.max_price == Decimal("0.10") and c.max_payment_attempts == 1
    assert c.schemes == ("deferred", "exact") and c.offer_policy == "cheapest"
    assert c.ledger_uri == "x402-ledger.sqlite3"
    assert (
        c.assets.get("eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e").symbol == "USDC"
    )


def test_values_are_parsed_once(tmp_path):
    c = X402Config.from_settings(
        Settings(
            {
                "X402_BUDGETS": {"News.Example": "2.50", "*.papers.example": 1},
                "X402_NETWORKS": ["base-sepolia"],
                "X402_RPC_URLS": {"base-sepolia": "http://127.0.0.1:8545"},
                "X402_MAX_TOTAL": "$3",
                "JOBDIR": str(tmp_path),
            }
        )
    )
    assert c.budgets == {"news.example": Decimal("2.50"), "*.papers.example": Decimal(1)}
    assert c.networks == frozenset({"eip155:84532"})
    assert c.rpc_urls == {"eip155:84532": "http://127.0.0.1:8545"}
    assert c.max_total == Decimal(3)
    assert c.ledger_uri == str(tmp_path / "x402-ledger.sqlite3")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"X402_MAX_PRICE": 0.1}, "not a float"),
        ({"X402_BUDGETS": {"a.example": "lots"}}, "USD amount"),
        ({"X402_DEFAULT_BUDGET": "-1"}, "non-negative"),
        ({"X402_RPC_URLS": {"mars": "x"}}, "not a network name"),
        ({"X402_SCHEMES": ["deferred", "barter"]}, "unknown scheme 'barter'"),
        ({"X402_OFFER_POLICY": "random"}, "must be one of cheapest, scheme_order"),
        (
            {"X402_ASSETS": {"eip155:1": {"0x" + "11" * 20: {"decimals": 6, "usd": 1.0}}}},
            "not a float",
        ),
        ({"X402_ASSETS": {"eip155:1": {"0x" + "11" * 20: {"usd": "1"}}}}, "'decimals'"),
    ],
)
def test_bad_settings_fail_loudly(settings, message):
    with pytest.raises(ValueError, match=message):
        X402Config.from_settings(Settings(settings))
