from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from scrapy_x402._protocol import (
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    V1_PAYMENT,
    V1_PAYMENT_RESPONSE,
    b64json_encode,
)
from scrapy_x402.paywall._book import CommitmentBook
from scrapy_x402.paywall._verifier import DeferredVerifier, PaymentRejected
from scrapy_x402.schemes.deferred import Commitment

Price = Callable[[Request], "int | None"]


class PaywallResource(Resource):
    """Serves ``wrapped`` only to requests that carry an acceptable commitment.

    ``price`` is atomic units per page, or a callable returning that for a request
    (None: free). ``on_accept(commitment, request)`` is called for every verified
    commitment, before the page is rendered. ``book`` (a CommitmentBook) records each
    commitment once its page is served: what the publisher is owed.
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: Resource,
        verifier: DeferredVerifier,
        price: int | Price,
        *,
        x402_version: int = 2,
        on_accept: Callable[[Commitment, Request], Any] | None = None,
        book: CommitmentBook | None = None,
    ):
        super().__init__()
        self.wrapped = wrapped
        self.verifier = verifier
        self.price = price if callable(price) else (lambda _request: price)
        self.x402_version = x402_version
        self.on_accept = on_accept
        self.book = book

    def render(self, request: Request) -> bytes | int:
        amount = self.price(request)
        if amount is None:
            return self.wrapped.render(request)
        url = request_url(request)
        header = request.getHeader(PAYMENT_SIGNATURE if self.x402_version == 2 else V1_PAYMENT)
        if header is None:
            return self._payment_required(request, amount, url, "payment required")
        try:
            commitment = self.verifier.verify(header, amount, url)
        except PaymentRejected as e:
            return self._payment_required(request, amount, url, e.reason)
        if self.on_accept is not None:
            self.on_accept(commitment, request)
        request.setHeader(self._receipt_header, b64json_encode(self.verifier.receipt(commitment)))
        body = self.wrapped.render(request)
        if body is NOT_DONE_YET:
            finished = request.notifyFinish()
            finished.addCallbacks(lambda _: self._served(request, commitment), lambda _: None)
        else:
            self._served(request, commitment)
        return body

    def _served(self, request: Request, commitment: Commitment) -> None:
        """A success ends the commitment's presentations; after a failure the client may
        send it again."""
        if request.code < 400:
            self.verifier.nonces.served(commitment.payer, commitment.nonce)
            if self.book is not None:  # served: now it is owed
                self.book.record(commitment, request_url(request))

    @property
    def _receipt_header(self) -> str:
        return PAYMENT_RESPONSE if self.x402_version == 2 else V1_PAYMENT_RESPONSE

    def _payment_required(self, request: Request, amount: int, url: str, error: str) -> bytes:
        request.setResponseCode(402)
        terms = self.verifier.payment_required(amount, url, self.x402_version, error)
        if error != "payment required":
            request.setHeader(self._receipt_header, b64json_encode(self.verifier.refusal(error)))
        if self.x402_version == 1:
            request.setHeader("Content-Type", "application/json")
            return json.dumps(terms).encode()
        request.setHeader(PAYMENT_REQUIRED, b64json_encode(terms))
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return f"402 Payment Required: {error}\n".encode()


def request_url(request: Request) -> str:
    """The absolute URL the client asked for, as it asked for it (Host header, path, query)."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader("host") or "").strip()
    return f"{scheme}://{host}{request.uri.decode('latin-1')}"
