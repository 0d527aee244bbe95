"""Fuzz ``BotIdentity.sign_request`` (Web Bot Auth, RFC 9421) with the header values a
request may carry, decoded as X402BotAuthMiddleware decodes them (latin-1), a method and a
path. Expected: the added headers, or Unsignable / IdentityError (the module's own errors);
anything else, such as the signing library's exceptions, is a crash. The key is made at start, never shown."""

from __future__ import annotations

import atheris
from scrapy import Request

from fuzz._common import run

with atheris.instrument_imports(include=["scrapy_x402"]):
    from scrapy_x402._webbotauth import BotIdentity, IdentityError, Unsignable

IDENTITIES = [
    BotIdentity.generate(agent="https://crawler.example"),
    BotIdentity.generate(agent="https://crawler.example", syntax="dictionary"),
    BotIdentity.generate(),
]
NAMES = [
    "payment-signature",
    "crawler-max-price",
    "crawler-exact-price",
    "signature-agent",
    "user-agent",
    "accept",
]
SEEDS = [b"\x3fUSD 0.01\x00eyJ4NDAyVmVyc2lvbiI6IDJ9\x00Scrapy/2.14\x00*/*", b'\x01"\x00\\']


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    identity = IDENTITIES[fdp.ConsumeIntInRange(0, len(IDENTITIES) - 1)]
    chosen = fdp.ConsumeIntInRange(0, 2 ** len(NAMES) - 1)
    method = fdp.PickValueInList(["GET", "POST", "HEAD", "get", "M-SEARCH"])
    path = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)).decode("latin-1")
    values = fdp.ConsumeBytes(fdp.remaining_bytes()).split(b"\x00")
    headers = {
        name: values[n % len(values)].decode("latin-1")
        for n, name in enumerate(NAMES)
        if chosen & (1 << n)
    }
    try:  # the URL as a Scrapy request holds it (percent-encoded by safe_url_string)
        url = Request("https://a.example/" + path).url
    except ValueError:
        return
    try:
        added = identity.sign_request(method, url, headers)
    except (IdentityError, Unsignable):
        return
    assert {"Signature", "Signature-Input"} <= set(added)


if __name__ == "__main__":
    run("botauth", test_one_input, SEEDS)
