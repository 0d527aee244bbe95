"""An RFC 9421 verifier written for the tests from the RFC, independent of the crawler's
signing library: Structured Fields parsed with `http-sfv`, the signature base built by hand
(RFC 9421 section 2.5), Ed25519 checked with `cryptography`."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_sfv import Dictionary, Item


class Rejected(Exception):
    pass


@dataclass
class Verified:
    label: str
    keyid: str
    components: list[str]
    params: dict


def thumbprint(jwk: dict[str, str]) -> str:
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x")}, separators=(",", ":"))
    return (
        base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    )


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _component_value(item: Item, method: str, url: str, headers: dict[str, str]) -> str:
    name = item.value
    parts = urlsplit(url)
    if name == "@authority":
        return parts.netloc.lower()
    if name == "@method":
        return method.upper()
    if name == "@path":
        return parts.path or "/"
    if name == "@query":  # RFC 9421 2.2.7: "?" and the query as sent; "?" alone if none
        return "?" + parts.query
    if name == "@target-uri":
        return url
    if name.startswith("@"):
        raise Rejected(f"component {name} not supported by this verifier")
    value = headers.get(name)
    if value is None:
        raise Rejected(f"covered field {name} is missing")
    if "key" in item.params:  # a member of a Dictionary field
        field = Dictionary()
        field.parse(value.encode())
        member = field.get(item.params["key"])
        if member is None:
            raise Rejected(f"{name} has no member {item.params['key']}")
        return str(member)
    return value.strip()


def verify(
    method: str,
    url: str,
    headers: dict[str, str],
    keys: dict[str, Ed25519PublicKey],
    label: str | None = None,
) -> Verified:
    """Verify one signature of a request; ``keys`` maps keyid to public key."""
    headers = {k.lower(): v for k, v in headers.items()}
    if "signature-input" not in headers or "signature" not in headers:
        raise Rejected("unsigned")
    inputs, signatures = Dictionary(), Dictionary()
    inputs.parse(headers["signature-input"].encode())
    signatures.parse(headers["signature"].encode())
    label = label or next(iter(inputs))
    if label not in inputs or label not in signatures:
        raise Rejected(f"no signature labelled {label}")
    covered = inputs[label]
    lines = []
    for item in covered:
        identifier = str(Item(item.value)) + "".join(
            f";{k}" if v is True else f";{k}={Item(v)}" for k, v in item.params.items()
        )
        lines.append(f"{identifier}: {_component_value(item, method, url, headers)}")
    raw_input = headers["signature-input"].split(f"{label}=", 1)[1].split(", ", 1)[0]
    lines.append(f'"@signature-params": {raw_input}')
    base = "\n".join(lines).encode()
    keyid = covered.params.get("keyid")
    if keyid not in keys:
        raise Rejected("unknown key")
    try:
        keys[keyid].verify(bytes(signatures[label].value), base)
    except InvalidSignature:
        raise Rejected("invalid signature") from None
    return Verified(label, keyid, [str(i.value) for i in covered], dict(covered.params))


def public_key(jwk: dict[str, str]) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_b64(jwk["x"]))
