"""A publisher selling articles with the standard x402 schemes, built only from the reference
x402 SDK (PyPI `x402`): its Flask middleware, its EVM server schemes and its own facilitator,
which submits each payment on-chain.

    FACILITATOR_KEY=0x... python exact_site.py --rpc-url URL --network eip155:84532 \\
        --token 0x... --payee 0x... --price 10000 [--port 0] \\
        [--transfer-method permit2] [--scheme upto --charge 4000]

`exact` charges --price (by EIP-3009, or Permit2 with --transfer-method permit2); `upto` lets
the client sign for at most --price and charges --charge per article.

prints its URL, then serves /articles/<n> until stopped. The demo crawls it next to the deferred
sections, and the interoperability tests pay it. The crawler never imports the SDK.
"""

from __future__ import annotations

import argparse
import os

from flask import Flask, Response, make_response
from werkzeug.serving import make_server
from x402 import x402FacilitatorSync, x402ResourceServerSync
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    declare_payment_identifier_extension,
)
from x402.http.middleware.flask import payment_middleware, set_settlement_overrides
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator, register_exact_evm_server
from x402.mechanisms.evm.upto import UptoEvmFacilitatorScheme, UptoEvmServerScheme
from x402.schemas.base import AssetAmount


def build_app(args: argparse.Namespace, facilitator_key: str) -> Flask:
    facilitator = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(private_key=facilitator_key, rpc_url=args.rpc_url)
    register_exact_evm_facilitator(facilitator, signer, networks=args.network)
    facilitator.register([args.network], UptoEvmFacilitatorScheme(signer))
    server = x402ResourceServerSync(facilitator)
    register_exact_evm_server(server, networks=args.network)
    server.register(args.network, UptoEvmServerScheme())
    extra = {"name": args.token_name, "version": args.token_version}
    if args.transfer_method == "permit2":
        extra["assetTransferMethod"] = "permit2"
    price = AssetAmount(amount=str(args.price), asset=args.token, extra=extra)
    routes = {
        "GET /articles/*": RouteConfig(
            accepts=PaymentOption(
                scheme=args.scheme,
                pay_to=args.payee,
                price=price,
                network=args.network,
                max_timeout_seconds=120,
            ),
            description="an article",
            mime_type="text/html",
            extensions={PAYMENT_IDENTIFIER: declare_payment_identifier_extension()},
        )
    }
    app = Flask(__name__)

    @app.get("/articles/<n>")
    def article(n: str) -> Response:
        response = make_response(
            "<html><head><title>article</title></head><body>"
            f"<article data-section='wire'><h1>Wire story {int(n)}</h1></article></body></html>"
        )
        if args.scheme == "upto":  # what this request actually cost
            set_settlement_overrides(response, {"amount": str(args.charge)})
        return response

    @app.get("/free/<n>")
    def free(n: str) -> str:  # the same page, unpaid: the benchmarks' baseline
        return article(n).get_data(as_text=True)

    payment_middleware(app, routes, server)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--network", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--token-name", default="Test USD")
    parser.add_argument("--token-version", default="2")
    parser.add_argument("--payee", required=True)
    parser.add_argument("--price", type=int, required=True, help="atomic units per article")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scheme", choices=["exact", "upto"], default="exact")
    parser.add_argument("--transfer-method", choices=["eip3009", "permit2"], default="eip3009")
    parser.add_argument("--charge", type=int, help="upto: atomic units charged per article")
    args = parser.parse_args()
    # The facilitator's key pays gas; from the environment, so no process listing shows it.
    app = build_app(args, os.environ["FACILITATOR_KEY"])
    http = make_server("127.0.0.1", args.port, app, threaded=True)
    print(f"http://127.0.0.1:{http.server_port}", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
