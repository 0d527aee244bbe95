"""Asking publishers about payments in doubt (docs/deferred-scheme.md section 7) when the
publisher's status endpoint is hostile: a broken answer keeps the payment in doubt and stops
nothing else; "still in flight" is believed only as long as an honest publisher could say it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from scrapy_x402._recovery import IN_FLIGHT_LIMIT, resolve_in_doubt
from scrapy_x402.ledger import Status, open_ledger
from scrapy_x402.payments import PaymentBook
from tests.test_ledger import PLENTY, record


@pytest.fixture
def book(tmp_path) -> Iterator[PaymentBook]:
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.sqlite3")
    yield PaymentBook(ledger)
    ledger.close()


def serve(answer: bytes) -> tuple[ThreadingHTTPServer, str]:
    """A status endpoint that writes ``answer`` raw, whatever it is asked."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def endpoint(request) -> Iterator[str]:
    server, host = serve(request.param)
    yield host
    server.shutdown()
    server.server_close()


def json_answer(body: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body


@pytest.mark.parametrize(
    "endpoint",
    [b"HELLO THERE\r\n\r\n", b"HTTP/1.0 200 OK\r\nContent-Length: 99\r\n\r\n{", b"[" * 4096],
    indirect=True,
    ids=["no_status_line", "cut_off", "nested"],
)
def test_a_broken_status_answer_keeps_the_payment_in_doubt_and_stops_nothing(
    book: PaymentBook, endpoint: str
):
    hostile = replace(record(1), url=f"http://{endpoint}/page/1")
    book.reserve(hostile, PLENTY)
    resolution = resolve_in_doubt(book)  # what `scrapy x402 settle` runs first
    assert resolution.unknown == [hostile.id]
    assert book.store.get_status(hostile.id) == Status.RESERVED


@pytest.mark.parametrize(
    "endpoint", [json_answer(b'{"accepted": false, "inFlight": true}')], indirect=True
)
def test_in_flight_is_believed_only_until_a_publisher_must_have_forgotten_it(
    book: PaymentBook, endpoint: str
):
    now = int(time.time())
    fresh = replace(record(1), url=f"http://{endpoint}/page/1", valid_until=now)
    stale = replace(
        record(2), url=f"http://{endpoint}/page/2", valid_until=now - IN_FLIGHT_LIMIT - 60
    )
    for payment in (fresh, stale):
        book.reserve(payment, PLENTY)
    resolution = resolve_in_doubt(book)
    assert resolution.unknown == [fresh.id]  # may still be served: stays counted
    assert resolution.refused == [stale.id]  # no honest publisher still answers it
    assert book.store.get_status(stale.id) != Status.RESERVED


def test_a_publisher_dripping_its_status_answer_cannot_hold_settlement(book, monkeypatch):
    """urllib's timeout is per read: an answer sent a byte at a time would hold `settle` (and
    every other payee's settlement) for as long as the publisher likes."""
    import scrapy_x402._recovery

    done = threading.Event()

    class Drip(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            try:
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                for _ in range(100):  # 20 s of a header that never ends
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)  # the hostile publisher's pace, not the test's timing
            finally:
                done.set()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(scrapy_x402._recovery, "STATUS_DEADLINE", 1)
    try:
        slow = replace(record(1), url=f"http://127.0.0.1:{server.server_address[1]}/page/1")
        book.reserve(slow, PLENTY)
        resolution = resolve_in_doubt(book)
        assert not done.is_set()  # given up long before the publisher was done
        assert resolution.unknown == [slow.id]
    finally:
        server.shutdown()
        server.server_close()
