"""Keeping RPC URLs out of logs, outcomes and the ledger: providers put API keys in them.

An Alchemy or Infura URL is ``https://host/v2/<key>``; requests names it in its exceptions
(the whole URL, or only its path) and web3 and urllib3 log it at DEBUG. Only the scheme, host
and port are safe to show.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit

# The libraries that log the URL of each request they make.
_LOGGERS_NAMING_URLS = (
    "web3.providers.HTTPProvider",
    "web3._utils.http_session_manager.HTTPSessionManager",
    "urllib3.connectionpool",
)


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…``: userinfo dropped, path and query hidden."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with the parts of each URL of ``secrets`` that may hold a key hidden.

    requests names the whole URL, or only its path and query; the host may stay.
    """
    for url in secrets:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        path_query = parts.path + (f"?{parts.query}" if parts.query else "")
        # Longest first, so that a path is not half hidden before its query is.
        for fragment, mask in (
            (f"{userinfo}@" if userinfo else "", ""),
            (path_query, "/…"),
            (parts.path, "/…"),
            (parts.query, "…"),
            (parts.password or "", "…"),
        ):
            if fragment.strip("/"):
                text = text.replace(fragment, mask)
    return text


class _RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message, self.secrets)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


_filter = _RedactingFilter()


def hide_in_logs(url: str) -> None:
    """Hide ``url`` from what the HTTP libraries log about the requests made to it."""
    _filter.secrets.add(url)
    for name in _LOGGERS_NAMING_URLS:
        logging.getLogger(name).addFilter(_filter)  # once: addFilter skips duplicates
