"""The exact scheme: signatures the token accepts, and budget held until they expire."""

from __future__ import annotations

import time
from decimal import Decimal

from eth_account import Account
from scrapy.utils.defer import deferred_f_from_coro_f
from scrapy.utils.test import get_crawler

from scrapy_x402._protocol import Offer
from scrapy_x402._session import X402Session
from scrapy_x402.ledger import PaymentRecord, Status
from scrapy_x402.schemes import ExactScheme


def offer_for(token, payee, amount=5_000, timeout=60, **extra):
    return Offer(
        "exact",
        f"eip155:{token.chain.chain_id}",
        amount,
        token.address,
        payee,
        timeout,
        None,
        {"name": "Test USD", "version": "2", **extra},
        {},
    )


def submit(token, payload, submitter):
    """What a facilitator does with the authorization: transferWithAuthorization on-chain."""
    a = payload["authorization"]
    function = token.contract.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )
    data = function(
        a["from"],
        a["to"],
        int(a["value"]),
        int(a["validAfter"]),
        int(a["validBefore"]),
        bytes.fromhex(a["nonce"][2:]),
        bytes.fromhex(payload["signature"][2:]),
    )._encode_transaction_data()
    return token.chain.transact(submitter, {"to": token.address, "data": data})


def test_the_token_accepts_the_signed_authorization(chain, token, payer):
    payee = Account.create().address
    signed = ExactScheme().sign(payer, offer_for(token, payee), "", int(time.time()), 300)
    submit(token, signed.payload, chain.new_account())
    assert token.balance_of(payee) == 5_000


def test_refusals():
    scheme = ExactScheme()
    base = Offer("exact", "eip155:84532", 1, "0x" + "11" * 20, "0x" + "22" * 20, 60, None, {}, {})
    assert scheme.refusal(base) == "token_domain_unknown"
    permit2 = Offer(
        **{
            **base.__dict__,
            "extra": {"name": "USDC", "version": "2", "assetTransferMethod": "permit2"},
        }
    )
    assert scheme.refusal(permit2) == "transfer_method_permit2"


def held_payments(session, chain, token, payer, count=2):
    """``count`` refused authorizations of 0.005 each, held (counted) by the session's book."""
    payee = Account.create().address
    payments = []
    for _ in range(count):
        signed = ExactScheme().sign(payer, offer_for(token, payee), "", int(time.time()), 300)
        record = PaymentRecord(
            signed.id,
            session.run_id,
            "exact",
            f"eip155:{chain.chain_id}",
            token.address,
            payer.address,
            payee,
            5_000,
            Decimal("0.005"),
            "pub.example",
            "pub.example",
            "http://pub.example/",
            signed.payload,
            signed.valid_until,
        )
        assert session.book.reserve(record, session.budgets.limits("pub.example")) is None
        assert session.book.not_served(signed.id, "refused", refused=True) == Status.HELD
        payments.append(signed)
    return payments


def exact_session(tmp_path, payer, monkeypatch, rpc_urls):
    monkeypatch.setenv("X402_PRIVATE_KEY", payer.key.hex())
    crawler = get_crawler(
        settings_dict={
            "X402_LEDGER_URI": str(tmp_path / "l.sqlite3"),
            "X402_BUDGETS": {"pub.example": "0.01"},
            "X402_RPC_URLS": rpc_urls,
        }
    )
    return X402Session.for_crawler(crawler)


def spent(session):
    return session.store.spent_by_budget(session.run_id).get("pub.example", Decimal(0))


@deferred_f_from_coro_f
async def test_expired_holds_are_released_only_when_the_chain_shows_them_unused(
    tmp_path, chain, token, payer, monkeypatch
):
    session = exact_session(tmp_path, payer, monkeypatch, {f"eip155:{chain.chain_id}": chain.url})
    now = int(time.time())
    payments = held_payments(session, chain, token, payer)
    # The server refused the first, yet submitted it anyway: the money moved.
    submit(token, payments[0].payload, chain.new_account())
    assert await session.release_expired_holds() == 0  # not expired yet: both stay held
    monkeypatch.setattr(time, "time", lambda: now + 301)  # past validBefore
    assert await session.release_expired_holds() == 1
    assert session.store.get_status(payments[0].id) == Status.SETTLED
    assert session.store.get_status(payments[1].id) == Status.EXPIRED
    assert spent(session) == Decimal("0.005")


@deferred_f_from_coro_f
async def test_without_an_rpc_url_expired_holds_stay_counted(
    tmp_path, chain, token, payer, monkeypatch
):
    """The facilitator may have settled a held authorization (a lost 504): with no chain to
    ask, it is never released, and `settle`/`report` show it held."""
    session = exact_session(tmp_path, payer, monkeypatch, {})
    now = int(time.time())
    payments = held_payments(session, chain, token, payer)
    submit(token, payments[0].payload, chain.new_account())  # collected behind our back
    monkeypatch.setattr(time, "time", lambda: now + 301)
    assert await session.release_expired_holds() == 0
    assert {session.store.get_status(p.id) for p in payments} == {Status.HELD}
    assert spent(session) == Decimal("0.01")


@deferred_f_from_coro_f
async def test_a_permit2_signature_that_expired_unused_gives_its_allowance_back(
    tmp_path, chain, token, payer, monkeypatch
):
    from scrapy import Request
    from scrapy.http import Response

    from scrapy_x402._chain import PERMIT2
    from tests.test_middleware import middleware, offer, response402

    chain.install_permit2()
    token.approve(payer, PERMIT2, 5_000)  # room for one payment
    monkeypatch.setenv("X402_PRIVATE_KEY", payer.key.hex())
    mw, crawler = middleware(
        {
            "X402_LEDGER_URI": str(tmp_path / "l.sqlite3"),
            "X402_BUDGETS": {"news.example": "1"},
            "X402_SCHEMES": ["exact"],
            "X402_ASSETS": token.asset_setting(),
            "X402_RPC_URLS": {f"eip155:{chain.chain_id}": chain.url},
        }
    )
    permit2 = offer(
        "5000",
        scheme="exact",
        network=f"eip155:{chain.chain_id}",
        asset=token.address,
        extra={"name": "Test USD", "version": "2", "assetTransferMethod": "permit2"},
    )
    first = response402(permit2)
    paid = await mw.process_response(first.request, first)
    assert isinstance(paid, Request)
    refused = Response(paid.url, status=402, request=paid)
    await mw.process_response(paid, refused)  # held: the server might still submit it
    second = response402(permit2)
    assert await mw.process_response(second.request, second) is second  # allowance used up
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 400)  # past its deadline, never submitted
    assert await mw.session.release_expired_holds() == 1
    third = response402(permit2)
    assert isinstance(await mw.process_response(third.request, third), Request)
    assert crawler.stats.get_value("x402/offer_refused/permit2_allowance") == 1


def test_an_upto_charge_is_read_only_from_the_settle_that_spent_our_signature(chain, token, payer):
    """A dishonest publisher names a transaction that carries our signature without spending
    it (here: a 1-unit transfer with the signature appended): the chain then says nothing about
    what the authorization cost, and the signed maximum stays counted."""
    from scrapy_x402.schemes import UptoScheme
    from scrapy_x402.schemes._permit2 import UPTO_PROXY, UPTO_WITNESS, sign_permit2

    payee = Account.create().address
    signed = sign_permit2(
        payer,
        chain.chain_id,
        token.address,
        10_000,
        UPTO_PROXY,
        int(time.time()) + 300,
        {"to": payee, "facilitator": payee, "validAfter": 0},
        UPTO_WITNESS,
    )
    transfer = token.contract.encode_abi("transfer", [payee, 1])
    decoy = bytes.fromhex(transfer[2:]) + bytes.fromhex(signed.payload["signature"][2:])
    receipt = chain.transact(payer, {"to": token.address, "data": decoy})
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    found = UptoScheme().charged(chain.w3, token.address, payee, signed.payload, tx_hash)
    assert found is None
