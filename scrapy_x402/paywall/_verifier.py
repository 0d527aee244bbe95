from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from eth_utils import to_checksum_address

from scrapy_x402._networks import CAIP2_TO_V1, evm_chain_id, normalize_network
from scrapy_x402._protocol import InvalidChallenge, b64json_decode
from scrapy_x402.schemes.deferred import Commitment, InvalidCommitment, resource_hash


class PaymentRejected(Exception):
    """A payment the publisher must refuse; ``reason`` is the x402 errorReason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NonceStore(Protocol):
    """Replay protection: which commitment each payer's nonce is bound to, and whether the
    page it paid for was served."""

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> bool:
        """Bind a payer's nonce to a commitment. False when it is bound to another
        commitment, or when its page was already served (a replay).

        The same commitment may be presented again until its page is served (a client
        resending it after a 5xx): it is still one commitment, settled once.
        """

    def served(self, payer: str, nonce: str) -> None:
        """The page the commitment paid for was served: no more presentations."""


class MemoryNonceStore:
    """Nonces of one process. Expired commitments are rejected anyway, so their nonces
    are forgotten and memory stays bounded by the commitments still valid."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._seen: dict[tuple[str, str], list[Any]] = {}  # -> [commitment id, valid until, served]
        self._clock = clock
        self._next_prune = 0.0

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> bool:
        now = self._clock()
        if now >= self._next_prune:
            self._seen = {k: v for k, v in self._seen.items() if v[1] > now}
            self._next_prune = now + 60
        bound = self._seen.setdefault(
            (payer.lower(), nonce.lower()), [commitment_id, valid_until, False]
        )
        return bool(bound[0] == commitment_id and not bound[2])

    def served(self, payer: str, nonce: str) -> None:
        entry = self._seen.get((payer.lower(), nonce.lower()))
        if entry is not None:
            entry[2] = True


class SQLiteNonceStore:
    """Nonces shared by several publisher processes through one SQLite file."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_nonces (payer TEXT NOT NULL, nonce TEXT NOT NULL, "
            "commitment_id TEXT NOT NULL, valid_until INTEGER NOT NULL, served INTEGER NOT NULL, "
            "PRIMARY KEY (payer, nonce))"
        )
        self._clock = clock

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> bool:
        key = (payer.lower(), nonce.lower())
        self._conn.execute("BEGIN IMMEDIATE")  # one claim at a time across processes
        try:
            self._conn.execute(
                "DELETE FROM x402_nonces WHERE valid_until < ?", (int(self._clock()),)
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO x402_nonces VALUES (?, ?, ?, ?, 0)",
                (*key, commitment_id, valid_until),
            )
            bound, served = self._conn.execute(
                "SELECT commitment_id, served FROM x402_nonces WHERE payer = ? AND nonce = ?", key
            ).fetchone()
        finally:
            self._conn.execute("COMMIT")
        return bool(bound == commitment_id and not served)

    def served(self, payer: str, nonce: str) -> None:
        self._conn.execute(
            "UPDATE x402_nonces SET served = 1 WHERE payer = ? AND nonce = ?",
            (payer.lower(), nonce.lower()),
        )


class DeferredVerifier:
    """Sells pages for ``deferred`` commitments paid to ``pay_to`` in ``asset`` on ``network``."""

    scheme = "deferred"

    def __init__(
        self,
        network: str,
        asset: str,
        pay_to: str,
        *,
        nonces: NonceStore | None = None,
        max_timeout_seconds: int = 300,
        extra: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        chain_id = evm_chain_id(normalize_network(network) or "")
        if chain_id is None:
            raise ValueError(f"{network!r} is not an eip155:N network")
        self.network = f"eip155:{chain_id}"
        self.chain_id = chain_id
        self.asset = to_checksum_address(asset)
        self.pay_to = to_checksum_address(pay_to)
        self.nonces = nonces if nonces is not None else MemoryNonceStore(clock)
        self.max_timeout_seconds = max_timeout_seconds
        self.extra = dict(extra or {})
        self._clock = clock

    def offer(self, amount: int, url: str, version: int = 2) -> dict[str, Any]:
        """One ``accepts`` entry selling ``url`` for ``amount`` atomic units."""
        offer: dict[str, Any] = {
            "scheme": self.scheme,
            "network": self.network,
            "asset": self.asset,
            "payTo": self.pay_to,
            "maxTimeoutSeconds": self.max_timeout_seconds,
            "extra": self.extra,
        }
        if version == 1:
            offer.update(
                network=CAIP2_TO_V1.get(self.network, self.network),
                maxAmountRequired=str(amount),
                resource=url,
                mimeType="text/html",
                description="",
            )
        else:
            offer["amount"] = str(amount)
        return offer

    def payment_required(
        self, amount: int, url: str, version: int = 2, error: str = "payment required"
    ) -> dict[str, Any]:
        """The PaymentRequired object (v2 header content, or v1 body)."""
        terms: dict[str, Any] = {
            "x402Version": version,
            "error": error,
            "accepts": [self.offer(amount, url, version)],
        }
        if version == 2:
            terms["resource"] = {"url": url, "mimeType": "text/html"}
        return terms

    def verify(self, header_value: str | bytes, amount: int, url: str) -> Commitment:
        """Check a ``PAYMENT-SIGNATURE`` (or v1 ``X-PAYMENT``) value for ``url`` at ``amount``.

        Returns the accepted commitment (its nonce is now used) or raises PaymentRejected.
        """
        try:
            payment = b64json_decode(header_value)
        except InvalidChallenge:
            raise PaymentRejected("invalid_payload") from None
        if not isinstance(payment, dict) or not isinstance(payment.get("payload"), dict):
            raise PaymentRejected("invalid_payload")
        accepted = payment.get("accepted") if payment.get("x402Version") == 2 else payment
        if not isinstance(accepted, dict) or accepted.get("scheme") != self.scheme:
            raise PaymentRejected("unsupported_scheme")
        if normalize_network(str(accepted.get("network", ""))) != self.network:
            raise PaymentRejected("invalid_network")
        signature = payment["payload"].get("signature")
        try:
            commitment = Commitment.from_json(self.chain_id, payment["payload"].get("commitment"))
        except InvalidCommitment:
            raise PaymentRejected("invalid_payload") from None
        now = int(self._clock())
        checks = [
            (commitment.payee == self.pay_to, "wrong_payee"),
            (commitment.token == self.asset, "wrong_token"),
            (commitment.amount >= amount, "underpaid"),
            (commitment.resource == resource_hash(url), "wrong_resource"),
            (commitment.valid_until > now, "expired"),
            (commitment.valid_until <= now + self.max_timeout_seconds + 60, "expiry_too_far"),
        ]
        for ok, reason in checks:
            if not ok:
                raise PaymentRejected(reason)
        if not isinstance(signature, str):
            raise PaymentRejected("invalid_signature")
        try:
            signer = commitment.recover_signer(signature)
        except InvalidCommitment:
            raise PaymentRejected("invalid_signature") from None
        if signer != commitment.payer:
            raise PaymentRejected("invalid_signature")
        # Last, so only a valid commitment uses up its nonce.
        if not self.nonces.claim(
            commitment.payer, commitment.nonce, commitment.id, commitment.valid_until
        ):
            raise PaymentRejected("nonce_reused")
        return commitment

    def receipt(self, commitment: Commitment) -> dict[str, Any]:
        """The SettlementResponse for an accepted commitment: nothing moved on-chain yet."""
        return {
            "success": True,
            "transaction": "",
            "network": self.network,
            "payer": commitment.payer,
            "amount": str(commitment.amount),
            "extra": {"commitmentId": commitment.id},
        }

    def refusal(self, reason: str) -> dict[str, Any]:
        return {"success": False, "errorReason": reason, "transaction": "", "network": self.network}
