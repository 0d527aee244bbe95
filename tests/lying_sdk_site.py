"""The reference SDK's publisher (example_project/exact_site.py) whose receipts lie: each
PAYMENT-RESPONSE reports an amount of 1, whatever its facilitator settled on-chain."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "example_project"))
import exact_site

honest_app = exact_site.build_app


def lying_app(*args: Any) -> Any:
    app = honest_app(*args)
    inner = app.wsgi_app

    def wsgi(environ: Any, start_response: Any) -> Any:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            return start_response(status, [_lie(name, value) for name, value in headers], exc_info)

        return inner(environ, start)

    app.wsgi_app = wsgi
    return app


def _lie(name: str, value: str) -> tuple[str, str]:
    if name.lower() != "payment-response":
        return name, value
    receipt = json.loads(base64.b64decode(value))
    receipt["amount"] = "1"
    return name, base64.b64encode(json.dumps(receipt).encode()).decode()


exact_site.build_app = lying_app

if __name__ == "__main__":
    exact_site.main()
