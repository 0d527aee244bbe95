"""Fuzz the 402 parser: ``parse_challenge`` (v2 header, v1 body) and, for Cloudflare's header
form, ``parse_crawler_price``. Expected: a Challenge, or InvalidChallenge; anything else is a
crash. The first byte picks the form; the rest is the JSON text (base64-encoded here for the
header form, so that the fuzzer mutates JSON, not base64)."""

from __future__ import annotations

import json

import atheris

from fuzz._common import b64, run, split

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402._protocol import InvalidChallenge, parse_challenge, parse_crawler_price

OFFER = {
    "scheme": "exact",
    "network": "eip155:84532",
    "amount": "1000",
    "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "payTo": "0x" + "ab" * 20,
    "maxTimeoutSeconds": 60,
    "extra": {"name": "USDC", "version": "2"},
}
SEEDS = [
    b"\x00"
    + json.dumps(
        {"x402Version": 2, "resource": {"url": "https://a.example/x"}, "accepts": [OFFER]}
    ).encode(),
    b"\x01"
    + json.dumps(
        {
            "x402Version": 1,
            "error": "pay",
            "accepts": [
                {
                    **OFFER,
                    "network": "base-sepolia",
                    "maxAmountRequired": "250",
                    "resource": "https://a.example/y",
                }
            ],
        }
    ).encode(),
    b"\x02" + b"eyJ4NDAyVmVyc2lvbiI6IDJ9",
    b"\x03USD 0.01",
]


def test_one_input(data: bytes) -> None:
    form, rest = split(data)
    try:
        if form % 4 == 0:
            challenge = parse_challenge(b64(rest), b"")
        elif form % 4 == 1:
            challenge = parse_challenge(None, rest)
        elif form % 4 == 2:
            challenge = parse_challenge(rest, b"")  # the header as sent, base64 or not
        else:
            challenge = parse_crawler_price(rest, "a.example", "https://a.example/x")
    except InvalidChallenge:
        return
    assert type(challenge.version) is int and challenge.version in (0, 1, 2)
    for offer in challenge.offers:
        assert type(offer.amount) is int and 0 <= offer.amount < 2**256


if __name__ == "__main__":
    run("challenge", test_one_input, SEEDS)
