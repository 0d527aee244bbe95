"""The downloader middlewares: Scrapy glue around the Payer.

``X402DownloaderMiddleware`` (545, after RetryMiddleware in the response chain) answers 402s
with a paid request and reports what became of each payment, on the final response.
``X402SigningMiddleware`` (950, after HttpCacheMiddleware and before the Web Bot Auth signer
in the request chain) pays known terms as a request leaves, so a request the cache answers is
never paid, and keeps 402s out of the cache.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from scrapy.exceptions import (
    CannotResolveHostError,
    DownloadConnectionRefusedError,
    NotConfigured,
    UnsupportedURLSchemeError,
)
from scrapy.utils.httpobj import urlparse_cached
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectError, DNSLookupError

from scrapy_x402._payer import PAYMENT_HEADERS, Payer, is_paid, response_is_cached, terms_key
from scrapy_x402._protocol import (
    PAYMENT_REQUIRED,
    Challenge,
    InvalidChallenge,
    parse_atomic,
    parse_challenge,
    parse_crawler_price,
    parse_receipt,
)
from scrapy_x402.schemes import HELD_SCHEMES
from scrapy_x402.schemes._cloudflare import count_crawler_error, retry_internal_error

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

logger = logging.getLogger(__name__)

# Failures that prove a request never reached the publisher: the connection never opened.
NEVER_SENT = (
    ConnectError,
    DNSLookupError,
    DownloadConnectionRefusedError,
    CannotResolveHostError,
    UnsupportedURLSchemeError,
)


class X402DownloaderMiddleware:
    def __init__(self, crawler: Crawler):
        self.crawler = crawler
        self.payer = Payer.for_crawler(crawler)
        self.session = self.payer.session
        self.config = self.session.config
        if not _enabled(crawler, X402SigningMiddleware):
            raise NotConfigured(
                "X402DownloaderMiddleware needs scrapy_x402.X402SigningMiddleware in "
                "DOWNLOADER_MIDDLEWARES (at 950), or use ADDONS = {'scrapy_x402.Addon': 500}"
            )

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> X402DownloaderMiddleware:
        return cls(crawler)

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        if request.meta.get("_x402_internal"):
            return response
        if b"crawler-error" in response.headers and not response_is_cached(response):
            count_crawler_error(self.payer, request, response)
        if is_paid(request):
            here = self.session.process_id
            if response_is_cached(response) and request.meta.get("_x402_sent") != here:
                # HttpCacheMiddleware answered before the request reached the signing
                # middleware: the payment never left (in this process).
                if request.meta.get("_x402_signed_in") == here:
                    await self.payer.unsent(request, "answered by the cache")
                else:  # signed by an earlier process: its doubt was resolved at start
                    self.payer.strip(request, "unsent")
                return response
            retry = await retry_internal_error(self.payer, request, response)
            if retry is not None:
                return retry
            # What became of the payment is durable before the spider sees the page.
            return await self._paid_response_guarded(request, response)
        if response.status != 402 or request.meta.get("x402_dont_pay"):
            return response
        return await self._pay(request, response)

    async def process_exception(self, request: Request, exception: Exception) -> None:
        # Reached only once RetryMiddleware gave up. Unless the connection never opened, the
        # publisher may have sent a 2xx status line (and so be owed) before the failure.
        if not is_paid(request) or request.meta.get("_x402_internal"):
            return
        reason = type(exception).__name__
        scheme = request.meta["x402_payment"]["scheme"]
        presented_before = request.meta.get("_x402_presented", 0) > 1  # a retried attempt
        if scheme in HELD_SCHEMES or (isinstance(exception, NEVER_SENT) and not presented_before):
            await self.payer.not_served(request, reason)  # a signed transfer stays held
        else:
            self.payer.in_doubt(request, reason)

    # -- paying ----------------------------------------------------------------------

    async def _pay(self, request: Request, response: Response) -> Request | Response:
        payer = self.payer
        domain = urlparse_cached(request).hostname or ""
        try:
            challenge = _read_challenge(response, domain)
        except InvalidChallenge as e:
            payer.inc("x402/invalid_challenge")
            payer.once(
                logging.WARNING,
                ("invalid", domain),
                "x402: unreadable payment terms from %s (%s); not paying",
                domain,
                e.reason,
            )
            return response
        if challenge.dropped:
            payer.inc("x402/invalid_offer", count=len(challenge.dropped))
        attempts = request.meta.get("_x402_attempts", 0)
        if attempts >= self.config.max_payment_attempts:
            payer.inc("x402/max_attempts_reached")
            return response
        max_price = payer.max_price(request)
        if max_price is None:
            return response
        choice = await payer.choose(challenge, max_price, domain)
        if choice is None:
            if payer.price_pending(challenge) and not request.meta.get("_x402_signed_retry"):
                # Cloudflare names its price once it recognises the crawler: ask again, signed.
                payer.inc("x402/signed_retry")
                retry = request.replace(dont_filter=True)
                retry.meta.update(x402_sign=True, _x402_signed_retry=True)
                return retry
            return response
        if await payer.paid_before(request, domain):
            return response
        offer, asset, usd = choice
        paid = request.replace(
            dont_filter=True, priority=request.priority + self.config.priority_adjust
        )
        if paid.meta.pop("_x402_uncached", False):
            paid.meta.pop("dont_cache", None)  # set for the 402 only: the paid page may be cached
        if not await payer.attach(
            paid, domain, challenge, offer, asset, usd, offer.resource or request.url
        ):
            return response
        paid.meta["_x402_attempts"] = attempts + 1
        # A payment asked for by a 402 is for this URL: it never follows a redirect elsewhere.
        paid.meta["dont_redirect"] = True
        payer.remember_terms(request, challenge, offer, asset, usd)
        return paid

    # -- after paying ------------------------------------------------------------------

    async def _paid_response_guarded(
        self, request: Request, response: Response
    ) -> Request | Response:
        """A bug while reading a paid response must not leave its payment ``reserved`` with
        nobody told: the payment is recorded as not confirmed, as without a receipt (a
        transfer stays held, a commitment is released), and the response goes on to the
        spider, since the page may well have been paid for; the traceback is logged."""
        try:
            return await self._paid_response(request, response)
        except CancelledError:
            raise  # the crawl is stopping: not a bug; the payment stays in doubt (reserved)
        except Exception:
            self.payer.inc("x402/internal_error")
            logger.exception(
                "x402: error while reading the paid response of %s; its payment is recorded "
                "as not confirmed",
                request,
            )
            if is_paid(request):  # its outcome was not recorded yet
                await self.payer.not_served(request, "internal_error")
            return response

    async def _paid_response(self, request: Request, response: Response) -> Request | Response:
        payer = self.payer
        domain = urlparse_cached(request).hostname or ""
        receipt, unreadable = parse_receipt(response.headers)
        if unreadable is not None:
            payer.inc("x402/invalid_receipt")
            payer.once(
                logging.WARNING,
                ("invalid_receipt", domain),
                "x402: unreadable receipt from %s (%s); read as no receipt",
                domain,
                unreadable,
            )
        payment = request.meta["x402_payment"]
        if 200 <= response.status < 300:
            scheme = self.session.schemes[payment["scheme"]]
            confirmation = scheme.confirmation(
                receipt, request.meta["_x402_payment"], int(payment["amount"])
            )
            if confirmation is None:
                await payer.not_served(
                    request, "invalid_receipt" if receipt is None and unreadable else "no_receipt"
                )
                if not unreadable:  # else said above
                    payer.once(
                        logging.WARNING,
                        ("no_receipt", domain),
                        "x402: %s served a paid page without a receipt confirming the payment",
                        domain,
                    )
            else:
                self._check_receipt(receipt, payment, domain)
                await payer.confirmed(request, confirmation, receipt, domain)
            return response
        if response.status != 402:
            await payer.not_served(request, f"http_{response.status}")
            return response
        reason = str(
            (receipt or {}).get("errorReason")
            or (response.headers.get("crawler-error") or b"").decode("latin-1")
            or _challenge_error(response)
            or "refused"
        )[:200]
        if request.meta.get("_x402_presented", 0) > 1 and payment["scheme"] not in HELD_SCHEMES:
            # Presented before: whatever the reason (nonce_reused, payment_in_flight, or a
            # check the earlier attempt's own debt now fails: credit, expiry), that attempt
            # may have been served. Never another signature for the page meanwhile.
            payer.in_doubt(request, reason)
            return response
        network = payment["network"]
        counted_as = await payer.not_served(request, reason, refused=True)
        if _out_of_funds(reason) and network not in payer.stopped_networks:
            payer.stopped_networks.add(network)
            logger.error(
                "x402: the wallet has insufficient funds on %s (%s said so: %s); "
                "no more payments on that network in this crawl",
                network,
                domain,
                reason,
            )
        else:
            payer.once(
                logging.WARNING,
                ("rejected", domain, counted_as),  # bounded: as many as the stats family
                "x402: %s refused a payment (%s); the 402 is passed on",
                domain,
                reason,
            )
        payer.terms.pop(terms_key(request), None)  # terms that were refused are stale
        if request.meta.pop("_x402_preauthorized", False):
            # A pre-authorised payment refused (new price, new payee...): pay the 402 as usual.
            payer.inc("x402/preauthorized_refused")
            return await self._pay(request, response)
        if request.meta.get("_x402_attempts", 0) < self.config.max_payment_attempts:
            return await self._pay(request, response)
        return response

    def _check_receipt(self, receipt: object, payment: dict[str, str], domain: str) -> None:
        """A receipt that names another network or payer, or more than was signed, is
        counted and logged; the ledger keeps what was signed, never what a receipt claims."""
        if not isinstance(receipt, dict):
            return
        claims = {
            "network": receipt.get("network") not in (None, payment["network"]),
            "payer": isinstance(receipt.get("payer"), str)
            and receipt["payer"].lower() != self.session.payer.lower(),
            "amount": "amount" in receipt
            and not _at_most(receipt["amount"], int(payment["amount"])),
        }
        for field, wrong in claims.items():
            if wrong:
                self.payer.inc("x402/receipt_mismatch/{}", field)
                self.payer.once(
                    logging.WARNING,
                    ("receipt", domain, field),
                    "x402: %s sent a receipt with another %s than the payment's (%r); "
                    "the ledger keeps the payment as signed",
                    domain,
                    field,
                    str(receipt.get(field))[:80],
                )


class X402SigningMiddleware:
    """Pays known terms as a request leaves (after the cache had its chance to answer),
    sends a resumed request's payment only if the book agrees, keeps 402s out of the cache,
    takes a payment off a request that is redirected, and lets a payment header leave only
    for the URL its payment was made for."""

    def __init__(self, crawler: Crawler):
        self.payer = Payer.for_crawler(crawler)
        self.session = self.payer.session

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> X402SigningMiddleware:
        return cls(crawler)

    async def process_request(self, request: Request) -> None:
        meta = request.meta
        if meta.get("_x402_internal"):
            return
        if not self.session.doubt_resolved:
            await self.session.resolve_in_doubt()
        await self._keep_payment_home(request)
        if meta.get("x402_dont_pay"):
            return
        if is_paid(request):
            if meta.get("_x402_signed_in") != self.session.process_id:
                await self.payer.resend(request)  # from a JOBDIR queue of an earlier process
        elif self.payer.terms and not meta.get("_x402_attempts"):
            await self.payer.preauthorize(request)
        if is_paid(request):
            _unconditional(request)
            meta.setdefault("_x402_paid_url", request.url)  # signed by an earlier version
            meta["_x402_sent"] = self.session.process_id  # from here on, it may be taken
            # How many times it was presented: a refusal of a second presentation may be
            # about the first one having been served.
            meta["_x402_presented"] = meta.get("_x402_presented", 0) + 1

    async def process_response(self, request: Request, response: Response) -> Response:
        meta = request.meta
        if response.status == 402 and not meta.get("dont_cache"):
            # A 402 is an answer for this moment only: never stored by HttpCacheMiddleware.
            meta.update(dont_cache=True, _x402_uncached=True)
        if not is_paid(request) or response_is_cached(response):
            return response
        if (
            response.status in REDIRECTS
            and b"Location" in response.headers
            and not meta.get("dont_redirect")
        ):
            # RedirectMiddleware will follow it: the payment was for this URL, not served.
            payment_id = meta["_x402_payment"]
            await self.payer.not_served(request, f"http_{response.status}")
            self.payer.strip(request, meta["x402_payment"]["status"])
            meta.pop("_x402_preauthorized", None)
            logger.debug("x402: payment %s not used: %s redirects", payment_id, request.url)
        elif 200 <= response.status < 300:
            # The page paid for is this one: MetaRefreshMiddleware (580, before the payment is
            # judged at 545) must not swap it for another URL's, taking the payment along.
            meta["dont_redirect"] = True
        return response

    async def _keep_payment_home(self, request: Request) -> None:
        """Payment headers copied onto a request for another URL (a redirect, a refresh, any
        middleware's copy or rewrite) or put there by no payment of ours are taken off: a
        payment header never leaves for a URL it was not made for."""
        meta = request.meta
        if is_paid(request):
            made_for = meta.get("_x402_paid_url", request.url)
            if made_for == request.url:
                return
            self.payer.inc("x402/payment_not_forwarded")
            if "_x402_sent" not in meta:  # pointed elsewhere before it ever left: unused
                logger.warning(
                    "x402: payment %s for %s not sent to %s; released",
                    meta["_x402_payment"],
                    made_for,
                    request.url,
                )
                await self.payer.unsent(request, "url changed before it was sent")
            elif meta["_x402_sent"] == self.session.process_id:
                # It left with the request for its URL, and the answer was followed before
                # its outcome was recorded: in doubt (reserved, counted), said at close.
                logger.warning(
                    "x402: payment %s for %s not sent on to %s; its outcome is unknown",
                    meta["_x402_payment"],
                    made_for,
                    request.url,
                )
                self.payer.strip(request, meta["x402_payment"]["status"])
            else:  # sent by an earlier process, whose doubt was resolved at start
                self.payer.strip(request, "unsent")
            return
        carried = [name for name in PAYMENT_HEADERS if name in request.headers]
        if carried:
            for name in carried:
                request.headers.pop(name, None)
            domain = urlparse_cached(request).hostname or ""
            self.payer.inc("x402/payment_header_dropped")
            self.payer.once(
                logging.WARNING,
                ("payment_header", domain),
                "x402: a request to %s carries %s, which no payment of this crawl made for it; "
                "sent without it",
                domain,
                b", ".join(carried).decode(),
            )


REDIRECTS = frozenset({301, 302, 303, 307, 308})  # what RedirectMiddleware follows
CONDITIONAL_HEADERS = (
    b"If-None-Match",
    b"If-Modified-Since",
    b"If-Match",
    b"If-Unmodified-Since",
    b"If-Range",
)


def _unconditional(request: Request) -> None:
    """What is paid for is the page: a paid request is never conditional, whoever made it so
    (HttpCacheMiddleware revalidating a copy, the spider, default headers). A 304 would hide
    whether the payment was taken, and the cache would answer with its copy."""
    request.meta.pop("cached_response", None)
    for name in CONDITIONAL_HEADERS:
        request.headers.pop(name, None)


def _enabled(crawler: Crawler, component: type) -> bool:
    from scrapy.utils.misc import load_object  # noqa: PLC0415

    middlewares = crawler.settings.getwithbase("DOWNLOADER_MIDDLEWARES")
    return any(
        (load_object(path) if isinstance(path, str) else path) is component and order is not None
        for path, order in middlewares.items()
    )


def _out_of_funds(reason: str) -> bool:
    """The payer's balance is short: x402's `insufficient_funds`, or the reference SDK's
    `invalid_exact_evm_insufficient_balance` and kin (not the facilitator's own balance)."""
    return reason == "insufficient_funds" or (
        reason.endswith("insufficient_balance") and not reason.startswith("facilitator_")
    )


def _read_challenge(response: Response, domain: str) -> Challenge:
    """x402 v2 header, else Cloudflare's crawler-price header, else an x402 v1 body."""
    header = response.headers.get(PAYMENT_REQUIRED)
    price = response.headers.get("crawler-price")
    if header is None and price is not None:
        return parse_crawler_price(price, domain, response.url)
    return parse_challenge(header, response.body)


def _at_most(amount: object, signed: int) -> bool:
    """A receipt's amount that is a readable amount, at most what was signed."""
    try:
        return parse_atomic(amount, "receipt amount", 0) <= signed
    except InvalidChallenge:
        return False


def _challenge_error(response: Response) -> str | None:
    try:
        return parse_challenge(response.headers.get(PAYMENT_REQUIRED), response.body).error
    except InvalidChallenge:
        return None
