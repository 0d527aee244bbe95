"""An adversarial publisher: /<case>/<n>, each case a way to cheat or break a paying crawler.

python -m tests.mockserver.hostile config.json     # prints its URL, then serves
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from eth_account import Account
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from scrapy_x402._protocol import b64json_encode
from scrapy_x402.paywall import DeferredVerifier, PaymentRejected
from scrapy_x402.paywall._resource import request_url

PRICE = 1_000
USDC_BASE = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
# A date no datetime holds: parsedate_to_datetime raises OverflowError.
BEYOND_DATETIME = b"Mon, 01 Jan 99999999999 00:00:00 GMT"


class Hostile(Resource):
    isLeaf = True

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        network, token = config["network"], config["asset"]
        self.advertised = DeferredVerifier(network, token, config["payee"])
        self.other_payee = DeferredVerifier(network, token, config["other_payee"])
        self.book = open(config["book"], "a", encoding="utf-8")  # noqa: SIM115

    def render_GET(self, request: Request) -> bytes | int:
        case = request.postpath[0].decode() if request.postpath else ""
        url = request_url(request)
        payment = request.getHeader("PAYMENT-SIGNATURE")
        if case == "mainnet":  # asks for mainnet USDC on Base
            offer = {
                "scheme": "deferred",
                "network": "eip155:8453",
                "amount": str(PRICE),
                "asset": USDC_BASE,
                "payTo": self.advertised.pay_to,
                "maxTimeoutSeconds": 60,
            }
            return self.required(request, {"x402Version": 2, "accepts": [offer]})
        if case == "huge-header":  # 50 KB of terms
            request.setResponseCode(402)
            request.setHeader("PAYMENT-REQUIRED", "A" * 50_000)
            return b"402"
        if case == "many-offers":  # thousands of offers in a v1 body
            offer = self.advertised.offer(PRICE, url, version=1)
            request.setResponseCode(402)
            return json.dumps({"x402Version": 1, "accepts": [offer] * 5000}).encode()
        if case == "binary":  # neither UTF-8 nor JSON
            request.setResponseCode(402)
            return b"\xff\xfe\x00\x81 payment \xc3\x28 required"
        if case == "cf-date":  # Cloudflare's header form; charges, with a date past year 9999
            if request.getHeader("crawler-max-price") is None:
                request.setResponseCode(402)
                request.setHeader("crawler-price", "USD 0.01")
                return b"402"
            self.book.write(json.dumps({"case": case, "url": url}) + "\n")
            self.book.flush()
            request.setHeader("crawler-charged", "USD 0.01")
            request.setHeader("Date", BEYOND_DATETIME)
            return b"<html><head><title>paid</title></head><body>paid</body></html>"
        if payment is None:
            return self.required(request, self.advertised.payment_required(PRICE, url))
        # Paid: each case cheats differently.
        verifier, price = self.advertised, PRICE
        if case == "payee-change":
            verifier = self.other_payee  # the retry must now pay someone else
        elif case == "price-raise":
            price = PRICE * 2
        try:
            commitment = verifier.verify(payment, price, url)
        except PaymentRejected as e:
            terms = verifier.payment_required(price, url, error=e.reason)
            request.setHeader("PAYMENT-RESPONSE", b64json_encode(verifier.refusal(e.reason)))
            return self.required(request, terms)
        if case == "forever":  # takes the commitment, answers 402 anyway
            return self.required(request, self.advertised.payment_required(PRICE, url))
        if case.startswith("refusal-"):  # takes the commitment, answers 402 with odd terms
            return self.odd_refusal(request, case, url)
        self.book.write(json.dumps({"id": commitment.id, "case": case}) + "\n")
        self.book.flush()
        receipt = verifier.receipt(commitment)
        if case == "receipt-lies":
            receipt.update(
                amount=str(commitment.amount * 10),
                payer=Account.create().address,
                network="eip155:1",
            )
        elif case == "receipt-amount":  # "²": str.isdigit() says yes, int() raises
            receipt["amount"] = "\u00b2"
        request.setHeader("PAYMENT-RESPONSE", b64json_encode(receipt))
        if case == "receipt-nested":  # 2000 levels of JSON arrays in 2.7 KB
            request.setHeader("PAYMENT-RESPONSE", base64.b64encode(b"[" * 2000))
        if case == "drip":  # the paid page trickles in, a byte at a time
            self.drip(request, 40)
            return NOT_DONE_YET
        return b"<html><head><title>paid</title></head><body>paid</body></html>"

    def odd_refusal(self, request: Request, case: str, url: str) -> bytes:
        request.setResponseCode(402)
        if case == "refusal-nested":  # a v1 body of 2000 nested arrays
            return b"[" * 2000
        terms = self.advertised.payment_required(PRICE, url)
        if case == "refusal-amount":  # str.strip() drops "\x1c", int() refuses it
            terms["accepts"][0]["amount"] = "5\x1c"
        elif case == "refusal-version":  # a digit to str.isdigit(), not to int()
            terms["x402Version"] = "\u00b2"
        return self.required(request, terms)

    def required(self, request: Request, terms: dict[str, Any]) -> bytes:
        request.setResponseCode(402)
        request.setHeader("PAYMENT-REQUIRED", b64json_encode(terms))
        return b"402 payment required"

    def drip(self, request: Request, left: int) -> None:
        if request.finished or request._disconnected:
            return
        if left == 0:
            request.finish()
            return
        request.write(b".")
        reactor.callLater(0.25, self.drip, request, left - 1)  # type: ignore[attr-defined]


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    root = Resource()
    root.putChild(b"hostile", Hostile(config))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
