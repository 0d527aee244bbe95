"""Host patterns as the settings write them: an exact host, or ``*.suffix`` for the suffix
and every host under it. The most specific pattern wins."""

from __future__ import annotations

from collections.abc import Iterable


class HostPatterns:
    def __init__(self, patterns: Iterable[str]):
        patterns = [p.lower().rstrip(".") for p in patterns]
        self.exact = {p for p in patterns if not p.startswith("*.")}
        self.suffixes = sorted((p for p in patterns if p.startswith("*.")), key=len, reverse=True)

    def match(self, host: str) -> str | None:
        """The pattern that covers ``host``, or None."""
        host = host.lower().rstrip(".")
        if host in self.exact:
            return host
        for pattern in self.suffixes:  # longest first: most specific wins
            suffix = pattern[2:]
            if host == suffix or host.endswith("." + suffix):
                return pattern
        return None
