"""A publisher made of the reference x402 SDK alone, selling ``/articles/*`` with
``batch-settlement`` on the contract doubles: its Flask middleware and server scheme, its
facilitator (deposits, claims, refunds on anvil) and its channel manager (claim and settle)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from flask import Flask
from werkzeug.serving import make_server
from x402 import x402FacilitatorSync, x402ResourceServerSync
from x402.http.middleware.flask import payment_middleware
from x402.http.types import PaymentOption, RouteConfig
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.server import (
    BatchSettlementChannelManagerSync,
)
from x402.mechanisms.evm.batch_settlement.server import (
    BatchSettlementEvmScheme as BatchSettlementServerScheme,
)
from x402.mechanisms.evm.batch_settlement.server.channel_manager_common import (
    ChannelManagerConfigSync,
)
from x402.schemas.base import AssetAmount

from scrapy_x402.devchain import Anvil, TestUSD


@dataclass
class BatchSite:
    url: str  # pages are {url}/articles/<n>
    network: str
    receiver: str
    manager: Any  # the SDK's BatchSettlementChannelManagerSync: claim_and_settle()


@contextmanager
def sdk_batch_site(chain: Anvil, token: TestUSD, price: int) -> Iterator[BatchSite]:
    chain.install_batch_settlement()
    network = f"eip155:{chain.chain_id}"
    receiver = Account.create().address
    facilitator = x402FacilitatorSync()
    facilitator.register(
        [network],
        BatchSettlementEvmFacilitator(
            FacilitatorWeb3Signer(private_key=chain.new_account().key.hex(), rpc_url=chain.url),
            authorizer_signer=LocalAuthorizerSigner(Account.create()),
        ),
    )
    scheme = BatchSettlementServerScheme(receiver)
    server = x402ResourceServerSync(facilitator)
    server.register(network, scheme)  # type: ignore[arg-type]  # the SDK's own typing
    amount = AssetAmount(
        amount=str(price), asset=token.address, extra={"name": "Test USD", "version": "2"}
    )
    option = PaymentOption(
        scheme="batch-settlement", pay_to=receiver, price=amount, network=network
    )
    app = Flask(__name__)
    app.add_url_rule("/articles/<n>", "article", lambda n: f"article {n}")
    payment_middleware(app, {"GET /articles/*": RouteConfig(accepts=option)}, server)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    manager = BatchSettlementChannelManagerSync(
        ChannelManagerConfigSync(
            scheme=scheme,
            facilitator=facilitator,
            receiver=receiver,
            token=token.address,
            network=network,
        )
    )
    try:
        yield BatchSite(f"http://127.0.0.1:{http.server_port}", network, receiver, manager)
    finally:
        http.shutdown()
