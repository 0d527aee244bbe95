"""A local stand-in for Cloudflare's edge in front of a pay-per-crawl site, header form.

It verifies every signed request with tests/edgeserver/verifier.py (not the crawler's signing
library), and answers as Cloudflare documents: 402 with crawler-price, 200 with crawler-charged
for an acceptable crawler-max-price / crawler-exact-price, and its crawler-error codes.

    python -m tests.edgeserver.site config.json     # prints its URL, then serves

Paths: /x402/<n> (x402 batch-settlement on cloudflare:402), /ppc/<n> (priced), /forbidden/<n> (CrawlerForbidden when paid), /flaky/<n> (InternalError once
per path after payment), /payment-failed/<n> (PaymentFailed), the free paths (never priced;
with "price_free_paths" they answer 402 anyway, to see that the crawler still does not pay).
Any path with ``?to=URL`` answers 302 to URL once its signature (if any) verifies; a paid page
with ``?refresh=URL`` carries a meta refresh to URL; /echo/<n> is a third party's free page
that records the headers it was sent (``<book>.received.jsonl``).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.edgeserver.verifier import Rejected, public_key, thumbprint, verify

FREE_PATHS = {"/robots.txt", "/sitemap.xml", "/security.txt", "/.well-known/security.txt"}
PRICE_HEADERS = ("crawler-exact-price", "crawler-max-price")


def cents(value: str) -> int | None:
    currency, _, amount = value.strip().partition(" ")
    try:
        dollars, _, fraction = amount.partition(".")
        return int(dollars) * 100 + int(fraction.ljust(2, "0")[:2]) if currency == "USD" else None
    except ValueError:
        return None


class Edge(Resource):
    isLeaf = True

    def __init__(self, config: dict[str, Any], book, received=None):
        super().__init__()
        self.received = received
        self.keys = {thumbprint(jwk): public_key(jwk) for jwk in config["keys"]}
        self.price = int(config["price_cents"])
        self.price_free_paths = config.get("price_free_paths", False)
        self.book = book
        self.failed_once: set[str] = set()

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        headers = {
            k.decode().lower(): v[0].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        url = f"http://{headers.get('host', '')}{request.uri.decode()}"
        if path in FREE_PATHS and not self.price_free_paths:
            return self.page(path)
        if path.startswith("/echo/"):
            self.received.write(json.dumps({"url": url, "headers": headers}) + "\n")
            self.received.flush()
            return self.page(path)
        if path.startswith("/x402/"):
            return self.x402(request, path, url, headers)
        prices = [h for h in PRICE_HEADERS if h in headers]
        if "signature" in headers or prices:
            try:
                verified = verify("GET", url, headers, self.keys)
                self.check_web_bot_auth(verified, headers, prices)
            except Rejected as e:
                return self.error(request, 401, "InvalidSignature", str(e))
        if b"to" in request.args:  # moved elsewhere: not charged
            request.setResponseCode(302)
            request.setHeader("Location", request.args[b"to"][0])
            return b""
        if len(prices) == 2:
            return self.error(request, 400, "ConflictingPriceHeaders")
        if not prices:
            request.setHeader("crawler-price", self.usd(self.price))
            return self.error(request, 402, None, "payment required")
        if path.startswith("/forbidden/"):  # the site refuses this (verified) crawler
            return self.error(request, 403, "CrawlerForbidden")
        offered = cents(headers[prices[0]])
        if offered is None:
            code = (
                "InvalidCrawlerExactPrice"
                if prices[0] == "crawler-exact-price"
                else "InvalidCrawlerMaxPrice"
            )
            return self.error(request, 402, code)
        if (prices[0] == "crawler-exact-price" and offered != self.price) or offered < self.price:
            request.setHeader("crawler-price", self.usd(self.price))
            code = (
                "InvalidCrawlerExactPrice"
                if prices[0] == "crawler-exact-price"
                else "InvalidCrawlerMaxPrice"
            )
            return self.error(request, 402, code)
        if path.startswith("/payment-failed/"):
            return self.error(request, 403, "PaymentFailed")
        if path.startswith("/flaky/") and path not in self.failed_once:
            self.failed_once.add(path)
            return self.error(request, 500, "InternalError")
        request.setHeader("crawler-charged", self.usd(self.price))
        self.book.write(json.dumps({"url": url, "cents": self.price, "header": prices[0]}) + "\n")
        self.book.flush()
        refresh = request.args.get(b"refresh", [b""])[0].decode()
        return self.page(path, refresh)

    def x402(self, request: Request, path: str, url: str, headers: dict[str, str]) -> bytes:
        """The x402 form: batch-settlement on cloudflare:402. The price is named only to a
        crawler whose signature verifies; the payment header must be covered by it."""
        recognised = False
        if "signature" in headers:
            try:
                verified = verify("GET", url, headers, self.keys)
                payment = ["payment-signature"] if "payment-signature" in headers else []
                self.check_web_bot_auth(verified, headers, payment)
                recognised = True
            except Rejected as e:
                return self.x402_required(
                    request, url, recognised, error="invalid_signature", why=str(e)
                )
        if "payment-signature" not in headers:
            return self.x402_required(request, url, recognised)
        if not recognised:
            return self.x402_required(request, url, recognised, error="signature_agent_unknown")
        try:
            payment = json.loads(base64.b64decode(headers["payment-signature"]))
            amount = int(payment["payload"]["amount"])
            ok = (
                payment["accepted"]["network"] == "cloudflare:402"
                and payment["payload"]["asset"] == "USD"
            )
        except (ValueError, KeyError, TypeError):
            return self.x402_required(request, url, recognised, error="invalid_payment_signature")
        if not ok or amount < self.price:
            return self.x402_required(request, url, recognised, error="price_not_acceptable")
        receipt = {
            "amount": str(self.price),
            "asset": "USD",
            "network": "cloudflare:402",
            "timestamp": int(time.time()),
        }
        request.setHeader(
            "PAYMENT-RESPONSE", base64.b64encode(json.dumps(receipt).encode()).decode()
        )
        self.book.write(
            json.dumps({"url": url, "cents": self.price, "header": "payment-signature"}) + "\n"
        )
        self.book.flush()
        return self.page(path)

    def x402_required(
        self, request: Request, url: str, recognised: bool, error: str | None = None, why: str = ""
    ) -> bytes:
        offer: dict[str, Any] = {
            "scheme": "batch-settlement",
            "network": "cloudflare:402",
            "asset": "USD",
            "payTo": "merchant",
            "extra": {"version": "1.0.0"},
        }
        if recognised:  # an unrecognised crawler is not told the price
            offer["amount"] = str(self.price)
        terms = {
            "x402Version": 2,
            "error": error or "payment required",
            "resource": {"url": url},
            "accepts": [offer],
            "extensions": {
                "http-message-signatures": {
                    "registrationUrl": "https://dash.cloudflare.example/bots",
                    "signatureSchemes": ["ed25519"],
                    "tags": ["web-bot-auth"],
                }
            },
        }
        request.setResponseCode(402)
        request.setHeader("PAYMENT-REQUIRED", base64.b64encode(json.dumps(terms).encode()).decode())
        if error:
            refusal = {"success": False, "errorReason": error}
            request.setHeader(
                "PAYMENT-RESPONSE", base64.b64encode(json.dumps(refusal).encode()).decode()
            )
        return f"402 {error or ''} {why}".encode()

    def check_web_bot_auth(self, verified, headers: dict[str, str], prices: list[str]) -> None:
        params = verified.params
        now = time.time()
        if params.get("tag") != "web-bot-auth":
            raise Rejected("tag is not web-bot-auth")
        if not (params.get("created", 0) <= now + 5 < params.get("expires", 0) + 5):
            raise Rejected("created/expires out of range")
        if "@authority" not in verified.components:
            raise Rejected("@authority not covered")
        if "signature-agent" in headers:
            if "signature-agent" not in verified.components:
                raise Rejected("signature-agent not covered")
            if '"https://' not in headers["signature-agent"]:
                raise Rejected("signature-agent is not a quoted https URL")
        for name in prices:
            if name not in verified.components:
                raise Rejected(f"{name} is not covered by the signature")

    def page(self, path: str, refresh: str = "") -> bytes:
        meta = f'<meta http-equiv="refresh" content="0; url={refresh}">' if refresh else ""
        return f"<html><head><title>{path}</title>{meta}</head><body>{path}</body></html>".encode()

    def error(self, request: Request, status: int, code: str | None, text: str = "") -> bytes:
        request.setResponseCode(status)
        if code:
            request.setHeader("crawler-error", code)
        return f"{status} {code or ''} {text}".encode()

    @staticmethod
    def usd(cents_: int) -> str:
        return f"USD {cents_ // 100}.{cents_ % 100:02d}"


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    book = open(config["book"], "a", encoding="utf-8")  # noqa: SIM115 (open for the process' life)
    received = open(config["book"] + ".received.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    port = reactor.listenTCP(0, Site(Edge(config, book, received)), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
