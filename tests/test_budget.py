from decimal import Decimal as D

from scrapy_x402._budget import TOTAL, Budgets


def budgets(**kw):
    limits = {"news.example": D("1"), "*.papers.example": D("0.10"), "*.a.papers.example": D("5")}
    return Budgets(limits, kw.get("default", D(0)), kw.get("max_total"), kw.get("spent"))


def test_most_specific_budget_wins():
    b = budgets()
    assert b.key_for("news.example") == "news.example"
    assert b.key_for("NEWS.example.") == "news.example"
    assert b.key_for("x.papers.example") == "*.papers.example"
    assert b.key_for("papers.example") == "*.papers.example"
    assert b.key_for("b.a.papers.example") == "*.a.papers.example"
    assert b.key_for("notpapers.example") == "notpapers.example"
    assert b.limit("notpapers.example") == D(0)  # unlisted: never paid by default


def test_reserve_exactly_up_to_the_limit_and_release():
    b = budgets()
    assert [b.reserve("*.papers.example", D("0.03")) for _ in range(4)] == [
        None,
        None,
        None,
        "*.papers.example",
    ]
    assert b.spent("*.papers.example") == D("0.09")
    b.release("*.papers.example", D("0.03"))
    assert b.reserve("*.papers.example", D("0.04")) is None
    assert b.spent("*.papers.example") == D("0.10")


def test_total_cap_and_resumed_spending():
    b = budgets(max_total=D("1.5"), spent={"news.example": D("0.9")})
    assert b.reserve("news.example", D("0.2")) == "news.example"  # 1.1 > 1
    assert b.reserve("*.a.papers.example", D("0.6")) is None  # total 1.5
    assert b.reserve("*.a.papers.example", D("0.01")) == TOTAL
