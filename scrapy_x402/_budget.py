"""Per-domain USD budgets with reservations, so concurrent pages can never overspend."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from scrapy_x402._hosts import HostPatterns

TOTAL = "*"  # the key of X402_MAX_TOTAL in refusals


class Budgets:
    """What each budget allows and has spent (reserved or paid), in USD.

    ``X402_BUDGETS`` keys are exact hosts or ``*.suffix`` patterns; a pattern's budget is
    shared by every host it matches (the suffix itself included). Unlisted hosts each get
    ``X402_DEFAULT_BUDGET``. Reserving is synchronous: Scrapy runs middlewares on one
    thread, so check-and-reserve is atomic however many requests are in flight.
    """

    def __init__(
        self,
        limits: Mapping[str, Decimal],
        default: Decimal,
        max_total: Decimal | None,
        spent: Mapping[str, Decimal] | None = None,
    ):
        self._limits = dict(limits)
        self._patterns = HostPatterns(limits)
        self._default = default
        self._max_total = max_total
        self._spent: dict[str, Decimal] = dict(spent or {})
        self.total_spent = sum(self._spent.values(), Decimal(0))

    def key_for(self, host: str) -> str:
        return self._patterns.match(host) or host.lower().rstrip(".")

    def limit(self, key: str) -> Decimal:
        return self._limits.get(key, self._default)

    def spent(self, key: str) -> Decimal:
        return self._spent.get(key, Decimal(0))

    def reserve(self, key: str, usd: Decimal) -> str | None:
        """Reserve ``usd`` against ``key``; on refusal return which budget said no."""
        if self.spent(key) + usd > self.limit(key):
            return key
        if self._max_total is not None and self.total_spent + usd > self._max_total:
            return TOTAL
        self._spent[key] = self.spent(key) + usd
        self.total_spent += usd
        return None

    def release(self, key: str, usd: Decimal) -> None:
        self._spent[key] = self.spent(key) - usd
        self.total_spent -= usd
