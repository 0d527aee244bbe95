from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

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

logger = logging.getLogger(__name__)

Price = Callable[[Request], "int | None"]
Policy = Callable[[Commitment, Request], "str | None"]


class PaywallResource(Resource):
    """Serves ``wrapped`` only to requests that carry an acceptable commitment.

    ``price`` is atomic units per page, or a callable returning that for a request
    (None: free). ``policy(commitment, request)`` decides, for a commitment that verified,
    whether to extend this payer credit: None accepts, a string refuses with that
    errorReason (a 402; the commitment is not used up). ``book`` (a CommitmentBook) records
    each commitment as the 2xx status line of its page is sent: what the publisher is owed;
    ``on_served(commitment, request)`` is called then too. A response other than 2xx is not
    owed, carries no receipt, and frees the commitment to be presented again.
    """

    isLeaf = True

    def __init__(
        self,
        wrapped: Resource,
        verifier: DeferredVerifier,
        price: int | Price,
        *,
        x402_version: int = 2,
        policy: Policy | None = None,
        on_served: Callable[[Commitment, Request], Any] | None = None,
        book: CommitmentBook | None = None,
    ):
        super().__init__()
        self.wrapped = wrapped
        self.verifier = verifier
        self.price = price if callable(price) else (lambda _request: price)
        self.x402_version = x402_version
        self.policy = policy
        self.on_served = on_served
        self.book = book

    def render(self, request: Request) -> bytes | int:
        amount = self.price(request)
        if amount is None:
            return self.wrapped.render(request)
        name = PAYMENT_SIGNATURE if self.x402_version == 2 else V1_PAYMENT
        try:
            url = request_url(request)
            header = request.getHeader(name.encode())
            payment = None if header is None else header.decode("ascii")
        except ValueError:  # not ASCII, or a Host that is no host: these can pay for nothing
            return self._payment_required(
                request, amount, request_url(request, "replace"), "invalid_payload"
            )
        if payment is None:
            return self._payment_required(request, amount, url, "payment required")
        try:
            commitment = self.verifier.check(payment, amount, url)
            refusal = self.policy(commitment, request) if self.policy is not None else None
            if refusal is not None:  # before the claim: a refused commitment stays usable
                raise PaymentRejected(refusal)
            self.verifier.claim(commitment)
        except PaymentRejected as e:
            return self._payment_required(request, amount, url, e.reason)
        return _Sale(self, request, commitment, url).render()

    @property
    def receipt_header(self) -> str:
        return PAYMENT_RESPONSE if self.x402_version == 2 else V1_PAYMENT_RESPONSE

    def _payment_required(self, request: Request, amount: int, url: str, error: str) -> bytes:
        request.setResponseCode(402)
        terms = self.verifier.payment_required(amount, url, self.x402_version, error)
        if error != "payment required":
            request.setHeader(self.receipt_header, b64json_encode(self.verifier.refusal(error)))
        if self.x402_version == 1:
            request.setHeader("Content-Type", "application/json")
            return json.dumps(terms).encode()
        request.setHeader(PAYMENT_REQUIRED, b64json_encode(terms))
        request.setHeader("Content-Type", "text/plain; charset=utf-8")
        return f"402 Payment Required: {error}\n".encode()


class _Sale:
    """One request presenting a claimed (in flight) commitment. The commitment is owed the
    moment a 2xx status line goes out, however the response ends after that (docs section
    6); a request that ends, or answers anything else, before that releases it."""

    def __init__(
        self, paywall: PaywallResource, request: Request, commitment: Commitment, url: str
    ):
        self.paywall = paywall
        self.request = request
        self.commitment = commitment
        self.url = url
        self.settled = False  # owed or released: nothing more to do
        # Every write goes through the instance attribute, Twisted's own included: render()
        # writing a returned body, finish() writing the headers of an empty one, and a
        # resource that writes and finishes inside render (renderElement).
        self._write = request.write
        request.write = self.write  # type: ignore[method-assign]
        # Before rendering: a resource that finishes inside render fires it at once.
        request.notifyFinish().addBoth(self.ended)

    def render(self) -> bytes | int:
        try:
            return self.paywall.wrapped.render(self.request)
        except BaseException:  # Twisted answers a 500, or re-renders (HEAD faked by GET)
            self.release()
            raise

    def write(self, data: bytes) -> None:
        request = self.request
        sends_status_line = not (
            request.startedWriting
            or request.finished
            or request._disconnected
            or getattr(request, "_inFakeHead", False)
        )
        if sends_status_line and not self.settled:
            if 200 <= request.code < 300:
                self.owed()
            else:
                self.release()
        self._write(data)

    def owed(self) -> None:
        self.settled = True
        paywall, commitment = self.paywall, self.commitment
        receipt = paywall.verifier.receipt(commitment)
        self.request.setHeader(paywall.receipt_header, b64json_encode(receipt))
        # The book first: while the nonce still says in flight, the status endpoint never
        # answers "not served" for a commitment whose 2xx is going out.
        if paywall.book is not None:
            paywall.book.record(commitment, self.url)
        paywall.verifier.served(commitment)
        if paywall.on_served is not None:
            try:
                paywall.on_served(commitment, self.request)
            except Exception:  # the page is owed and its headers go out whatever the hook did
                logger.exception("on_served failed for commitment %s", commitment.id)

    def release(self) -> None:
        if not self.settled:
            self.settled = True
            self.paywall.verifier.release(self.commitment)

    def ended(self, _result: Any) -> None:
        """The request finished, or its connection was lost (the failure is consumed)."""
        self.release()


def request_url(request: Request, errors: str = "strict") -> str:
    """The absolute URL the client asked for, as it asked for it (Host header, path, query).
    With ``errors="strict"``, a Host header that is not ASCII or not a host[:port] (a "/" in
    it would name another page) raises ValueError."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"host") or b"").strip().decode("ascii", errors)
    if errors == "strict" and not _HOST.fullmatch(host):
        raise ValueError("the Host header is not a host")
    if errors == "strict" and not request.uri.startswith(b"/"):
        raise ValueError("the request target is not a path")  # "GET .x" would extend the host
    return f"{scheme}://{host}{request.uri.decode('latin-1')}"


# A reg-name, IPv4 or [IPv6] host and an optional port (RFC 3986 authority, without userinfo).
_HOST = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
