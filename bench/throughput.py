"""Throughput: the same local site of PAGES pages (default 5,000; exact: 2,000) crawled unpaid and paid at
CONCURRENT_REQUESTS = 32, pages/s each and the ratio paid/unpaid:
deferred (with pre-authorisation, and without for comparison) on the package's paywall, and
exact on a server built from the reference x402 SDK whose facilitator settles every payment
on anvil. Paid crawls include settlement at close.

    python bench/throughput.py [PAGES]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench._common import ROOT, machine, paid_world, result, server

PAGES = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000
EXACT_PAGES = min(PAGES, 2_000)  # each is an on-chain transaction by the SDK's facilitator
PAYEES = 4


def crawl(tmp: Path, name: str, urls: list[str], settings: dict, env: dict[str, str]) -> float:
    urls_file = tmp / f"{name}.txt"
    urls_file.write_text("\n".join(urls))
    out = (
        subprocess.run(
            [sys.executable, "-m", "bench.crawl", str(urls_file), json.dumps(settings)],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    run = json.loads(out)
    assert run["items"] == len(urls), (name, run)
    rate = run["items"] / run["seconds"]
    print(
        f"{name:<28} {run['items']} pages in {run['seconds']:6.2f} s = {rate:7.1f} pages/s"
        f"  (paid {run['paid']}, pre-authorised {run['preauthorized']}, settled {run['settled']})"
    )
    return rate


def main() -> None:
    print(f"# throughput, {PAGES} pages, CONCURRENT_REQUESTS=32, {machine()}")
    with paid_world(PAYEES) as world:
        chain, token, payees, tmp, network = (
            world.chain,
            world.token,
            world.payees,
            world.tmp,
            world.network,
        )
        env, settings = world.env, world.settings
        with server(world.site_args()) as site:
            free = [f"{site}/free/{i}" for i in range(PAGES)]
            paid = [f"{site}/paid/{i % PAYEES}/{i}" for i in range(PAGES)]
            unpaid_rate = crawl(tmp, "unpaid", free, {}, env)
            deferred_rate = crawl(tmp, "deferred, pre-authorised", paid, settings("deferred"), env)
            no_preauth_rate = crawl(
                tmp,
                "deferred, 402 every page",
                paid,
                settings("deferred402", X402_PREAUTHORIZE=False),
                env,
            )

        exact_args = [
            "example_project/exact_site.py",
            "--rpc-url",
            chain.url,
            "--network",
            network,
            "--token",
            token.address,
            "--payee",
            payees[0],
            "--price",
            "1000",
        ]
        with server(exact_args, {"FACILITATOR_KEY": chain.new_account().key.hex()}) as sdk:
            exact_free = [f"{sdk}/free/{i}" for i in range(EXACT_PAGES)]
            exact_paid = [f"{sdk}/articles/{i}" for i in range(EXACT_PAGES)]
            exact_unpaid_rate = crawl(tmp, "SDK site, unpaid", exact_free, {}, env)
            exact_rate = crawl(tmp, "SDK site, exact", exact_paid, settings("exact"), env)

    result("throughput_unpaid_pages_per_s", unpaid_rate)
    result("throughput_deferred_pages_per_s", deferred_rate)
    result("throughput_ratio_deferred", deferred_rate / unpaid_rate)
    result("throughput_ratio_deferred_without_preauth", no_preauth_rate / unpaid_rate)
    result("throughput_sdk_unpaid_pages_per_s", exact_unpaid_rate)
    result("throughput_exact_pages_per_s", exact_rate)
    result("throughput_ratio_exact", exact_rate / exact_unpaid_rate)


if __name__ == "__main__":
    main()
