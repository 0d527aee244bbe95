"""Fuzz offer -> scheme -> signed payment: terms parsed by ``parse_challenge``, each offer
checked by its scheme's ``refusal``, and every offer a scheme accepts signed (with a
throwaway key made at start, never shown) and put in its payment headers. Expected:
InvalidChallenge from the parser only; refusal, sign and headers never raise. The first byte
picks the header or the body form; the rest is the terms' JSON."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import atheris
from eth_account import Account

from fuzz._common import b64, run, split

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402._payer import _echo_extensions
    from scrapy_x402._protocol import InvalidChallenge, parse_challenge
    from scrapy_x402.schemes import (
        BatchSettlementScheme,
        DeferredScheme,
        ExactScheme,
        PayPerCrawlScheme,
        UptoScheme,
    )
    from scrapy_x402.schemes._permit2 import Permit2Allowances

ACCOUNT = Account.create()  # throwaway: signs fuzzed offers only


class _Everywhere(dict):  # type: ignore[type-arg]
    """An RPC URL for every network and an unlimited Permit2 allowance for every token, so
    that Permit2 offers are signed too (nothing is read from a chain)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: object) -> int:
        return Permit2Allowances.UNLIMITED


PERMIT2 = Permit2Allowances(SimpleNamespace(rpc_urls=_Everywhere()), ACCOUNT.address)  # type: ignore[arg-type]
PERMIT2._left = _Everywhere()
SCHEMES: dict[str, Any] = {
    "deferred": DeferredScheme(),
    "exact": ExactScheme(PERMIT2),
    "upto": UptoScheme(PERMIT2),
    "batch-settlement": BatchSettlementScheme(identity=True),
    "pay-per-crawl": PayPerCrawlScheme(identity=True),
}
BASE = {
    "network": "eip155:84532",
    "amount": "1000",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "payTo": "0x" + "ab" * 20,
    "maxTimeoutSeconds": 60,
}
OFFERS: list[dict[str, Any]] = [
    {**BASE, "scheme": "deferred"},
    {**BASE, "scheme": "exact", "extra": {"name": "USDC", "version": "2"}},
    {
        **BASE,
        "scheme": "exact",
        "extra": {"name": "USDC", "version": "2", "assetTransferMethod": "permit2"},
    },
    {**BASE, "scheme": "upto", "extra": {"facilitatorAddress": "0x" + "cd" * 20}},
    {
        "scheme": "batch-settlement",
        "network": "cloudflare:402",
        "amount": "1",
        "asset": "USD",
        "payTo": "merchant",
        "extra": {"version": "1.0.0"},
    },
]
EXTENSIONS = {"payment-identifier": {"info": {"required": True}}}
SEEDS = [
    b"\x00"
    + json.dumps(
        {
            "x402Version": 2,
            "resource": {"url": "https://a.example/x"},
            "accepts": OFFERS,
            "extensions": EXTENSIONS,
        }
    ).encode(),
    b"\x01"
    + json.dumps(
        {"x402Version": 1, "accepts": [{**o, "resource": "https://a.example/y"} for o in OFFERS]}
    ).encode(),
]


def test_one_input(data: bytes) -> None:
    form, rest = split(data)
    try:
        challenge = parse_challenge(b64(rest), b"") if form % 2 else parse_challenge(None, rest)
    except InvalidChallenge:
        return
    for offer in challenge.offers:
        scheme = SCHEMES.get(offer.scheme)
        if scheme is None or scheme.refusal(offer) is not None:
            continue
        url = offer.resource or "https://a.example/x"
        signed = scheme.sign(ACCOUNT, offer, url, int(time.time()), 300)
        headers = scheme.headers(challenge, offer, signed, _echo_extensions(challenge, signed.id))
        assert all(isinstance(v, str) and v.isascii() for v in headers.values())


if __name__ == "__main__":
    run("signing", test_one_input, SEEDS)
