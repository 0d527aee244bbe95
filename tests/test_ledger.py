from dataclasses import replace
from decimal import Decimal

import pytest

from scrapy_x402.ledger import PaymentRecord, Settlement, Status, open_ledger


@pytest.fixture
def ledger(tmp_path):
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    yield ledger
    ledger.close()


def record(n, payee="0xP1", run="r1", usd="0.01", key="a.example"):
    return PaymentRecord(
        id=f"0x{n:064x}",
        run_id=run,
        scheme="deferred",
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


def test_lifecycle_and_what_budgets_count(ledger):
    for n in range(5):
        ledger.add(record(n))
    assert ledger.resolve(record(0).id, Status.ACCEPTED, receipt={"ok": 1})
    assert ledger.resolve(record(1).id, Status.REJECTED, reason="insufficient_funds")
    assert ledger.resolve(record(2).id, Status.FAILED, reason="http_500")
    assert not ledger.resolve(record(0).id, Status.REJECTED)  # only from reserved
    # reserved (3, 4) and accepted (0) count; refused ones do not
    assert ledger.spent_by_budget("r1") == {"a.example": Decimal("0.03")}
    assert ledger.spent_by_budget("other-run") == {}
    assert [d.id for d in ledger.in_doubt("r1")] == [record(3).id, record(4).id]
    assert ledger.in_doubt("r1", expired_before=1) == []  # valid_until 1: not expired before 1
    assert len(ledger.in_doubt(expired_before=2)) == 2


def test_owed_totals_group_by_payee_and_keep_big_amounts_exact(ledger):
    for n, payee in enumerate(["0xP1", "0xP2", "0xP1"]):
        ledger.add(record(n, payee))
        ledger.resolve(record(n).id, Status.ACCEPTED)
    owed = ledger.owed("0xME")
    assert [(o.payee, o.amount, len(o.payment_ids)) for o in owed] == [
        ("0xP1", 2 * 10**30 + 2, 2),
        ("0xP2", 10**30 + 1, 1),
    ]
    assert ledger.owed("0xSOMEONE_ELSE") == []


def test_settlement_confirm_and_fail(ledger):
    for n in range(2):
        ledger.add(record(n))
        ledger.resolve(record(n).id, Status.ACCEPTED)
    owed = ledger.owed("0xME")[0]
    s = Settlement(
        "0xTX1",
        owed.network,
        owed.asset,
        owed.payer,
        owed.payee,
        owed.amount,
        2,
        "pending",
        "0xRAW",
        7,
    )
    assert ledger.begin_settlement(s, owed.payment_ids)
    assert ledger.owed("0xME") == []
    assert [x.id for x in ledger.settlements("signed")] == ["0xTX1"]
    # Never two settlements for one payment: refused whole, nothing written.
    assert not ledger.begin_settlement(replace(s, id="0xTX2"), owed.payment_ids)
    ledger.finish_settlement("0xTX1", "replaced", reason="replaced")
    assert ledger.owed("0xME")[0].payment_ids == owed.payment_ids  # owed again
    assert ledger.begin_settlement(replace(s, id="0xTX3"), owed.payment_ids)
    ledger.mark_settlement("0xTX3", "observed", block=12)
    ledger.finish_settlement("0xTX3", "confirmed")
    assert {ledger.get_status(i) for i in owed.payment_ids} == {Status.SETTLED}
    assert [(x.id, x.status, x.block_number) for x in ledger.settlements()] == [
        ("0xTX1", "replaced", None),
        ("0xTX3", "confirmed", 12),
    ]


def test_unsupported_uri_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        open_ledger("postgresql://localhost/x402")
