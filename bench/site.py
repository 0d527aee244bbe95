"""The benchmark site: /free/<n> unpaid, /paid/<n> sold for deferred commitments through the
package's own paywall. Prints its URL, then serves.

    python bench/site.py --network eip155:31337 --token 0x... --payees 0xA,0xB [--price 1000]
"""

from __future__ import annotations

import argparse

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from scrapy_x402.paywall import DeferredVerifier, PaywallResource

BODY = b"<html><head><title>page</title></head><body>" + b"lorem ipsum " * 300 + b"</body></html>"


class Page(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return BODY


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--network", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--payees", required=True)
    parser.add_argument("--price", type=int, default=1000)
    args = parser.parse_args()
    root = Resource()
    root.putChild(b"free", Page())
    paid = Resource()
    for i, payee in enumerate(args.payees.split(",")):
        verifier = DeferredVerifier(args.network, args.token, payee)
        paid.putChild(str(i).encode(), PaywallResource(Page(), verifier, args.price))
    root.putChild(b"paid", paid)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
