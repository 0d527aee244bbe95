# The demo crawler's settings. run_demo.py provides the wallet key (X402_PRIVATE_KEY in the
# environment), the chain and the token through DEMO_* environment variables.
import os

BOT_NAME = "newsdemo"
SPIDER_MODULES = ["newsdemo.spiders"]
ROBOTSTXT_OBEY = False
TELNETCONSOLE_ENABLED = False
LOG_LEVEL = "INFO"
CONCURRENT_REQUESTS_PER_DOMAIN = 16

ADDONS = {"scrapy_x402.Addon": 500}

CHAIN = os.environ.get("DEMO_NETWORK", "eip155:31337")
X402_RPC_URLS = {CHAIN: os.environ.get("DEMO_RPC_URL", "http://127.0.0.1:8545")}
# The demo's test token, pegged at 1 USD (USDC needs no entry: it is built in).
X402_ASSETS = {
    CHAIN: {
        os.environ.get("DEMO_TOKEN", "0x5FbDB2315678afecb367f032d93F642f64180aa3"): {
            "symbol": "tUSD",
            "decimals": 6,
            "usd": "1",
        }
    }
}
# 127.0.0.1 and localhost are two domains of the same demo site, with their own budgets.
X402_BUDGETS = {"127.0.0.1": "1.00", "localhost": "0.10"}
X402_MAX_PRICE = "0.05"
X402_LEDGER_URI = os.environ.get("DEMO_LEDGER", ".demo/x402-ledger.sqlite3")
X402_ITEM_RECEIPT_FIELD = "payment"

FEEDS = {".demo/articles.jsonl": {"format": "jsonlines", "overwrite": True}}
