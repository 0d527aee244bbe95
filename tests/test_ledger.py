"""The store and the PaymentBook: every transition, budgets enforced by the store, and the
schema's versions."""

import sqlite3
from dataclasses import replace
from decimal import Decimal

import pytest

from scrapy_x402.ledger import PaymentRecord, SchemaTooNew, Settlement, Status, open_ledger
from scrapy_x402.ledger._base import TOTAL_KEY
from scrapy_x402.payments import SETTLEMENT_TRANSITIONS, TRANSITIONS, Limits, PaymentBook

PLENTY = Limits(Decimal(100), None)


@pytest.fixture
def ledger(tmp_path):
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    yield ledger
    ledger.close()


@pytest.fixture
def book(ledger):
    return PaymentBook(ledger)


def record(n, payee="0xP1", run="r1", usd="0.01", key="a.example", scheme="deferred"):
    return PaymentRecord(
        id=f"0x{n:064x}",
        run_id=run,
        scheme=scheme,
        network="eip155:31337",
        asset="0xT",
        payer="0xME",
        payee=payee,
        amount=10**30 + n,
        usd=Decimal(usd),
        domain=key,
        budget_key=key,
        url=f"http://{key}/{n}",
        payload={"signature": "0x00"},
        valid_until=1,
    )


def test_lifecycle_and_what_budgets_count(book, ledger):
    for n in range(5):
        assert book.reserve(record(n), PLENTY) is None
    assert book.confirm(record(0).id, Status.ACCEPTED, receipt={"ok": 1})
    assert book.not_served(record(1).id, "insufficient_funds", refused=True) == Status.REJECTED
    assert book.not_served(record(2).id, "http_500") == Status.FAILED
    assert not book.confirm(record(1).id, Status.ACCEPTED)  # refused: never served after
    assert book.invalid_transitions == 1
    # reserved (3, 4) and accepted (0) count; refused ones do not
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.03")}
    assert ledger.spent_by_budget("other-run") == {}
    assert [d.id for d in ledger.in_doubt("r1")] == [record(3).id, record(4).id]
    assert ledger.in_doubt("r1", expired_before=1) == []  # valid_until 1: not expired before 1
    assert len(ledger.in_doubt(expired_before=2)) == 2


def test_the_store_refuses_a_reservation_beyond_the_budget_or_the_total(book, ledger):
    tight = Limits(Decimal("0.03"), Decimal("0.05"))
    assert [book.reserve(record(n), tight) for n in range(4)] == [None, None, None, "a.example"]
    assert ledger.get_status(record(3).id) is None  # refused: not recorded at all
    assert book.reserve(record(10, key="b.example"), tight) is None  # total 0.04
    assert book.reserve(record(11, key="b.example", usd="0.02"), tight) == TOTAL_KEY
    assert book.not_served(record(0).id, "http_404") == Status.FAILED  # released
    assert book.reserve(record(12, key="b.example"), tight) is None
    assert ledger.spent_by_budget("r1") == {
        "a.example": Decimal("0.02"),
        "b.example": Decimal("0.02"),
    }


def test_upto_counts_what_was_charged(book, ledger):
    assert book.reserve(record(0, scheme="upto", usd="0.01"), PLENTY) is None
    assert book.confirm(record(0).id, Status.SETTLED, amount=4, usd=Decimal("0.004"))
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.004")}


def test_held_payments_are_counted_until_they_expire_or_are_collected(book, ledger):
    for n in range(3):
        book.reserve(record(n, scheme="exact"), PLENTY)
        assert book.not_served(record(n).id, "refused", refused=True) == Status.HELD
    assert book.not_served(record(0).id, "again") == Status.HELD  # sent again, not served
    assert book.expire(record(0).id, "expired uncollected")
    assert book.collected(record(1).id, "collected anyway")
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.02")}
    assert not book.expire(record(1).id, "settled: cannot expire")


def test_resend_of_a_resumed_payment(book, ledger):
    tight = Limits(Decimal("0.02"), None)
    book.reserve(record(0), tight)
    book.reserve(record(1, scheme="exact"), tight)
    assert book.resend(record(0).id, tight)  # still reserved: counted once
    book.not_served(record(1).id, "in doubt after a crash")  # held
    assert book.resend(record(1).id, tight)  # held: still counted, may go
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.02")}
    book.not_served(record(0).id, "not served")  # released...
    assert book.reserve(record(2), tight) is None  # ...and taken by another page
    assert not book.resend(record(0).id, tight)  # no room: it must not leave
    assert ledger.get_status(record(0).id) == Status.FAILED
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.02")}


def test_owed_totals_group_by_payee_and_keep_big_amounts_exact(book, ledger):
    for n, payee in enumerate(["0xP1", "0xP2", "0xP1"]):
        book.reserve(record(n, payee), PLENTY)
        book.confirm(record(n).id, Status.ACCEPTED)
    owed = ledger.owed("0xME")
    assert [(o.payee, o.amount, len(o.payment_ids)) for o in owed] == [
        ("0xP1", 2 * 10**30 + 2, 2),
        ("0xP2", 10**30 + 1, 1),
    ]
    assert ledger.owed("0xSOMEONE_ELSE") == []


def test_settlement_confirm_and_replace(book, ledger):
    from scrapy_x402.ledger import IllegalTransition

    for n in range(2):
        book.reserve(record(n), PLENTY)
        book.confirm(record(n).id, Status.ACCEPTED)
    owed = ledger.owed("0xME")[0]
    s = Settlement(
        "0xTX1",
        owed.network,
        owed.asset,
        owed.payer,
        owed.payee,
        owed.amount,
        2,
        "signed",
        "0xRAW",
        7,
    )
    assert book.settle_begin(s, owed.payment_ids)
    assert ledger.owed("0xME") == []
    assert [x.id for x in ledger.settlements("signed")] == ["0xTX1"]
    assert not book.settle_begin(replace(s, id="0xTX2"), owed.payment_ids)  # never two
    with pytest.raises(IllegalTransition):
        book.settle_end("0xTX1", "confirmed")  # never seen mined
    book.settle_end("0xTX1", "replaced", reason="nonce used by another transaction")
    assert ledger.owed("0xME")[0].payment_ids == owed.payment_ids  # owed again
    assert book.settle_begin(replace(s, id="0xTX3"), owed.payment_ids)
    book.settle_mark("0xTX3", "broadcast")
    book.settle_mark("0xTX3", "observed", block=9)
    book.settle_end("0xTX3", "confirmed")
    assert {ledger.get_status(i) for i in owed.payment_ids} == {Status.SETTLED}
    # The refused 0xTX2 was rolled back whole.
    assert [(x.id, x.status) for x in ledger.settlements()] == [
        ("0xTX1", "replaced"),
        ("0xTX3", "confirmed"),
    ]
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.02")}


def test_every_declared_transition_has_a_budget_effect():
    assert set(TRANSITIONS.values()) <= {"reserve", "charge", "keep", "release"}
    for status, following in SETTLEMENT_TRANSITIONS.items():
        assert following <= set(SETTLEMENT_TRANSITIONS), status


def test_a_schema_1_ledger_is_migrated_with_its_budgets(tmp_path):
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    columns = (
        "id, run_id, created_at, updated_at, status, scheme, network, asset, payer, payee, "
        "amount, usd, domain, budget_key, url, valid_until, payload, receipt, reason, settlement_id"
    )
    conn.execute(f"CREATE TABLE x402_payments ({columns})")
    for n, status in enumerate([Status.ACCEPTED, Status.RESERVED, Status.FAILED]):
        conn.execute(
            f"INSERT INTO x402_payments ({columns}) VALUES "
            "(?, 'r1', 0, 0, ?, 'deferred', 'n', 'a', 'me', 'p', '10', '0.01', 'd', 'd', 'u', 0, '{}', "
            "NULL, NULL, NULL)",
            (f"0x{n}", status),
        )
    conn.commit()
    conn.close()
    ledger = open_ledger(str(path))
    assert ledger.spent_by_budget("r1") == {"d": Decimal("0.02")}
    book = PaymentBook(ledger)
    assert book.not_served("0x1", "never served") == Status.FAILED
    assert ledger.spent_by_budget("r1") == {"d": Decimal("0.01")}
    ledger.close()
    ledger = open_ledger(str(path))  # opened again: counted once, not twice
    assert ledger.spent_by_budget("r1") == {"d": Decimal("0.01")}
    ledger.execute("UPDATE x402_meta SET value = '99' WHERE name = 'schema_version'")
    ledger.close()
    with pytest.raises(SchemaTooNew, match="newer scrapy-x402"):
        open_ledger(str(path))


def test_a_failed_commit_leaves_no_transaction_open(book, ledger, monkeypatch):
    real = ledger._conn
    fail = {"commit": True}

    class FlakyConnection:
        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *args):
            if sql == "COMMIT" and fail.pop("commit", False):
                raise sqlite3.OperationalError("disk I/O error")
            return real.execute(sql, *args)

    monkeypatch.setattr(ledger, "_conn", FlakyConnection())
    with pytest.raises(sqlite3.OperationalError):
        book.reserve(record(0), PLENTY)
    assert not real.in_transaction
    assert ledger.get_status(record(0).id) is None  # nothing of it was kept
    assert book.reserve(record(1), PLENTY) is None  # and the next one is recorded
    assert ledger.get_status(record(1).id) == Status.RESERVED


def test_unsupported_uri_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        open_ledger("postgresql://localhost/x402")
