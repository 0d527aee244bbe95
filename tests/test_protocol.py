import base64
import json

import pytest

from scrapy_x402._protocol import (
    InvalidChallenge,
    Offer,
    b64json_decode,
    b64json_encode,
    parse_atomic,
    parse_challenge,
    parse_receipt,
)
from scrapy_x402.schemes import UptoScheme
from scrapy_x402.schemes._base import settled_transaction
from scrapy_x402.schemes._cloudflare import cloudflare_refusal
from scrapy_x402.schemes.deferred import Commitment, InvalidCommitment

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
        (v2(offer(amount=1.5)), b"", "not a decimal string"),
        (v2(offer(amount=None)), b"", "not a decimal string"),
        (v2(offer(payTo="nobody")), b"", "not an address"),
        (v2(offer(network="moon")), b"", "no valid network"),
        (
            b64json_encode({"x402Version": 3, "accepts": [offer()]}).encode(),
            b"",
            "unknown x402Version",
        ),
        (
            b64json_encode({"x402Version": True, "accepts": [offer()]}).encode(),
            b"",
            "not an integer",
        ),
        (b64json_encode({"x402Version": 2, "accepts": []}).encode(), b"", "no 'accepts'"),
        (v2(*[offer()] * 33), b"", "33 offers"),
        (None, json.dumps({"x402Version": 1, "accepts": [offer()] * 200}).encode(), "200 offers"),
        (b"A" * (16 * 1024 + 1), b"", "over 16 KiB"),
        (None, b"<html>pay me</html>", "body is not UTF-8 JSON"),
        (None, b"\xff\xfe", "body is not UTF-8 JSON"),
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
    assert parse_receipt({"PAYMENT-RESPONSE": b64json_encode(receipt)}) == (receipt, None)
    assert parse_receipt({"X-PAYMENT-RESPONSE": b64json_encode(receipt)}) == (receipt, None)
    assert parse_receipt({}) == (None, None)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"garbage!", "not base64"),
        (b64("[" * 2000 + "]" * 2000), "more than 32 levels deep"),
        (b64('{"a":' * 40 + "1" + "}" * 40), "more than 32 levels deep"),
        (b64('{"network": "\\ud800"}'), "lone surrogate"),
        (b64("[1, 2]"), "not a JSON object"),
    ],
)
def test_an_unreadable_receipt_says_why(value, reason):
    receipt, unreadable = parse_receipt({"PAYMENT-RESPONSE": value})
    assert receipt is None
    assert reason in unreadable


@pytest.mark.parametrize(
    "date",
    [
        b"Mon, 01 Jan 99999999999 00:00:00 GMT",  # OverflowError in parsedate_to_datetime
        b"Mon, 32 Jan 2020 00:00:00 GMT",
        b"Mon, 01 Jan 2020 00:00:00 +9999",
        b"yesterday",
    ],
)
def test_crawler_charged_with_an_unreadable_date_is_still_a_receipt(date):
    receipt, unreadable = parse_receipt({"crawler-charged": b"USD 0.01", "Date": date})
    assert receipt == {"crawler-charged": "USD 0.01"}
    assert "is not a date" in unreadable
    good = {"crawler-charged": b"USD 0.01", "Date": b"Tue, 01 Dec 2026 17:00:00 GMT"}
    assert parse_receipt(good) == ({"crawler-charged": "USD 0.01", "timestamp": 1796144400}, None)


# -- the spec's decimal-string grammar: one parser for every amount -------------------------

NOT_DECIMAL = [
    "01000",
    "+1000",
    "-1000",
    "1_000",
    " 1000 ",
    "1000 ",
    "1000\n",
    "5\x1c",  # int() strips it as whitespace; ValueError before
    "\u0661\u0660\u0660\u0660",  # Arabic-Indic digits: int() reads them as 1000
    "\u00b2",  # isdigit() but not int()
    "1e3",
    "0x10",
    "1.0",
    "",
]


@pytest.mark.parametrize("value", NOT_DECIMAL)
def test_amounts_follow_the_decimal_string_grammar(value):
    with pytest.raises(InvalidChallenge, match="not a whole number"):
        parse_atomic(value)
    with pytest.raises(InvalidChallenge):
        parse_challenge(v2(offer(amount=value)), b"")


@pytest.mark.parametrize("value", [1000, True, 1000.0, None, ["1000"]])
def test_amounts_are_strings(value):
    with pytest.raises(InvalidChallenge, match="not a decimal string"):
        parse_atomic(value)


def test_amounts_are_bounded_to_uint256():
    assert parse_atomic(str(2**256 - 1)) == 2**256 - 1
    assert parse_atomic("1") == 1
    assert parse_atomic("0", minimum=0) == 0
    for value in ("0", str(2**256), "9" * 78):
        with pytest.raises(InvalidChallenge, match="out of range"):
            parse_atomic(value)
    with pytest.raises(InvalidChallenge, match="not a whole number"):
        parse_atomic("1" * 79)


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (1.0, "not an integer"),  # 1.0 == 1 in Python
        (2.0, "not an integer"),
        (False, "not an integer"),
        ("\u00b2", "unknown x402Version"),  # "²".isdigit(): ValueError from int() before
        ("\u0662", "unknown x402Version"),  # Arabic-Indic 2
        (" 2", "unknown x402Version"),
        ("2\n", "unknown x402Version"),
        ("02", "unknown x402Version"),
        ("3.0.0", "unknown x402Version"),
        ([2], "unknown x402Version"),
    ],
)
def test_x402_version_is_an_integer(version, reason):
    with pytest.raises(InvalidChallenge, match=reason):
        parse_challenge(b64json_encode({"x402Version": version, "accepts": [offer()]}), b"")


DEPTH = 32  # scrapy_x402._protocol.MAX_JSON_DEPTH


def nested(depth: int) -> str:
    return '{"a":' * (depth - 1) + "[1]" + "}" * (depth - 1)


def test_json_nesting_is_capped_before_parsing():
    assert b64json_decode(b64(nested(DEPTH)))
    for text in ("[" * 2000, "[" * 2000 + "]" * 2000, nested(DEPTH + 1)):
        with pytest.raises(InvalidChallenge, match="more than 32 levels deep"):
            b64json_decode(b64(text))
        with pytest.raises(InvalidChallenge, match="body nests JSON more than 32 levels"):
            parse_challenge(None, text.encode())
    # Brackets inside strings are text, whatever escapes precede them.
    terms = {"x402Version": 2, "error": '[[["\\' * 100, "accepts": [offer()]}
    assert parse_challenge(b64json_encode(terms).encode(), b"").error == terms["error"]
    terms = {"x402Version": 2, "accepts": [offer(extra={"name": "[" * 100})]}
    assert parse_challenge(b64json_encode(terms).encode(), b"").offers[0].extra["name"]


@pytest.mark.parametrize(
    "where",
    [
        {"extra": {"name": "USD\ud800", "version": "2"}},
        {"extra": {"name": "USDC", "version": "\udfff"}},
        {"resource": "https://a.example/\ud800"},
    ],
)
def test_lone_surrogates_are_malformed_input(where):
    # They could be neither signed (extra.name/version) nor hashed (the resource URL).
    terms = {"x402Version": 1, "accepts": [offer(scheme="exact", **where)]}
    for header, body in ((b64json_encode(terms).encode(), b""), (None, json.dumps(terms).encode())):
        with pytest.raises(InvalidChallenge, match="lone surrogate"):
            parse_challenge(header, body)
    paired = {"x402Version": 2, "accepts": [offer(extra={"name": "\U0001f600"})]}
    assert (
        parse_challenge(b64json_encode(paired).encode(), b"").offers[0].extra["name"]
        == "\U0001f600"
    )


def test_an_offer_whose_resource_is_not_a_url_is_dropped():
    terms = {"x402Version": 1, "accepts": [offer(resource="http://[::1"), offer()]}
    challenge = parse_challenge(None, json.dumps(terms).encode())
    assert len(challenge.offers) == 1
    assert "is not a URL" in challenge.dropped[0]


def test_cloudflare_refusal_of_a_resource_that_is_not_a_url():
    # An Offer built by hand, as a caller may: the refusal check itself never raises.
    cf = Offer("batch-settlement", "cloudflare:402", 1, "USD", "m", None, "http://[x", {}, {})
    assert cloudflare_refusal(cf, identity=True) == "resource_url"


TX = "0x" + "ab" * 32


@pytest.mark.parametrize("transaction", [TX + "\n", " " + TX, TX + "00", TX.upper()[:-1]])
def test_a_transaction_hash_is_exactly_32_bytes_of_hex(transaction):
    assert settled_transaction({"success": True, "transaction": transaction}) is None
    assert (
        settled_transaction({"success": True, "transaction": TX.upper().replace("0X", "0x")}) == TX
    )


@pytest.mark.parametrize("amount", ["\u00b2", "5\x1c", "01", str(2**300), 7, None])
def test_an_upto_receipt_amount_that_is_unreadable_counts_the_maximum(amount):
    receipt = {"success": True, "transaction": TX, "amount": amount}
    confirmation = UptoScheme().confirmation(receipt, "0x01", 1000)
    assert confirmation is not None
    assert (confirmation.transaction, confirmation.amount) == (TX, None)
    receipt["amount"] = "400"
    assert UptoScheme().confirmation(receipt, "0x01", 1000).amount == 400


COMMITMENT = {
    "payer": "0x" + "11" * 20,
    "payee": "0x" + "22" * 20,
    "token": "0x" + "33" * 20,
    "amount": "1000",
    "resource": "0x" + "44" * 32,
    "nonce": "0x" + "55" * 32,
    "validUntil": "1800000000",
}


@pytest.mark.parametrize(
    "change",
    [
        *({"amount": value} for value in [*NOT_DECIMAL, 1000, "0", str(2**256)]),
        *(
            {"validUntil": value}
            for value in ["01800000000", " 1800000000", 1800000000, str(2**64)]
        ),
        {"nonce": "0x" + "55" * 32 + "\n"},
        {"nonce": "0x" + "55 " * 21 + "5"},  # bytes.fromhex skips spaces
        {"resource": "0x" + "44" * 31},
        {"payer": None},
    ],
)
def test_commitment_fields_follow_the_grammar(change):
    assert Commitment.from_json(84532, COMMITMENT).amount == 1000
    with pytest.raises(InvalidCommitment):
        Commitment.from_json(84532, {**COMMITMENT, **change})


def test_a_status_answer_nested_too_deep_is_a_value_error_not_a_recursion_error():
    """resolve_in_doubt keeps a payment in doubt on ValueError; anything else would stop it."""
    from scrapy_x402._recovery import parse_status

    with pytest.raises(ValueError, match="levels deep"):
        parse_status(b"[" * 4096)
