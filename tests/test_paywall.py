"""The publisher's verifier: every rule of docs/deferred-scheme.md has its own reason."""

import time
from dataclasses import replace

import pytest
from eth_account import Account

from scrapy_x402._protocol import (
    Challenge,
    Offer,
    b64json_decode,
    b64json_encode,
    payment_header,
)
from scrapy_x402.paywall import (
    Commitment,
    DeferredVerifier,
    MemoryNonceStore,
    PaymentRejected,
    SQLiteNonceStore,
)
from scrapy_x402.schemes.deferred import DeferredScheme

NOW = 1_700_000_000
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYEE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
URL = "http://pub.example/a/1"


@pytest.fixture
def verifier():
    return DeferredVerifier("eip155:31337", TOKEN, PAYEE, clock=lambda: NOW)


def pay(verifier, account=None, url=URL, now=NOW, version=2, **changes):
    """A header as the crawler builds it, for the verifier's own offer (with changes)."""
    raw = {**verifier.offer(1000, url, version), **changes}
    offer = Offer(
        "deferred",
        raw["network"] if ":" in raw["network"] else "eip155:31337",
        int(raw.get("amount", raw.get("maxAmountRequired"))),
        raw["asset"],
        raw["payTo"],
        60,
        url,
        {},
        raw,
    )
    signed = DeferredScheme().sign(account or Account.create(), offer, url, now, 300)
    challenge = Challenge(version, (offer,), {"url": url}, None, {})
    return payment_header(challenge, offer, signed.payload)[1], signed


def test_accepts_a_valid_commitment_and_issues_a_receipt(verifier):
    header, signed = pay(verifier)
    commitment = verifier.verify(header, 1000, URL)
    assert commitment.id == signed.id
    receipt = verifier.receipt(commitment)
    assert receipt["success"] is True and receipt["extra"]["commitmentId"] == signed.id


def test_accepts_v1_x_payment(verifier):
    header, _ = pay(verifier, version=1)
    assert verifier.verify(header, 1000, URL).amount == 1000


def test_a_commitment_may_be_resent_until_served_and_never_replayed(verifier):
    account = Account.create()
    header, _ = pay(verifier, account)
    first = verifier.verify(header, 1000, URL)
    with pytest.raises(PaymentRejected, match="payment_in_flight"):  # while it is served
        verifier.verify(header, 1000, URL)
    verifier.nonces.release(first.payer, first.nonce)  # that request failed (a 5xx)
    assert verifier.verify(header, 1000, URL).id == first.id  # a resend after a failure
    verifier.nonces.served(first.payer, first.nonce)
    verifier.nonces.release(first.payer, first.nonce)  # too late: a 2xx went out
    with pytest.raises(PaymentRejected, match="nonce_reused"):  # a replay of a served page
        verifier.verify(header, 1000, URL)
    # The same payer signs a different commitment (more money) under the same nonce.
    reused = replace(first, amount=2000)
    envelope = b64json_decode(header)
    envelope["payload"] = {
        "commitment": reused.to_json(),
        "signature": "0x" + account.sign_message(reused.signable()).signature.hex(),
    }
    with pytest.raises(PaymentRejected, match="nonce_reused"):
        verifier.verify(b64json_encode(envelope), 2000, URL)


def test_replays_are_refused_across_two_publisher_processes(tmp_path):
    """Two processes of one publisher share a SQLiteNonceStore: a commitment served by one
    is refused by the other."""
    import urllib.error
    import urllib.request

    from tests.mockserver import MockServer

    payee = Account.create().address
    config = {
        "network": "eip155:31337",
        "asset": TOKEN,
        "nonce_store": str(tmp_path / "nonces.sqlite3"),
        "sections": {"news": {"payee": payee, "price": 1000}},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with MockServer(config, tmp_path / "a") as a, MockServer(config, tmp_path / "b") as b:
        # Both serve "the same site": the client names one host for the resource it pays for.
        host = a.url.removeprefix("http://")
        url = f"http://{host}/news/1"
        header, _ = pay(
            DeferredVerifier("eip155:31337", TOKEN, payee), url=url, now=int(time.time())
        )

        def get(server_url: str) -> int:
            request = urllib.request.Request(
                f"{server_url}/news/1", headers={"PAYMENT-SIGNATURE": header, "Host": host}
            )
            try:
                with urllib.request.urlopen(request) as response:
                    return int(response.status)
            except urllib.error.HTTPError as e:
                return e.code

        assert get(a.url) == 200
        assert get(b.url) == 402  # the same commitment, replayed at the other process
        assert get(a.url) == 402
        assert len(a.accepted()) == 1 and b.accepted() == []


@pytest.mark.parametrize(
    ("changes", "amount", "url", "reason"),
    [
        ({"payTo": "0x" + "99" * 20}, 1000, URL, "wrong_payee"),
        ({"asset": "0x" + "98" * 20}, 1000, URL, "wrong_token"),
        ({"network": "eip155:1"}, 1000, URL, "invalid_network"),
        ({}, 1001, URL, "underpaid"),
        ({}, 999, URL, "amount_mismatch"),  # the commitment is the price, not a blank cheque
        ({"amount": str(2**256 - 1)}, 1000, URL, "amount_mismatch"),
        ({}, 1000, "http://pub.example/a/2", "wrong_resource"),
        ({"scheme": "exact"}, 1000, URL, "unsupported_scheme"),
    ],
)
def test_rejections(verifier, changes, amount, url, reason):
    header, _ = pay(verifier, **changes)
    with pytest.raises(PaymentRejected, match=reason):
        verifier.verify(header, amount, url)


def test_expired_commitment_is_rejected(verifier):
    header, _ = pay(verifier, now=NOW - 3600)
    with pytest.raises(PaymentRejected, match="expired"):
        verifier.verify(header, 1000, URL)


def test_commitment_for_another_chain_does_not_verify(verifier):
    other = DeferredVerifier("eip155:84532", TOKEN, PAYEE, clock=lambda: NOW)
    header, _ = pay(other)
    decoded = b64json_decode(header)
    decoded["accepted"]["network"] = "eip155:31337"  # lie about the chain in the envelope
    with pytest.raises(PaymentRejected, match="invalid_signature"):
        verifier.verify(b64json_encode(decoded), 1000, URL)


def test_forged_signature_and_garbage(verifier):
    header, _ = pay(verifier)
    decoded = b64json_decode(header)
    decoded["payload"]["commitment"]["amount"] = "999999"  # signed for 1000
    with pytest.raises(PaymentRejected, match="invalid_signature"):
        verifier.verify(b64json_encode(decoded), 999999, URL)
    decoded["payload"]["signature"] = "0x" + "00" * 65
    with pytest.raises(PaymentRejected, match="invalid_signature"):
        verifier.verify(b64json_encode(decoded), 999999, URL)
    for garbage in (
        "not base64!",
        b64json_encode([1]),
        b64json_encode({"x402Version": 2, "payload": {}}),
    ):
        with pytest.raises(PaymentRejected):
            verifier.verify(garbage, 1000, URL)


def test_a_commitment_signed_by_someone_else_than_its_payer(verifier):
    payer, impostor = Account.create(), Account.create()
    header, _ = pay(verifier, payer)
    envelope = b64json_decode(header)
    commitment = Commitment.from_json(31337, envelope["payload"]["commitment"])
    envelope["payload"]["signature"] = (
        "0x" + impostor.sign_message(commitment.signable()).signature.hex()
    )
    with pytest.raises(PaymentRejected, match="invalid_signature"):
        verifier.verify(b64json_encode(envelope), 1000, URL)


def test_nonces_are_kept_past_expiry_whatever_the_other_process_clock(tmp_path):
    """Two processes share a SQLiteNonceStore and their clocks differ by 2 s: the one ahead
    must not forget a nonce the one behind still takes for valid."""
    path = str(tmp_path / "nonces.sqlite3")
    behind = DeferredVerifier(
        "eip155:31337",
        TOKEN,
        PAYEE,
        clock=lambda: NOW,
        nonces=SQLiteNonceStore(path, clock=lambda: NOW),
    )
    ahead = DeferredVerifier(
        "eip155:31337",
        TOKEN,
        PAYEE,
        clock=lambda: NOW + 2,
        nonces=SQLiteNonceStore(path, clock=lambda: NOW + 2),
    )
    header, _ = pay(behind, now=NOW - 59)  # valid until NOW + 1 (pay() signs for 60 s)
    served = behind.verify(header, 1000, URL)
    behind.nonces.served(served.payer, served.nonce)
    # The process ahead claims another commitment: it prunes what it thinks has expired.
    other, _ = pay(ahead, now=NOW + 2)
    ahead.verify(other, 1000, URL)
    with pytest.raises(PaymentRejected, match="nonce_reused"):  # not "accepted again"
        behind.verify(header, 1000, URL)


def test_a_claim_that_waited_for_the_lock_checks_expiry_again(tmp_path):
    """The verifier checked expiry at NOW; the claim ran 5 s later (it waited for another
    process' transaction), after the commitment expired: refused, by the store's clock."""
    stores = [
        SQLiteNonceStore(str(tmp_path / "nonces.sqlite3"), clock=lambda: NOW + 5),
        MemoryNonceStore(clock=lambda: NOW + 5),
    ]
    for store in stores:
        verifier = DeferredVerifier("eip155:31337", TOKEN, PAYEE, clock=lambda: NOW, nonces=store)
        header, _ = pay(verifier, now=NOW - 57)  # valid until NOW + 3
        with pytest.raises(PaymentRejected, match="expired"):
            verifier.verify(header, 1000, URL)


@pytest.mark.parametrize("version", [2.0, True, "2", None, 3])
def test_a_payment_whose_x402_version_is_not_the_integer_1_or_2_is_invalid(verifier, version):
    header, _ = pay(verifier)
    decoded = b64json_decode(header)
    decoded["x402Version"] = version
    with pytest.raises(PaymentRejected, match="invalid_payload"):
        verifier.verify(b64json_encode(decoded), 1000, URL)


def test_a_version_1_client_is_refused_only_where_version_2_requires_it(verifier):
    """Spec version 2 kept the commitment (EIP-712 domain version "1"), its id and the header:
    a version-1 client's commitment for the price verifies. Version 1 let a commitment exceed
    the price; version 2 refuses that, and only that (its settlement by hash is reconciled when
    it covers all that is owed: test_reconcile.py)."""
    header, signed = pay(verifier)  # what a version-1 client sends for a 1000 offer
    decoded = b64json_decode(header)
    assert decoded["payload"]["commitment"]["amount"] == "1000"
    assert verifier.verify(header, 1000, URL).id == signed.id
    more, _ = pay(verifier, amount="1500")  # valid in version 1 (at least the price)
    with pytest.raises(PaymentRejected, match="amount_mismatch"):
        verifier.verify(more, 1000, URL)
