"""What the two downloader middlewares share: choosing an offer, putting a payment on a
request (signed, reserved and recorded before it leaves), and reporting what became of it
to the PaymentBook. Every store call runs in the ledger's thread; nothing here waits on the
reactor.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from scrapy.utils.httpobj import urlparse_cached
from twisted.internet.threads import deferToThread

from scrapy_x402._budget import TOTAL
from scrapy_x402._config import parse_usd
from scrapy_x402._networks import evm_chain_id, is_testnet
from scrapy_x402._protocol import UNKNOWN_AMOUNT, Challenge, Offer
from scrapy_x402._redact import redact
from scrapy_x402._session import PerCrawler, X402Session
from scrapy_x402.ledger import PaymentRecord, Status

if TYPE_CHECKING:
    from scrapy import Request
    from scrapy.crawler import Crawler
    from scrapy.http import Response

    from scrapy_x402._assets import Asset
    from scrapy_x402.schemes import Confirmation

logger = logging.getLogger(__name__)

PAYMENT_HEADERS = (b"PAYMENT-SIGNATURE", b"X-PAYMENT", b"crawler-max-price", b"crawler-exact-price")
MAX_TERMS = 1_000  # pre-authorised terms remembered (host + path pattern), least recent dropped
MAX_SAID = 1_000  # distinct "said once" messages remembered
MAX_STAT_PARTS = 100  # distinct values of one {placeholder} stats family; then "other"


class Payer(PerCrawler):
    def __init__(self, crawler: Crawler):
        self.crawler = crawler
        self.session = X402Session.for_crawler(crawler)
        self.config = self.session.config
        self.stats = crawler.stats
        self.terms: OrderedDict[tuple[str, str], Terms] = OrderedDict()  # pre-authorisation
        self.stopped_networks: set[str] = set()  # the wallet ran out of funds there
        self.forbidden_domains: set[str] = set()  # CrawlerForbidden
        self._said: OrderedDict[tuple[str, ...], None] = OrderedDict()
        self._stat_parts: dict[str, set[str]] = {}
        self._spent: dict[str, Decimal] = {}
        self._closing: Any = None

    # -- choosing ----------------------------------------------------------------------

    def max_price(self, request: Request) -> Decimal | None:
        try:
            return parse_usd(
                request.meta.get("x402_max_price", self.config.max_price), "meta['x402_max_price']"
            )
        except ValueError as e:
            logger.error("x402: %s (%s); not paying", e, request)
            return None

    async def choose(
        self, challenge: Challenge, max_price: Decimal, domain: str
    ) -> tuple[Offer, Asset, Decimal] | None:
        """The offer X402_OFFER_POLICY picks among those the settings allow, or None."""
        for offer in challenge.offers:
            scheme = self.session.schemes.get(offer.scheme)
            if scheme is not None and offer.scheme in self.config.schemes:
                await scheme.prepare(offer)  # chain reads it needs, in a thread
        acceptable: list[tuple[tuple[Any, ...], Offer, Asset, Decimal]] = []
        refusals = []
        for offer in challenge.offers:
            reason, asset = self.refusal(offer, domain)
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
                self.inc("x402/offer_refused/{}", reason)
        if acceptable:
            _, offer, asset, usd = min(acceptable, key=lambda choice: choice[0])
            return offer, asset, usd
        self.inc("x402/no_acceptable_offer")
        self.once(
            logging.INFO,
            ("refused", domain, *sorted(set(refusals))),
            "x402: no acceptable offer from %s (refused: %s); not paying",
            domain,
            ", ".join(refusals),
        )
        return None

    def price_pending(self, challenge: Challenge) -> bool:
        """An offer we could pay but for its missing price, which a signed request may get."""
        return any(
            offer.amount == UNKNOWN_AMOUNT and self.refusal(offer, "")[0] == "amount_unknown"
            for offer in challenge.offers
        )

    def refusal(self, offer: Offer, domain: str) -> tuple[str | None, Asset | None]:
        if domain in self.forbidden_domains:
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
        if offer.network in self.stopped_networks:
            return "insufficient_funds", None
        asset = self.config.assets.get(offer.network, offer.asset)
        if asset is None:
            return "asset", None
        return None, asset

    # -- paying ------------------------------------------------------------------------

    async def attach(
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
        """Sign a payment for ``offer``, have the book reserve and record it (durably), and
        put it on ``request``; False (nothing counted, nothing sent) when the budget or the
        signer says no. ``quiet``: a refusal by the budget is not logged."""
        session = self.session
        key = session.budgets.key_for(domain)
        scheme = session.schemes[offer.scheme]
        try:
            signed = scheme.sign(
                session.account,
                offer,
                resource_url,
                int(time.time()),
                self.config.max_timeout_seconds,
            )
            payment_headers = scheme.headers(
                challenge, offer, signed, _echo_extensions(challenge, signed.id)
            )
        except Exception:
            self.inc("x402/payment_error")
            logger.exception("x402: could not sign a payment for %s; not paying", request)
            return False
        record = PaymentRecord(
            id=signed.id,
            run_id=session.run_id,
            scheme=offer.scheme,
            network=offer.network,
            asset=offer.asset,
            payer=session.payer,
            payee=offer.pay_to,
            amount=offer.amount,
            usd=usd,
            domain=domain,
            budget_key=key,
            url=request.url,
            payload=signed.payload,
            valid_until=signed.valid_until,
        )
        limits = session.budgets.limits(key)
        try:
            refused = await session.ledger.run(session.book.reserve, record, limits)
            if refused is not None and await session.release_expired_holds():
                refused = await session.ledger.run(session.book.reserve, record, limits)
        except Exception as e:
            scheme.discard(offer)
            self.inc("x402/ledger_error")
            logger.error("x402: a payment for %s cannot be recorded (%s); not paying", request, e)
            return False
        if refused is not None:
            scheme.discard(offer)  # never sent: give back what signing took (Permit2)
            if not quiet:  # a pre-authorisation that does not fit is left to the 402 cycle
                self.budget_exceeded(domain, refused)
            return False
        self.inc("x402/payment_signed")
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
        request.meta.pop("_x402_sent", None)  # a new payment: not sent yet
        request.meta.pop("_x402_presented", None)
        # The URL it pays for: its header never leaves with a request for another one.
        request.meta["_x402_paid_url"] = request.url
        request.meta.update(_x402_payment=signed.id, _x402_signed_in=session.process_id)
        if scheme.charge_on_chain:  # to read what it cost from the chain later
            request.meta["_x402_payload"] = signed.payload
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

    async def paid_before(self, request: Request, domain: str) -> bool:
        """A resumed run may be asked again for pages its earlier process paid for (a kill
        loses the scheduler's state): each page is paid once per run."""
        if not await self._run_paid_for(request):
            return False
        self.inc("x402/already_paid")
        self.once(
            logging.INFO,
            ("already_paid", domain),
            "x402: this run already paid for pages of %s it is asked for again; not paying twice",
            domain,
        )
        return True

    async def _run_paid_for(self, request: Request) -> bool:
        """Whether this run paid for the URL already; only a resumed run can have."""
        session = self.session
        return session.resumed and await session.ledger.run(
            session.store.paid_for, session.run_id, request.url
        )

    def strip(self, request: Request, status: str) -> None:
        """Take the payment off ``request``, which goes on unpaid (a 402 then ends it)."""
        for key in (
            "_x402_payment",
            "_x402_signed_in",
            "_x402_sent",
            "_x402_paid_url",
            "_x402_presented",
        ):
            request.meta.pop(key, None)
        if "x402_payment" in request.meta:
            request.meta["x402_payment"] = {**request.meta["x402_payment"], "status": status}
        for name in PAYMENT_HEADERS:
            request.headers.pop(name, None)

    async def preauthorize(self, request: Request) -> None:
        """Known, still valid terms for this host and path pattern: pay on the first request,
        as x402 v2 and Cloudflare allow, instead of waiting for a 402."""
        key = terms_key(request)
        terms = self.terms.get(key)
        if terms is None:
            return
        if time.time() >= terms.expires:
            del self.terms[key]
            return
        self.terms.move_to_end(key)
        max_price = self.max_price(request)
        if max_price is None or terms.usd > max_price:
            return
        domain = urlparse_cached(request).hostname or ""
        if self.refusal(terms.offer, domain)[0] is not None:
            return
        if await self._run_paid_for(request):
            return  # left to the 402, which says so once
        challenge = replace(terms.challenge, resource={"url": request.url})
        if await self.attach(
            request, domain, challenge, terms.offer, terms.asset, terms.usd, request.url, quiet=True
        ):
            request.meta["_x402_preauthorized"] = True
            self.inc("x402/preauthorized")

    def remember_terms(
        self, request: Request, challenge: Challenge, offer: Offer, asset: Asset, usd: Decimal
    ) -> None:
        if not self.config.preauthorize or self.session.schemes[offer.scheme].held_until_expiry:
            return  # only schemes whose refusals cost nothing are paid before a 402
        validity = min(
            offer.max_timeout_seconds or self.config.max_timeout_seconds,
            self.config.max_timeout_seconds,
        )
        key = terms_key(request)
        self.terms[key] = Terms(challenge, offer, asset, usd, time.time() + validity)
        self.terms.move_to_end(key)
        while len(self.terms) > MAX_TERMS:
            self.terms.popitem(last=False)

    async def resend(self, request: Request) -> None:
        """A payment signed by an earlier process of this run (a resumed JOBDIR queue): sent
        only if the book still counts it, or can count it again."""
        payment_id = request.meta["_x402_payment"]
        key = self.session.budgets.key_for(urlparse_cached(request).hostname or "")
        try:
            ok = await self.session.ledger.run(
                self.session.book.resend, payment_id, self.session.budgets.limits(key)
            )
        except Exception:
            ok = False
        if ok:
            request.meta["_x402_signed_in"] = self.session.process_id
            # The earlier process may have presented it already (a kill loses which queued
            # requests left): a refusal of this presentation may be about that one.
            request.meta["_x402_presented"] = max(1, request.meta.get("_x402_presented", 0))
            return
        self.inc("x402/resumed_payment_dropped")
        logger.warning(
            "x402: the payment %s of a resumed request cannot be sent again; sending %s unpaid",
            payment_id,
            request.url,
        )
        self.strip(request, "dropped")

    # -- what became of a payment ------------------------------------------------------

    async def confirmed(
        self, request: Request, confirmation: Confirmation, receipt: Any, domain: str
    ) -> None:
        payment = request.meta["x402_payment"]
        payment_id = request.meta.pop("_x402_payment")
        usd = Decimal(payment["usd"])
        amount = confirmation.amount
        scheme = self.session.schemes[payment["scheme"]]
        if amount is not None and scheme.charge_on_chain:
            amount = await self._charged_on_chain(request, payment, confirmation, domain)
        if amount is not None:  # upto, Cloudflare: charged less than the signed maximum
            asset = self.config.assets.get(payment["network"], payment["asset"])
            assert asset is not None  # it was priced with it
            usd = min(asset.to_usd(amount), usd)
        try:
            ok = await self.session.ledger.run(
                self.session.book.confirm,
                payment_id,
                confirmation.status,
                receipt=receipt if isinstance(receipt, dict) else {},
                transaction=confirmation.transaction,
                amount=amount,
                usd=usd if amount is not None else None,
            )
        except Exception as e:  # still reserved in the book: in doubt, and counted
            logger.error("x402: cannot record that payment %s was accepted: %s", payment_id, e)
            ok = False
        if not ok:
            return
        self.inc("x402/payment_count")
        self.inc("x402/payment_count/{}", domain)
        self.spent(domain, usd)
        update = {"status": confirmation.status, "receipt": receipt, "usd": str(usd)}
        update["transaction"] = confirmation.transaction
        if amount is not None:
            update["amount"] = str(amount)
        payment.update(update)

    async def _charged_on_chain(
        self, request: Request, payment: dict[str, Any], confirmation: Confirmation, domain: str
    ) -> int | None:
        """What the transaction that spent an ``upto`` signature moved (read in a thread),
        never more than signed; None (the maximum stays counted) when the chain cannot say."""
        scheme = self.session.schemes[payment["scheme"]]
        payload, transaction = request.meta.get("_x402_payload"), confirmation.transaction

        def read() -> int | None:
            w3 = self.session.chain.get(payment["network"])
            if w3 is None or payload is None or transaction is None:
                return None
            return scheme.charged(w3, payment["asset"], payment["payee"], payload, transaction)

        try:
            on_chain = await maybe_deferred_to_future(deferToThread(read))
        except Exception as e:
            on_chain = None
            reason = redact(str(e), self.config.rpc_urls.values())
            logger.warning("x402: cannot read what payment %s cost: %s", payment["id"], reason)
        if on_chain is None:
            self.once(
                logging.WARNING,
                ("unverified_charge", domain),
                "x402: %s charged less than signed, but the chain cannot confirm it; "
                "the signed maximum stays counted",
                domain,
            )
            return None
        if on_chain != confirmation.amount:
            self.inc("x402/receipt_mismatch/{}", "amount")
            self.once(
                logging.WARNING,
                ("receipt", domain, "charged"),
                "x402: %s reported a charge of %s, the chain shows %s; counting the chain's",
                domain,
                confirmation.amount,
                on_chain,
            )
        return min(on_chain, int(payment["amount"]))

    async def not_served(self, request: Request, reason: str, refused: bool = False) -> str:
        """The page was not served. A commitment is then never settled, so it is released;
        a signed transfer stays held (counted) until it expires. The reason as counted."""
        payment = request.meta["x402_payment"]
        payment_id = request.meta.pop("_x402_payment")
        request.meta.pop("_x402_signed_in", None)
        try:
            status = await self.session.ledger.run(
                self.session.book.not_served, payment_id, reason, refused=refused
            )
        except Exception as e:  # still reserved in the book: in doubt, and counted
            logger.error("x402: cannot record what became of payment %s: %s", payment_id, e)
            status = None
        counted = self.inc(
            f"x402/payment_{'rejected' if refused else 'failed'}/{{}}", stat_name(reason)
        )
        if status == Status.HELD:
            self.inc("x402/payment_held")
        payment.update(status=status or Status.RESERVED, reason=reason)
        return counted or "other"

    def in_doubt(self, request: Request, reason: str) -> None:
        """The publisher may have served the page though we did not get it (a response cut
        off after its status line, a retry refused because the first attempt is in flight or
        was served: docs/deferred-scheme.md section 6). The payment stays reserved, and
        counted, until the publisher is asked (section 7); the request goes on without it and
        is not paid again here."""
        payment_id = request.meta["_x402_payment"]
        self.strip(request, Status.RESERVED)
        request.meta["x402_payment"]["reason"] = reason
        self.inc("x402/payment_in_doubt/{}", stat_name(reason))
        domain = urlparse_cached(request).hostname or ""
        self.once(
            logging.WARNING,
            ("in_doubt", domain),
            "x402: payment %s for %s is in doubt (%s): %s may have served the page; it stays "
            "counted until it is asked (a resumed crawl, or scrapy x402 settle)",
            payment_id,
            request.url,
            reason,
            domain,
        )

    async def unsent(self, request: Request, reason: str) -> None:
        """The payment never left (the cache answered): nothing can collect it."""
        payment_id = request.meta["_x402_payment"]
        self.strip(request, "unsent")
        try:
            await self.session.ledger.run(self.session.book.unsent, payment_id, reason)
        except Exception as e:  # still reserved in the book: in doubt, and counted
            logger.error("x402: cannot record that payment %s never left: %s", payment_id, e)
            return
        self.inc("x402/payment_unsent")

    # -- telling -----------------------------------------------------------------------

    def budget_exceeded(self, domain: str, refused: str) -> None:
        self.inc("x402/budget_exceeded/{}", domain)
        if refused == TOTAL:
            self.inc("x402/max_total_exceeded")
            self.once(
                logging.WARNING,
                ("total",),
                "x402: X402_MAX_TOTAL (%s USD) is spent; not paying any more pages",
                self.config.max_total,
            )
            if self.config.close_on_budget_exhausted and self._closing is None:
                assert self.crawler.engine is not None
                self._closing = deferred_from_coro(
                    self.crawler.engine.close_spider_async(reason="x402_budget_exhausted")
                )
        else:
            self.once(
                logging.WARNING,
                ("budget", refused),
                "x402: the budget for %s (%s USD) is spent; not paying more pages there",
                refused,
                self.session.budgets.limit(refused),
            )

    def inc(self, family: str, part: str | None = None, count: int = 1) -> str | None:
        """Count in a stat, or in a ``{}`` family of stats whose part (a domain, a server's
        reason) is capped at MAX_STAT_PARTS distinct values, then "other"; the part used."""
        if part is None:
            self.stats.inc_value(family, count)
            return None
        part = self._stat_part(family, part)
        self.stats.inc_value(family.format(part), count)
        return part

    def _stat_part(self, family: str, part: str) -> str:
        seen = self._stat_parts.setdefault(family, set())
        if part not in seen:
            if len(seen) >= MAX_STAT_PARTS:
                return "other"
            seen.add(part)
        return part

    def spent(self, domain: str, usd: Decimal) -> None:
        """``x402/spent_usd/{domain}``: a number for monitoring, from an exact running total
        (the ledger has the amounts; a float here never accumulates rounding errors)."""
        key = "x402/spent_usd/{}".format(self._stat_part("x402/spent_usd/{}", domain))
        self._spent[key] = self._spent.get(key, Decimal(0)) + usd
        self.stats.set_value(key, float(self._spent[key]))

    def once(self, level: int, key: tuple[str, ...], msg: str, *args: Any) -> None:
        """Log ``msg`` the first time ``key`` is seen (keys normalised, and capped)."""
        key = tuple(stat_name(part) for part in key)
        if key in self._said:
            return
        self._said[key] = None
        if len(self._said) > MAX_SAID:
            self._said.popitem(last=False)
        logger.log(level, msg, *args)


@dataclass(frozen=True)
class Terms:
    challenge: Challenge
    offer: Offer
    asset: Asset
    usd: Decimal
    expires: float  # unix time


def terms_key(request: Request) -> tuple[str, str]:
    """Host and priced path pattern: terms seen for /news/1 apply to /news/2."""
    parsed = urlparse_cached(request)
    return (parsed.hostname or "", parsed.path.rsplit("/", 1)[0] + "/*")


def stat_name(reason: str) -> str:
    """A server's reason as a stat key part: short, no spaces or slashes."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", reason)[:64] or "unknown"


def _echo_extensions(challenge: Challenge, payment_id: str) -> dict[str, Any]:
    """The extensions a client echoes. ``payment-identifier`` gets the payment's id: a
    retry of the request (RetryMiddleware copies its headers) resends the same id."""
    declared = challenge.extensions.get("payment-identifier")
    if not isinstance(declared, dict):
        return {}
    info = declared.get("info")
    info = info if isinstance(info, dict) else {}
    return {"payment-identifier": {**declared, "info": {**info, "id": payment_id[2:]}}}


def is_paid(request: Request) -> bool:
    return "_x402_payment" in request.meta


def response_is_cached(response: Response) -> bool:
    return "cached" in response.flags
