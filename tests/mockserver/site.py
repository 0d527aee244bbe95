"""The mock publisher. Sections are paywalled with the package's own PaywallResource."""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.template import Element, XMLString, renderElement

from scrapy_x402._protocol import b64json_encode
from scrapy_x402.paywall import (
    Commitment,
    CommitmentBook,
    CommitmentStatusResource,
    DeferredVerifier,
    MemoryNonceStore,
    PayerPolicy,
    PaywallResource,
    SQLiteNonceStore,
    request_url,
)
from tests.edgeserver.verifier import public_key, thumbprint, verify


class Held:
    """Requests a page holds until the test asks ``/release?code=N``: in "response" mode
    nothing is sent until then; in "finish" mode the page is sent at once, unfinished.
    ``/release?code=N&stop=1`` also stops holding: later requests are answered at once."""

    def __init__(self) -> None:
        self.requests: list[tuple[Request, bytes]] = []
        self.holding = True

    def hold(self, request: Request, body: bytes, mode: str) -> int:
        if mode == "finish":
            request.write(body)
            body = b""
        self.requests.append((request, body))
        return NOT_DONE_YET

    def release(self, code: int) -> int:
        released, self.requests = self.requests, []
        for request, body in released:
            if not request._disconnected:
                if not request.startedWriting:
                    request.setResponseCode(code)
                request.write(body)
                request.finish()
        return len(released)


HELD = Held()
DELAYED: set[Request] = set()  # requests a ``delay`` page has not answered yet


class Pending(Resource):
    """``/pending``: how many requests the site has not answered yet (held or delayed)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return str(len(HELD.requests) + len(DELAYED)).encode()


class Release(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        code = int(request.args.get(b"code", [b"200"])[0])
        HELD.holding = not request.args.get(b"stop")
        return str(HELD.release(code)).encode()


class Story(Element):
    loader = XMLString(b"<html><head><title>story</title></head><body>story</body></html>")


class Page(Resource):
    """A page; with ``fail_first`` it answers 500 to the first request for each path; with
    ``delay`` it answers that many seconds later; with ``hold`` when the test releases it;
    with ``template`` through twisted.web.template (which finishes inside render); with
    ``answer`` that status (a 3xx to /free/moved) to every request; with ``cut`` the status
    line and half the page, then the connection closes (a paid response cut off)."""

    isLeaf = True

    def __init__(
        self,
        fail_first: bool = False,
        delay: float = 0,
        etag: bool = False,
        hold: str | None = None,
        template: bool = False,
        answer: int | None = None,
        cut: bool = False,
    ):
        super().__init__()
        self.failed: set[str] | None = set() if fail_first else None
        self.delay = delay
        self.etag = etag
        self.hold = hold
        self.template = template
        self.answer = answer
        self.cut = cut

    def render_GET(self, request: Request) -> bytes | int:
        path = request.path.decode()
        if self.answer is not None:
            request.setResponseCode(self.answer)
            request.setHeader("Location", "/free/moved")
            return b""
        if self.template:
            return renderElement(request, Story())
        if self.etag:  # revalidation: 304 to a matching If-None-Match (a payment taken or not)
            request.setHeader("ETag", '"v1"')
            request.setHeader("Cache-Control", "max-age=0")
            if request.getHeader("if-none-match") == '"v1"':
                request.setResponseCode(304)
                return b""
        if self.failed is not None and path not in self.failed:
            self.failed.add(path)
            request.setResponseCode(500)
            return b"try again"
        body = f"<html><head><title>{path}</title></head><body>{path}</body></html>".encode()
        if self.cut:
            request.setHeader("Content-Length", str(len(body)))
            request.write(body[: len(body) // 2])
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        if self.hold and HELD.holding:
            return HELD.hold(request, body, self.hold)
        if self.delay:

            def finish() -> None:
                DELAYED.discard(request)
                if not request._disconnected:
                    request.write(body)
                    request.finish()

            DELAYED.add(request)
            reactor.callLater(self.delay, finish)  # type: ignore[attr-defined]
            return NOT_DONE_YET
        return body


class Moved(Resource):
    """A paid section whose listed pages moved: they answer a free 301 to their new URL."""

    isLeaf = True

    def __init__(self, paid: Resource, moved: dict[str, str]):
        super().__init__()
        self.paid = paid
        self.moved = moved

    def render(self, request: Request) -> bytes | int:
        name = request.postpath[-1].decode() if request.postpath else ""
        if name in self.moved:
            request.setResponseCode(301)
            request.setHeader("Location", self.moved[name])
            return b""
        return self.paid.render(request)


class BadTerms(Resource):
    """402s that no client should pay: /bad/<case>."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        case = request.postpath[0].decode() if request.postpath else ""
        request.setResponseCode(402)
        offer = {
            "scheme": "deferred",
            "network": "eip155:31337",
            "amount": "1000",
            "asset": "0x" + "11" * 20,
            "payTo": "0x" + "22" * 20,
        }
        headers = {
            "not-base64": "%%% not base64 %%%",
            "decimal-amount": b64json_encode(
                {"x402Version": 2, "accepts": [{**offer, "amount": "0.50"}]}
            ),
            "negative-amount": b64json_encode(
                {"x402Version": 2, "accepts": [{**offer, "amount": "-5"}]}
            ),
            "unknown-version": b64json_encode({"x402Version": 7, "accepts": [offer]}),
            # Over the parser's 32-offer cap, under Twisted's 16 KiB header-line limit.
            "many-offers": b64json_encode({"x402Version": 2, "accepts": [offer] * 40}),
        }
        if case in headers:
            request.setHeader("PAYMENT-REQUIRED", headers[case])
        return b"<html>payment required</html>"


def bot_identity(keys: list[dict[str, str]]):
    """The verified Web Bot Auth key id of a request (None: unsigned or not verified)."""
    by_keyid = {thumbprint(jwk): public_key(jwk) for jwk in keys}

    def identity(request: Request) -> str | None:
        headers = {
            k.decode("latin-1"): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        try:
            return verify(request.method.decode(), request_url(request), headers, by_keyid).keyid
        except Exception:  # unsigned, malformed or wrong: no identity
            return None

    return identity


def policy_of(section: dict[str, Any], book: CommitmentBook, nonces: Any):
    """``refuse``: refuse every verified payment with that reason; ``policy``: PayerPolicy's
    arguments (``bot_keys``: the public JWKs whose signatures identify a request)."""
    if section.get("refuse"):
        return lambda _commitment, _request: section["refuse"]
    options = dict(section.get("policy") or {})
    if not options:
        return None
    if "bot_keys" in options:
        options["identity"] = bot_identity(options.pop("bot_keys"))
    return PayerPolicy(book, nonces=nonces, **options)


def build_site(config: dict[str, Any]) -> Site:
    root = Resource()
    book = open(config["book"], "a", encoding="utf-8")  # noqa: SIM115 (open for the process' life)

    def record(section: str):
        def on_served(commitment: Commitment, request: Request) -> None:
            book.write(
                json.dumps(
                    {
                        "id": commitment.id,
                        "section": section,
                        "payer": commitment.payer,
                        "payee": commitment.payee,
                        "amount": str(commitment.amount),
                        "url": request_url(request),
                    }
                )
                + "\n"
            )
            book.flush()

        return on_served

    served: dict[str, int] = {}
    commitments = CommitmentBook(config["book"] + ".sqlite3")  # what was served: owed
    well_known = Resource()
    # One nonce store for every section, which the status endpoint reads too.
    nonces = (
        SQLiteNonceStore(config["nonce_store"]) if config.get("nonce_store") else MemoryNonceStore()
    )
    well_known.putChild(b"x402-deferred", CommitmentStatusResource(commitments, [nonces]))
    root.putChild(b".well-known", well_known)

    def price_of(name: str, section: dict[str, Any]):
        """The section's price; with "price_after": {"count", "price"} it changes once that
        many pages were served."""
        change = section.get("price_after")

        def price(request: Request) -> int:
            if change and served.get(name, 0) >= change["count"]:
                return int(change["price"])
            return int(section["price"])

        return price

    def counting(name: str, inner):
        def on_served(commitment: Commitment, request: Request) -> None:
            served[name] = served.get(name, 0) + 1
            inner(commitment, request)

        return on_served

    for name, section in config["sections"].items():
        args = (config["network"], section.get("asset", config["asset"]), section["payee"])
        paid = PaywallResource(
            Page(
                fail_first=section.get("fail_first", False),
                delay=section.get("delay", 0),
                etag=section.get("etag", False),
                hold=section.get("hold"),
                template=section.get("template", False),
                answer=section.get("answer"),
                cut=section.get("cut", False),
            ),
            DeferredVerifier(*args, nonces=nonces),
            price_of(name, section),
            x402_version=section.get("version", 2),
            policy=policy_of(section, commitments, nonces),
            on_served=counting(name, record(name)),
            book=commitments,
        )
        root.putChild(name.encode(), Moved(paid, section.get("moved", {})))
    root.putChild(b"bad", BadTerms())
    root.putChild(b"free", Page())
    root.putChild(b"release", Release())
    root.putChild(b"pending", Pending())
    return Site(root)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    port = reactor.listenTCP(0, build_site(config), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(f"http://127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
