"""Shared by the benchmark scripts: servers in their own processes, and result lines."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def result(name: str, value: float | int | str) -> None:
    """One figure, in the form compared across commits: ``RESULT <name> <value>``."""
    if isinstance(value, float):
        value = f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    print(f"RESULT {name} {value}", flush=True)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


@contextmanager
def server(args: list[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """A server script that prints its URL on its first line, stopped on exit."""
    process = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError(f"{args[0]} did not start")
        yield url
    finally:
        process.terminate()
        process.wait(10)
