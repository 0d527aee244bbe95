"""Fuzz the publisher's ``DeferredVerifier.verify`` with any ``PAYMENT-SIGNATURE`` value.
Expected: a Commitment, or PaymentRejected with its reason; anything else is a crash. The first
byte picks the form: the rest as the JSON payment (base64-encoded here), or as the raw header.
The seed is a valid payment signed with a throwaway key, so mutations reach every check."""

from __future__ import annotations

import json

import atheris
from eth_account import Account

from fuzz._common import b64, run, split

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402.paywall import DeferredVerifier, PaymentRejected
    from scrapy_x402.schemes._eip712 import signer_for
    from scrapy_x402.schemes.deferred import Commitment, resource_hash

NOW = 1_800_000_000
URL = "https://a.example/x"
TOKEN = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYEE = "0x" + "ab" * 20
ACCOUNT = Account.create()  # throwaway: signs the seed only


def _seed() -> bytes:
    commitment = Commitment(
        84532, ACCOUNT.address, PAYEE, TOKEN, 1000, resource_hash(URL), "0x" + "01" * 32, NOW + 60
    )
    signature = signer_for(bytes(ACCOUNT.key)).sign(commitment.digest())
    accepted = {
        "scheme": "deferred",
        "network": "eip155:84532",
        "amount": "1000",
        "asset": TOKEN,
        "payTo": PAYEE,
    }
    payload = {"signature": "0x" + signature.hex(), "commitment": commitment.to_json()}
    return json.dumps({"x402Version": 2, "accepted": accepted, "payload": payload}).encode()


SEEDS = [b"\x00" + _seed(), b"\x01" + b64(_seed())]


def test_one_input(data: bytes) -> None:
    form, rest = split(data)
    verifier = DeferredVerifier("eip155:84532", TOKEN, PAYEE, clock=lambda: NOW)
    try:
        commitment = verifier.verify(b64(rest) if form % 2 == 0 else rest, 1000, URL)
    except PaymentRejected as e:
        assert isinstance(e.reason, str)
        return
    assert commitment.amount >= 1000 and commitment.payee == verifier.pay_to


if __name__ == "__main__":
    run("verifier", test_one_input, SEEDS)
