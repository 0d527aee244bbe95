"""Asset pegs: how many USD one atomic unit of a token is worth.

Budgets are in USD. A token counts against them only through a declared peg; a token
without one is never paid.
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eth_utils import is_address, to_checksum_address

# Enough digits for any uint256 amount times a price, so conversions are exact.
MONEY_CONTEXT = decimal.Context(prec=100, traps=[decimal.InvalidOperation])


@dataclass(frozen=True)
class Asset:
    network: str
    address: str
    symbol: str
    decimals: int
    usd_price: Decimal  # USD per whole token

    def to_usd(self, atomic: int) -> Decimal:
        return MONEY_CONTEXT.multiply(Decimal(atomic), self.usd_price).scaleb(
            -self.decimals, MONEY_CONTEXT
        )

    def format(self, atomic: int) -> str:
        return f"{Decimal(atomic).scaleb(-self.decimals, MONEY_CONTEXT)} {self.symbol}"


CLOUDFLARE = "cloudflare:402"

# USDC, pegged 1:1, on the networks x402 servers use.
KNOWN_ASSETS = {
    ("eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
    ("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
    ("eip155:1", "0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48"),
    ("eip155:11155111", "0x1c7D4B196Cb0C7B01d743Fbc6116a902379C7238"),
}


class AssetTable:
    """The built-in USDC pegs plus the user's ``X402_ASSETS``."""

    def __init__(self, declared: Mapping[str, Mapping[str, Mapping[str, Any]]]):
        self._assets: dict[tuple[str, str], Asset] = {}
        for network, address in KNOWN_ASSETS:
            self._add(Asset(network, address, "USDC", 6, Decimal(1)))
        # Cloudflare bills in US cents (batch-settlement amounts; crawler-price headers).
        self._add(Asset(CLOUDFLARE, "USD", "USD", 2, Decimal(1)))
        for network, by_address in declared.items():
            for address, spec in by_address.items():
                self._add(_declared_asset(network, address, spec))

    def _add(self, asset: Asset) -> None:
        self._assets[(asset.network, asset.address.lower())] = asset

    def get(self, network: str, address: str) -> Asset | None:
        return self._assets.get((network, address.lower()))

    def __iter__(self):
        return iter(self._assets.values())


def _declared_asset(network: str, address: str, spec: Mapping[str, Any]) -> Asset:
    where = f"X402_ASSETS[{network!r}][{address!r}]"
    if not is_address(address):
        raise ValueError(f"{where}: not an address")
    try:
        decimals = int(spec["decimals"])
        usd_price = Decimal(str(spec["usd"]))
    except (KeyError, ValueError, TypeError, decimal.InvalidOperation):
        raise ValueError(
            f"{where} must be a dict with 'symbol', 'decimals' (int) and 'usd' "
            f'(USD per whole token, e.g. "1"), got {spec!r}'
        ) from None
    if isinstance(spec["usd"], float):
        raise ValueError(f"{where}['usd'] must be a string or Decimal, not a float")
    if not 0 <= decimals <= 36 or not usd_price.is_finite() or usd_price <= 0:
        raise ValueError(f"{where}: decimals must be 0-36 and usd a positive number")
    return Asset(
        network,
        to_checksum_address(address),
        str(spec.get("symbol", "?")),
        decimals,
        usd_price,
    )
