"""Settings, read once into a frozen dataclass."""

from __future__ import annotations

import decimal
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from scrapy.settings import BaseSettings
from scrapy.utils.conf import closest_scrapy_cfg
from scrapy.utils.job import job_dir

from scrapy_x402._assets import AssetTable
from scrapy_x402._networks import normalize_network
from scrapy_x402.schemes import SCHEME_NAMES

LEDGER_FILENAME = "x402-ledger.sqlite3"


def parse_usd(value: Any, name: str) -> Decimal:
    """A USD amount from a setting or meta key: str, int or Decimal; never a float."""
    if isinstance(value, float):
        raise ValueError(f'{name} must be a string such as "0.10", not a float ({value!r})')
    try:
        usd = Decimal(str(value).strip().removeprefix("$"))
    except decimal.InvalidOperation:
        raise ValueError(f'{name} must be a USD amount such as "2.50", got {value!r}') from None
    if not usd.is_finite() or usd < 0:
        raise ValueError(f"{name} must be a non-negative USD amount, got {value!r}")
    return usd


@dataclass(frozen=True)
class X402Config:
    enabled: bool = True
    allow_mainnet: bool = False
    assets: AssetTable = field(default_factory=lambda: AssetTable({}))
    budgets: Mapping[str, Decimal] = field(default_factory=dict)
    bot_auth_domains: tuple[str, ...] = ()
    bot_auth_key: str | None = field(default=None, repr=False)
    bot_auth_label: str = "sig1"
    bot_auth_validity: int = 60
    close_on_budget_exhausted: bool = False
    confirmations: int | None = None  # None: 1 on local dev chains, 3 elsewhere
    crawler_price_header: str = "crawler-max-price"
    crawler_retry_backoff: float = 1.0
    crawler_retry_times: int = 2
    debug: bool = False
    default_budget: Decimal = Decimal(0)
    freeze_gc: bool = True
    item_receipt_field: str | None = None
    keystore_password_env: str = "X402_KEYSTORE_PASSWORD"
    keystore_path: str | None = None
    ledger_uri: str = LEDGER_FILENAME
    max_gas_price: int | None = None  # wei
    max_payment_attempts: int = 1
    max_price: Decimal = Decimal("0.10")
    max_timeout_seconds: int = 300
    max_total: Decimal | None = None
    networks: frozenset[str] | None = None
    offer_policy: str = "cheapest"
    preauthorize: bool = True
    priority_adjust: int = 1
    private_key: str | None = field(default=None, repr=False)
    rpc_urls: Mapping[str, str] = field(default_factory=dict)
    schemes: tuple[str, ...] = ("deferred", "exact")
    settle_on_close: bool = True
    settlement_timeout: int = 120
    signature_agent: str | None = None
    signature_agent_syntax: str = "legacy"
    jobdir: str | None = None

    @classmethod
    def from_settings(cls, settings: BaseSettings) -> X402Config:
        jobdir = job_dir(settings)
        ledger_uri = settings.get("X402_LEDGER_URI") or _default_ledger(jobdir)
        max_total = settings.get("X402_MAX_TOTAL")
        networks = settings.getlist("X402_NETWORKS")
        return cls(
            enabled=settings.getbool("X402_ENABLED", True),
            allow_mainnet=settings.getbool("X402_ALLOW_MAINNET"),
            assets=AssetTable(settings.getdict("X402_ASSETS")),
            budgets={
                pattern.lower(): parse_usd(v, f"X402_BUDGETS[{pattern!r}]")
                for pattern, v in settings.getdict("X402_BUDGETS").items()
            },
            bot_auth_domains=tuple(settings.getlist("X402_BOT_AUTH_DOMAINS")),
            bot_auth_key=settings.get("X402_BOT_AUTH_KEY") or os.environ.get("X402_BOT_AUTH_KEY"),
            bot_auth_label=settings.get("X402_BOT_AUTH_LABEL", "sig1"),
            bot_auth_validity=settings.getint("X402_BOT_AUTH_VALIDITY", 60),
            close_on_budget_exhausted=settings.getbool("X402_CLOSE_ON_BUDGET_EXHAUSTED"),
            confirmations=_confirmations(settings.get("X402_CONFIRMATIONS")),
            crawler_retry_backoff=settings.getfloat("X402_CRAWLER_RETRY_BACKOFF", 1.0),
            crawler_retry_times=settings.getint("X402_CRAWLER_RETRY_TIMES", 2),
            crawler_price_header=_choice(
                settings.get("X402_CRAWLER_PRICE_HEADER", "crawler-max-price"),
                "X402_CRAWLER_PRICE_HEADER",
                ("crawler-max-price", "crawler-exact-price"),
            ),
            debug=settings.getbool("X402_DEBUG"),
            default_budget=parse_usd(
                settings.get("X402_DEFAULT_BUDGET", "0"), "X402_DEFAULT_BUDGET"
            ),
            freeze_gc=settings.getbool("X402_FREEZE_GC", True),
            item_receipt_field=settings.get("X402_ITEM_RECEIPT_FIELD") or None,
            keystore_password_env=settings.get(
                "X402_KEYSTORE_PASSWORD_ENV", "X402_KEYSTORE_PASSWORD"
            ),
            keystore_path=settings.get("X402_KEYSTORE_PATH") or None,
            ledger_uri=ledger_uri,
            max_gas_price=_gwei(settings.get("X402_MAX_GAS_PRICE")),
            max_payment_attempts=settings.getint("X402_MAX_PAYMENT_ATTEMPTS", 1),
            max_price=parse_usd(settings.get("X402_MAX_PRICE", "0.10"), "X402_MAX_PRICE"),
            max_timeout_seconds=settings.getint("X402_MAX_TIMEOUT_SECONDS", 300),
            max_total=None if max_total in (None, "") else parse_usd(max_total, "X402_MAX_TOTAL"),
            networks=frozenset(_network(n) for n in networks) if networks else None,
            preauthorize=settings.getbool("X402_PREAUTHORIZE", True),
            priority_adjust=settings.getint("X402_PRIORITY_ADJUST", 1),
            private_key=settings.get("X402_PRIVATE_KEY") or None,
            rpc_urls={_network(n): url for n, url in settings.getdict("X402_RPC_URLS").items()},
            offer_policy=_choice(
                settings.get("X402_OFFER_POLICY", "cheapest"),
                "X402_OFFER_POLICY",
                ("cheapest", "scheme_order"),
            ),
            schemes=_schemes(settings.getlist("X402_SCHEMES", ["deferred", "exact"])),
            settle_on_close=settings.getbool("X402_SETTLE_ON_CLOSE", True),
            settlement_timeout=settings.getint("X402_SETTLEMENT_TIMEOUT", 120),
            signature_agent=settings.get("X402_SIGNATURE_AGENT") or None,
            signature_agent_syntax=_choice(
                settings.get("X402_SIGNATURE_AGENT_SYNTAX", "legacy"),
                "X402_SIGNATURE_AGENT_SYNTAX",
                ("legacy", "dictionary"),
            ),
            jobdir=jobdir,
        )


def _default_ledger(jobdir: str | None) -> str:
    """In JOBDIR when set, else beside the project's scrapy.cfg, else here."""
    if jobdir:
        return str(Path(jobdir) / LEDGER_FILENAME)
    project_cfg = closest_scrapy_cfg()
    return str(Path(project_cfg).parent / LEDGER_FILENAME) if project_cfg else LEDGER_FILENAME


def _gwei(value: Any) -> int | None:
    """X402_MAX_GAS_PRICE, in gwei (a string such as "2.5"), as wei."""
    if value in (None, ""):
        return None
    if isinstance(value, float):
        raise ValueError('X402_MAX_GAS_PRICE must be a string such as "2.5" (gwei), not a float')
    try:
        gwei = Decimal(str(value))
    except decimal.InvalidOperation:
        raise ValueError(f"X402_MAX_GAS_PRICE must be a number of gwei, got {value!r}") from None
    if not gwei.is_finite() or gwei <= 0:
        raise ValueError(f"X402_MAX_GAS_PRICE must be positive, got {value!r}")
    return int(gwei.scaleb(9))


def _confirmations(value: Any) -> int | None:
    if value in (None, ""):
        return None
    if int(value) < 1:
        raise ValueError(f"X402_CONFIRMATIONS must be 1 or more, got {value!r}")
    return int(value)


def _schemes(names: list[str]) -> tuple[str, ...]:
    for name in names:
        if name not in SCHEME_NAMES:
            raise ValueError(
                f"X402_SCHEMES: unknown scheme {name!r}; known: {', '.join(SCHEME_NAMES)}"
            )
    return tuple(names)


def _choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _network(name: str) -> str:
    network = normalize_network(name)
    if network is None:
        raise ValueError(f'{name!r} is not a network name or CAIP-2 id (e.g. "eip155:84532")')
    return network
