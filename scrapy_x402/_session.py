"""What the x402 components of one crawler share: config, wallet, ledger and budgets."""

from __future__ import annotations

import logging
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar
from weakref import WeakKeyDictionary

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import maybe_deferred_to_future
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from scrapy_x402._botauth import load_identity
from scrapy_x402._budget import Budgets
from scrapy_x402._chain import ChainReader
from scrapy_x402._config import X402Config
from scrapy_x402._recovery import resolve_in_doubt
from scrapy_x402._version import __version__
from scrapy_x402._wallet import load_account
from scrapy_x402.ledger import Status, open_ledger
from scrapy_x402.schemes import build_schemes

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)

RUN_ID_FILE = "x402-run-id"


class X402Session:
    _by_crawler: ClassVar[WeakKeyDictionary[Crawler, X402Session]] = WeakKeyDictionary()

    @classmethod
    def for_crawler(cls, crawler: Crawler) -> X402Session:
        if crawler not in cls._by_crawler:
            cls._by_crawler[crawler] = cls(crawler)
        return cls._by_crawler[crawler]

    def __init__(self, crawler: Crawler):
        config = X402Config.from_settings(crawler.settings)
        if not config.enabled:
            raise NotConfigured("X402_ENABLED is False")
        account = load_account(config)
        identity = load_identity(config)
        if account is None and identity is None:
            raise NotConfigured(
                "no wallet key: set X402_PRIVATE_KEY (setting or environment variable) "
                "or X402_KEYSTORE_PATH (or, to pay Cloudflare only, X402_BOT_AUTH_KEY)"
            )
        self.config = config
        self.account = account  # None: only Cloudflare, which bills the operator, is paid
        # Who pays, in the ledger: the wallet, or the Web Bot Auth identity Cloudflare bills.
        self.payer = account.address if account else f"web-bot-auth:{identity.keyid}"  # type: ignore[union-attr]
        self.ledger = open_ledger(config.ledger_uri)
        # A resumed crawl (same JOBDIR) keeps its run id, so it keeps counting against
        # what it already spent.
        self.run_id = _run_id(config.jobdir)
        # A resumed crawl: the payments its previous process left reserved are in doubt.
        # Ask their publishers; the refused ones whose requests are still queued are
        # re-reserved when those requests leave (reopen()).
        self.reopenable = set(resolve_in_doubt(self.ledger, run_id=self.run_id).refused)
        self.budgets = Budgets(
            config.budgets,
            config.default_budget,
            config.max_total,
            self.ledger.spent_by_budget(self.run_id),
        )
        self.chain = ChainReader(config.rpc_urls)
        self.schemes = build_schemes(
            self.chain,
            self.payer,
            bot_identity=bool(config.bot_auth_key),
            price_header=config.crawler_price_header,
        )
        self._waiters: list[Deferred[None]] = []
        self._commit_scheduled = False
        crawler.signals.connect(self.ledger.close, signals.engine_stopped)
        logger.info(
            "scrapy-x402 %s: wallet %s, budgets %s (others %s, total %s), ledger %s, run %s",
            __version__,
            self.payer,
            {k: str(v) for k, v in config.budgets.items()},
            config.default_budget,
            config.max_total if config.max_total is not None else "unlimited",
            config.ledger_uri,
            self.run_id,
        )
        if config.allow_mainnet:
            logger.warning("X402_ALLOW_MAINNET is set: this crawl may pay with real money")

    def commit_soon(self) -> None:
        """Commit the payments recorded in this reactor turn at its end: one commit (one
        fsync) for all of them, and the ledger's write lock is never held longer."""
        if not self._commit_scheduled:
            from twisted.internet import reactor  # noqa: PLC0415 (importing it installs one)

            reactor.callLater(0, self._commit)  # type: ignore[attr-defined,arg-type]
            self._commit_scheduled = True

    def reopen(self, payment_id: str, key: str, usd: Decimal) -> bool:
        """A payment resolved as refused at start whose queued request is leaving now:
        reserve it again, or say it must not be sent (budget spent meanwhile)."""
        self.reopenable.discard(payment_id)
        if self.budgets.reserve(key, usd) is not None:
            return False
        self.ledger.resolve(payment_id, Status.RESERVED, reason=None, current=Status.FAILED)
        return True

    async def durable(self) -> None:
        """Wait until every payment recorded so far is committed."""
        if not self.ledger.pending:
            return
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        self.commit_soon()
        await maybe_deferred_to_future(waiter)

    def _commit(self) -> None:
        self._commit_scheduled = False
        waiters, self._waiters = self._waiters, []
        try:
            self.ledger.commit()
        except Exception:
            failure = Failure()
            for waiter in waiters:
                waiter.errback(failure)
            return
        for waiter in waiters:
            waiter.callback(None)

    def release_expired_holds(self) -> int:
        """Free the budget held by signed transfers that expired uncollected.

        Past their expiry nobody can submit them any more; with an RPC URL the chain must
        also show them unused, else the money moved and stays counted (as settled).
        """
        released = 0
        for held in self.ledger.expired_holds(self.run_id, int(time.time())):
            status, reason = Status.EXPIRED, "expired uncollected"
            try:
                w3 = self.chain.get(held.network)
                if w3 is not None and self.schemes[held.scheme].collected(
                    w3, held.asset, held.payload
                ):
                    status, reason = Status.SETTLED, "collected on-chain after a refusal"
            except Exception as e:  # unknown: it stays held, and counted
                logger.warning("x402: cannot check payment %s on-chain: %s", held.id, e)
                continue
            if self.ledger.resolve(held.id, status, reason=reason, current=Status.HELD):
                if status == Status.EXPIRED:
                    self.budgets.release(held.budget_key, held.usd)
                    released += 1
                else:
                    logger.warning("x402: payment %s was refused but collected anyway", held.id)
        return released


def _run_id(jobdir: str | None) -> str:
    if not jobdir:
        return uuid.uuid4().hex
    path = Path(jobdir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    path.write_text(run_id)
    return run_id
