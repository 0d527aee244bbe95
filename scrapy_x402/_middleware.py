"""The downloader middleware: answers 402s with a payment, within budget."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached

from scrapy_x402._budget import TOTAL
from scrapy_x402._config import parse_usd
from scrapy_x402._networks import evm_chain_id, is_testnet
from scrapy_x402._protocol import (
    PAYMENT_REQUIRED,
    UNKNOWN_AMOUNT,
    Challenge,
    InvalidChallenge,
    Offer,
    parse_challenge,
    parse_crawler_price,
    parse_receipt,
)
from scrapy_x402._session import X402Session
from scrapy_x402.ledger import PaymentRecord, Status
from scrapy_x402.schemes import Confirmation

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from scrapy_x402._assets import Asset

logger = logging.getLogger(__name__)


class X402DownloaderMiddleware:
    def __init__(self, crawler: Crawler):
        self.crawler = crawler
        self.session = X402Session.for_crawler(crawler)
        self.config = self.session.config
        self.stats = crawler.stats
        self._said: set[tuple[str, ...]] = set()  # what was already logged, once per domain
        self._closing: Any = None
        self._stopped_networks: set[str] = set()  # the wallet ran out of funds there
        self._forbidden_domains: set[str] = set()  # CrawlerForbidden
        self._terms: dict[tuple[str, str], _Terms] = {}  # for pre-authorised payments

    @classmethod
    def from_crawler(cls, crawler: Crawler) -> X402DownloaderMiddleware:
        return cls(crawler)

    async def process_response(self, request: Request, response: Response) -> Request | Response:
        if b"crawler-error" in response.headers:
            self._crawler_error(request, response)
        if "_x402_payment" in request.meta:
            if _internal_error(response):
                retry = await self._retry_internal_error(request)
                if retry is not None:
                    return retry
            result = self._paid_response(request, response)
            # What became of the payment is committed before the spider sees the page.
            await self.session.durable()
            return result
        if response.status != 402 or request.meta.get("x402_dont_pay"):
            return response
        return self._pay(request, response)

    async def process_request(self, request: Request) -> None:
        if (
            self._terms
            and "_x402_payment" not in request.meta
            and not request.meta.get("_x402_attempts")
            and not request.meta.get("x402_dont_pay")
        ):
            self._preauthorize(request)
        payment_id = request.meta.get("_x402_payment")
        if payment_id in self.session.reopenable:
            key, usd = request.meta["_x402_reserved"]
            if not self.session.reopen(payment_id, key, Decimal(usd)):
                self._unrecorded(request, release=False)
                return
        if "_x402_payment" in request.meta and not request.meta.get("_x402_durable"):
            # The payment is committed before the request leaves: a crash never loses one.
            try:
                await self.session.durable()
            except Exception:
                self._unrecorded(request)
                return
            request.meta["_x402_durable"] = True

    async def process_exception(self, request: Request, exception: Exception) -> None:
        # Reached only once RetryMiddleware gave up: the page was never served.
        if "_x402_payment" in request.meta:
            self._unconfirmed(request, type(exception).__name__)

    # -- paying ----------------------------------------------------------------------

    def _pay(self, request: Request, response: Response) -> Request | Response:
        domain = urlparse_cached(request).hostname or ""
        try:
            challenge = _read_challenge(response, domain)
        except InvalidChallenge as e:
            self._inc("x402/invalid_challenge")
            self._once(
                logging.WARNING,
                ("invalid", domain),
                "x402: unreadable payment terms from %s (%s); not paying",
                domain,
                e.reason,
            )
            return response
        if challenge.dropped:
            self._inc("x402/invalid_offer", len(challenge.dropped))
        attempts = request.meta.get("_x402_attempts", 0)
        if attempts >= self.config.max_payment_attempts:
            self._inc("x402/max_attempts_reached")
            return response
        max_price = self._max_price(request)
        if max_price is None:
            return response
        choice = self._choose(challenge, max_price, domain)
        if choice is None:
            if self._price_pending(challenge) and not request.meta.get("_x402_signed_retry"):
                # Cloudflare names its price once it recognises the crawler: ask again, signed.
                self._inc("x402/signed_retry")
                retry = request.replace(dont_filter=True)
                retry.meta.update(x402_sign=True, _x402_signed_retry=True)
                return retry
            return response
        offer, asset, usd = choice
        paid = request.replace(
            dont_filter=True, priority=request.priority + self.config.priority_adjust
        )
        if not self._attach_payment(
            paid, domain, challenge, offer, asset, usd, offer.resource or request.url
        ):
            return response
        paid.meta["_x402_attempts"] = attempts + 1
        if self.config.preauthorize and not self.session.schemes[offer.scheme].held_until_expiry:
            self._terms[_terms_key(request)] = _Terms(
                challenge, offer, asset, time.time() + self._validity(offer)
            )
        return paid

    def _max_price(self, request: Request) -> Decimal | None:
        try:
            return parse_usd(
                request.meta.get("x402_max_price", self.config.max_price), "meta['x402_max_price']"
            )
        except ValueError as e:
            logger.error("x402: %s (%s); not paying", e, request)
            return None

    def _validity(self, offer: Offer) -> int:
        return min(
            offer.max_timeout_seconds or self.config.max_timeout_seconds,
            self.config.max_timeout_seconds,
        )

    def _attach_payment(
        self,
        request: Request,
        domain: str,
        challenge: Challenge,
        offer: Offer,
        asset: Asset,
        usd: Decimal,
        resource_url: str,
        quiet: bool = False,
    ) -> bool:
        """Reserve, sign and record a payment for ``offer``, and put it on ``request``;
        False (nothing reserved, nothing signed) when the budget or the signer says no."""
        budgets = self.session.budgets
        key = budgets.key_for(domain)
        refused = budgets.reserve(key, usd)
        if refused is not None and self.session.release_expired_holds():
            refused = budgets.reserve(key, usd)
        if refused is not None:
            if not quiet:  # a pre-authorisation that does not fit is left to the 402 cycle
                self._budget_exceeded(domain, refused)
            return False
        try:
            scheme = self.session.schemes[offer.scheme]
            signed = scheme.sign(
                self.session.account,
                offer,
                resource_url,
                int(time.time()),
                self.config.max_timeout_seconds,
            )
            payment_headers = scheme.headers(
                challenge, offer, signed, _echo_extensions(challenge, signed.id)
            )
            # Recorded now, and committed (with the others of this reactor turn) by
            # process_request before the paid request leaves.
            self.session.ledger.add(
                PaymentRecord(
                    id=signed.id,
                    run_id=self.session.run_id,
                    scheme=offer.scheme,
                    network=offer.network,
                    asset=offer.asset,
                    payer=self.session.payer,
                    payee=offer.pay_to,
                    amount=offer.amount,
                    usd=usd,
                    domain=domain,
                    budget_key=key,
                    url=request.url,
                    payload=signed.payload,
                    valid_until=signed.valid_until,
                ),
                commit=False,
            )
            self.session.commit_soon()
        except Exception:
            budgets.release(key, usd)
            self._inc("x402/payment_error")
            logger.exception("x402: could not sign or record a payment for %s; not paying", request)
            return False
        self._inc("x402/payment_signed")
        log = logger.info if self.config.debug else logger.debug
        log(
            "x402: paying %s (%s USD) to %s on %s for %s",
            asset.format(offer.amount),
            usd,
            offer.pay_to,
            offer.network,
            request.url,
        )
        for name, value in payment_headers.items():
            request.headers[name] = value
        if offer.scheme == "pay-per-crawl":
            # Cloudflare: only InternalError may be retried; this middleware does it.
            request.meta["dont_retry"] = True
        # dont_redirect: a payment is for this URL; it never follows a redirect elsewhere.
        request.meta.update(
            _x402_payment=signed.id, _x402_reserved=(key, str(usd)), dont_redirect=True
        )
        request.meta["x402_payment"] = {
            "id": signed.id,
            "status": Status.RESERVED,
            "scheme": offer.scheme,
            "network": offer.network,
            "asset": offer.asset,
            "payee": offer.pay_to,
            "amount": str(offer.amount),
            "usd": str(usd),
        }
        return True

    def _preauthorize(self, request: Request) -> None:
        """Known, still valid terms for this host and path pattern: pay on the first request,
        as x402 v2 and Cloudflare allow, instead of waiting for a 402."""
        key = _terms_key(request)
        terms = self._terms.get(key)
        if terms is None:
            return
        if time.time() >= terms.expires:
            del self._terms[key]
            return
        max_price = self._max_price(request)
        usd = terms.asset.to_usd(terms.offer.amount)
        if max_price is None or usd > max_price:
            return
        domain = urlparse_cached(request).hostname or ""
        if self._refusal(terms.offer, domain)[0] is not None:
            return
        challenge = replace(terms.challenge, resource={"url": request.url})
        if self._attach_payment(
            request, domain, challenge, terms.offer, terms.asset, usd, request.url, quiet=True
        ):
            request.meta["_x402_preauthorized"] = True
            self._inc("x402/preauthorized")

    def _choose(
        self, challenge: Challenge, max_price: Decimal, domain: str
    ) -> tuple[Offer, Asset, Decimal] | None:
        """The offer X402_OFFER_POLICY picks among those the settings allow, or None."""
        acceptable: list[tuple[tuple[Any, ...], Offer, Asset, Decimal]] = []
        refusals = []
        for offer in challenge.offers:
            reason, asset = self._refusal(offer, domain)
            if asset is not None:
                usd = asset.to_usd(offer.amount)
                if usd > max_price:
                    reason = "max_price"
                else:
                    rank = self.config.schemes.index(offer.scheme)
                    order = (
                        (rank, usd) if self.config.offer_policy == "scheme_order" else (usd, rank)
                    )
                    acceptable.append((order, offer, asset, usd))
            if reason:
                refusals.append(reason)
                self._inc(f"x402/offer_refused/{reason}")
        if acceptable:
            _, offer, asset, usd = min(acceptable, key=lambda choice: choice[0])
            return offer, asset, usd
        self._inc("x402/no_acceptable_offer")
        self._once(
            logging.INFO,
            ("refused", domain, *refusals),
            "x402: no acceptable offer from %s (refused: %s); not paying",
            domain,
            ", ".join(refusals),
        )
        return None

    def _price_pending(self, challenge: Challenge) -> bool:
        """An offer we could pay but for its missing price, which a signed request may get."""
        return any(
            offer.amount == UNKNOWN_AMOUNT and self._refusal(offer, "")[0] == "amount_unknown"
            for offer in challenge.offers
        )

    def _refusal(self, offer: Offer, domain: str) -> tuple[str | None, Asset | None]:
        if domain in self._forbidden_domains:
            return "crawler_forbidden", None
        scheme = self.session.schemes.get(offer.scheme)
        if offer.scheme not in self.config.schemes or scheme is None:
            return "scheme", None
        if scheme.needs_wallet and self.session.account is None:
            return "no_wallet", None
        if reason := scheme.refusal(offer):
            return reason, None
        if self.config.networks is not None and offer.network not in self.config.networks:
            return "network", None
        if (
            evm_chain_id(offer.network) is not None
            and not is_testnet(offer.network)
            and not self.config.allow_mainnet
        ):
            return "mainnet", None
        if offer.network in self._stopped_networks:
            return "insufficient_funds", None
        asset = self.config.assets.get(offer.network, offer.asset)
        if asset is None:
            return "asset", None
        return None, asset

    async def _retry_internal_error(self, request: Request) -> Request | None:
        """Cloudflare's InternalError is its only retryable error: retry the same payment
        after an exponential backoff, X402_CRAWLER_RETRY_TIMES times at most."""
        retries = request.meta.get("_x402_internal_retries", 0)
        if retries >= self.config.crawler_retry_times:
            return None
        from twisted.internet import reactor  # noqa: PLC0415 (importing it installs one)
        from twisted.internet.task import deferLater  # noqa: PLC0415

        delay = self.config.crawler_retry_backoff * 2**retries
        self._inc("x402/crawler_retry")
        await maybe_deferred_to_future(deferLater(reactor, delay, lambda: None))
        retry = request.replace(dont_filter=True)
        retry.meta["_x402_internal_retries"] = retries + 1
        return retry

    def _unrecorded(self, request: Request, release: bool = True) -> None:
        """The payment cannot be recorded (or, resumed, no longer fits the budget): it must
        not leave. Take it off the request, which goes on unpaid (a 402 then ends it)."""
        self._inc("x402/ledger_error" if release else "x402/resumed_payment_dropped")
        logger.error(
            "x402: a payment for %s cannot be recorded; sending the request unpaid", request
        )
        key, usd = request.meta.pop("_x402_reserved")
        if release:
            self.session.budgets.release(key, Decimal(usd))
        request.meta.pop("_x402_payment")
        request.meta["x402_payment"].update(status="unrecorded")
        for name in (
            b"PAYMENT-SIGNATURE",
            b"X-PAYMENT",
            b"crawler-max-price",
            b"crawler-exact-price",
        ):
            request.headers.pop(name, None)

    def _crawler_error(self, request: Request, response: Response) -> None:
        """Cloudflare's error codes: each counted; CrawlerForbidden ends paying the domain."""
        code = _stat_name((response.headers.get(b"crawler-error") or b"").decode("latin-1"))
        domain = urlparse_cached(request).hostname or ""
        self._inc(f"x402/crawler_error/{code}")
        if code == "CrawlerForbidden" and domain not in self._forbidden_domains:
            self._forbidden_domains.add(domain)
            logger.warning(
                "x402: %s forbids this crawler (CrawlerForbidden); no more payments there", domain
            )

    def _budget_exceeded(self, domain: str, refused: str) -> None:
        self._inc(f"x402/budget_exceeded/{domain}")
        if refused == TOTAL:
            self._inc("x402/max_total_exceeded")
            self._once(
                logging.WARNING,
                ("total",),
                "x402: X402_MAX_TOTAL (%s USD) is spent; not paying any more pages",
                self.config.max_total,
            )
            if self.config.close_on_budget_exhausted and self._closing is None:
                self._closing = deferred_from_coro(
                    self.crawler.engine.close_spider_async(reason="x402_budget_exhausted")
                )
        else:
            budgets = self.session.budgets
            self._once(
                logging.WARNING,
                ("budget", refused),
                "x402: the budget for %s (%s USD) is spent; not paying more pages there",
                refused,
                budgets.limit(refused),
            )

    # -- after paying ------------------------------------------------------------------

    def _paid_response(self, request: Request, response: Response) -> Request | Response:
        domain = urlparse_cached(request).hostname or ""
        receipt = parse_receipt(response.headers)
        if 200 <= response.status < 300:
            payment = request.meta["x402_payment"]
            scheme = self.session.schemes[payment["scheme"]]
            confirmation = scheme.confirmation(
                receipt, request.meta["_x402_payment"], int(payment["amount"])
            )
            if confirmation is None:
                self._unconfirmed(request, "no_receipt")
                self._once(
                    logging.WARNING,
                    ("no_receipt", domain),
                    "x402: %s served a paid page without a receipt confirming the payment",
                    domain,
                )
            else:
                self._confirmed(request, confirmation, receipt, domain)
            return response
        if response.status != 402:
            self._unconfirmed(request, f"http_{response.status}")
            return response
        reason = str(
            (receipt or {}).get("errorReason")
            or (response.headers.get("crawler-error") or b"").decode("latin-1")
            or _challenge_error(response)
            or "refused"
        )
        network = request.meta["x402_payment"]["network"]
        self._unconfirmed(request, reason, refused=True)
        if _out_of_funds(reason) and network not in self._stopped_networks:
            self._stopped_networks.add(network)
            logger.error(
                "x402: the wallet has insufficient funds on %s (%s said so: %s); "
                "no more payments on that network in this crawl",
                network,
                domain,
                reason,
            )
        else:
            self._once(
                logging.WARNING,
                ("rejected", domain, reason),
                "x402: %s refused a payment (%s); the 402 is passed on",
                domain,
                reason,
            )
        self._terms.pop(_terms_key(request), None)  # terms that were refused are stale
        if request.meta.pop("_x402_preauthorized", False):
            # A pre-authorised payment refused (new price, new payee...): pay the 402 as usual.
            self._inc("x402/preauthorized_refused")
            return self._pay(request, response)
        if request.meta.get("_x402_attempts", 0) < self.config.max_payment_attempts:
            return self._pay(request, response)
        return response

    def _confirmed(
        self, request: Request, confirmation: Confirmation, receipt: Any, domain: str
    ) -> None:
        payment = request.meta["x402_payment"]
        self._check_receipt(receipt, payment, domain)
        payment_id = request.meta.pop("_x402_payment")
        key, reserved = request.meta.pop("_x402_reserved")
        usd = Decimal(reserved)
        amount = confirmation.amount
        if amount is not None:  # upto: charged less than the signed maximum
            asset = self.config.assets.get(payment["network"], payment["asset"])
            assert asset is not None  # it was priced with it
            usd = asset.to_usd(amount)
        if not self.session.ledger.resolve(
            payment_id,
            confirmation.status,
            receipt=receipt or {},
            transaction=confirmation.transaction,
            amount=amount,
            usd=usd if amount is not None else None,
            commit=False,
        ):
            return
        self.session.commit_soon()
        if usd < Decimal(reserved):
            self.session.budgets.release(key, Decimal(reserved) - usd)
        self._inc("x402/payment_count")
        self._inc(f"x402/payment_count/{domain}")
        spent = Decimal(self.stats.get_value(f"x402/spent_usd/{domain}", "0")) + usd
        self.stats.set_value(f"x402/spent_usd/{domain}", str(spent))
        payment.update(
            status=confirmation.status,
            receipt=receipt,
            transaction=confirmation.transaction,
            usd=str(usd),
        )
        if amount is not None:
            payment["amount"] = str(amount)

    def _check_receipt(self, receipt: Any, payment: dict[str, Any], domain: str) -> None:
        """A receipt that names another network or payer, or more than was signed, is
        counted and logged; the ledger keeps what was signed, never what a receipt claims."""
        if not isinstance(receipt, dict):
            return
        claimed = str(receipt.get("amount", ""))
        claims = {
            "network": receipt.get("network") not in (None, payment["network"]),
            "payer": isinstance(receipt.get("payer"), str)
            and receipt["payer"].lower() != self.session.payer.lower(),
            "amount": claimed.isdigit() and int(claimed) > int(payment["amount"]),
        }
        for field, wrong in claims.items():
            if wrong:
                self._inc(f"x402/receipt_mismatch/{field}")
                self._once(
                    logging.WARNING,
                    ("receipt", domain, field),
                    "x402: %s sent a receipt with another %s than the payment's (%r); "
                    "the ledger keeps the payment as signed",
                    domain,
                    field,
                    str(receipt.get(field))[:80],
                )

    def _unconfirmed(self, request: Request, reason: str, refused: bool = False) -> None:
        """The payment was not confirmed. A commitment is then never settled, so its
        reservation is freed; a signed transfer stays held until it expires."""
        payment = request.meta["x402_payment"]
        payment_id = request.meta.pop("_x402_payment")
        key, usd = request.meta.pop("_x402_reserved")
        held = self.session.schemes[payment["scheme"]].held_until_expiry
        status = Status.HELD if held else Status.REJECTED if refused else Status.FAILED
        if (
            self.session.ledger.resolve(payment_id, status, reason=reason[:200], commit=False)
            and not held
        ):
            self.session.budgets.release(key, Decimal(usd))
        self.session.commit_soon()
        self._inc(f"x402/payment_{'rejected' if refused else 'failed'}/{_stat_name(reason)}")
        if held:
            self._inc("x402/payment_held")
        payment.update(status=status, reason=reason)

    def _inc(self, key: str, count: int = 1) -> None:
        self.stats.inc_value(key, count)

    def _once(self, level: int, key: tuple[str, ...], msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.log(level, msg, *args)


def _out_of_funds(reason: str) -> bool:
    """The payer's balance is short: x402's `insufficient_funds`, or the reference SDK's
    `invalid_exact_evm_insufficient_balance` and kin (not the facilitator's own balance)."""
    return reason == "insufficient_funds" or (
        reason.endswith("insufficient_balance") and not reason.startswith("facilitator_")
    )


def _echo_extensions(challenge: Challenge, payment_id: str) -> dict[str, Any]:
    """The extensions a client echoes. ``payment-identifier`` gets the payment's id: a
    retry of the request (RetryMiddleware copies its headers) resends the same id."""
    declared = challenge.extensions.get("payment-identifier")
    if not isinstance(declared, dict):
        return {}
    info = declared.get("info")
    info = info if isinstance(info, dict) else {}
    return {"payment-identifier": {**declared, "info": {**info, "id": payment_id[2:]}}}


@dataclass(frozen=True)
class _Terms:
    challenge: Challenge
    offer: Offer
    asset: Asset
    expires: float  # unix time


def _terms_key(request: Request) -> tuple[str, str]:
    """Host and priced path pattern: terms seen for /news/1 apply to /news/2."""
    parsed = urlparse_cached(request)
    return (parsed.hostname or "", parsed.path.rsplit("/", 1)[0] + "/*")


def _stat_name(reason: str) -> str:
    """A server's reason as a stat key part: short, no spaces or slashes."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", reason)[:64] or "unknown"


def _internal_error(response: Response) -> bool:
    return response.status == 500 and response.headers.get("crawler-error") == b"InternalError"


def _read_challenge(response: Response, domain: str) -> Challenge:
    """x402 v2 header, else Cloudflare's crawler-price header, else an x402 v1 body."""
    header = response.headers.get(PAYMENT_REQUIRED)
    price = response.headers.get("crawler-price")
    if header is None and price is not None:
        return parse_crawler_price(price, domain, response.url)
    return parse_challenge(header, response.body)


def _challenge_error(response: Response) -> str | None:
    try:
        return parse_challenge(response.headers.get(PAYMENT_REQUIRED), response.body).error
    except InvalidChallenge:
        return None
