"""A publisher built only from the reference x402 SDK (PyPI `x402`): its Flask middleware, its
`exact` EVM server scheme and its own facilitator, which settles on the test chain.

    python -m tests.interop.sdk_server config.json    # prints its URL, then serves

The crawler never imports the SDK; it only talks to this server over HTTP.
"""

from __future__ import annotations

import json
import sys

from flask import Flask
from werkzeug.serving import make_server
from x402 import x402FacilitatorSync, x402ResourceServerSync
from x402.extensions.payment_identifier import (
    PAYMENT_IDENTIFIER,
    declare_payment_identifier_extension,
)
from x402.http.middleware.flask import payment_middleware
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import register_exact_evm_facilitator, register_exact_evm_server
from x402.schemas.base import AssetAmount


def build_app(config: dict) -> Flask:
    network = config["network"]
    facilitator = x402FacilitatorSync()
    signer = FacilitatorWeb3Signer(private_key=config["facilitator_key"], rpc_url=config["rpc_url"])
    register_exact_evm_facilitator(facilitator, signer, networks=network)
    server = x402ResourceServerSync(facilitator)
    register_exact_evm_server(server, networks=network)

    price = AssetAmount(
        amount=str(config["price"]),
        asset=config["token"],
        extra={"name": config["token_name"], "version": config["token_version"]},
    )
    routes = {
        "GET /articles/*": RouteConfig(
            accepts=PaymentOption(
                scheme="exact",
                pay_to=config["payee"],
                price=price,
                network=network,
                max_timeout_seconds=120,
            ),
            description="an article",
            mime_type="text/html",
            extensions={PAYMENT_IDENTIFIER: declare_payment_identifier_extension()},
        )
    }
    app = Flask(__name__)

    @app.get("/articles/<n>")
    def article(n: str) -> str:
        return f"<html><head><title>article {n}</title></head><body>paid</body></html>"

    payment_middleware(app, routes, server)
    return app


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    http = make_server("127.0.0.1", 0, build_app(config), threaded=True)
    print(f"http://127.0.0.1:{http.server_port}", flush=True)
    http.serve_forever()


if __name__ == "__main__":
    main()
