"""Payments in doubt after a crash: recorded as reserved, maybe sent, maybe accepted.

For ``deferred`` only the publisher knows, and the scheme lets the client ask it
(docs/deferred-scheme.md, section 7): accepted ones become owed, the others are never paid.
A signed ``exact``/``upto`` transfer is held (counted) until it expires; Cloudflare may have
charged one, so it is counted as owed and left to the invoice.

A crawl asks through Scrapy's downloader (``ask`` is async there); the ``settle`` command,
which runs no reactor, asks with a plain HTTP client.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from scrapy_x402._protocol import json_decode
from scrapy_x402.ledger import InDoubt, Status
from scrapy_x402.payments import PaymentBook
from scrapy_x402.schemes import HELD_SCHEMES

logger = logging.getLogger(__name__)

STATUS_PATH = "/.well-known/x402-deferred/"
MAX_ANSWER = 4096
# A publisher forgets a commitment's in-flight record this long after it expired (docs
# section 5): an "in flight" answer later than that is not believed.
IN_FLIGHT_LIMIT = 600
STATUS_DEADLINE = 30  # seconds for a whole status answer


@dataclass
class Resolution:
    accepted: list[str] = field(default_factory=list)  # owed: the publisher served them
    refused: list[str] = field(default_factory=list)  # never paid: released
    held: list[str] = field(default_factory=list)  # signed transfers: counted until they expire
    unknown: list[str] = field(default_factory=list)  # the publisher could not say: still in doubt


def status_url(url: str, payment_id: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{STATUS_PATH}{payment_id}"


def parse_status(body: bytes) -> bool | None:
    """The publisher's answer ``{"accepted": true|false, "inFlight": true|false}``; None while
    a request presenting the commitment is still being answered (it may yet be served)."""
    # Bounded and depth-capped: InvalidChallenge is a ValueError, as callers expect.
    answer = json_decode(body[:MAX_ANSWER], "the status endpoint's answer")
    if not isinstance(answer, dict) or not isinstance(answer.get("accepted"), bool):
        raise ValueError("the status endpoint did not answer {'accepted': true|false}")
    if not answer["accepted"] and answer.get("inFlight") is True:
        return None
    return answer["accepted"]


def publisher_accepted(url: str, payment_id: str, timeout: float = 10) -> bool | None:
    """Ask the publisher of ``url`` whether it accepted ``payment_id`` (blocking: commands
    only), within STATUS_DEADLINE whatever the publisher does: urllib's timeout is per read,
    and a publisher dripping its answer would otherwise hold every other payee's settlement."""
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            with urllib.request.urlopen(status_url(url, payment_id), timeout=timeout) as answer:  # noqa: S310 (http(s) only)
                outcome["accepted"] = parse_status(answer.read(MAX_ANSWER + 1))
        except Exception as e:
            outcome["error"] = e

    asking = threading.Thread(target=ask, name="x402-status", daemon=True)
    asking.start()
    asking.join(STATUS_DEADLINE)
    if asking.is_alive():  # left to finish on its own: it decides nothing any more
        raise TimeoutError(f"no answer within {STATUS_DEADLINE} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["accepted"]


def final(row: InDoubt, answer: bool | None, now: float) -> bool | None:
    """The publisher's answer, with "still in flight" read as "not served" once no honest
    publisher could still say so (else a hostile one would hold the budget for ever)."""
    if answer is None and row.valid_until is not None and now > row.valid_until + IN_FLIGHT_LIMIT:
        return False
    return answer


def needs_asking(row: InDoubt) -> bool:
    return row.scheme == "deferred" and row.url.startswith(("http://", "https://"))


def record(book: PaymentBook, row: InDoubt, accepted: bool | None, resolution: Resolution) -> None:
    """Record what became of one payment in doubt (``accepted``: the publisher's answer,
    None when it could not say)."""
    if row.scheme in HELD_SCHEMES:
        if book.not_served(row.id, "in doubt after a crash: held until it expires"):
            resolution.held.append(row.id)
    elif row.scheme != "deferred":  # Cloudflare's: charged or not, the invoice will say
        if book.confirm(
            row.id, Status.ACCEPTED, reason="in doubt after a crash; check the invoice"
        ):
            resolution.accepted.append(row.id)
    elif accepted is None:
        resolution.unknown.append(row.id)
    elif accepted:
        if book.confirm(row.id, Status.ACCEPTED, reason="in doubt after a crash; served"):
            resolution.accepted.append(row.id)
    elif book.not_served(row.id, "in doubt after a crash; the publisher never served it"):
        resolution.refused.append(row.id)


def resolve_in_doubt(
    book: PaymentBook, *, run_id: str | None = None, expired_before: int | None = None
) -> Resolution:
    """Resolve reserved payments (of ``run_id``, or of every run; only those expired before
    ``expired_before`` unless it is None: the caller knows no crawl is running). Blocking."""
    resolution = Resolution()
    for row in book.store.in_doubt(run_id=run_id, expired_before=expired_before):
        accepted = None
        if needs_asking(row):
            try:
                accepted = final(row, publisher_accepted(row.url, row.id), time.time())
            except (OSError, ValueError, http.client.HTTPException) as e:
                _cannot_ask(row, e)
        record(book, row, accepted, resolution)
    return resolution


async def ask_all(
    rows: list[InDoubt], ask: Callable[[str, str], Awaitable[bool | None]]
) -> dict[str, bool | None]:
    """The publishers' answers for ``rows`` (None where one could not say)."""
    answers: dict[str, bool | None] = {}
    for row in rows:
        answers[row.id] = None
        if needs_asking(row):
            try:
                answers[row.id] = final(row, await ask(row.url, row.id), time.time())
            except Exception as e:
                _cannot_ask(row, e)
    return answers


def _cannot_ask(row: InDoubt, error: Exception) -> None:
    logger.warning("x402: cannot ask %s about payment %s: %s", row.url, row.id, error)
