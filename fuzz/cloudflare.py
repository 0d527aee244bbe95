"""Fuzz Cloudflare's headers and checks: ``crawler-price`` (``parse_crawler_price``),
``crawler-charged`` (pay-per-crawl's confirmation), ``crawler-error`` (as a stat name) and the
refusal check on an offer's resource URL (``cloudflare_refusal``). Expected: InvalidChallenge
from the price parser only; the others never raise."""

from __future__ import annotations

import contextlib

import atheris

from fuzz._common import run

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402._payer import stat_name
    from scrapy_x402._protocol import InvalidChallenge, Offer, parse_crawler_price
    from scrapy_x402.schemes import BatchSettlementScheme, PayPerCrawlScheme

SEEDS = [b"USD 0.01", b"https://a.example/robots.txt", b"http://[::1]:80/x", b"InternalError"]
PPC = PayPerCrawlScheme(identity=True)
BATCH = BatchSettlementScheme(identity=True)


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(InvalidChallenge):
        parse_crawler_price(data, "a.example", "https://a.example/x")
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(len(data))
    for scheme in (PPC, BATCH):  # both share the refusal check on the resource URL
        offer = Offer(scheme.name, "cloudflare:402", 1, "USD", "m", None, text, {}, {})
        reason = scheme.refusal(offer)
        assert reason is None or isinstance(reason, str)
    latin = data.decode("latin-1")
    confirmation = PPC.confirmation({"crawler-charged": latin}, "ppc-1", 100)
    assert confirmation is not None and (confirmation.amount or 0) <= 100
    assert stat_name(latin)


if __name__ == "__main__":
    run("cloudflare", test_one_input, SEEDS)
