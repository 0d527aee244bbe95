"""Property-based tests: for any input the parsers return a normalised value or raise their
own error, and never produce an amount, payee or network that the input did not contain;
JSON nested deeper than MAX_JSON_DEPTH is refused as malformed wherever it comes from."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scrapy_x402._networks import normalize_network
from scrapy_x402._protocol import (
    MAX_JSON_DEPTH,
    InvalidChallenge,
    b64json_encode,
    json_depth,
    parse_challenge,
    parse_crawler_price,
    parse_receipt,
)
from scrapy_x402.paywall import DeferredVerifier, PaymentRejected

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
    st.sampled_from(
        ["0.50", "1e3", " 12", "12\n", "012", "+12", "1_2", "5\x1c", "\u00b2", "\u0661", "", "0x10"]
    ),
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
        "x402Version": st.sampled_from(
            [1, 2, "2.0.0", 3, "x", True, None, 1.0, 2.0, "\u00b2", " 2", "2\n"]
        ),
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
        # The decimal-string grammar has one spelling per number: the source is that spelling.
        assert offer.amount == 0 or str(offer.amount) == source
        assert 0 <= offer.amount < 2**256
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
    assert challenge.version in (1, 2) and type(challenge.version) is int
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
    receipt, unreadable = parse_receipt({name: base64.b64encode(json.dumps(data).encode())})
    assert receipt == (data if isinstance(data, dict) else None)
    assert (unreadable is None) == isinstance(data, dict)


@PROPERTY
@given(st.binary(max_size=300))
def test_any_receipt_bytes(value):
    receipt, unreadable = parse_receipt({"PAYMENT-RESPONSE": value})
    if not value:
        assert (receipt, unreadable) == (None, None)
    else:  # a receipt, or why there is none
        assert (receipt is None) != (unreadable is None)
        assert receipt is None or isinstance(receipt, dict)


@PROPERTY
@given(st.binary(max_size=60), st.binary(max_size=60))
def test_any_crawler_charged_and_date(charged, date):
    receipt, _ = parse_receipt({"crawler-charged": charged, "Date": date})
    if charged:
        assert receipt is not None
        assert receipt["crawler-charged"] == charged.decode("latin-1")
        assert isinstance(receipt.get("timestamp", 0), int)


# -- nesting depth ---------------------------------------------------------------------------

# Leaves that hold brackets, quotes and backslashes inside strings: they never count as depth.
leaves = st.one_of(
    st.integers().map(str),
    st.text(alphabet='[]{}"\\ab', max_size=8).map(json.dumps),
    st.just("[]"),
    st.just("{}"),
)


@st.composite
def nested_json(draw, max_depth=3 * MAX_JSON_DEPTH):
    """JSON text nested ``depth`` levels (arrays and objects mixed), built as text so that any
    depth can be made; with its depth."""
    depth = draw(st.integers(0, max_depth))
    kinds = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    leaf = draw(leaves)
    text = leaf
    for is_array in kinds:
        key = json.dumps(draw(st.text(alphabet='[{"\\k', max_size=3)))
        text = f"[{text}]" if is_array else f"{{{key}:{text}}}"
    return text, depth + (leaf in ("[]", "{}"))


def offer_with_extra(extra: str) -> str:
    # terms (1) > accepts (2) > offer (3) > extra: ``extra`` starts at level 4
    return (
        '{"x402Version": 2, "accepts": [{"scheme": "deferred", "network": "eip155:84532", '
        '"amount": "1000", "asset": "0x' + "11" * 20 + '", "payTo": "0x' + "22" * 20 + '", '
        '"extra": ' + extra + "}]}"
    )


@PROPERTY
@given(nested_json())
def test_depth_is_counted_exactly(nested):
    text, depth = nested
    assert json_depth(text) == depth
    if depth < 500:  # the reference: Python's own parser, within its recursion limit
        assert reference_depth(json.loads(text)) == depth


def reference_depth(value):
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    return 0


@PROPERTY
@given(nested_json(), st.sampled_from(["header", "body"]))
def test_terms_nested_too_deep_are_malformed(nested, where):
    extra, depth = nested
    text = offer_with_extra(extra)
    total = 3 + depth
    header = base64.b64encode(text.encode()) if where == "header" else None
    body = text.encode() if where == "body" else b""
    if total <= MAX_JSON_DEPTH:
        [offer] = parse_challenge(header, body).offers
        assert offer.extra == (json.loads(extra) if isinstance(json.loads(extra), dict) else {})
    else:
        with pytest.raises(InvalidChallenge, match=f"more than {MAX_JSON_DEPTH} levels deep"):
            parse_challenge(header, body)


@PROPERTY
@given(nested_json(), st.sampled_from(["PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"]))
def test_receipts_nested_too_deep_are_malformed(nested, name):
    inner, depth = nested
    text = '{"success": true, "extra": ' + inner + "}"
    receipt, unreadable = parse_receipt({name: base64.b64encode(text.encode())})
    if 1 + depth <= MAX_JSON_DEPTH:
        assert (receipt, unreadable) == (json.loads(text), None)
    else:
        assert receipt is None
        assert f"more than {MAX_JSON_DEPTH} levels deep" in unreadable


VERIFIER = DeferredVerifier("eip155:84532", "0x" + "11" * 20, "0x" + "22" * 20)


@PROPERTY
@given(nested_json())
def test_the_publishers_verifier_refuses_deep_payloads(nested):
    inner, _ = nested
    text = (
        '{"x402Version": 2, "accepted": {"scheme": "deferred", "network": "eip155:84532"}, '
        '"payload": {"commitment": ' + inner + "}}"
    )
    # Whatever the depth, a payment with no valid commitment is invalid_payload: no other error.
    with pytest.raises(PaymentRejected, match="invalid_payload"):
        VERIFIER.verify(base64.b64encode(text.encode()), 1000, "https://a.example/")
