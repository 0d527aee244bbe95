"""Property-based tests: for any input the parsers return a normalised value or raise their
own error, and never produce an amount, payee or network that the input did not contain."""

from __future__ import annotations

import base64
import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scrapy_x402._networks import normalize_network
from scrapy_x402._protocol import (
    InvalidChallenge,
    b64json_encode,
    parse_challenge,
    parse_crawler_price,
    parse_receipt,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
amounts = st.one_of(
    st.integers(min_value=-5, max_value=2**260).map(str),
    st.integers(min_value=0, max_value=10**30),
    st.sampled_from(["0.50", "1e3", " 12", "", "0x10", "NaN"]),
    json_values,
)
networks = st.one_of(
    st.sampled_from(
        [
            "base",
            "base-sepolia",
            "eip155:84532",
            "eip155:1",
            "cloudflare:402",
            "moon",
            "",
            "EIP155:1",
        ]
    ),
    st.text(max_size=15),
)
offers = st.fixed_dictionaries(
    {
        "scheme": st.sampled_from(["deferred", "exact", "upto", ""]),
        "network": networks,
        "asset": addresses | st.text(max_size=5),
        "payTo": addresses | st.text(max_size=5),
    },
    optional={
        "amount": amounts,
        "maxAmountRequired": amounts,
        "maxTimeoutSeconds": json_values,
        "extra": json_values,
        "resource": json_values,
    },
)
terms = st.fixed_dictionaries(
    {
        "x402Version": st.sampled_from([1, 2, "2.0.0", 3, "x", True, None]),
        "accepts": st.lists(offers, max_size=5) | json_values,
    },
    optional={"resource": json_values, "error": json_values, "extensions": json_values},
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_offers_come_from_input(challenge, raw_offers):
    for offer in challenge.offers:
        raw = offer.raw
        assert raw in raw_offers  # each offer is one the server sent, echoed verbatim
        source = raw.get("amount", raw.get("maxAmountRequired"))
        if raw.get("maxAmountRequired") is not None and challenge.version == 1:
            source = raw["maxAmountRequired"]
        assert offer.amount == 0 or offer.amount == int(str(source).strip())
        assert offer.amount >= 0
        assert offer.pay_to.lower() == raw["payTo"].lower()
        assert offer.asset.lower() == raw["asset"].lower()
        assert offer.network == normalize_network(raw["network"])


@PROPERTY
@given(terms)
def test_v2_header_terms(data):
    header = b64json_encode(data).encode()
    try:
        challenge = parse_challenge(header, b"")
    except InvalidChallenge:
        return
    check_offers_come_from_input(challenge, data["accepts"])


@PROPERTY
@given(terms)
def test_v1_body_terms(data):
    try:
        challenge = parse_challenge(None, json.dumps(data).encode())
    except InvalidChallenge:
        return
    check_offers_come_from_input(challenge, data["accepts"])


@PROPERTY
@given(st.binary(max_size=2000), st.binary(max_size=2000) | st.none())
def test_any_bytes_are_parsed_or_refused(body, header):
    with contextlib.suppress(InvalidChallenge):  # anything else fails the test
        parse_challenge(header, body)


@PROPERTY
@given(st.binary(max_size=64))
def test_any_crawler_price(value):
    try:
        challenge = parse_crawler_price(value, "a.example", "https://a.example/x")
    except InvalidChallenge:
        return
    [offer] = challenge.offers
    dollars, _, cents = value.decode("latin-1").split(" ", 1)[1].partition(".")
    assert offer.amount == int(dollars) * 100 + int(cents.ljust(2, "0")) > 0


@PROPERTY
@given(json_values, st.sampled_from(["PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"]))
def test_receipts_decode_to_what_was_sent_or_nothing(data, name):
    receipt = parse_receipt({name: base64.b64encode(json.dumps(data).encode())})
    assert receipt == (data if isinstance(data, dict) else None)


@PROPERTY
@given(st.binary(max_size=300))
def test_any_receipt_bytes(value):
    receipt = parse_receipt({"PAYMENT-RESPONSE": value})
    assert receipt is None or isinstance(receipt, dict)
