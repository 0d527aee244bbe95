"""The x402 wire format: 402 challenges (v1 body, v2 header), payment headers, receipts.

One tolerant parser turns what servers send into one normalised model. Anything it cannot
read with certainty raises InvalidChallenge with a short reason, and nothing else: an amount
is never guessed, and no input makes a parser raise another exception.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from eth_utils import is_hex_address, to_checksum_address

from scrapy_x402._networks import normalize_network

PAYMENT_REQUIRED = "PAYMENT-REQUIRED"
PAYMENT_SIGNATURE = "PAYMENT-SIGNATURE"
PAYMENT_RESPONSE = "PAYMENT-RESPONSE"
V1_PAYMENT = "X-PAYMENT"
V1_PAYMENT_RESPONSE = "X-PAYMENT-RESPONSE"

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_OFFERS = 32
MAX_JSON_DEPTH = 32  # nesting levels of arrays and objects; x402 documents need about 5
UINT256_MAX = 2**256 - 1
UNKNOWN_AMOUNT = 0  # an offer whose price is not given yet; never paid as such
# The spec's decimal-string grammar for amounts: ASCII digits, no sign, no leading zero, no
# spaces or underscores; uint256 has at most 78 decimal digits.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")
# Integer versions; real servers also send "2" or "2.0.0".
_VERSION = re.compile(r"([12])(\.[0-9]{1,9}){0,2}")
# A JSON string (closed, or running to the end: never backtracks) or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[][{}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class InvalidChallenge(ValueError):
    """A 402 whose payment terms cannot be read with certainty."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    """One normalised entry of ``accepts``."""

    scheme: str
    network: str  # CAIP-2
    amount: int  # atomic units
    asset: str  # checksummed for EVM networks
    pay_to: str
    max_timeout_seconds: int | None
    resource: str | None
    extra: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)  # echoed verbatim as `accepted` in v2


@dataclass(frozen=True)
class Challenge:
    version: int
    offers: tuple[Offer, ...]
    resource: Mapping[str, Any] | None
    error: str | None
    extensions: Mapping[str, Any]
    dropped: tuple[str, ...] = ()  # reasons of offers that were malformed


def b64json_encode(obj: Any) -> str:
    data = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    return base64.b64encode(data).decode("ascii")


def b64json_decode(value: bytes | str, max_bytes: int = MAX_HEADER_BYTES) -> Any:
    """Decode standard base64 of UTF-8 JSON (as ``json_decode``); tolerate missing padding
    and urlsafe."""
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    if len(value) > max_bytes:
        raise InvalidChallenge(f"header over {max_bytes // 1024} KiB")
    value = value.strip()
    value += b"=" * (-len(value) % 4)
    try:
        data = base64.b64decode(value.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidChallenge("header is not base64 of UTF-8 JSON") from None
    return json_decode(data, "header")


def json_decode(data: bytes, what: str) -> Any:
    """UTF-8 JSON nested at most MAX_JSON_DEPTH levels, whose strings are all Unicode text
    (no lone surrogate escapes, which could not be encoded again to sign or hash them).
    Anything else raises InvalidChallenge, saying what ``what`` is."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidChallenge(f"{what} is not UTF-8 JSON") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        # Checked before parsing: the parser recurses once per level.
        raise InvalidChallenge(f"{what} nests JSON more than {MAX_JSON_DEPTH} levels deep")
    try:
        value = json.loads(text)
    except ValueError:  # also numbers over Python's 4300-digit limit
        raise InvalidChallenge(f"{what} is not UTF-8 JSON") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidChallenge(f"{what} has a string with a lone surrogate") from None
    return value


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest, brackets inside strings
    ignored; one linear scan."""
    depth = deepest = 0
    for token in _JSON_TOKENS.findall(text):
        if token in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token in ("]", "}"):
            depth = max(depth - 1, 0)
    return deepest


def parse_challenge(header: bytes | None, body: bytes) -> Challenge:
    """Read a 402: the v2 ``PAYMENT-REQUIRED`` header wins; else a v1 JSON body."""
    if header is not None:
        data = b64json_decode(header)
    else:
        if len(body) > MAX_BODY_BYTES:
            raise InvalidChallenge("no PAYMENT-REQUIRED header and a body over 64 KiB")
        data = json_decode(body, "no PAYMENT-REQUIRED header and the body")
    if not isinstance(data, dict):
        raise InvalidChallenge("payment terms are not a JSON object")
    version = _version(data.get("x402Version"))
    accepts = data.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise InvalidChallenge("no 'accepts' list")
    if len(accepts) > MAX_OFFERS:
        raise InvalidChallenge(f"{len(accepts)} offers, more than {MAX_OFFERS}")
    resource = data.get("resource") if isinstance(data.get("resource"), dict) else None
    offers, dropped = [], []
    for raw in accepts:
        try:
            offers.append(_offer(raw, version, resource))
        except InvalidChallenge as e:
            dropped.append(e.reason)
    if not offers:
        raise InvalidChallenge(dropped[0])
    extensions = data.get("extensions")
    return Challenge(
        version=version,
        offers=tuple(offers),
        resource=resource,
        error=data["error"] if isinstance(data.get("error"), str) else None,
        extensions=extensions if isinstance(extensions, dict) else {},
        dropped=tuple(dropped),
    )


def _version(value: Any) -> int:
    """1 or 2, as a JSON integer; real servers also send the strings "2" or "2.0.0". Not
    a float (``1.0``), not a bool."""
    if isinstance(value, str) and (match := _VERSION.fullmatch(value)):
        return int(match[1])
    if isinstance(value, (bool, float)):
        raise InvalidChallenge(f"x402Version {value!r} is not an integer")
    if not isinstance(value, int) or value not in (1, 2):
        raise InvalidChallenge(f"unknown x402Version {str(value)[:20]!r}")
    return value


def _offer(raw: Any, version: int, resource: Mapping[str, Any] | None) -> Offer:
    if not isinstance(raw, dict):
        raise InvalidChallenge("an offer is not a JSON object")
    scheme = raw.get("scheme")
    if not isinstance(scheme, str) or not scheme:
        raise InvalidChallenge("an offer has no scheme")
    network = normalize_network(raw["network"]) if isinstance(raw.get("network"), str) else None
    if network is None:
        raise InvalidChallenge(f"an offer has no valid network ({raw.get('network')!r})")
    value = raw.get("amount" if version == 2 else "maxAmountRequired", raw.get("amount"))
    if value is None and network == "cloudflare:402":
        amount = UNKNOWN_AMOUNT  # Cloudflare names the price once it recognises the crawler
    else:
        amount = parse_atomic(value)
    asset, pay_to = raw.get("asset"), raw.get("payTo")
    if not isinstance(asset, str) or not isinstance(pay_to, str) or not asset or not pay_to:
        raise InvalidChallenge("an offer has no asset or payTo")
    if network.startswith("eip155:"):
        if not (is_hex_address(asset) and is_hex_address(pay_to)):
            raise InvalidChallenge("an EVM offer's asset or payTo is not an address")
        asset, pay_to = to_checksum_address(asset), to_checksum_address(pay_to)
    timeout = raw.get("maxTimeoutSeconds")
    if not (isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0):
        timeout = None  # often missing: the caller applies its own cap
    extra = raw.get("extra")
    url = raw.get("resource") if version == 1 else (resource or {}).get("url")
    if isinstance(url, str) and not _is_url(url):
        raise InvalidChallenge(f"an offer's resource {url[:40]!r} is not a URL")
    return Offer(
        scheme=scheme,
        network=network,
        amount=amount,
        asset=asset,
        pay_to=pay_to,
        max_timeout_seconds=timeout,
        resource=url if isinstance(url, str) and url else None,
        extra=extra if isinstance(extra, dict) else {},
        raw=raw,
    )


def parse_atomic(
    value: Any, what: str = "amount", minimum: int = 1, maximum: int = UINT256_MAX
) -> int:
    """An amount in atomic units (or another uint256 such as ``validUntil``) in the spec's
    decimal-string grammar: a JSON string of ASCII digits ``0|[1-9][0-9]*``, within
    [minimum, maximum]. The one parser of such numbers from outside input."""
    if not isinstance(value, str):
        raise InvalidChallenge(f"{what} is missing or not a decimal string")
    if not _DECIMAL.fullmatch(value):
        raise InvalidChallenge(f"{what} {value[:40]!r} is not a whole number of atomic units")
    number = int(value)
    if not minimum <= number <= maximum:
        raise InvalidChallenge(f"{what} {value[:40]!r} is out of range")
    return number


def _is_url(value: str) -> bool:
    try:
        urlsplit(value)
    except ValueError:  # an unbalanced "[" in the host, for one
        return False
    return True


def payment_header(
    challenge: Challenge,
    offer: Offer,
    payload: Mapping[str, Any],
    extensions: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """The header (name, value) that carries a payment for ``offer``."""
    if challenge.version == 1:
        network = _v1_network(offer.raw)
        body: dict[str, Any] = {
            "x402Version": 1,
            "scheme": offer.scheme,
            "network": network,
            "payload": dict(payload),
        }
        return V1_PAYMENT, b64json_encode(body)
    body = {"x402Version": 2, "accepted": dict(offer.raw), "payload": dict(payload)}
    if challenge.resource is not None:
        body["resource"] = dict(challenge.resource)
    if extensions:
        body["extensions"] = dict(extensions)
    return PAYMENT_SIGNATURE, b64json_encode(body)


def _v1_network(raw: Mapping[str, Any]) -> str:
    # v1 servers compare the network name they sent, so echo it as sent.
    return str(raw.get("network", ""))


def parse_usd_cents(value: str) -> int:
    """Cloudflare's price form ``USD 0.01`` in whole cents; anything else is refused."""
    currency, _, amount = value.strip().partition(" ")
    if currency != "USD" or not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,2})?", amount.strip()):
        raise InvalidChallenge(f"price {value[:40]!r} is not 'USD <dollars>.<cents>'")
    dollars, _, cents = amount.strip().partition(".")
    return int(dollars) * 100 + int(cents.ljust(2, "0"))


def format_usd_cents(cents: int) -> str:
    return f"USD {cents // 100}.{cents % 100:02d}"


def parse_crawler_price(value: bytes, host: str, url: str) -> Challenge:
    """Cloudflare pay-per-crawl's header form: ``crawler-price: USD 0.01``."""
    cents = parse_usd_cents(value.decode("latin-1"))
    if cents <= 0:
        raise InvalidChallenge("crawler-price is zero")
    offer = Offer(
        scheme="pay-per-crawl",
        network="cloudflare:402",
        amount=cents,
        asset="USD",
        pay_to=host,
        max_timeout_seconds=None,
        resource=url,
        extra={},
        raw={"crawler-price": value.decode("latin-1")},
    )
    return Challenge(version=0, offers=(offer,), resource=None, error=None, extensions={})


def parse_receipt(headers: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The decoded ``PAYMENT-RESPONSE`` (or v1 ``X-PAYMENT-RESPONSE``), or for Cloudflare's
    header form ``{"crawler-charged": "USD 0.01", "timestamp": <its Date>}``; None when
    there is none or it is unreadable. Second: why a receipt sent could not be (all) read."""
    charged = headers.get("crawler-charged")
    if charged:
        receipt: dict[str, Any] = {"crawler-charged": charged.decode("latin-1")}
        date = headers.get("Date")
        if date is None:
            return receipt, None
        try:  # when Cloudflare charged: its Date header
            when = email.utils.parsedate_to_datetime(date.decode("latin-1"))
            receipt["timestamp"] = int(when.timestamp())
        except (TypeError, ValueError, OverflowError):  # a year past 9999, an odd zone...
            return receipt, f"Date {date[:40]!r} is not a date"
        return receipt, None
    for name in (PAYMENT_RESPONSE, V1_PAYMENT_RESPONSE):
        value = headers.get(name)
        if value:
            try:
                data = b64json_decode(value)
            except InvalidChallenge as e:
                return None, f"{name} {e.reason}"
            if not isinstance(data, dict):
                return None, f"{name} is not a JSON object"
            return data, None
    return None, None
