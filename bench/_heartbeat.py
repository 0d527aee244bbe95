"""Child of bench/reactor.py: one crawl of the given URLs with a heartbeat on the reactor;
prints the gaps between its ticks as JSON.

    python -m bench._heartbeat URLS_FILE SETTINGS_JSON [--diagnose]

A ``LoopingCall`` ticks every ``TICK`` seconds from the moment the reactor runs until it
shuts down (the whole crawl, spider_closed handlers, settlement at close and engine_stopped
handlers included); a gap between two ticks is the time the reactor thread was busy or
blocked. With ``--diagnose``, a watchdog thread samples the reactor thread's stack while a
gap is longer than ``STALL``, so the report says which call the reactor was in.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from scrapy.utils.reactor import install_reactor

install_reactor("twisted.internet.asyncioreactor.AsyncioSelectorReactor")

from scrapy import signals
from scrapy.crawler import CrawlerProcess
from twisted.internet import reactor
from twisted.internet.task import LoopingCall

from bench.crawl import CRAWL_SETTINGS, Pages

TICK = 0.005  # seconds between heartbeats
STALL = 0.020  # a gap longer than this is sampled by the watchdog (--diagnose)
SAMPLE = 0.002  # seconds between the watchdog's samples
KEEP = 20  # longest gaps reported
ROOT = str(Path(__file__).resolve().parent.parent)


class Heartbeat:
    """The gaps between ticks: (seconds, when the gap ended in seconds since the first tick,
    CPU seconds the reactor thread used during it, CPU seconds the whole process used). A gap
    the reactor thread spent running (CPU ≈ gap) is work on the reactor; one it spent off
    the CPU is a wait: for the GIL (process CPU ≈ gap: another thread held it), for a
    blocking call, or for a core (the machine was busy)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.gaps: list[tuple[float, float, float, float]] = []
        self.start = 0.0
        self.marks: dict[str, float] = {}
        self.loop = LoopingCall(self.tick)
        self._cpu = (0.0, 0.0)

    def tick(self) -> None:
        now, cpu = time.perf_counter(), (time.thread_time(), time.process_time())
        if self.last is not None:
            self.gaps.append(
                (now - self.last, now - self.start, cpu[0] - self._cpu[0], cpu[1] - self._cpu[1])
            )
        self.last, self._cpu = now, cpu

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.loop.start(TICK, now=True)

    def end(self) -> None:
        self.tick()
        if self.loop.running:
            self.loop.stop()

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter() - self.start)


class Collections:
    """Garbage collections longer than 5 ms, in any thread (each holds the GIL, so the
    reactor waits for it): (start, ms, generation, thread name)."""

    def __init__(self, heartbeat: Heartbeat):
        self.heartbeat = heartbeat
        self.long: list[tuple[float, float, int, str]] = []
        self._began: dict[int, float] = {}

    def __call__(self, phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._began[threading.get_ident()] = now
            return
        began = self._began.pop(threading.get_ident(), now)
        if now - began > 0.005 and self.heartbeat.start:
            thread = threading.current_thread().name
            self.long.append(
                (began - self.heartbeat.start, 1000 * (now - began), info["generation"], thread)
            )


class Watchdog(threading.Thread):
    """Samples the reactor thread's stack while the heartbeat is late: what it was doing
    during each stall, as counts of stacks, keyed by the tick that preceded the stall."""

    def __init__(self, heartbeat: Heartbeat, reactor_thread: int):
        super().__init__(name="heartbeat-watchdog", daemon=True)
        self.heartbeat = heartbeat
        self.reactor_thread = reactor_thread
        self.samples: dict[float, Counter[tuple[str, ...]]] = {}
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            time.sleep(SAMPLE)
            last = self.heartbeat.last
            if last is None or time.perf_counter() - last < STALL:
                continue
            frame = sys._current_frames().get(self.reactor_thread)
            if frame is None:
                continue
            stack = tuple(
                f"{_short(f.filename)}:{f.lineno} {f.name}"
                for f in traceback.extract_stack(frame)[-14:]
            )
            self.samples.setdefault(last - self.heartbeat.start, Counter())[stack] += 1


def _short(path: str) -> str:
    if path.startswith(ROOT + "/"):
        return path[len(ROOT) + 1 :]
    marker = "site-packages/"
    return path[path.index(marker) + len(marker) :] if marker in path else path


def main() -> None:
    urls_file, settings_json = sys.argv[1], sys.argv[2]
    diagnose = "--diagnose" in sys.argv[3:]
    settings = {**CRAWL_SETTINGS, **json.loads(settings_json)}
    heartbeat = Heartbeat()
    process = CrawlerProcess(settings)
    crawler = process.create_crawler(Pages)
    for name, signal in (
        ("engine_started", signals.engine_started),
        ("spider_closed", signals.spider_closed),
        ("engine_stopped", signals.engine_stopped),
    ):
        # Connected before the crawl builds its components: these run first of their signal.
        crawler.signals.connect(lambda name=name, **_: heartbeat.mark(name), signal, weak=False)
    reactor.callWhenRunning(heartbeat.begin)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", heartbeat.end)  # type: ignore[attr-defined]
    collections = Collections(heartbeat)
    gc.callbacks.append(collections)
    watchdog = Watchdog(heartbeat, threading.get_ident()) if diagnose else None
    if watchdog is not None:
        watchdog.start()
    process.crawl(crawler, urls_file=urls_file)
    process.start()
    if watchdog is not None:
        watchdog.stopped = True
        watchdog.join()
    stats = crawler.stats.get_stats()
    closed = heartbeat.marks.get("spider_closed", float("inf"))
    gaps = heartbeat.gaps
    crawl_gaps = [g[0] for g in gaps if g[1] <= closed]
    close_gaps = [g[0] for g in gaps if g[1] > closed]
    longest = sorted(gaps, reverse=True)[:KEEP]
    report = {
        "items": stats.get("item_scraped_count", 0),
        "paid": stats.get("x402/payment_count", 0),
        "preauthorized": stats.get("x402/preauthorized", 0),
        "settled": stats.get("x402/settled_payment_count", 0),
        "settlements": stats.get("x402/settlement/confirmed", 0),
        "ticks": len(gaps),
        "marks": heartbeat.marks,
        "close_seconds": heartbeat.marks.get("engine_stopped", 0.0) - closed,
        "worst_gap_ms": 1000 * max(g[0] for g in gaps),
        "worst_crawl_gap_ms": 1000 * max(crawl_gaps, default=0.0),
        "worst_close_gap_ms": 1000 * max(close_gaps, default=0.0),
        "gaps_over_20ms": sum(g[0] > 0.020 for g in gaps),
        "gaps_over_50ms": sum(g[0] > 0.050 for g in gaps),
        # (ms, ended at s, reactor thread CPU ms, process CPU ms)
        "longest": [[1000 * g, at, 1000 * cpu, 1000 * pcpu] for g, at, cpu, pcpu in longest],
        "collections": collections.long,
    }
    if watchdog is not None:
        # Each sampled stall: its start (s since the heartbeat began) and its stacks, most
        # sampled first; matched to the gaps by start = end - gap.
        report["stalls"] = [
            [start, [[n, list(stack)] for stack, n in counts.most_common(3)]]
            for start, counts in sorted(watchdog.samples.items())
        ]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
