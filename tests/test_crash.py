"""A crawl killed (SIGKILL) while paid requests are in flight: nothing the publisher served is
lost or paid twice, nothing it did not serve is paid, and the reserved budget comes back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from scrapy_x402.ledger import Status, open_ledger
from tests.mockserver import ROOT, MockServer

PAGES = 60
PRICE = 1_000


def start_crawl(tmp_path, name: str, urls: list[str], settings: dict[str, Any]) -> subprocess.Popen:
    urls_file = tmp_path / f"{name}.txt"
    urls_file.write_text("\n".join(urls))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.crawl_child", str(urls_file), json.dumps(settings)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def wait_for(condition, timeout: float = 60) -> None:
    """Poll for an outside event (the publisher serving pages), with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the condition did not happen in time")
        time.sleep(0.05)


def test_sigkill_mid_crawl_then_resume_and_settle(
    tmp_path, x402_settings, token, payer, payees, chain
):
    config = {
        "network": "eip155:31337",
        "asset": token.address,
        "sections": {"slow": {"payee": payees[0], "price": PRICE, "delay": 0.3}},
    }
    jobdir = tmp_path / "job"
    settings = {
        **x402_settings,
        "JOBDIR": str(jobdir),
        "CONCURRENT_REQUESTS": 16,
        "X402_SETTLE_ON_CLOSE": False,
        "LOG_LEVEL": "WARNING",
        "X402_BUDGETS": {"127.0.0.1": str(PAGES * PRICE / 10**6)},
    }  # exactly all pages
    with MockServer(config, tmp_path) as server:
        urls = [f"{server.url}/slow/{i}" for i in range(PAGES)]
        crawl = start_crawl(tmp_path, "first", urls, settings)
        wait_for(lambda: len(server.served()) >= 10)
        crawl.send_signal(signal.SIGKILL)  # paid requests are in flight
        crawl.wait()
        crawl.stdout.close()
        # A page is owed once its status line is sent, even to a client that just died:
        # what was served is known once the publisher answered the requests it had.
        wait_for(lambda: server.pending() == 0)
        served_before = {c["id"] for c in server.served()}
        ledger = open_ledger(settings["X402_LEDGER_URI"])
        in_doubt = {d.id for d in ledger.in_doubt()}
        ledger.close()
        assert in_doubt, "the kill should leave payments in doubt"

        # Resumed (same run, so the same budgets): what the dead process left reserved is
        # resolved with the publisher first, so the budget left covers every page not served.
        resume_dir = tmp_path / "job2"
        resume_dir.mkdir()
        (resume_dir / "x402-run-id").write_text((jobdir / "x402-run-id").read_text())
        resumed = start_crawl(tmp_path, "resume", urls, {**settings, "JOBDIR": str(resume_dir)})
        out, _ = resumed.communicate(timeout=180)
        stats = json.loads(out.strip().splitlines()[-1])
        served_after = {c["id"] for c in server.served()}
        served_urls = [c["url"] for c in server.served()]

    assert stats["x402/payment_count"] == PAGES - len(served_before)
    # The pages served before the kill are asked for again (the scheduler's state died with
    # the process): not paid twice, and the budget covers every other page.
    assert stats["x402/already_paid"] == len(served_before)
    assert "x402/budget_exceeded/127.0.0.1" not in stats
    assert len(served_urls) == len(set(served_urls)) == PAGES  # each page bought once

    env = {**os.environ, "X402_PRIVATE_KEY": payer.key.hex()}
    settle = subprocess.run(
        [
            sys.executable,
            "-m",
            "scrapy",
            "x402",
            "settle",
            "--resolve-in-doubt",
            "--ledger",
            settings["X402_LEDGER_URI"],
            "-s",
            "X402_RPC_URLS=" + json.dumps({"eip155:31337": chain.url}),
            "-s",
            "X402_ASSETS=" + json.dumps(token.asset_setting()),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert settle.returncode == 0, settle.stderr
    ledger = open_ledger(settings["X402_LEDGER_URI"])
    rows = dict(ledger.query("SELECT id, status FROM x402_payments"))
    ledger.close()
    settled = {pid for pid, status in rows.items() if status == Status.SETTLED}
    assert settled == served_after  # every commitment the publisher served, and only those
    assert len(served_after) == PAGES
    assert Status.RESERVED not in rows.values()
    assert token.balance_of(payees[0]) == PAGES * PRICE  # each paid exactly once


def test_sigkill_during_settlement_after_broadcast_pays_once(tmp_path, payer, chain, token, payees):
    from tests.test_settlement import owe

    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    owe(ledger, payer, token, payees[0], 3_000, count=3)
    ledger.close()
    env = {**os.environ, "X402_PRIVATE_KEY": payer.key.hex()}
    command = [
        sys.executable,
        "-m",
        "scrapy",
        "x402",
        "settle",
        "--ledger",
        str(tmp_path / "ledger.sqlite3"),
        "-s",
        "X402_RPC_URLS=" + json.dumps({"eip155:31337": chain.url}),
        "-s",
        "X402_ASSETS=" + json.dumps(token.asset_setting()),
    ]
    chain.w3.provider.make_request("evm_setAutomine", [False])
    try:
        settle = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # Broadcast, not mined: the process waits for the receipt. Kill it there.
        wait_for(
            lambda: (
                chain.w3.provider.make_request("txpool_status", [])["result"]["pending"] != "0x0"
            )
        )
        settle.send_signal(signal.SIGKILL)
        settle.wait()
        chain.w3.provider.make_request("evm_mine", [])
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])
    assert token.balance_of(payees[0]) == 9_000  # the transfer landed; the ledger never heard
    again = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "confirmed" in again.stdout  # found on-chain and recorded...
    assert token.balance_of(payees[0]) == 9_000  # ...and not paid again
    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    assert ledger.owed(payer.address) == [] and [s.status for s in ledger.settlements()] == [
        "confirmed"
    ]
    ledger.close()


def test_one_process_per_resumable_run(tmp_path, x402_settings):
    """A second process on the same JOBDIR would take the first one's live payments for ones
    a crash left in doubt, ask the publisher (not served yet) and release them."""
    from scrapy.utils.test import get_crawler

    from scrapy_x402._session import RunInUse, X402Session

    settings = {**x402_settings, "JOBDIR": str(tmp_path / "job")}
    first = X402Session.for_crawler(get_crawler(settings_dict=settings))
    with pytest.raises(RunInUse, match="in use by another crawl process"):
        X402Session.for_crawler(get_crawler(settings_dict=settings))
    first._run_lock.close()  # the first process ends
    again = X402Session.for_crawler(get_crawler(settings_dict=settings))  # resumable now
    again._run_lock.close()
