"""Which budget a host's payments count against, and what each budget allows, in USD.

What each budget has spent is kept by the store (``scrapy_x402.payments``), which refuses a
reservation that would go beyond its limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from scrapy_x402._hosts import HostPatterns
from scrapy_x402.ledger import TOTAL_KEY
from scrapy_x402.payments import Limits

TOTAL = TOTAL_KEY  # the key of X402_MAX_TOTAL in refusals


class Budgets:
    """``X402_BUDGETS`` keys are exact hosts or ``*.suffix`` patterns; a pattern's budget is
    shared by every host it matches (the suffix itself included). Unlisted hosts each get
    ``X402_DEFAULT_BUDGET``; every payment also counts against ``X402_MAX_TOTAL``."""

    def __init__(self, limits: Mapping[str, Decimal], default: Decimal, max_total: Decimal | None):
        self._limits = dict(limits)
        self._patterns = HostPatterns(limits)
        self._default = default
        self.max_total = max_total

    def key_for(self, host: str) -> str:
        return self._patterns.match(host) or host.lower().rstrip(".")

    def limit(self, key: str) -> Decimal | None:
        return self.max_total if key == TOTAL else self._limits.get(key, self._default)

    def limits(self, key: str) -> Limits:
        return Limits(self._limits.get(key, self._default), self.max_total)
