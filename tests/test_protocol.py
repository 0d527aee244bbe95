import json

import pytest

from scrapy_x402._protocol import (
    InvalidChallenge,
    b64json_encode,
    parse_challenge,
    parse_receipt,
)

ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAY_TO = "0x" + "ab" * 20


def v2(*accepts, **extra):
    return b64json_encode(
        {
            "x402Version": 2,
            "resource": {"url": "https://a.example/x"},
            "accepts": list(accepts),
            **extra,
        }
    ).encode()


def offer(**kw):
    return {
        "scheme": "deferred",
        "network": "eip155:84532",
        "amount": "1000",
        "asset": ASSET.lower(),
        "payTo": PAY_TO,
        "maxTimeoutSeconds": 60,
        **kw,
    }


def test_v2_header_is_normalised():
    c = parse_challenge(v2(offer(), offer(amount="5", scheme="exact")), b"")
    assert c.version == 2
    assert [o.amount for o in c.offers] == [1000, 5]
    first = c.offers[0]
    assert first.asset == ASSET  # checksummed
    assert first.network == "eip155:84532"
    assert first.resource == "https://a.example/x"
    assert first.raw == offer()  # kept verbatim for `accepted`


def test_v1_body_with_network_name_and_max_amount_required():
    body = json.dumps(
        {
            "x402Version": 1,
            "error": "pay",
            "accepts": [
                {
                    "scheme": "deferred",
                    "network": "base-sepolia",
                    "maxAmountRequired": "250",
                    "resource": "https://a.example/y",
                    "asset": ASSET,
                    "payTo": PAY_TO,
                }
            ],
        }
    ).encode()
    c = parse_challenge(None, body)
    assert (c.version, c.error) == (1, "pay")
    assert (c.offers[0].network, c.offers[0].amount) == ("eip155:84532", 250)
    assert c.offers[0].resource == "https://a.example/y"
    assert c.offers[0].max_timeout_seconds is None


def test_string_versions_are_tolerated():
    data = {"x402Version": "2.0.0", "accepts": [offer()]}
    assert parse_challenge(b64json_encode(data).encode(), b"").version == 2


@pytest.mark.parametrize(
    ("header", "body", "reason"),
    [
        (b"%%%", b"", "not base64"),
        (b64json_encode([1, 2]).encode(), b"", "not a JSON object"),
        (v2(offer(amount="0.50")), b"", "not a whole number"),
        (v2(offer(amount="-5")), b"", "not a whole number"),
        (v2(offer(amount="0")), b"", "out of range"),
        (v2(offer(amount=str(2**256))), b"", "out of range"),
        (v2(offer(amount=1.5)), b"", "no amount"),
        (v2(offer(amount=None)), b"", "no amount"),
        (v2(offer(payTo="nobody")), b"", "not an address"),
        (v2(offer(network="moon")), b"", "no valid network"),
        (
            b64json_encode({"x402Version": 3, "accepts": [offer()]}).encode(),
            b"",
            "unknown x402Version",
        ),
        (b64json_encode({"x402Version": True, "accepts": [offer()]}).encode(), b"", "not a number"),
        (b64json_encode({"x402Version": 2, "accepts": []}).encode(), b"", "no 'accepts'"),
        (v2(*[offer()] * 33), b"", "33 offers"),
        (None, json.dumps({"x402Version": 1, "accepts": [offer()] * 200}).encode(), "200 offers"),
        (b"A" * (16 * 1024 + 1), b"", "over 16 KiB"),
        (None, b"<html>pay me</html>", "body is not JSON"),
        (None, b"\xff\xfe", "body is not JSON"),
        (None, b"{" * 70_000, "over 64 KiB"),
    ],
)
def test_malformed_terms_raise_with_a_reason(header, body, reason):
    with pytest.raises(InvalidChallenge, match=reason):
        parse_challenge(header, body)


def test_malformed_offers_are_dropped_when_others_are_valid():
    c = parse_challenge(v2(offer(amount="1.5"), offer()), b"")
    assert len(c.offers) == 1
    assert c.dropped == ("amount '1.5' is not a whole number of atomic units",)


def test_receipt_is_read_from_either_header():
    receipt = {"success": True, "transaction": ""}
    assert parse_receipt({"PAYMENT-RESPONSE": b64json_encode(receipt)}) == receipt
    assert parse_receipt({"X-PAYMENT-RESPONSE": b64json_encode(receipt)}) == receipt
    assert parse_receipt({"PAYMENT-RESPONSE": "garbage!"}) is None
    assert parse_receipt({}) is None
