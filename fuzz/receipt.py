"""Fuzz what a paid response's receipt goes through: ``parse_receipt``, then each scheme's
``confirmation`` and the middleware's receipt check. Expected: a receipt or None with the
reason it is unreadable, and a Confirmation or None; none of them raises. The first byte picks
the header; the rest is the receipt's JSON (base64-encoded here) or the raw header value."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import atheris

from fuzz._common import b64, run, split

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402._middleware import X402DownloaderMiddleware
    from scrapy_x402._protocol import parse_receipt
    from scrapy_x402.schemes import (
        BatchSettlementScheme,
        DeferredScheme,
        ExactScheme,
        PayPerCrawlScheme,
        UptoScheme,
    )

PAYMENT_ID = "0x" + "12" * 32
SCHEMES: list[Any] = [
    DeferredScheme(),
    ExactScheme(),
    UptoScheme(),
    BatchSettlementScheme(identity=True),
    PayPerCrawlScheme(identity=True),
]
PAYMENT = {"network": "eip155:84532", "amount": "1000"}
# The receipt check needs only a payer to count with and the wallet's address.
MIDDLEWARE: Any = SimpleNamespace(
    payer=SimpleNamespace(inc=lambda *a, **k: None, once=lambda *a, **k: None),
    session=SimpleNamespace(payer="0x" + "ab" * 20),
)
SEEDS = [
    b"\x00"
    + json.dumps(
        {
            "success": True,
            "transaction": "0x" + "cd" * 32,
            "amount": "400",
            "network": "eip155:84532",
            "extra": {"commitmentId": PAYMENT_ID},
        }
    ).encode(),
    b"\x01"
    + json.dumps(
        {"amount": "2", "asset": "USD", "network": "cloudflare:402", "timestamp": 1796144400}
    ).encode(),
    b"\x02USD 0.01\x00Tue, 01 Dec 2026 17:00:00 GMT",
    b"\x03" + b"eyJzdWNjZXNzIjogdHJ1ZX0=",
]


def test_one_input(data: bytes) -> None:
    form, rest = split(data)
    if form % 4 == 0:
        headers = {"PAYMENT-RESPONSE": b64(rest)}
    elif form % 4 == 1:
        headers = {"X-PAYMENT-RESPONSE": b64(rest)}
    elif form % 4 == 2:
        charged, _, date = rest.partition(b"\x00")
        headers = {"crawler-charged": charged, "Date": date}
    else:
        headers = {"PAYMENT-RESPONSE": rest}
    receipt, unreadable = parse_receipt(headers)
    assert receipt is None or isinstance(receipt, dict)
    assert unreadable is None or isinstance(unreadable, str)
    for scheme in SCHEMES:
        confirmation = scheme.confirmation(receipt, PAYMENT_ID, 1000)
        if confirmation is not None and confirmation.amount is not None:
            assert 0 <= confirmation.amount <= 1000
    X402DownloaderMiddleware._check_receipt(MIDDLEWARE, receipt, PAYMENT, "a.example")


if __name__ == "__main__":
    run("receipt", test_one_input, SEEDS)
