"""A JSON-RPC proxy in front of anvil that misbehaves on cue, by method name.

Faults: forward then answer 502 (the node acted, the client hears an error), answer 502
without forwarding, delay, drop the connection, and hooks run after forwarding (to mine a
block at an exact point, say). Any path is accepted, so the URL can carry a fake API key.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def rpc(url: str, method: str, params: list[Any] | None = None) -> Any:
    """One JSON-RPC call, straight to ``url``."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []})
    request = urllib.request.Request(
        url, body.encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response).get("result")


@dataclass
class Fault:
    method: str
    times: int = 1  # then it stops applying
    forward: bool = True
    answer: str = "ok"  # ok (the node's answer), 502, drop, null (a node that lags behind)
    delay: float = 0.0
    hook: Callable[[list[Any]], Any] | None = None  # called with the params, after forwarding


class RPCProxy:
    def __init__(self, upstream: str, path: str = "/"):
        self.upstream = upstream
        self.calls: list[str] = []  # method names, in the order they arrived
        self.faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RPCProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening: from now on, connections to the URL are refused."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    # -- faults --------------------------------------------------------------------

    def forward_then_502(self, method: str, times: int = 1) -> None:
        self.faults.append(Fault(method, times, answer="502"))

    def answer_502(self, method: str, times: int = 1) -> None:
        self.faults.append(Fault(method, times, forward=False, answer="502"))

    def drop(self, method: str, times: int = 1, forward: bool = False) -> None:
        self.faults.append(Fault(method, times, forward=forward, answer="drop"))

    def lag(self, method: str, times: int = 1) -> None:
        """Answer null without asking the node: a load-balanced RPC's backend that has not
        seen the latest blocks yet."""
        self.faults.append(Fault(method, times, forward=False, answer="null"))

    def delay(self, method: str, seconds: float, times: int = 1) -> None:
        self.faults.append(Fault(method, times, delay=seconds))

    def after(self, method: str, hook: Callable[[list[Any]], Any], times: int = 1) -> None:
        self.faults.append(Fault(method, times, hook=hook))

    def node(self, method: str, params: list[Any] | None = None) -> Any:
        """Call anvil directly (from a hook, say), unseen by the proxy."""
        return rpc(self.upstream, method, params)

    def _take(self, method: str) -> Fault | None:
        with self._lock:
            self.calls.append(method)
            for fault in self.faults:
                if fault.method == method and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                call = json.loads(body)
                fault = proxy._take(call.get("method", "")) or Fault("")
                time.sleep(fault.delay)
                answer = b""
                if fault.answer == "null":
                    answer = json.dumps({"jsonrpc": "2.0", "id": call.get("id"), "result": None})
                    answer = answer.encode()
                if fault.forward:
                    request = urllib.request.Request(
                        proxy.upstream, body, {"Content-Type": "application/json"}
                    )
                    with urllib.request.urlopen(request, timeout=30) as response:
                        answer = response.read()
                if fault.hook is not None:
                    fault.hook(call.get("params", []))
                if fault.answer == "drop":
                    self.close_connection = True  # no status line: the client sees a reset
                    return
                status = 502 if fault.answer == "502" else 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the path may hold a (fake) key: keep it out of stderr too

        return Handler
