"""A local news site whose sections are sold per article with scrapy-x402's own paywall.

    python demo_site.py --network eip155:31337 --token 0x... --payees 0xA,0xB,0xC [--port 0]

prints the site's URL, then serves until stopped. Each commitment whose page was served (its
2xx status line sent) is appended to --book: the publisher's record of what it is owed.
"""

from __future__ import annotations

import argparse
import json
from html import escape
from pathlib import Path

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from scrapy_x402.paywall import (
    CommitmentBook,
    CommitmentStatusResource,
    DeferredVerifier,
    MemoryNonceStore,
    PaywallResource,
    request_url,
)

# section: (payee index, price in atomic units of a 6-decimal token, articles, host)
SECTIONS = {
    "world": (0, 10_000, 8, "127.0.0.1"),  # 0.01
    "science": (1, 20_000, 6, "127.0.0.1"),  # 0.02
    "opinion": (2, 5_000, 4, "127.0.0.1"),  # 0.005
    "markets": (0, 80_000, 2, "127.0.0.1"),  # 0.08: over the crawler's X402_MAX_PRICE
    "archive": (1, 40_000, 5, "localhost"),  # 0.04 each, on a domain with a 0.10 budget
}


class Article(Resource):
    isLeaf = True

    def __init__(self, section: str):
        super().__init__()
        self.section = section

    def render_GET(self, request: Request) -> bytes:
        n = escape(request.postpath[0].decode() if request.postpath else "0")
        return (
            f"<html><body><article data-section='{self.section}'>"
            f"<h1>{self.section.title()} story {n}</h1><p>Paid content.</p>"
            "</article></body></html>"
        ).encode()


class FrontPage(Resource):
    isLeaf = True

    def __init__(self, port: int, wire: str | None):
        super().__init__()
        self.port = port
        self.wire = wire  # the wire service: another publisher, selling with `exact`

    def render_GET(self, request: Request) -> bytes:
        links = [
            f"<a class='article' href='http://{host}:{self.port}/{name}/{i}'>{name} {i}</a>"
            for name, (_, _, count, host) in SECTIONS.items()
            for i in range(1, count + 1)
        ]
        if self.wire:
            links += [
                f"<a class='article' href='{self.wire}/articles/{i}'>wire {i}</a>"
                for i in range(1, 5)
            ]
        return ("<html><body><h1>Demo News</h1>" + "<br>".join(links) + "</body></html>").encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--payees", required=True, help="three comma-separated addresses")
    parser.add_argument("--port", type=int, default=8402)
    parser.add_argument("--book", default=".demo/publisher-book.jsonl")
    parser.add_argument("--wire", help="URL of a wire service to link to (exact_site.py)")
    args = parser.parse_args()
    payees = args.payees.split(",")
    book = open(args.book, "a", encoding="utf-8")  # noqa: SIM115 (open for the process' life)

    def on_served(commitment, request):  # owed now: not when verified, which is no sale yet
        book.write(
            json.dumps(
                {
                    "id": commitment.id,
                    "payee": commitment.payee,
                    "amount": str(commitment.amount),
                    "url": request_url(request),
                }
            )
            + "\n"
        )
        book.flush()

    root = Resource()
    # What this publisher served, and so is owed; crawlers may ask about a commitment after a crash.
    book_db = CommitmentBook(str(Path(args.book).with_suffix(".sqlite3")))
    well_known = Resource()
    nonces = MemoryNonceStore()  # replay protection shared by the sections, read by the status page
    well_known.putChild(b"x402-deferred", CommitmentStatusResource(book_db, [nonces]))
    root.putChild(b".well-known", well_known)
    port = reactor.listenTCP(args.port, Site(root), interface="127.0.0.1")
    root.putChild(b"", FrontPage(port.getHost().port, args.wire))
    for name, (payee, price, _, _) in SECTIONS.items():
        verifier = DeferredVerifier(args.network, args.token, payees[payee], nonces=nonces)
        root.putChild(
            name.encode(),
            PaywallResource(Article(name), verifier, price, on_served=on_served, book=book_db),
        )
    print(f"http://127.0.0.1:{port.getHost().port}/", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
