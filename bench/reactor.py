"""Reactor stalls: the longest time the reactor thread goes without running a 5 ms heartbeat,
during a paid crawl of PAGES pages (deferred, pre-authorised, settled at close) whose RPC
answers slowly, against an unpaid crawl of the same site.

The RPC is anvil behind a proxy that adds RPC_DELAY to every JSON-RPC call, as a remote
node would: if any chain call ran on the reactor, the heartbeat would miss at least that
long. The paid crawl's gaps cover the whole crawl and its close (spider_closed, the
settlement, the ledger's close); ``reactor_settlement_seconds`` is that close, from
spider_closed to engine_stopped. When the worst gap is over LIMIT_MS, the paid crawl runs
again with a watchdog that samples the reactor thread's stack during each stall and the
stacks are printed.

    python -m bench.reactor [PAGES]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench._common import ROOT, machine, paid_world, result, server

PAGES = int(sys.argv[1]) if len(sys.argv) > 1 else 400
PAYEES = 4
RPC_DELAY = 0.200  # seconds added to every JSON-RPC call
LIMIT_MS = 50  # worst gap above which the stalls are diagnosed


@contextmanager
def slow_rpc(upstream: str, delay: float) -> Iterator[tuple[str, list[str]]]:
    """A JSON-RPC proxy to ``upstream`` on a loopback port, ``delay`` seconds slower per
    call: its URL, and the methods it was asked for (in order)."""
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as web3's session expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                payload = json.loads(body)
                batch = payload if isinstance(payload, list) else [payload]
                calls.extend(str(call.get("method")) for call in batch)
            except ValueError:
                calls.append("?")
            time.sleep(delay)
            request = urllib.request.Request(
                upstream, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                data, status = answer.read(), answer.status
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="slow-rpc", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", calls
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def crawl(tmp: Path, name: str, urls: list[str], settings: dict, env: dict[str, str], *flags: str):
    urls_file = tmp / f"{name}.txt"
    urls_file.write_text("\n".join(urls))
    out = subprocess.run(
        [sys.executable, "-m", "bench._heartbeat", str(urls_file), json.dumps(settings), *flags],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise RuntimeError(f"the {name} crawl failed")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["items"] == len(urls), (name, run)
    close = f", close {run['close_seconds']:.2f} s" if run["paid"] else ""
    collections = run["collections"]
    longest_gc = max((c[1] for c in collections), default=0.0)
    print(
        f"{name:<8} {run['items']} pages, {run['ticks']} ticks: worst gap "
        f"{run['worst_gap_ms']:.1f} ms (crawl {run['worst_crawl_gap_ms']:.1f}, close "
        f"{run['worst_close_gap_ms']:.1f}); gaps > 20 ms: {run['gaps_over_20ms']}, "
        f"> 50 ms: {run['gaps_over_50ms']}; garbage collections > 5 ms: {len(collections)} "
        f"(longest {longest_gc:.1f} ms){close}  (paid {run['paid']}, pre-authorised "
        f"{run['preauthorized']}, settled {run['settled']} in {run['settlements']} transactions)"
    )
    return run


def print_stalls(run: dict[str, Any]) -> None:
    """The sampled stacks of the stalls longer than LIMIT_MS, longest first."""
    marks = run["marks"]
    for gap_ms, ended, cpu_ms, process_ms in run["longest"]:
        if gap_ms <= LIMIT_MS:
            break
        started = ended - gap_ms / 1000
        phase = "close" if ended > marks.get("spider_closed", float("inf")) else "crawl"
        print(
            f"\n## stall of {gap_ms:.1f} ms at {started:.3f} s ({phase}): the reactor thread "
            f"ran {cpu_ms:.1f} ms of it, the process {process_ms:.1f} ms"
        )
        for at, ms, generation, thread in run["collections"]:
            if started - 0.001 <= at <= ended:
                print(
                    f"   of which a garbage collection (generation {generation}, in thread "
                    f"{thread}): {ms:.1f} ms"
                )
        stacks = [s for start, s in run["stalls"] if abs(start - started) < 0.002]
        if not stacks:
            print("   (not sampled: the watchdog did not get the GIL during it)")
            continue
        for samples, stack in stacks[0]:
            print(f"   {samples} samples:")
            for frame in stack:
                print(f"      {frame}")


def main() -> None:
    print(
        f"# reactor stalls, {PAGES} pages, CONCURRENT_REQUESTS=32, heartbeat every 5 ms, "
        f"RPC +{RPC_DELAY * 1000:.0f} ms per call, {machine()}"
    )
    with paid_world(PAYEES) as world:
        tmp, env = world.tmp, world.env
        with (
            server(world.site_args()) as site,
            slow_rpc(world.chain.url, RPC_DELAY) as (rpc, calls),
        ):

            def settings(name: str) -> dict:
                return world.settings(name, rpc)

            free = [f"{site}/free/{i}" for i in range(PAGES)]
            paid = [f"{site}/paid/{i % PAYEES}/{i}" for i in range(PAGES)]
            unpaid_run = crawl(tmp, "unpaid", free, {}, env)
            paid_run = crawl(tmp, "paid", paid, settings("paid"), env)
            methods = Counter(calls)
            assert paid_run["settled"] == PAGES, paid_run
            print(
                f"settlement at close: {paid_run['settlements']} transactions, {len(calls)} RPC "
                f"calls at +{RPC_DELAY * 1000:.0f} ms each, {paid_run['close_seconds']:.2f} s "
                f"from spider_closed to engine_stopped; calls: "
                + ", ".join(f"{m} {n}" for m, n in methods.most_common())
            )
            if paid_run["worst_gap_ms"] > LIMIT_MS:
                print(f"\n# worst gap over {LIMIT_MS} ms: the paid crawl again, sampled")
                sampled = crawl(tmp, "sampled", paid, settings("sampled"), env, "--diagnose")
                print_stalls(sampled)
                print()

    result("reactor_worst_gap_ms", paid_run["worst_gap_ms"])
    result("reactor_worst_gap_ms_unpaid", unpaid_run["worst_gap_ms"])
    result("reactor_worst_gap_ms_close", paid_run["worst_close_gap_ms"])
    result("reactor_settlement_seconds", paid_run["close_seconds"])


if __name__ == "__main__":
    main()
