"""Property-based, stateful tests of the PaymentBook on a real SQLite ledger: random sequences
of payment events, crashes and restarts, with the store read back after every step.

The test keeps its own model of what every event should do (written from the methods'
contracts, not from ``TRANSITIONS``) and checks, after every step: the budget counters equal
what the payments count and stay within their limits, every payment has one known status and
counts what that status says, no payment is in two settlements, released money is counted
again only by an explicit resend, every move the store shows is a declared transition, and the
store agrees with the model, also between the events of one transaction and after a crash
in the middle of one. Deterministic (derandomized, no example database) for CI.

Then two PaymentBooks on two connections to one file (two processes) reserving at the same
moments never count past a budget between them.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from scrapy_x402.ledger import (
    IllegalTransition,
    PaymentRecord,
    Settlement,
    SettlementStatus,
    Status,
    open_ledger,
)
from scrapy_x402.ledger._base import COUNT_UNITS, TOTAL_KEY, counted_units
from scrapy_x402.payments import NEW, TRANSITIONS, Limits, PaymentBook

PAYER = "0xME"
PAYEES = ("0xP1", "0xP2")
RUNS = ("run-1", "run-2")
EVM_NETWORKS = ("eip155:84532", "eip155:8453")
CLOUDFLARE = "cloudflare:402"
SCHEMES = ("deferred", "exact", "upto", "pay-per-crawl")
HELD_SCHEMES = ("exact", "upto")  # signed transfers: collectable until they expire
CHARGE_LESS = ("upto", "pay-per-crawl")  # may be charged less than was signed
RELEASED = (Status.REJECTED, Status.FAILED, Status.EXPIRED)
ALL_STATUSES = frozenset((*Status.COUNTED, *RELEASED))
UNKNOWN_ID = "0x" + "f" * 64

S = SettlementStatus
# What the chain can show next for a settlement (SettlementStatus's documentation).
CHAIN_MOVES = {
    S.SIGNED: {S.BROADCAST, S.OBSERVED, S.REPLACED},
    S.BROADCAST: {S.OBSERVED, S.REPLACED},
    S.OBSERVED: {S.OBSERVED, S.BROADCAST, S.CONFIRMED, S.REVERTED},  # a reorg moves it back
}
OPEN = (S.SIGNED, S.BROADCAST, S.OBSERVED)  # could still be mined: its payments are settling
FINAL = (S.CONFIRMED, S.REVERTED, S.REPLACED)
# The allowed moves, weighted towards the way most settlements go: mined, then confirmed.
LIKELY = {
    S.SIGNED: (S.BROADCAST, S.OBSERVED, S.OBSERVED, S.REPLACED),
    S.BROADCAST: (S.OBSERVED, S.OBSERVED, S.REPLACED),
    S.OBSERVED: (S.CONFIRMED, S.CONFIRMED, S.REVERTED, S.OBSERVED, S.BROADCAST),
}


def usd_amounts(min_micros: int, max_micros: int) -> st.SearchStrategy[Decimal]:
    """USD with up to 6 decimals, written with 6 places or normalised ("0.01", "1E-6")."""
    micros = st.integers(min_value=min_micros, max_value=max_micros)
    return st.builds(
        lambda n, normal: Decimal(n).scaleb(-6).normalize() if normal else Decimal(n).scaleb(-6),
        micros,
        st.booleans(),
    )


# Mostly room for a few payments; now and then none at all (only free ones fit).
budget_limits = st.integers(0, 7).flatmap(
    lambda n: usd_amounts(0, 0) if n == 0 else usd_amounts(20_000, 200_000)
)


def micros(usd: Decimal) -> int:
    """The token amount of ``usd`` in a 6-decimal stablecoin (exact: at most 6 decimals)."""
    return int(usd * 10**6)


def limit_units(limit: Decimal) -> int:
    return int((limit * COUNT_UNITS).to_integral_value(rounding=ROUND_FLOOR))


@dataclass
class Pay:
    run: str
    key: str
    scheme: str
    network: str
    asset: str
    payee: str
    amount: int
    usd: Decimal
    status: str
    counted: int
    settlement: str | None = None

    @property
    def group(self) -> tuple[str, str, str]:
        return (self.network, self.asset, self.payee)


@dataclass
class Model:
    """What the store should hold, and how many impossible events the book has seen."""

    payments: dict[str, Pay] = field(default_factory=dict)
    settlements: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # status, block
    invalid: int = 0

    def spent(self, run: str, key: str) -> int:
        return sum(
            p.counted
            for p in self.payments.values()
            if p.run == run and key in (p.key, TOTAL_KEY) and p.status in Status.COUNTED
        )

    def refusal(self, run: str, key: str, units: int, limits: Limits) -> str | None:
        """The budget that refuses ``units`` more (the key's first), or None."""
        if self.spent(run, key) + units > limit_units(limits.budget):
            return key
        if limits.total is not None and self.spent(run, TOTAL_KEY) + units > limit_units(
            limits.total
        ):
            return TOTAL_KEY
        return None

    def owed(self) -> dict[tuple[str, str, str], list[str]]:
        """Accepted payments per (network, asset, payee), as ``Ledger.owed()`` groups them."""
        groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
        for pid in sorted(self.payments):
            p = self.payments[pid]
            if p.status == Status.ACCEPTED:
                groups[p.group].append(pid)
        return dict(groups)

    def ids(self, *statuses: str) -> list[str]:
        return sorted(pid for pid, p in self.payments.items() if p.status in statuses)


class _Crash(Exception):
    """The process died."""


class _GiveUp(Exception):
    """A batch abandoned by its caller: rolled back, the process lives on."""


class _DyingConnection:
    """A sqlite3 connection that dies (is closed, uncommitted) before its ``after``-th
    statement that is not a read (BEGIN, SAVEPOINT, INSERT, UPDATE, RELEASE, COMMIT...), or
    when told to: what a killed process leaves behind."""

    def __init__(self, real: sqlite3.Connection, after: int):
        self.real = real
        self.left = after
        self.dead = False

    def die(self) -> None:
        self.dead = True
        self.real.close()

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if not self.dead and self.left <= 0:
            self.die()
        if self.dead:
            raise _Crash(sql)
        if not sql.lstrip().upper().startswith("SELECT"):
            self.left -= 1
        return self.real.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


BATCH_EVENTS = (
    "_reserve",
    "_confirm",
    "_not_served",
    "_unsent",
    "_expire",
    "_collected",
    "_resend",
    "_settle_begin",
    "_chain_shows",
    "_invoice",
)


@settings(
    max_examples=150,
    stateful_step_count=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class PaymentBookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="x402-book-"))
        self.path = str(self.dir / "ledger.sqlite3")
        self.ledger = open_ledger(self.path)
        self.book = PaymentBook(self.ledger)
        self.model = Model()
        self.budgets: dict[str, Decimal] = {}
        self.total: Decimal | None = None
        self.serial = 0
        self.seen: dict[str, str] = {}  # payment id -> status at the last check
        self.resent: set[str] = set()  # payments an explicit resend counted again since

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(
        budgets=st.lists(budget_limits, min_size=2, max_size=3),
        total=st.none() | usd_amounts(20_000, 150_000),
    )
    def set_limits(self, budgets: list[Decimal], total: Decimal | None) -> None:
        """Limits stay fixed for the whole example, so "within its limit" is well defined."""
        self.budgets = {f"k{n}.example": limit for n, limit in enumerate(budgets)}
        self.total = total

    # -- helpers ---------------------------------------------------------------------------

    def _next(self, prefix: str) -> str:
        self.serial += 1
        return f"0x{prefix}{self.serial:062x}"

    def _limits(self, key: str) -> Limits:
        return Limits(self.budgets[key], self.total)

    def _pick(self, data: st.DataObject, model: Model, *statuses: str) -> str:
        """A payment to report an event about: mostly one it applies to, sometimes any (it
        may not apply), now and then one the book never saw."""
        fitting, anyone = model.ids(*statuses), sorted(model.payments)
        choice = data.draw(st.integers(min_value=0, max_value=9))
        if choice >= 4 and fitting:
            return data.draw(st.sampled_from(fitting))
        if choice >= 1 and anyone:
            return data.draw(st.sampled_from(anyone))
        return UNKNOWN_ID

    def _restart(self) -> None:
        """A new process on the same file: a new connection and a new book."""
        self.ledger = open_ledger(self.path)
        self.book = PaymentBook(self.ledger)
        self.model.invalid = 0

    # -- events: each calls the book, checks its answer against the model and updates it -----

    def _reserve(self, model: Model, data: st.DataObject) -> None:
        if model.payments and data.draw(st.integers(0, 7)) == 0:
            self._reserve_again(model, data)
            return
        key = data.draw(st.sampled_from(sorted(self.budgets)))
        run = data.draw(st.sampled_from(RUNS[:1] * 3 + RUNS[1:]))  # mostly one run
        scheme = data.draw(st.sampled_from(SCHEMES))
        usd = data.draw(usd_amounts(0, 80_000))
        payee = data.draw(st.sampled_from(PAYEES))
        if scheme == "pay-per-crawl":
            network, asset = CLOUDFLARE, "USD"
        else:
            network, asset = data.draw(st.sampled_from(EVM_NETWORKS)), "0xUSDC"
        pid = self._next("a")
        units = counted_units(usd)
        expected = model.refusal(run, key, units, self._limits(key))
        record = PaymentRecord(
            id=pid,
            run_id=run,
            scheme=scheme,
            network=network,
            asset=asset,
            payer=PAYER,
            payee=payee,
            amount=micros(usd),
            usd=usd,
            domain=key,
            budget_key=key,
            url=f"https://{key}/{pid}",
            payload={"signature": "0x00"},
            valid_until=0,
        )
        assert self.book.reserve(record, self._limits(key)) == expected
        if expected is None:
            model.payments[pid] = Pay(
                run, key, scheme, network, asset, payee, micros(usd), usd, Status.RESERVED, units
            )

    def _reserve_again(self, model: Model, data: st.DataObject) -> None:
        """A payment id the book already holds is never reserved (counted) twice."""
        pid = data.draw(st.sampled_from(sorted(model.payments)))
        p = model.payments[pid]
        record = PaymentRecord(
            id=pid,
            run_id=p.run,
            scheme=p.scheme,
            network=p.network,
            asset=p.asset,
            payer=PAYER,
            payee=p.payee,
            amount=p.amount,
            usd=p.usd,
            domain=p.key,
            budget_key=p.key,
            url=f"https://{p.key}/{pid}",
            payload={},
            valid_until=0,
        )
        with contextlib.suppress(sqlite3.IntegrityError):  # a refusal, or the store says no
            assert self.book.reserve(record, self._limits(p.key)) is not None

    def _confirm(self, model: Model, data: st.DataObject) -> None:
        pid = self._pick(data, model, Status.RESERVED, Status.HELD)
        p = model.payments.get(pid)
        # Mostly what the scheme says (owed, or paid at once), sometimes the other.
        natural = Status.SETTLED if p is not None and p.scheme in HELD_SCHEMES else Status.ACCEPTED
        other = Status.ACCEPTED if natural == Status.SETTLED else Status.SETTLED
        status = other if data.draw(st.integers(0, 3)) == 0 else natural
        charged = None
        if p is not None and p.scheme in CHARGE_LESS and data.draw(st.booleans()):
            charged = Decimal(data.draw(st.integers(0, micros(p.usd)))).scaleb(-6)
        transaction = self._next("b") if status == Status.SETTLED else None
        ok = self.book.confirm(
            pid,
            status,
            receipt={"success": True},
            transaction=transaction,
            amount=None if charged is None else micros(charged),
            usd=charged,
        )
        applies = p is not None and (p.status, status) in {
            (Status.RESERVED, Status.ACCEPTED),
            (Status.RESERVED, Status.SETTLED),
            (Status.HELD, Status.SETTLED),
        }
        assert ok is applies
        if p is None or not applies:
            model.invalid += 1
            return
        p.status = status
        p.settlement = transaction
        if charged is not None:  # counts what was charged, never more than it counted
            p.counted = min(p.counted, counted_units(charged))
            p.usd, p.amount = charged, micros(charged)

    def _not_served(self, model: Model, data: st.DataObject) -> None:
        pid = self._pick(data, model, Status.RESERVED, Status.HELD)
        refused = data.draw(st.booleans())
        result = self.book.not_served(pid, "http_402" if refused else "http_500", refused=refused)
        p = model.payments.get(pid)
        if p is None or p.status not in (Status.RESERVED, Status.HELD):
            assert result is None
            model.invalid += 1
        elif p.scheme in HELD_SCHEMES:  # still collectable: held, and counted
            assert result == Status.HELD
            p.status = Status.HELD
        else:
            assert p.status == Status.RESERVED  # only signed transfers are ever held
            assert result == (Status.REJECTED if refused else Status.FAILED)
            p.status, p.counted = result, 0

    def _unsent(self, model: Model, data: st.DataObject) -> None:
        self._simple(model, data, self.book.unsent, Status.RESERVED, Status.FAILED, 0)

    def _expire(self, model: Model, data: st.DataObject) -> None:
        self._simple(model, data, self.book.expire, Status.HELD, Status.EXPIRED, 0)

    def _collected(self, model: Model, data: st.DataObject) -> None:
        self._simple(model, data, self.book.collected, Status.HELD, Status.SETTLED, None)

    def _simple(
        self,
        model: Model,
        data: st.DataObject,
        event: Callable[[str, str], bool],
        source: str,
        to: str,
        counted: int | None,
    ) -> None:
        pid = self._pick(data, model, source)
        ok = event(pid, "test")
        p = model.payments.get(pid)
        assert ok is (p is not None and p.status == source)
        if not ok:
            model.invalid += 1
            return
        p.status = to
        if counted is not None:
            p.counted = counted

    def _resend(self, model: Model, data: st.DataObject) -> None:
        pid = self._pick(data, model, Status.FAILED, Status.REJECTED, Status.RESERVED, Status.HELD)
        p = model.payments.get(pid)
        key = p.key if p is not None else sorted(self.budgets)[0]
        ok = self.book.resend(pid, self._limits(key))  # never an invalid transition
        if p is None or p.status not in (*Status.COUNTED, Status.FAILED, Status.REJECTED):
            assert ok is False
        elif p.status in (Status.RESERVED, Status.HELD):
            assert ok is True  # still counted: it may leave, counted once
        elif p.status in (Status.FAILED, Status.REJECTED):
            units = counted_units(p.usd)
            fits = model.refusal(p.run, p.key, units, self._limits(p.key)) is None
            assert ok is fits
            if fits:
                p.status, p.counted = Status.RESERVED, units
                self.resent.add(pid)
        else:  # served, settling or settled: it must not leave again
            assert ok is False

    def _settle_begin(self, model: Model, data: st.DataObject) -> None:
        groups = model.owed()
        if not groups:
            return
        network, asset, payee = data.draw(st.sampled_from(sorted(groups)))
        ids = data.draw(
            st.lists(
                st.sampled_from(groups[network, asset, payee]), min_size=1, max_size=6, unique=True
            )
        )
        stale = model.ids(*(ALL_STATUSES - {Status.ACCEPTED}))
        if stale and data.draw(st.integers(0, 3)) == 0:  # one is no longer owed: none is sent
            position = data.draw(st.integers(0, len(ids)))
            ids.insert(position, data.draw(st.sampled_from(stale)))
        sid = self._next("c")
        settlement = Settlement(
            id=sid,
            network=network,
            asset=asset,
            payer=PAYER,
            payee=payee,
            amount=sum(model.payments[i].amount for i in ids),
            payment_count=len(ids),
            status=S.SIGNED,
            raw_tx="0x02f8",
            tx_nonce=self.serial,
        )
        ok = self.book.settle_begin(settlement, ids)
        applies = all(model.payments[i].status == Status.ACCEPTED for i in ids)
        assert ok is applies
        if not applies:
            model.invalid += 1
            return
        model.settlements[sid] = (S.SIGNED, None)
        for i in ids:
            model.payments[i].status = Status.SETTLING
            model.payments[i].settlement = sid

    @staticmethod
    def _open_settlements(model: Model) -> list[str]:
        return sorted(sid for sid, (status, _) in model.settlements.items() if status in OPEN)

    def _pick_settlement(self, data: st.DataObject, model: Model, *statuses: str) -> str:
        """Mostly one in ``statuses``, sometimes any, now and then one never recorded."""
        fitting = sorted(
            sid for sid, (status, _) in model.settlements.items() if status in statuses
        )
        choice = data.draw(st.integers(0, 9))
        if choice >= 2 and fitting:
            return data.draw(st.sampled_from(fitting))
        if choice >= 1 and model.settlements:
            return data.draw(st.sampled_from(sorted(model.settlements)))
        return UNKNOWN_ID

    def _chain_shows(self, model: Model, data: st.DataObject) -> None:
        """What the chain shows of a settlement: mostly a move it allows (so settlements do
        reach their end), else any status, which the book must refuse."""
        sid = self._pick_settlement(data, model, *OPEN)
        current, block = model.settlements.get(sid, (None, None))
        if current in LIKELY and data.draw(st.integers(0, 4)):
            status = data.draw(st.sampled_from(LIKELY[current]))
        else:
            status = data.draw(st.sampled_from((*OPEN, *FINAL)))
        if status in FINAL:
            self._settle_end(model, sid, status, current, block)
        else:
            self._settle_mark(model, data, sid, status, current)

    def _settle_mark(
        self, model: Model, data: st.DataObject, sid: str, status: str, current: str | None
    ) -> None:
        """Seen broadcast, or mined in a block (observed)."""
        block = data.draw(st.integers(1, 10**6)) if status == S.OBSERVED else None
        if status in CHAIN_MOVES.get(current, ()):
            assert self.book.settle_mark(sid, status, block) is None
            model.settlements[sid] = (status, block)
        else:  # refused, counted, nothing written
            with pytest.raises(IllegalTransition):
                self.book.settle_mark(sid, status, block)
            model.invalid += 1

    def _settle_end(
        self, model: Model, sid: str, status: str, current: str | None, block: int | None
    ) -> None:
        """Final: confirmed (its payments settled), reverted or replaced (owed again)."""
        if status not in CHAIN_MOVES.get(current, ()):  # refused, counted, nothing written
            with pytest.raises(IllegalTransition):
                self.book.settle_end(sid, status, reason=status)
            model.invalid += 1
            return
        assert self.book.settle_end(sid, status, reason=status) is None
        model.settlements[sid] = (status, block)
        for p in model.payments.values():
            if p.settlement == sid:
                assert p.status == Status.SETTLING
                if status == S.CONFIRMED:
                    p.status = Status.SETTLED
                else:  # reverted or replaced: owed again
                    p.status, p.settlement = Status.ACCEPTED, None

    def _invoice(self, model: Model, data: st.DataObject) -> None:
        owing = sorted({p.network for p in model.payments.values() if p.status == Status.ACCEPTED})
        networks = owing if owing and data.draw(st.integers(0, 3)) else (CLOUDFLARE, *EVM_NETWORKS)
        network = data.draw(st.sampled_from(networks))
        now = data.draw(st.integers(0, 3)) > 0  # else a period that has not started
        start, end = (0, 2**62) if now else (int(time.time()) + 3600, 2**62)
        invoice = self._next("d")
        marked = self.book.invoice(network, start, end, invoice)
        owed = [p for p in model.payments.values() if p.status == Status.ACCEPTED]
        expected = [p for p in owed if p.network == network] if now else []
        assert marked == len(expected)
        for p in expected:
            p.status, p.settlement = Status.SETTLED, f"invoice:{invoice}"

    # -- rules -------------------------------------------------------------------------------

    @rule(data=st.data())
    def reserve(self, data: st.DataObject) -> None:
        self._reserve(self.model, data)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        self._confirm(self.model, data)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def not_served(self, data: st.DataObject) -> None:
        self._not_served(self.model, data)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def unsent(self, data: st.DataObject) -> None:
        self._unsent(self.model, data)

    @precondition(lambda self: self.model.ids(Status.HELD))
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        self._expire(self.model, data)

    @precondition(lambda self: self.model.ids(Status.HELD))
    @rule(data=st.data())
    def collected(self, data: st.DataObject) -> None:
        self._collected(self.model, data)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        self._resend(self.model, data)

    @precondition(lambda self: self.model.owed() or self._open_settlements(self.model))
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """settle_begin for owed payments, or settle_mark / settle_end for an open settlement
        (one rule, so that examples where it is enabled see settlements to the end)."""
        begin = bool(self.model.owed())
        if begin and self._open_settlements(self.model):
            begin = data.draw(st.integers(0, 2)) == 0
        if begin:
            self._settle_begin(self.model, data)
        else:
            self._chain_shows(self.model, data)

    @precondition(lambda self: self.model.ids(Status.ACCEPTED))
    @rule(data=st.data())
    def invoice(self, data: st.DataObject) -> None:
        self._invoice(self.model, data)

    def _batch(self, model: Model, data: st.DataObject, events: list[str]) -> None:
        """Events in the caller's transaction, the store checked (uncommitted) after each."""
        for event in events:
            getattr(self, event)(model, data)
            self._check(model)

    @precondition(lambda self: self.model.payments)
    @rule(data=st.data(), events=st.lists(st.sampled_from(BATCH_EVENTS), min_size=2, max_size=5))
    def group_commit(self, data: st.DataObject, events: list[str]) -> None:
        """Several events committed together (the ledger thread's group commit): a refused
        or impossible one among them leaves nothing behind, the others all count."""
        with self.ledger.transaction():
            self._batch(self.model, data, events)

    @precondition(lambda self: self.model.payments)
    @rule(
        data=st.data(),
        events=st.lists(st.sampled_from(BATCH_EVENTS), min_size=1, max_size=3),
        dies=st.booleans(),
        after=st.integers(min_value=0, max_value=15),
    )
    def crash(self, data: st.DataObject, events: list[str], dies: bool, after: int) -> None:
        """One transaction of one or more events is interrupted. ``dies``: the process dies
        (its connection closed uncommitted) before the ``after``-th statement or just before
        COMMIT, and a new process opens the file. Else an exception rolls it back and the
        process lives on."""
        conn = _DyingConnection(self.ledger._conn, after if dies else 2**62)
        self.ledger._conn = conn  # type: ignore[assignment]
        scratch = copy.deepcopy(self.model)  # what the interrupted transaction did
        seen = dict(self.seen)
        with contextlib.suppress(_Crash, _GiveUp), self.ledger.transaction():
            self._batch(scratch, data, events)
            if not dies:
                raise _GiveUp
            conn.die()
            raise _Crash("before COMMIT")
        self.seen = seen  # none of it happened
        if dies:
            assert conn.dead
            self._restart()
        else:
            self.ledger._conn = conn.real
            self.model.invalid = scratch.invalid  # the book counted them, in memory

    @precondition(lambda self: self.model.payments)
    @rule()
    def reopen(self) -> None:
        self.ledger.close()
        self._restart()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def no_transaction_left_open(self) -> None:
        assert not self.ledger._conn.in_transaction

    def _check(self, model: Model) -> None:
        """Every invariant, against ``model``; also inside a transaction, between events."""
        self.book_counts_impossible_events(model)
        self.payments_agree_with_the_model(model)
        self.budgets_count_what_payments_count_within_their_limits(model)
        self.no_payment_is_in_two_settlements(model)
        self.every_move_is_declared_and_released_money_comes_back_only_by_resend()

    @invariant()
    def book_counts_impossible_events(self, model: Model | None = None) -> None:
        assert self.book.invalid_transitions == (model or self.model).invalid

    @invariant()
    def payments_agree_with_the_model(self, model: Model | None = None) -> None:
        model = model or self.model
        rows = self.ledger.query(
            "SELECT id, run_id, budget_key, status, counted, usd, amount, settlement_id "
            "FROM x402_payments"
        )
        store = {}
        for pid, run, key, status, counted, usd, amount, settlement in rows:
            assert status in ALL_STATUSES, (pid, status)
            if status in RELEASED:
                assert counted == 0, (pid, status, counted)
            else:  # counts what it costs, rounded up: > 0 unless it cost nothing
                assert counted == counted_units(Decimal(usd)), (pid, status, counted, usd)
                assert counted > 0 or Decimal(usd) == 0
            store[pid] = (run, key, status, counted, Decimal(usd), int(amount), settlement)
        assert store == {
            pid: (p.run, p.key, p.status, p.counted, p.usd, p.amount, p.settlement)
            for pid, p in model.payments.items()
        }

    @invariant()
    def budgets_count_what_payments_count_within_their_limits(
        self, model: Model | None = None
    ) -> None:
        model = model or self.model
        rows = self.ledger.query("SELECT run_id, budget_key, spent FROM x402_budgets")
        spent = {(run, key): units for run, key, units in rows}
        counted: dict[tuple[str, str], int] = defaultdict(int)
        for run, key, units in self.ledger.query(
            "SELECT run_id, budget_key, counted FROM x402_payments WHERE status IN "
            f"({', '.join('?' for _ in Status.COUNTED)})",
            Status.COUNTED,
        ):
            counted[run, key] += units
            counted[run, TOTAL_KEY] += units
        for run, key in set(spent) | set(counted):
            units = spent.get((run, key), 0)
            assert units == counted[run, key] == model.spent(run, key), (run, key)
            assert units >= 0
            if key == TOTAL_KEY:
                keys = sum(u for (r, k), u in spent.items() if r == run and k != TOTAL_KEY)
                assert units == keys, run
                if self.total is not None:
                    assert units <= limit_units(self.total), (run, units)
            else:
                assert units <= limit_units(self.budgets[key]), (run, key, units)

    @invariant()
    def no_payment_is_in_two_settlements(self, model: Model | None = None) -> None:
        model = model or self.model
        settlements = {
            sid: (status, count, int(amount))
            for sid, status, count, amount in self.ledger.query(
                "SELECT id, status, payment_count, amount FROM x402_settlements"
            )
        }
        blocks = dict(self.ledger.query("SELECT id, block_number FROM x402_settlements"))
        assert {
            sid: (status, blocks[sid]) for sid, (status, _, _) in settlements.items()
        } == model.settlements
        members: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
        for pid, status, settlement, amount in self.ledger.query(
            "SELECT id, status, settlement_id, amount FROM x402_payments"
        ):
            if status == Status.SETTLING:  # in a settlement that could still be mined
                assert settlements[settlement][0] in OPEN, (pid, settlement)
            if status not in (Status.SETTLING, Status.SETTLED):
                assert settlement is None, (pid, status, settlement)
            if settlement in settlements:
                members[settlement].append((pid, status, int(amount)))
        for sid, (status, count, amount) in settlements.items():
            statuses = {s for _, s, _ in members[sid]}
            if status in OPEN:  # all its payments, and only they, are settling
                assert statuses == {Status.SETTLING}, (sid, status, statuses)
                assert len(members[sid]) == count
                assert sum(a for _, _, a in members[sid]) == amount
            elif status == S.CONFIRMED:
                assert statuses == {Status.SETTLED}, (sid, statuses)
                assert len(members[sid]) == count
            else:  # reverted or replaced: its payments are owed again, in no settlement
                assert status in (S.REVERTED, S.REPLACED), (sid, status)
                assert not members[sid], (sid, status, statuses)
        # Owed (what the next settlement may take) is exactly the accepted payments.
        owed = {(o.network, o.asset, o.payee): list(o.payment_ids) for o in self.ledger.owed(PAYER)}
        assert owed == model.owed()

    @invariant()
    def every_move_is_declared_and_released_money_comes_back_only_by_resend(self) -> None:
        now = dict(self.ledger.query("SELECT id, status FROM x402_payments"))
        assert set(self.seen) <= set(now), "a payment disappeared"
        for pid, status in now.items():
            before = self.seen.get(pid, NEW)
            if before != status:
                assert (before, status) in TRANSITIONS, (pid, before, status)
            if before in RELEASED and status in Status.COUNTED:
                assert pid in self.resent, (pid, before, status)
        self.seen = now
        self.resent.clear()


TestPaymentBookStateMachine = PaymentBookMachine.TestCase


# -- two processes, one file -------------------------------------------------------------


def _record(n: int, key: str) -> PaymentRecord:
    return PaymentRecord(
        id=f"0x{n:064x}",
        run_id="run-1",
        scheme="deferred",
        network=EVM_NETWORKS[0],
        asset="0xUSDC",
        payer=PAYER,
        payee=PAYEES[0],
        amount=10_000,
        usd=Decimal("0.01"),
        domain=key,
        budget_key=key,
        url=f"https://{key}/{n}",
        payload={},
        valid_until=0,
    )


@pytest.mark.parametrize(
    ("keys", "limits"),
    [
        (("a.example", "a.example"), Limits(Decimal("0.37"), None)),  # one budget
        (("a.example", "b.example"), Limits(Decimal(1), Decimal("0.37"))),  # one total
    ],
    ids=["budget", "total"],
)
def test_two_processes_on_one_file_never_exceed_a_budget(tmp_path, keys, limits):
    path = str(tmp_path / "ledger.sqlite3")
    ledgers = [open_ledger(path) for _ in keys]  # two connections: two processes
    barrier = threading.Barrier(len(keys))
    results: list[list[str | None]] = [[] for _ in keys]
    errors: list[BaseException] = []

    def crawl(n: int) -> None:
        book = PaymentBook(ledgers[n])
        try:
            for i in range(50):
                barrier.wait(timeout=30)  # both reserve at the same moment, every time
                results[n].append(book.reserve(_record(100 * n + i, keys[n]), limits))
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=crawl, args=(n,)) for n in range(len(keys))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        reserved = [r for rs in results for r in rs if r is None]
        assert len(reserved) == 37
        assert all(r in (keys[n], TOTAL_KEY) for n, rs in enumerate(results) for r in rs if r)
        assert ledgers[0].query(
            "SELECT spent FROM x402_budgets WHERE run_id = 'run-1' AND budget_key = ?",
            (TOTAL_KEY,),
        ) == [(37 * COUNT_UNITS // 100,)]
        assert ledgers[1].query(
            "SELECT COUNT(*) FROM x402_payments WHERE status = ?", (Status.RESERVED,)
        ) == [(37,)]
    finally:
        for ledger in ledgers:
            ledger.close()
