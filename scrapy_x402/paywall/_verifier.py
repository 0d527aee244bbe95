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


# Rows of expired commitments are forgotten only this long after they expired: longer than any
# clock skew between publisher processes, so no process forgets a nonce another still accepts.
PRUNE_MARGIN = 600

# What a (payer, nonce) is doing. The SQLite column is named ``served`` for files made by
# earlier versions, whose 0 (bound, not served) and 1 (served) mean what they mean here.
RELEASED, SERVED, IN_FLIGHT = 0, 1, 2


class NonceStore(Protocol):
    """Replay protection: which commitment each payer's nonce is bound to, and whether it is
    being served (in flight), was served, or was released after a failure."""

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> str | None:
        """Bind a payer's nonce to a commitment and mark it in flight. None when claimed,
        else the errorReason: ``expired`` by the store's clock, ``nonce_reused`` when bound to
        another commitment or already served, ``payment_in_flight`` while another request
        presents the same commitment.

        A released commitment (its request ended without a 2xx) may be claimed again: it is
        still one commitment, owed once.
        """

    def served(self, payer: str, nonce: str) -> None:
        """The commitment's 2xx status line was sent: no more presentations."""

    def release(self, payer: str, nonce: str) -> None:
        """The request ended without a 2xx: the commitment may be presented again."""

    def in_flight(self, commitment_id: str) -> bool:
        """Whether a request presenting the commitment is being answered now (so whether it
        will be owed is not known yet: docs section 7)."""

    def in_flight_count(self, payer: str) -> int:
        """How many of the payer's commitments are being answered now (credit not yet
        counted as owed: PayerPolicy)."""


class MemoryNonceStore:
    """Nonces of one process. Expired commitments are rejected anyway, so their nonces are
    forgotten (PRUNE_MARGIN after expiry) and memory stays bounded by the commitments still
    valid."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._seen: dict[tuple[str, str], list[Any]] = {}  # -> [commitment id, valid until, state]
        self._clock = clock
        self._next_prune = 0.0

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> str | None:
        now = self._clock()
        if valid_until <= now:
            return "expired"
        if now >= self._next_prune:
            self._seen = {k: v for k, v in self._seen.items() if v[1] >= now - PRUNE_MARGIN}
            self._next_prune = now + 60
        key = (payer.lower(), nonce.lower())
        bound = self._seen.get(key)
        if bound is None:
            self._seen[key] = [commitment_id, valid_until, IN_FLIGHT]
            return None
        refusal = _refusal(bound[0], bound[2], commitment_id)
        if refusal is None:
            bound[2] = IN_FLIGHT
        return refusal

    def served(self, payer: str, nonce: str) -> None:
        self._set(payer, nonce, SERVED)

    def release(self, payer: str, nonce: str) -> None:
        self._set(payer, nonce, RELEASED)

    def in_flight(self, commitment_id: str) -> bool:
        # A scan: only clients recovering from a crash ask.
        return any(v[0] == commitment_id and v[2] == IN_FLIGHT for v in self._seen.values())

    def in_flight_count(self, payer: str) -> int:
        payer = payer.lower()
        return sum(1 for (p, _), v in self._seen.items() if p == payer and v[2] == IN_FLIGHT)

    def _set(self, payer: str, nonce: str, state: int) -> None:
        entry = self._seen.get((payer.lower(), nonce.lower()))
        if entry is not None and entry[2] != SERVED:
            entry[2] = state


class SQLiteNonceStore:
    """Nonces shared by several publisher processes through one SQLite file. Every claim
    reads the time from this store's clock, inside the transaction that claims."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self._conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS x402_nonces (payer TEXT NOT NULL, nonce TEXT NOT NULL, "
            "commitment_id TEXT NOT NULL, valid_until INTEGER NOT NULL, served INTEGER NOT NULL, "
            "PRIMARY KEY (payer, nonce))"
        )
        self._conn.execute(
            "CREATE INDEX IF NOT EXISTS x402_nonces_commitment ON x402_nonces (commitment_id)"
        )
        self._clock = clock

    def claim(self, payer: str, nonce: str, commitment_id: str, valid_until: int) -> str | None:
        key = (payer.lower(), nonce.lower())
        self._conn.execute("BEGIN IMMEDIATE")  # one claim at a time across processes
        try:
            now = self._clock()  # read after the lock: a claim that waited sees the time it ran
            if valid_until <= now:
                return "expired"
            self._conn.execute(
                "DELETE FROM x402_nonces WHERE valid_until < ?", (int(now) - PRUNE_MARGIN,)
            )
            row = self._conn.execute(
                "SELECT commitment_id, served FROM x402_nonces WHERE payer = ? AND nonce = ?", key
            ).fetchone()
            refusal = None if row is None else _refusal(row[0], row[1], commitment_id)
            if refusal is None:
                self._conn.execute(
                    "INSERT OR REPLACE INTO x402_nonces VALUES (?, ?, ?, ?, ?)",
                    (*key, commitment_id, valid_until, IN_FLIGHT),
                )
            return refusal
        finally:
            self._conn.execute("COMMIT")

    def served(self, payer: str, nonce: str) -> None:
        self._set(payer, nonce, SERVED)

    def release(self, payer: str, nonce: str) -> None:
        self._set(payer, nonce, RELEASED)

    def in_flight_count(self, payer: str) -> int:
        (count,) = self._conn.execute(  # the primary key's (payer, ...) prefix
            "SELECT COUNT(*) FROM x402_nonces WHERE payer = ? AND served = ?",
            (payer.lower(), IN_FLIGHT),
        ).fetchone()
        return int(count)

    def in_flight(self, commitment_id: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM x402_nonces WHERE commitment_id = ? AND served = ?",
            (commitment_id, IN_FLIGHT),
        ).fetchone()
        return row is not None

    def _set(self, payer: str, nonce: str, state: int) -> None:
        self._conn.execute(
            "UPDATE x402_nonces SET served = ? WHERE payer = ? AND nonce = ? AND served != ?",
            (state, payer.lower(), nonce.lower(), SERVED),
        )


def _refusal(bound_id: str, state: int, commitment_id: str) -> str | None:
    """Why a nonce bound to ``bound_id`` in ``state`` cannot be claimed for ``commitment_id``."""
    if bound_id != commitment_id or state == SERVED:
        return "nonce_reused"
    if state == IN_FLIGHT:
        return "payment_in_flight"
    return None


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
        """``check`` then ``claim``: the commitment returned is in flight until the caller
        reports it ``served`` (as it sends a 2xx status line) or ``release``s it (the request
        ended without one). PaywallResource does both."""
        commitment = self.check(header_value, amount, url)
        self.claim(commitment)
        return commitment

    def check(self, header_value: str | bytes, amount: int, url: str) -> Commitment:
        """Check a ``PAYMENT-SIGNATURE`` (or v1 ``X-PAYMENT``) value for ``url`` at ``amount``
        (docs section 5, steps 1-11): the commitment, or PaymentRejected. Touches no state."""
        try:
            payment = b64json_decode(header_value)
        except InvalidChallenge:
            raise PaymentRejected("invalid_payload") from None
        if not isinstance(payment, dict) or not isinstance(payment.get("payload"), dict):
            raise PaymentRejected("invalid_payload")
        version = payment.get("x402Version")
        if type(version) is not int or version not in (1, 2):  # not 2.0, not true
            raise PaymentRejected("invalid_payload")
        accepted = payment.get("accepted") if version == 2 else payment
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
            (commitment.amount == amount, "amount_mismatch"),  # the price, not a blank cheque
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
        return commitment

    def claim(self, commitment: Commitment) -> None:
        """Mark a checked commitment in flight (docs section 5, step 12), or PaymentRejected."""
        refusal = self.nonces.claim(
            commitment.payer, commitment.nonce, commitment.id, commitment.valid_until
        )
        if refusal is not None:
            raise PaymentRejected(refusal)

    def served(self, commitment: Commitment) -> None:
        """Its 2xx status line is being sent: owed, never to be presented again."""
        self.nonces.served(commitment.payer, commitment.nonce)

    def release(self, commitment: Commitment) -> None:
        """Its request ended without a 2xx: not owed, and it may be presented again."""
        self.nonces.release(commitment.payer, commitment.nonce)

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
