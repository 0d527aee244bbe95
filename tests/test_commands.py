"""`scrapy x402 settle` and `scrapy x402 report`, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_settlement import owe


def scrapy(tmp_path, payer, chain, token, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "X402_PRIVATE_KEY": payer.key.hex()}
    settings = [
        "-L",
        "DEBUG",  # every log line, web3's included, is searched for the key
        "-s",
        f"X402_LEDGER_URI={tmp_path / 'ledger.sqlite3'}",
        "-s",
        "X402_RPC_URLS=" + json.dumps({"eip155:31337": chain.url}),
        "-s",
        "X402_ASSETS=" + json.dumps(token.asset_setting()),
    ]
    return subprocess.run(
        [sys.executable, "-m", "scrapy", "x402", *args, *settings],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_settle_dry_run_settle_and_report(tmp_path, payer, chain, token, payees):
    from scrapy_x402.ledger import open_ledger

    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    owe(ledger, payer, token, payees[0], 2_500, count=4)
    ledger.close()

    dry = scrapy(tmp_path, payer, chain, token, "settle", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "planned" in dry.stdout and "0.010000 tUSD" in dry.stdout
    assert token.balance_of(payees[0]) == 0

    paid = scrapy(tmp_path, payer, chain, token, "settle")
    assert paid.returncode == 0, paid.stderr
    assert "confirmed" in paid.stdout
    assert token.balance_of(payees[0]) == 10_000

    again = scrapy(tmp_path, payer, chain, token, "settle")
    assert "Nothing is owed on-chain." in again.stdout
    assert token.balance_of(payees[0]) == 10_000

    report_run = scrapy(tmp_path, payer, chain, token, "report", "--json")
    report = json.loads(report_run.stdout)
    [row] = report["payments"]
    assert (row["payee"], row["settled_pages"], row["settled_amount"], row["owed_amount"]) == (
        payees[0],
        "4",
        "10000",
        "0",
    )
    assert report["settlements"][0]["status"] == "confirmed"
    table_run = scrapy(tmp_path, payer, chain, token, "report")
    table = table_run.stdout
    assert payees[0] in table and "Total: 0 USD owed, 0.0100 USD settled." in table

    key = payer.key.hex().removeprefix("0x").lower()
    assert "[web3" in paid.stderr and "DEBUG" in paid.stderr  # it really logged at DEBUG
    assert "x402 settled" in paid.stderr
    for run in (dry, paid, again, report_run, table_run):
        assert key not in (run.stdout + run.stderr).lower()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert key.encode() not in written.lower()


def test_settle_without_a_key_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "X402_PRIVATE_KEY"}
    run = subprocess.run(
        [sys.executable, "-m", "scrapy", "x402", "settle"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert run.returncode == 2 and "no wallet key" in run.stderr


def test_keys_writes_a_new_key_and_prints_its_signed_directory(tmp_path):
    from scrapy_x402._webbotauth import BotIdentity
    from tests.edgeserver.verifier import public_key, verify

    env = {k: v for k, v in os.environ.items() if k != "X402_BOT_AUTH_KEY"}

    def keys() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scrapy", "x402", "keys", "--agent", "https://crawler.example"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )

    run = keys()
    assert run.returncode == 0, run.stderr
    key_file = tmp_path / "x402-bot-key.jwk"
    assert key_file.stat().st_mode & 0o777 == 0o600
    identity = BotIdentity.load(str(key_file))
    assert identity.private_jwk()["d"] not in run.stdout  # the private key is never printed
    assert f"keyid (JWK SHA-256 thumbprint): {identity.keyid}" in run.stdout
    jwks = json.loads(run.stdout.split("# JWKS:\n", 1)[1].split("\n", 1)[0])
    assert jwks == {"keys": [identity.public_jwk()]}
    headers = dict(
        line.split(": ", 1)
        for line in run.stdout.splitlines()
        if line.startswith(("Signature", "content-type"))
    )
    url = "https://crawler.example/.well-known/http-message-signatures-directory"
    assert verify("GET", url, headers, {identity.keyid: public_key(jwks["keys"][0])}).params[
        "tag"
    ] == ("http-message-signatures-directory")
    again = keys()
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites a key
