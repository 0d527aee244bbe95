"""What the x402 components of one crawler share: config, wallet, ledger and budgets."""

from __future__ import annotations

import gc
import logging

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar
from weakref import WeakKeyDictionary

from scrapy import signals
from scrapy.exceptions import NotConfigured
from scrapy.utils.defer import deferred_from_coro, maybe_deferred_to_future
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from scrapy_x402._botauth import load_identity
from scrapy_x402._budget import Budgets
from scrapy_x402._chain import ChainReader
from scrapy_x402._config import X402Config
from scrapy_x402._ledger_thread import LedgerThread
from scrapy_x402._recovery import (
    STATUS_DEADLINE,
    Resolution,
    ask_all,
    parse_status,
    record,
    status_url,
)
from scrapy_x402._redact import redact
from scrapy_x402._version import __version__
from scrapy_x402._wallet import load_account
from scrapy_x402.ledger import HeldPayment, open_ledger
from scrapy_x402.payments import PaymentBook
from scrapy_x402.schemes import build_schemes

if TYPE_CHECKING:
    from scrapy.crawler import Crawler

logger = logging.getLogger(__name__)

RUN_ID_FILE = "x402-run-id"
HOLD_CHECK_INTERVAL = 5  # seconds between checks of expired holds


_T = TypeVar("_T", bound="PerCrawler")


class PerCrawler:
    """One instance per crawler, shared by the components that ask for it."""

    _by_crawler: ClassVar[WeakKeyDictionary[Crawler, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._by_crawler = WeakKeyDictionary()

    def __init__(self, crawler: Crawler):
        raise NotImplementedError

    @classmethod
    def for_crawler(cls: type[_T], crawler: Crawler) -> _T:
        if crawler not in cls._by_crawler:
            cls._by_crawler[crawler] = cls(crawler)
        return cls._by_crawler[crawler]  # type: ignore[no-any-return]


class X402Session(PerCrawler):
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
        self.store = open_ledger(config.ledger_uri)
        self.stats = crawler.stats
        self.book = PaymentBook(self.store, on_invalid=self._invalid_transition)
        self.ledger = LedgerThread(self.store)  # every store call of the crawl goes there
        # A resumed crawl (same JOBDIR) keeps its run id, so it keeps counting against
        # what it already spent.
        self.run_id, resumed = _run_id(config.jobdir)
        # One process per resumable run: another would take this one's live payments for
        # ones left in doubt by a crash, and resolve them.
        self._run_lock = _lock_run(self.store, self.run_id) if config.jobdir else None
        # What an earlier process of this run left in doubt is resolved before this one
        # sends any request (its budget may come back).
        self.doubt_resolved = not resumed
        self.resumed = resumed
        # Marks the payments this process signed: any other found on a request was signed
        # before a resume, and is sent again only if the book agrees.
        self.process_id = uuid.uuid4().hex
        self.budgets = Budgets(config.budgets, config.default_budget, config.max_total)
        self.chain = ChainReader(config.rpc_urls)
        self.schemes = build_schemes(
            self.chain,
            self.payer,
            bot_identity=bool(config.bot_auth_key),
            price_header=config.crawler_price_header,
        )
        self.crawler = crawler
        self._in_doubt: Deferred[Resolution] | None = None
        self._holds_checked = 0.0
        crawler.signals.connect(self.ledger.close, signals.engine_stopped)
        crawler.signals.connect(self._release_run, signals.engine_stopped)
        if config.freeze_gc:
            crawler.signals.connect(_freeze_gc, signals.engine_started)
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

    def _release_run(self) -> None:
        if self._run_lock is not None:
            self._run_lock.close()

    def _invalid_transition(self, what: str) -> None:
        # Called from the ledger's thread: stats are touched on the reactor's.
        from twisted.internet import reactor  # noqa: PLC0415 (importing it installs one)

        reactor.callFromThread(self.stats.inc_value, "x402/invalid_transition")  # type: ignore[attr-defined]

    async def resolve_in_doubt(self) -> Resolution:
        """Once per crawl, before a resumed request is sent with its old payment: resolve the
        payments an earlier process of this run left in doubt, asking their publishers
        through Scrapy's downloader."""
        if self._in_doubt is None:
            self._in_doubt = deferred_from_coro(self._resolve_in_doubt())
        shared: Deferred[Resolution] = Deferred()

        def pass_on(resolution: Resolution) -> Resolution:
            shared.callback(resolution)
            return resolution

        self._in_doubt.addCallback(pass_on)
        return await maybe_deferred_to_future(shared)

    async def _resolve_in_doubt(self) -> Resolution:
        resolution = Resolution()
        try:
            rows = await self.ledger.run(self.store.in_doubt, run_id=self.run_id)
            if not rows:
                return resolution
            answers = await ask_all(rows, self._ask_publisher)

            def record_all() -> None:
                for row in rows:
                    record(self.book, row, answers[row.id], resolution)

            await self.ledger.run(record_all)
        except Exception:  # they stay in doubt, and counted
            logger.exception("x402: cannot resolve the payments in doubt of this run")
            return resolution
        finally:
            self.doubt_resolved = True
        logger.info(
            "x402: payments in doubt from an earlier process of this run: %d served (owed), "
            "%d not served (released), %d held until they expire, %d still unknown",
            len(resolution.accepted),
            len(resolution.refused),
            len(resolution.held),
            len(resolution.unknown),
        )
        return resolution

    async def _ask_publisher(self, url: str, payment_id: str) -> bool | None:
        from scrapy import Request  # noqa: PLC0415
        from scrapy.http.request import NO_CALLBACK  # noqa: PLC0415

        request = Request(
            status_url(url, payment_id),
            callback=NO_CALLBACK,
            meta={
                "x402_dont_pay": True,
                "dont_cache": True,
                "_x402_internal": True,
                # Bounded: the crawl waits for these answers before it sends anything.
                "dont_retry": True,
                "download_timeout": STATUS_DEADLINE,
            },
            dont_filter=True,
        )
        assert self.crawler.engine is not None
        response = await self.crawler.engine.download_async(request)
        if response.status != 200:
            raise ValueError(f"the status endpoint answered HTTP {response.status}")
        return parse_status(response.body)

    async def release_expired_holds(self) -> int:
        """Free the budget held by signed transfers that expired uncollected, at most once
        every HOLD_CHECK_INTERVAL seconds (called when a budget refuses).

        Past their expiry nobody can submit them any more; the chain must also show them
        unused, else the money moved and they are settled. Without an RPC URL to ask, they
        stay held, and counted. The chain is read in a thread, never on the reactor.
        """
        now = time.time()
        if now - self._holds_checked < HOLD_CHECK_INTERVAL:
            return 0
        self._holds_checked = now
        holds = await self.ledger.run(self.store.expired_holds, self.run_id, int(now))
        if not holds:
            return 0
        verdicts = await maybe_deferred_to_future(deferToThread(self._read_holds, holds))

        def record_all() -> int:
            released = 0
            for held, used in verdicts:
                if used:
                    self.book.collected(held.id, "collected on-chain after it was not confirmed")
                    logger.warning("x402: payment %s was not confirmed but collected", held.id)
                elif self.book.expire(held.id, "expired uncollected"):
                    self.schemes[held.scheme].expired(held.network, held.payload)
                    released += 1
            return released

        return await self.ledger.run(record_all)

    def _read_holds(self, holds: list[HeldPayment]) -> list[tuple[HeldPayment, bool]]:
        """Whether each expired hold was used on-chain; unknown ones are left out."""
        verdicts = []
        for held in holds:
            try:
                w3 = self.chain.get(held.network)
                if w3 is None:
                    continue  # no chain to ask: it stays held
                used = self.schemes[held.scheme].collected(w3, held.asset, held.payload)
            except Exception as e:
                logger.warning(
                    "x402: cannot check payment %s on-chain: %s",
                    held.id,
                    redact(str(e), self.config.rpc_urls.values()),
                )
                continue
            verdicts.append((held, used))
        return verdicts


def _freeze_gc() -> None:
    """Everything alive once the engine starts (Scrapy, web3, eth-account: about 110,000
    objects) lives as long as the crawl: moved out of the collector's sight, so that no full
    collection on the reactor thread scans them again (each took 40-50 ms, the crawl's worst
    stalls)."""
    gc.freeze()


class RunInUse(Exception):
    pass


def _lock_run(store: Any, run_id: str) -> IO[str] | None:
    """Hold an exclusive lock on this run for the life of the process (released by the OS
    when it exits, even by a kill)."""
    path = getattr(store, "path", None)
    if path is None or fcntl is None:  # not a file ledger, or no flock here
        return None
    lock = open(f"{Path(path).expanduser()}-run-{run_id}.lock", "a")  # noqa: SIM115 (held)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RunInUse(
            f"x402 run {run_id} (JOBDIR) is in use by another crawl process on ledger {path}; "
            "one process per JOBDIR"
        ) from None
    return lock


def _run_id(jobdir: str | None) -> tuple[str, bool]:
    """This crawl's run id, and whether it resumes an earlier process's run."""
    if not jobdir:
        return uuid.uuid4().hex, False
    path = Path(jobdir) / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip(), True
    path.parent.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    path.write_text(run_id)
    return run_id, False
