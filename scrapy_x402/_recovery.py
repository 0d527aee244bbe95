"""Payments in doubt after a crash: committed as reserved, maybe sent, maybe accepted.

For ``deferred`` only the publisher knows, and the scheme lets the client ask it
(docs/deferred-scheme.md, section 7): accepted ones become owed, the others are never paid.
A signed ``exact``/``upto`` transfer is held (counted) until it expires; Cloudflare may have
charged one, so it is counted as owed and left to the invoice.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from scrapy_x402.ledger import Ledger, Status

logger = logging.getLogger(__name__)

STATUS_PATH = "/.well-known/x402-deferred/"
HELD_SCHEMES = ("exact", "upto")


@dataclass
class Resolution:
    accepted: list[str] = field(default_factory=list)  # owed: the publisher served them
    refused: list[str] = field(default_factory=list)  # never paid
    unknown: list[str] = field(default_factory=list)  # the publisher could not say: still in doubt


def publisher_accepted(url: str, payment_id: str, timeout: float = 10) -> bool:
    """Ask the publisher of ``url`` whether it accepted the commitment ``payment_id``."""
    parts = urlsplit(url)
    status_url = f"{parts.scheme}://{parts.netloc}{STATUS_PATH}{payment_id}"
    with urllib.request.urlopen(status_url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
        answer = json.loads(response.read(4096))
    if not isinstance(answer, dict) or not isinstance(answer.get("accepted"), bool):
        raise ValueError(f"{status_url} did not answer {{'accepted': true|false}}")
    return answer["accepted"]


def resolve_in_doubt(
    ledger: Ledger, *, run_id: str | None = None, expired_before: int | None = None
) -> Resolution:
    """Resolve reserved payments (of ``run_id``, or of every run; only those expired before
    ``expired_before`` unless it is None: the caller knows no crawl is running)."""
    resolution = Resolution()
    for row in ledger.in_doubt(run_id=run_id, expired_before=expired_before):
        if row.scheme == "deferred":
            if not row.url.startswith(("http://", "https://")):
                resolution.unknown.append(row.id)
                continue
            try:
                accepted = publisher_accepted(row.url, row.id)
            except (OSError, ValueError) as e:
                logger.warning("x402: cannot ask %s about payment %s: %s", row.url, row.id, e)
                resolution.unknown.append(row.id)
                continue
            status = Status.ACCEPTED if accepted else Status.FAILED
            reason = "in doubt after a crash; the publisher " + (
                "served it" if accepted else "never served it"
            )
        elif row.scheme in HELD_SCHEMES:
            status, accepted, reason = (
                Status.HELD,
                False,
                "in doubt after a crash: held until it expires",
            )
        else:  # Cloudflare's: charged or not, the invoice will say
            status, accepted, reason = (
                Status.ACCEPTED,
                True,
                "in doubt after a crash; check the invoice",
            )
        ledger.resolve(row.id, status, reason=reason)
        (resolution.accepted if accepted else resolution.refused).append(row.id)
    return resolution
