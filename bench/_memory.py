"""Child of bench/ledger.py: N paid pages through the two middlewares (402 → paid request →
reserved durably → sent → 200 with receipt → accepted durably), then prints peak RSS (MiB)
and the ledger's size."""

from __future__ import annotations

import os
import resource
import sys
import tempfile

from scrapy.utils.reactor import install_reactor

install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")

from eth_account import Account
from scrapy import Request
from scrapy.http import Response
from scrapy.utils.defer import deferred_from_coro
from scrapy.utils.misc import build_from_crawler
from scrapy.utils.test import get_crawler
from twisted.internet import reactor

from scrapy_x402 import X402DownloaderMiddleware, X402SigningMiddleware
from scrapy_x402._protocol import b64json_encode

TERMS = b64json_encode(
    {
        "x402Version": 2,
        "accepts": [
            {
                "scheme": "deferred",
                "network": "eip155:84532",
                "amount": "1",
                "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
                "payTo": "0x" + "22" * 20,
                "maxTimeoutSeconds": 60,
            }
        ],
    }
)


async def run(pages: int, ledger_path: str) -> None:
    os.environ["X402_PRIVATE_KEY"] = Account.create().key.hex()
    crawler = get_crawler(
        settings_dict={
            "X402_LEDGER_URI": ledger_path,
            "X402_BUDGETS": {"news.example": "1000000"},
            "X402_PREAUTHORIZE": False,
            "LOG_LEVEL": "WARNING",
            "DOWNLOADER_MIDDLEWARES": {
                X402DownloaderMiddleware: 545,
                X402SigningMiddleware: 950,
            },
        }
    )
    mw = build_from_crawler(X402DownloaderMiddleware, crawler)
    signing = build_from_crawler(X402SigningMiddleware, crawler)
    for i in range(pages):
        url = f"https://news.example/a/{i}"
        request = Request(url)
        paid = await mw.process_response(
            request, Response(url, status=402, headers={"PAYMENT-REQUIRED": TERMS}, request=request)
        )
        await signing.process_request(paid)
        receipt = b64json_encode(
            {"success": True, "extra": {"commitmentId": paid.meta["_x402_payment"]}}
        )
        await mw.process_response(
            paid, Response(url, status=200, request=paid, headers={"PAYMENT-RESPONSE": receipt})
        )
    assert crawler.stats.get_value("x402/payment_count") == pages
    await mw.session.ledger.close()


def main() -> None:
    pages = int(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ledger.sqlite3")
        done = deferred_from_coro(run(pages, path))
        done.addBoth(lambda result: (reactor.stop(), result)[1])  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
        if done.result is not None:
            done.result.raiseException()
        size = os.path.getsize(path)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{peak_mib:.1f} {size}")


if __name__ == "__main__":
    main()
