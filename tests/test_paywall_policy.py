"""The publisher's credit policy (PayerPolicy, through PaywallResource's policy hook) on a real
server: refused before serving, with its own reason, and the refused commitment is not used
up: it buys the page once the policy allows it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account

from scrapy_x402._webbotauth import BotIdentity
from tests.mockserver import MockServer
from tests.test_paywall_serving import PRICE, TOKEN, commitment_for, get

PAYEE = Account.create().address
ALLOWED, STRANGER, BORROWER, LATE, BOT_PAYER, OTHER = (Account.create() for _ in range(6))
BOT = BotIdentity.generate()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockServer]:
    def section(**policy: Any) -> dict[str, Any]:
        return {"payee": PAYEE, "price": PRICE, "policy": policy}

    config = {
        "network": "eip155:31337",
        "asset": TOKEN,
        "sections": {
            "members": section(payers=[ALLOWED.address.lower()]),
            "credit": section(credit_limit=2 * PRICE + PRICE // 2),
            "overdue": section(max_debt_age=600),
            "held": {**section(credit_limit=PRICE), "hold": "response"},
            "bots": section(
                bot_keys=[BOT.public_jwk()], identities={BOT.keyid: [BOT_PAYER.address]}
            ),
        },
    }
    with MockServer(config, tmp_path_factory.mktemp("policy")) as server:
        yield server


def buy(server: MockServer, path: str, account: Any, header: str | None = None):
    """GET ``path`` paying with ``header`` (a fresh commitment when None): (answer, header)."""
    url = f"{server.url}{path}"
    if header is None:
        header, _ = commitment_for(url, PAYEE, account)
    return get(url, {"PAYMENT-SIGNATURE": header}), header


def book(server: MockServer) -> sqlite3.Connection:
    return sqlite3.connect(str(server.book) + ".sqlite3", isolation_level=None)


def reconcile(server: MockServer, payer: str) -> None:
    """What reconciliation does when a transfer paid the payer's commitments: rows in x402_paid."""
    with book(server) as db:
        db.execute(
            "INSERT INTO x402_paid SELECT id, ?, ? FROM x402_accepted WHERE payer = ?",
            ("0x" + "ab" * 32, int(time.time()), payer),
        )


def test_only_listed_payers_get_credit(server):
    refused, _ = buy(server, "/members/1", STRANGER)
    assert (refused.status, refused.reason) == (402, "payer_not_allowed")
    served, _ = buy(server, "/members/1", ALLOWED)
    assert served.status == 200
    assert all(c["payer"] != STRANGER.address for c in server.served())


def test_credit_is_limited_per_payer_until_reconciliation_pays_it(server):
    for page in (1, 2):
        assert buy(server, f"/credit/{page}", BORROWER)[0].status == 200
    refused, header = buy(server, "/credit/3", BORROWER)  # 2000 owed + 1000 > 2500
    assert (refused.status, refused.reason) == (402, "credit_limit_exceeded")
    reconcile(server, BORROWER.address)
    served, _ = buy(server, "/credit/3", BORROWER, header)  # the same commitment: not used up
    assert served.status == 200


def test_a_payer_with_an_overdue_debt_is_refused_until_it_pays(server):
    assert buy(server, "/overdue/1", LATE)[0].status == 200
    assert buy(server, "/overdue/2", LATE)[0].status == 200  # a recent debt is fine
    with book(server) as db:  # the first page was served an hour ago
        db.execute(
            "UPDATE x402_accepted SET accepted_at = accepted_at - 3600 "
            "WHERE payer = ? AND url LIKE '%/overdue/1'",
            (LATE.address,),
        )
    refused, header = buy(server, "/overdue/3", LATE)
    assert (refused.status, refused.reason) == (402, "overdue_debt")
    reconcile(server, LATE.address)
    assert buy(server, "/overdue/3", LATE, header)[0].status == 200


def test_a_payer_bound_to_a_web_bot_auth_identity_pays_only_with_it(server):
    url = f"{server.url}/bots/1"
    header, commitment_id = commitment_for(url, PAYEE, BOT_PAYER)
    unsigned = get(url, {"PAYMENT-SIGNATURE": header})
    assert (unsigned.status, unsigned.reason) == (402, "identity_required")
    other_header, _ = commitment_for(url, PAYEE, OTHER)
    signed_other = {"PAYMENT-SIGNATURE": other_header}
    signed_other.update(BOT.sign_request("GET", url, signed_other))
    mismatch = get(url, signed_other)
    assert (mismatch.status, mismatch.reason) == (402, "identity_mismatch")
    stranger = BotIdentity.generate()  # a signature by a key the publisher does not know
    forged = {"PAYMENT-SIGNATURE": header}
    forged.update(stranger.sign_request("GET", url, forged))
    assert get(url, forged).reason == "identity_required"
    signed = {"PAYMENT-SIGNATURE": header}
    signed.update(BOT.sign_request("GET", url, signed))
    served = get(url, signed)  # the commitment refused above: not used up
    assert served.status == 200
    assert commitment_id in {c["id"] for c in server.served()}


def test_commitments_in_flight_count_against_the_credit_limit(server):
    """A fresh key sending many requests at once: the ones in flight are credit too (found by
    review: 30 concurrent requests of a throwaway key were all served on a one-page limit)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_crash import wait_for

    payer = Account.create()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(buy, server, "/held/1", payer)
        wait_for(lambda: server.pending() == 1, timeout=20)
        others = [buy(server, f"/held/{i}", payer)[0] for i in range(2, 5)]
        assert [(a.status, a.reason) for a in others] == [(402, "credit_limit_exceeded")] * 3
        server.release(200, stop=True)
        assert first.result()[0].status == 200
