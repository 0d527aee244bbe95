"""PaywallResource on real Twisted servers (tests/mockserver, in subprocesses): a commitment is
owed exactly when a 2xx status line of its page is sent, once, whoever presents it how often."""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any
from urllib.parse import urlsplit

from eth_account import Account

from scrapy_x402._protocol import b64json_decode
from scrapy_x402.paywall import DeferredVerifier
from tests.mockserver import MockServer
from tests.test_paywall import TOKEN, pay

PRICE = 1000
WAIT = 20  # seconds a test waits for what the fixed code answers at once, before failing


def config(payee: str, **section: Any) -> dict[str, Any]:
    return {
        "network": "eip155:31337",
        "asset": TOKEN,
        "sections": {"news": {"payee": payee, "price": PRICE, **section}},
    }


def commitment_for(url: str, payee: str, account: Any = None) -> tuple[str, str]:
    """A PAYMENT-SIGNATURE header as the crawler signs it for ``url``, and its commitment id."""
    verifier = DeferredVerifier("eip155:31337", TOKEN, payee)
    header, signed = pay(verifier, account, url=url, now=int(time.time()))
    return header, signed.id


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def receipt(self) -> dict[str, Any] | None:
        value = self.headers.get("PAYMENT-RESPONSE")
        return None if value is None else b64json_decode(value)

    @property
    def reason(self) -> str | None:
        return (self.receipt or {}).get("errorReason")


def get(url: str, headers: dict[str, str], *, body: bool = True) -> Answer:
    """One GET, redirects not followed; with ``body=False`` only the status and headers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=WAIT + 10)
    try:
        conn.request("GET", parts.path, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read() if body else b"")
    finally:
        conn.close()


def accepted_by_status_endpoint(server: MockServer, commitment_id: str) -> bool:
    answer = get(f"{server.url}/.well-known/x402-deferred/{commitment_id}", {})
    return bool(json.loads(answer.body)["accepted"])


def raw_exchange(server: MockServer, request: bytes, until: bytes) -> bytes:
    """Send raw request bytes; read until ``until`` arrives; then reset the connection (RST,
    not FIN), as a client that got what it wanted and left would."""
    parts = urlsplit(server.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
    try:
        sock.sendall(request)
        received = b""
        while until not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def test_a_page_that_finishes_inside_render_is_owed_once(tmp_path):
    """twisted.web.template.renderElement writes and finishes the response inside render."""
    payee = Account.create().address
    with MockServer(config(payee, template=True), tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        answers = [get(url, {"PAYMENT-SIGNATURE": header}) for _ in range(3)]
        assert [a.status for a in answers] == [200, 402, 402]
        assert b"story" in answers[0].body
        assert answers[0].receipt is not None
        assert answers[0].receipt["extra"]["commitmentId"] == commitment_id
        assert [a.reason for a in answers[1:]] == ["nonce_reused", "nonce_reused"]
        assert [c["id"] for c in server.served()] == [commitment_id]
        assert accepted_by_status_endpoint(server, commitment_id)


def test_one_commitment_presented_eight_times_at_once_to_two_processes_is_served_once(
    tmp_path,
):
    """Two processes of one publisher share a SQLiteNonceStore; the page is held until the
    test releases it, so all eight presentations overlap: one is served, seven are refused
    while it is in flight."""
    payee = Account.create().address
    site = config(payee, hold="response")
    site["nonce_store"] = str(tmp_path / "nonces.sqlite3")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with MockServer(site, tmp_path / "a") as a, MockServer(site, tmp_path / "b") as b:
        host = urlsplit(a.url).netloc  # one site: the client names one host for what it pays
        header, commitment_id = commitment_for(f"http://{host}/news/1", payee)
        headers = {"PAYMENT-SIGNATURE": header, "Host": host}
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(get, f"{s.url}/news/1", headers) for s in (a, b) * 4]
            refused = []
            pending = set(answers)
            deadline = time.monotonic() + WAIT
            while len(refused) < 7 and pending and time.monotonic() < deadline:
                done, pending = wait(
                    pending, timeout=deadline - time.monotonic(), return_when=FIRST_COMPLETED
                )
                refused += done
            a.release(200)
            b.release(200)
            results = [f.result() for f in answers]
        assert sorted(r.status for r in results) == [200] + [402] * 7
        assert {r.reason for r in results if r.status == 402} == {"payment_in_flight"}
        assert [c["id"] for c in a.served() + b.served()] == [commitment_id]
        assert len(a.accepted() + b.accepted()) == 1  # the publishers' "owed" log


def test_a_commitment_in_flight_is_released_by_a_5xx_and_served_on_resend(tmp_path):
    payee = Account.create().address
    with MockServer(config(payee, hold="response"), tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        headers = {"PAYMENT-SIGNATURE": header}
        with ThreadPoolExecutor(2) as pool:
            first, second = (pool.submit(get, url, headers) for _ in range(2))
            wait([first, second], timeout=WAIT, return_when=FIRST_COMPLETED)
            server.release(500, stop=True)  # the held one fails; later requests pass
            answers = sorted((first.result(), second.result()), key=lambda a: a.status)
        assert [a.status for a in answers] == [402, 500]
        assert answers[0].reason == "payment_in_flight"
        assert answers[1].receipt is None  # no receipt for a page not served
        assert server.served() == []
        assert not accepted_by_status_endpoint(server, commitment_id)
        resent = get(url, headers)  # the client's retry, with the same payment
        assert resent.status == 200
        assert resent.receipt is not None and resent.receipt["success"] is True
        assert [c["id"] for c in server.served()] == [commitment_id]


def test_a_client_that_reads_the_page_and_resets_before_finish_owes_it(tmp_path):
    """The page's status line and body are sent, its response is not finished; the client
    reads it all and resets the connection. The page was delivered: it is owed, and the
    commitment cannot buy it again."""
    payee = Account.create().address
    with MockServer(config(payee, hold="finish"), tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        host = urlsplit(url).netloc
        request = (
            f"GET /news/1 HTTP/1.0\r\nHost: {host}\r\nPAYMENT-SIGNATURE: {header}\r\n\r\n"
        ).encode()
        received = raw_exchange(server, request, until=b"</html>")
        assert received.startswith(b"HTTP/1.0 200 ")
        assert b"</html>" in received and b"\r\npayment-response: " in received.lower()
        assert [c["id"] for c in server.served()] == [commitment_id]
        assert accepted_by_status_endpoint(server, commitment_id)
        again = get(url, {"PAYMENT-SIGNATURE": header}, body=False)
        assert (again.status, again.reason) == (402, "nonce_reused")


def test_3xx_and_304_are_not_owed_and_carry_no_receipt(tmp_path):
    payee = Account.create().address
    site = config(payee, etag=True)
    site["sections"]["old"] = {"payee": payee, "price": PRICE, "answer": 302}
    with MockServer(site, tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        revalidated = get(url, {"PAYMENT-SIGNATURE": header, "If-None-Match": '"v1"'})
        assert revalidated.status == 304
        assert revalidated.receipt is None
        moved_url = f"{server.url}/old/1"
        moved_header, moved_id = commitment_for(moved_url, payee)
        moved = get(moved_url, {"PAYMENT-SIGNATURE": moved_header})
        assert moved.status == 302
        assert moved.receipt is None
        assert server.served() == [] and server.accepted() == []
        assert not accepted_by_status_endpoint(server, commitment_id)
        assert not accepted_by_status_endpoint(server, moved_id)
        # Not owed, so not used up: the same commitment buys the page itself.
        page = get(url, {"PAYMENT-SIGNATURE": header})
        assert page.status == 200 and page.receipt is not None
        assert [c["id"] for c in server.served()] == [commitment_id]


def test_a_5xx_is_not_owed_and_the_resend_is_logged_owed_once(tmp_path):
    """The publisher logs "owed" when the page is served, not when its payment verified."""
    payee = Account.create().address
    with MockServer(config(payee, fail_first=True), tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        failed = get(url, {"PAYMENT-SIGNATURE": header})
        assert (failed.status, failed.receipt) == (500, None)
        assert server.accepted() == [] and server.served() == []
        served = get(url, {"PAYMENT-SIGNATURE": header})
        assert served.status == 200
        assert [line["id"] for line in server.accepted()] == [commitment_id]
        assert [c["id"] for c in server.served()] == [commitment_id]


def test_header_bytes_that_are_not_text_get_a_402_not_a_500(tmp_path):
    payee = Account.create().address
    with MockServer(config(payee), tmp_path) as server:
        host = urlsplit(server.url).netloc.encode()
        header, _ = commitment_for(f"{server.url}/news/1", payee)
        requests = [
            b"GET /news/1 HTTP/1.0\r\nHost: " + host + b"\r\nPAYMENT-SIGNATURE: \xff\xfe\x80"
            b"\r\n\r\n",
            b"GET /news/1 HTTP/1.0\r\nHost: "
            + host
            + b"\r\nPAYMENT-SIGNATURE: "
            + header.encode()[:-8]
            + "é".encode()
            + b"\r\n\r\n",
            b"GET /news/1 HTTP/1.0\r\nHost: \xc3\x28"
            + host
            + b"\r\nPAYMENT-SIGNATURE: "
            + header.encode()
            + b"\r\n\r\n",
            b"GET /news/1 HTTP/1.0\r\nHost: \xc3\x28" + host + b"\r\n\r\n",
        ]
        for request in requests:
            answer = raw_exchange(server, request, until=b"Payment Required")
            assert answer.startswith(b"HTTP/1.0 402 "), answer[:200]
        assert server.served() == []
        # A reason on each paid attempt, through a client that reads headers as Latin-1.
        conn = http.client.HTTPConnection(urlsplit(server.url).hostname, urlsplit(server.url).port)
        conn.putrequest("GET", "/news/1", skip_host=True)
        conn.putheader("Host", host)
        conn.putheader("PAYMENT-SIGNATURE", b"\xff\xfe\x80")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 402
        assert b64json_decode(response.headers["PAYMENT-RESPONSE"])["errorReason"] == (
            "invalid_payload"
        )
        conn.close()


def test_the_status_endpoint_says_in_flight_while_the_page_is_being_answered(tmp_path):
    """A crawler resolving a payment in doubt must not take "not accepted" for final while the
    publisher is still answering a request that presents it: that request may yet be served."""
    from scrapy_x402._recovery import parse_status
    from tests.test_crash import wait_for

    payee = Account.create().address
    with MockServer(config(payee, hold="response"), tmp_path) as server:
        url = f"{server.url}/news/1"
        header, commitment_id = commitment_for(url, payee)
        status_url = f"{server.url}/.well-known/x402-deferred/{commitment_id}"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(get, url, {"PAYMENT-SIGNATURE": header})
            wait_for(lambda: server.pending() == 1, timeout=WAIT)
            answer = get(status_url, {}).body
            assert json.loads(answer) == {"id": commitment_id, "accepted": False, "inFlight": True}
            assert parse_status(answer) is None  # not known yet: the payment stays in doubt
            server.release(200)
            assert held.result().status == 200
        answer = get(status_url, {}).body
        assert json.loads(answer) == {"id": commitment_id, "accepted": True, "inFlight": False}
        assert parse_status(answer) is True


def twisted_request(path: bytes, headers: dict[bytes, bytes]) -> Any:
    """A twisted.web Request on a channel that only records what is written."""
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    request = Request(DummyChannel(), False)
    request.method, request.uri, request.path, request.clientproto = b"GET", path, path, b"HTTP/1.1"
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.prepath, request.postpath = [], path.strip(b"/").split(b"/")
    return request


def test_the_status_endpoint_never_says_not_served_while_a_2xx_goes_out(tmp_path):
    """Between "the 2xx status line is going out" and "the book has it" the status endpoint
    must say in flight, never a final "not accepted" (a crawler asking then would release a
    page it owes). Observed from inside the book's write, as a concurrent asker would see it."""
    from twisted.web.resource import Resource

    from scrapy_x402.paywall import (
        CommitmentBook,
        CommitmentStatusResource,
        MemoryNonceStore,
        PaywallResource,
    )

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"<html>page</html>"

    seen: list[dict[str, Any]] = []

    class Book(CommitmentBook):
        def record(self, commitment: Any, url: str) -> None:
            asked = twisted_request(b"/" + commitment.id.encode(), {})
            seen.append(json.loads(status.render_GET(asked)))
            super().record(commitment, url)

    payee = Account.create().address
    nonces = MemoryNonceStore()
    book = Book(str(tmp_path / "book.sqlite3"))
    status = CommitmentStatusResource(book, [nonces])
    verifier = DeferredVerifier("eip155:31337", TOKEN, payee, nonces=nonces)
    paywall = PaywallResource(Page(), verifier, PRICE, book=book)
    header, commitment_id = commitment_for("http://news.example/news/1", payee)
    request = twisted_request(
        b"/news/1", {b"host": b"news.example", b"payment-signature": header.encode()}
    )
    body = paywall.render(request)  # before looking up request.write, which the sale wraps
    request.write(body)
    request.finish()
    assert request.code == 200
    assert seen == [{"id": commitment_id, "accepted": False, "inFlight": True}]
    assert book.accepted(commitment_id)


def test_a_host_header_that_names_another_path_is_refused(tmp_path):
    """`Host: site/elsewhere` would make the commitment for /elsewhere/news/1 buy /news/1, and
    the book record a page that was not served."""
    payee = Account.create().address
    with MockServer(config(payee), tmp_path) as server:
        host = urlsplit(server.url).netloc
        header, _ = commitment_for(f"http://{host}/elsewhere/news/1", payee)
        answer = raw_exchange(
            server,
            f"GET /news/1 HTTP/1.0\r\nHost: {host}/elsewhere\r\n"
            f"PAYMENT-SIGNATURE: {header}\r\n\r\n".encode(),
            until=b"\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.0 402 "), answer[:200]
        assert server.served() == []


def test_a_status_asked_while_another_process_serves_is_never_a_final_no(tmp_path):
    """Two processes share the book and the nonce store; one serves (book, then nonce) while
    the other answers the status endpoint. Whatever the interleaving, the answer is "in
    flight" or "accepted", never "not accepted" and not in flight (review: read in the other
    order, it was)."""
    from scrapy_x402.paywall import CommitmentBook, CommitmentStatusResource, SQLiteNonceStore

    payee = Account.create().address
    verifier = DeferredVerifier(
        "eip155:31337", TOKEN, payee, nonces=SQLiteNonceStore(str(tmp_path / "n.sqlite3"))
    )
    serving_book = CommitmentBook(str(tmp_path / "book.sqlite3"))
    header, commitment_id = commitment_for("http://news.example/news/1", payee)
    commitment = verifier.verify(header, PRICE, "http://news.example/news/1")  # in flight

    def serve() -> None:  # what _Sale.owed does in the serving process
        serving_book.record(commitment, "http://news.example/news/1")
        verifier.served(commitment)

    class AskingBook(CommitmentBook):
        """The status process's book: the serving process acts at each read."""

        def accepted(self, commitment_id: str) -> bool:
            before = super().accepted(commitment_id)
            if not serving_book.accepted(commitment_id):
                serve()
            return before

    status = CommitmentStatusResource(
        AskingBook(str(tmp_path / "book.sqlite3")),
        [SQLiteNonceStore(str(tmp_path / "n.sqlite3"))],
    )
    answer = json.loads(status.render_GET(twisted_request(b"/" + commitment_id.encode(), {})))
    assert answer["accepted"] or answer["inFlight"], answer


def test_a_request_target_that_is_no_path_is_refused(tmp_path):
    """`GET .news/1` with `Host: site` would make a commitment for http://site.news/1 (another
    host's page) buy /news/1."""
    payee = Account.create().address
    with MockServer(config(payee), tmp_path) as server:
        host = urlsplit(server.url).netloc
        header, _ = commitment_for(f"http://{host}.news/1", payee)
        answer = raw_exchange(
            server,
            f"GET .news/1 HTTP/1.0\r\nHost: {host}\r\nPAYMENT-SIGNATURE: {header}\r\n\r\n".encode(),
            until=b"\r\n\r\n",
        )
        assert not answer.startswith(b"HTTP/1.0 200 "), answer[:200]
        assert server.served() == []
