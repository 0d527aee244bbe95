from decimal import Decimal as D

from scrapy_x402._budget import TOTAL, Budgets


def budgets(**kw):
    limits = {"news.example": D("1"), "*.papers.example": D("0.10"), "*.a.papers.example": D("5")}
    return Budgets(limits, kw.get("default", D(0)), kw.get("max_total"))


def test_most_specific_budget_wins():
    b = budgets()
    assert b.key_for("news.example") == "news.example"
    assert b.key_for("NEWS.example.") == "news.example"
    assert b.key_for("x.papers.example") == "*.papers.example"
    assert b.key_for("papers.example") == "*.papers.example"
    assert b.key_for("b.a.papers.example") == "*.a.papers.example"
    assert b.key_for("notpapers.example") == "notpapers.example"
    assert b.limit("notpapers.example") == D(0)  # unlisted: never paid by default


def test_limits_of_a_reservation():
    b = budgets(max_total=D("1.5"))
    assert b.limits("*.papers.example").budget == D("0.10")
    assert b.limits("*.papers.example").total == D("1.5")
    assert b.limit(TOTAL) == D("1.5")
