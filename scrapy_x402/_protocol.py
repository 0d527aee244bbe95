"""The x402 wire format: 402 challenges (v1 body, v2 header), payment headers, receipts.

One tolerant parser turns what servers send into one normalised model. Anything it cannot
read with certainty raises InvalidChallenge with a short reason: an amount is never guessed.
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
UNKNOWN_AMOUNT = 0  # an offer whose price is not given yet; never paid as such
_ATOMIC = re.compile(r"^[0-9]{1,78}$")  # uint256 has at most 78 decimal digits


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
    """Decode standard base64 of UTF-8 JSON; tolerate missing padding and urlsafe."""
    if isinstance(value, str):
        value = value.encode("latin-1", "replace")
    if len(value) > max_bytes:
        raise InvalidChallenge(f"header over {max_bytes // 1024} KiB")
    value = value.strip()
    value += b"=" * (-len(value) % 4)
    try:
        data = base64.b64decode(value.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
        return json.loads(data.decode("utf-8"))
    except (binascii.Error, ValueError):
        raise InvalidChallenge("not base64 of UTF-8 JSON") from None


def parse_challenge(header: bytes | None, body: bytes) -> Challenge:
    """Read a 402: the v2 ``PAYMENT-REQUIRED`` header wins; else a v1 JSON body."""
    if header is not None:
        data = b64json_decode(header)
    else:
        if len(body) > MAX_BODY_BYTES:
            raise InvalidChallenge("no PAYMENT-REQUIRED header and a body over 64 KiB")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InvalidChallenge("no PAYMENT-REQUIRED header and the body is not JSON") from None
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
    # Real servers send 2, "2" or "2.0.0".
    if isinstance(value, bool):
        raise InvalidChallenge("x402Version is not a number")
    if isinstance(value, str):
        value = value.split(".", 1)[0].strip()
        value = int(value) if value.isdigit() else None
    if value not in (1, 2):
        raise InvalidChallenge(f"unknown x402Version {value!r}")
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


def parse_atomic(value: Any) -> int:
    """An amount in atomic units: a positive integer, as a JSON string or number."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise InvalidChallenge("an offer has no amount")
    if not _ATOMIC.match(value.strip()):
        raise InvalidChallenge(f"amount {value[:40]!r} is not a whole number of atomic units")
    amount = int(value)
    if amount <= 0 or amount >= 2**256:
        raise InvalidChallenge(f"amount {value[:40]!r} is out of range")
    return amount


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


def parse_receipt(headers: Any) -> dict[str, Any] | None:
    """The decoded ``PAYMENT-RESPONSE`` (or v1 ``X-PAYMENT-RESPONSE``), if readable; for
    Cloudflare's header form, ``{"crawler-charged": "USD 0.01"}``."""
    charged = headers.get("crawler-charged")
    if charged:
        receipt: dict[str, Any] = {"crawler-charged": charged.decode("latin-1")}
        try:  # when Cloudflare charged: its Date header
            date = email.utils.parsedate_to_datetime(headers.get("Date", b"").decode("latin-1"))
            receipt["timestamp"] = int(date.timestamp())
        except (TypeError, ValueError):
            pass
        return receipt
    for name in (PAYMENT_RESPONSE, V1_PAYMENT_RESPONSE):
        value = headers.get(name)
        if value:
            try:
                data = b64json_decode(value)
            except InvalidChallenge:
                return None
            return data if isinstance(data, dict) else None
    return None
