"""RPC URLs carry API keys in their paths and queries: never show more than their host."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…" if parts.scheme else "…"


def redact(text: str, urls: Iterable[str]) -> str:
    """``text`` with every one of ``urls`` (and its path and query alone) redacted."""
    for url in urls:
        parts = urlsplit(url)
        secret_tail = parts.path + (f"?{parts.query}" if parts.query else "")
        text = text.replace(url, redact_url(url))
        if len(secret_tail) > 1:
            text = text.replace(secret_tail, "/…")
    return text
