"""What the harnesses share: libFuzzer's command line, seed inputs, a throwaway corpus.

Each harness runs alone (``PYTHONPATH=. python -m fuzz.<name> -max_total_time=60``; any
libFuzzer flag works), starting from its seeds, written to ``fuzz/corpus/<name>/``. A crash
(an exception other than the documented malformed-input one) stops it with the traceback and
the input, saved as ``fuzz/artifacts/<name>-crash-<sha1>``; run the harness with that file as
its argument to reproduce it.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent


def run(name: str, test_one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    logging.disable(logging.CRITICAL)  # the warnings malformed input earns are not crashes
    corpus = HERE / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    for n, seed in enumerate(seeds):
        (corpus / f"seed-{n}").write_bytes(seed)
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    args = sys.argv[1:]
    inputs = [a for a in args if not a.startswith("-")] or [str(corpus)]
    flags = [a for a in args if a.startswith("-")]
    if not any(f.startswith("-dict=") for f in flags):
        flags.append(f"-dict={HERE / 'x402.dict'}")
    atheris.Setup(
        [sys.argv[0], f"-artifact_prefix={artifacts}/{name}-", *flags, *inputs], test_one_input
    )
    atheris.Fuzz()


def split(data: bytes) -> tuple[int, bytes]:
    """The first byte chooses a variant, the rest is the input: keeps seeds readable."""
    return (data[0], data[1:]) if data else (0, b"")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)
