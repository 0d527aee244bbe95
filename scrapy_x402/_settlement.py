"""Bulk settlement: one ERC-20 transfer per (network, token, payee) of what the ledger owes.

Idempotent by construction: each signed transfer is written to the ledger, its payments moved
from owed to settling, before it is broadcast. From then on only the chain decides its fate
(``ledger.SettlementStatus``). An error or a timeout while broadcasting is an unknown outcome,
never a failure: the node may hold the transfer. A settlement ends when the chain proves, deep
enough, that it was mined (confirmed; or reverted: owed again) or that another transaction used
its nonce (replaced: owed again). Re-broadcasting the same signed bytes is always safe.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_typing import ChecksumAddress, HexStr
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3Exception

from scrapy_x402._chain import ChainMismatch, connect, token_balance
from scrapy_x402._networks import evm_chain_id
from scrapy_x402._redact import redact
from scrapy_x402.ledger import IllegalTransition, OwedTotal, Settlement
from scrapy_x402.ledger import SettlementStatus as S
from scrapy_x402.payments import PaymentBook
from scrapy_x402.schemes.deferred import MAX_SETTLEMENT_IDS, settlement_calldata

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from eth_account.signers.local import LocalAccount

    from scrapy_x402._assets import AssetTable
    from scrapy_x402._config import X402Config

logger = logging.getLogger(__name__)

DEV_CHAINS = frozenset({"eip155:31337", "eip155:1337"})  # no reorgs: one confirmation will do


class SettlementError(Exception):
    pass


# What a chain call may raise: transport errors (requests' are OSErrors), node errors, bad data.
_ERRORS = (SettlementError, ChainMismatch, OSError, ValueError, Web3Exception)


@dataclass(frozen=True)
class Outcome:
    network: str
    asset: str
    payee: str
    amount: int
    payment_count: int
    # planned, confirmed, reverted, replaced, pending (fate unknown yet), failed (nothing
    # sent), skipped
    status: str
    tx_hash: str | None = None
    reason: str | None = None


@dataclass
class _Watched:
    """A recorded settlement whose fate is being read from the chain."""

    settlement: Settlement
    payment_ids: tuple[str, ...]
    status: str
    block: int | None = None
    error: str | None = None  # the last chain error, redacted


class Settler:
    def __init__(
        self,
        book: PaymentBook,
        account: LocalAccount,
        rpc_urls: Mapping[str, str],
        assets: AssetTable,
        timeout: int = 120,
        max_gas_price: int | None = None,
        confirmations: int | None = None,
        poll_interval: float = 0.2,
    ):
        self.book = book  # every status change: the PaymentBook's settle_* events
        self.ledger = book.store  # reads
        self.account = account
        self.rpc_urls = rpc_urls
        self.assets = assets
        self.timeout = timeout  # one deadline for all the transfers of a settle()
        self.max_gas_price = max_gas_price  # wei per gas
        self.confirmations = confirmations
        self.poll_interval = poll_interval
        self.illegal_transitions = 0  # status changes the ledger refused: a bug, or a race
        self._web3: dict[str, Web3] = {}

    @classmethod
    def from_config(cls, book: PaymentBook, account: LocalAccount, config: X402Config) -> Settler:
        return cls(
            book,
            account,
            config.rpc_urls,
            config.assets,
            config.settlement_timeout,
            config.max_gas_price,
            config.confirmations,
        )

    def settle(self, dry_run: bool = False) -> list[Outcome]:
        """Resolve open settlements from the chain, pay everything owed, wait for it all."""
        if dry_run:
            return [self._skip_reason(o) or _outcome(o, "planned") for o in self._owed()]
        recovered = [
            _Watched(s, tuple(self.ledger.payment_ids(s.id)), s.status, s.block_number)
            for s in self.ledger.settlements()
            if s.status in S.OPEN and s.payer == self.account.address
        ]
        for watched in recovered:
            self._observe(watched)  # a replaced or reverted one is owed again, just below
        results: list[Outcome | _Watched] = list(recovered)
        by_network: dict[str, list[OwedTotal]] = defaultdict(list)
        for owed in self._owed():
            skipped = self._skip_reason(owed)
            if skipped:
                results.append(skipped)
            else:
                by_network[owed.network].append(owed)
        for network, owed_there in by_network.items():
            results += self._send(network, owed_there)
        self._wait([r for r in results if isinstance(r, _Watched)])
        return [r if isinstance(r, Outcome) else self._outcome_of(r) for r in results]

    def depth(self, network: str) -> int:
        """Confirmations a settlement on ``network`` needs before it is final."""
        if self.confirmations is not None:
            return self.confirmations
        return 1 if network in DEV_CHAINS else 3

    def _owed(self) -> list[OwedTotal]:
        # Networks without an EVM chain id are not paid on-chain: Cloudflare invoices. A payee
        # owed more commitments than one transfer may list gets several transfers.
        owed = self.ledger.owed(self.account.address, MAX_SETTLEMENT_IDS)
        return [o for o in owed if evm_chain_id(o.network) is not None]

    def _skip_reason(self, owed: OwedTotal) -> Outcome | None:
        if owed.network not in self.rpc_urls:
            return _outcome(
                owed, "skipped", reason=f"no RPC URL for {owed.network} in X402_RPC_URLS"
            )
        return None

    def _w3(self, network: str) -> Web3:
        if network not in self.rpc_urls:
            raise SettlementError(f"no RPC URL for {network} in X402_RPC_URLS")
        if network not in self._web3:
            self._web3[network] = connect(self.rpc_urls[network], network)
        return self._web3[network]

    def _error_text(self, error: Exception) -> str:
        return redact(str(error), self.rpc_urls.values())

    # -- sending -------------------------------------------------------------------

    def _send(self, network: str, owed: list[OwedTotal]) -> list[Outcome | _Watched]:
        """Sign every transfer owed on one network (consecutive nonces), record each, then
        broadcast them all."""
        try:
            w3 = self._w3(network)
            short = self._short_tokens(w3, owed)
            fees = self._fees(w3)
            nonce = int(w3.eth.get_transaction_count(self.account.address, "pending"))
        except _ERRORS as e:
            return [self._failed(o, e) for o in owed]
        results: list[Outcome | _Watched] = []
        for o in owed:
            if o.asset in short:
                results.append(self._failed(o, SettlementError(short[o.asset])))
                continue
            try:
                settlement = self._sign_transfer(w3, o, nonce, fees)
            except _ERRORS as e:
                results.append(self._failed(o, e))
                continue
            # Written before it is broadcast: from here on, the chain decides what happened.
            if not self.book.settle_begin(settlement, o.payment_ids):
                reason = "its payments are no longer all owed (another settle ran?); nothing sent"
                logger.warning("x402 settlement to %s skipped: %s", o.payee, reason)
                results.append(_outcome(o, "skipped", reason=reason))
                continue  # nothing recorded: the nonce is still free for the next one
            nonce += 1
            results.append(_Watched(settlement, o.payment_ids, settlement.status))
        for watched in results:
            if isinstance(watched, _Watched):
                self._broadcast(w3, watched)
        return results

    def _short_tokens(self, w3: Web3, owed: list[OwedTotal]) -> dict[str, str]:
        """Tokens whose balance cannot cover all the transfers of them: none of those is sent."""
        totals: dict[str, int] = defaultdict(int)
        for o in owed:
            totals[o.asset] += o.amount
        short = {}
        for asset, total in totals.items():
            balance = token_balance(w3, asset, self.account.address)
            if balance < total:
                short[asset] = (
                    f"token balance {balance} is below the {total} owed in all; nothing was sent"
                )
        return short

    def _fees(self, w3: Web3) -> tuple[int, int]:
        """EIP-1559 (priority fee, max fee) per gas, within X402_MAX_GAS_PRICE."""
        base_fee = w3.eth.get_block("latest").get("baseFeePerGas", 0)
        priority = w3.eth.max_priority_fee
        max_fee = 2 * base_fee + priority
        if self.max_gas_price is not None:
            if base_fee + priority > self.max_gas_price:
                raise SettlementError(
                    f"gas costs {base_fee + priority} wei now, over X402_MAX_GAS_PRICE "
                    f"({self.max_gas_price} wei); nothing was sent"
                )
            max_fee = min(max_fee, self.max_gas_price)
        return priority, max_fee

    def _sign_transfer(
        self, w3: Web3, owed: OwedTotal, nonce: int, fees: tuple[int, int]
    ) -> Settlement:
        data = settlement_calldata(owed.payee, owed.amount, list(owed.payment_ids))
        tx: dict[str, Any] = {
            "from": self.account.address,
            "to": owed.asset,
            "data": data,
            "value": 0,
            "chainId": evm_chain_id(owed.network),
            "nonce": nonce,
        }
        # Estimated with the full calldata, which costs gas per byte (up to ~0.7 M for 500 ids).
        tx["gas"] = w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
        tx.update(maxPriorityFeePerGas=fees[0], maxFeePerGas=fees[1])
        del tx["from"]
        signed = self.account.sign_transaction(tx)
        return Settlement(
            id=Web3.to_hex(signed.hash),
            network=owed.network,
            asset=owed.asset,
            payer=self.account.address,
            payee=owed.payee,
            amount=owed.amount,
            payment_count=len(owed.payment_ids),
            status=S.SIGNED,
            raw_tx=Web3.to_hex(signed.raw_transaction),
            tx_nonce=nonce,
        )

    def _broadcast(self, w3: Web3, watched: _Watched) -> None:
        """Send the signed bytes (again: same nonce, so never a second payment)."""
        try:
            w3.eth.send_raw_transaction(HexStr(watched.settlement.raw_tx))
        except _ERRORS as e:
            # Refused, or sent and the answer lost: only the chain can tell which.
            watched.error = self._error_text(e)
            logger.warning(
                "x402 settlement %s to %s: broadcast outcome unknown (%s); reading the chain",
                watched.settlement.id,
                watched.settlement.payee,
                watched.error,
            )
            return
        if watched.status == S.SIGNED:
            self._move(watched, S.BROADCAST)

    # -- reading the chain ---------------------------------------------------------

    def _wait(self, watched: list[_Watched]) -> None:
        """Read open settlements' fate until all are final or one deadline passes."""
        deadline = time.monotonic() + self.timeout
        reported = None
        while True:
            confirmed = sum(w.status == S.CONFIRMED for w in watched)
            if watched and confirmed != reported:
                reported = confirmed
                logger.info("x402 settlement: %d of %d confirmed", confirmed, len(watched))
            waiting = [w for w in watched if w.status in S.OPEN]
            if not waiting or time.monotonic() >= deadline:
                return
            for w in waiting:
                self._observe(w)
            if any(w.status in S.OPEN for w in waiting):
                time.sleep(self.poll_interval)

    def _observe(self, watched: _Watched) -> None:
        """Read one open settlement's fate from the chain and record what it proves."""
        s = watched.settlement
        try:
            w3 = self._w3(s.network)
            depth = self.depth(s.network)
            head = w3.eth.block_number
            # The nonce before the receipt: a transfer mined between the two reads then
            # shows its receipt, instead of passing for another transaction that took its nonce.
            payer = Web3.to_checksum_address(s.payer)
            nonce_used = w3.eth.get_transaction_count(payer, max(head - depth + 1, 0)) > s.tx_nonce
            receipt = _unless_absent(w3.eth.get_transaction_receipt, s.id)
            if receipt is not None:
                self._mined(watched, receipt, head - receipt["blockNumber"] + 1 >= depth)
                return
            if watched.status == S.OBSERVED:  # a reorg took its block away
                self._move(watched, S.BROADCAST)
            if _unless_absent(w3.eth.get_transaction, s.id) is not None:
                return  # waiting in the node's mempool
            if nonce_used:
                # Proved only by the transaction that used the nonce: a lagging node (behind a
                # load balancer) may not know ours although it is mined.
                user = self._nonce_user(w3, payer, s.tx_nonce, max(head - depth + 1, 0))
                if user is not None and user != s.id.lower():
                    self._move(watched, S.REPLACED, reason=f"its nonce was used by {user}")
            else:  # dropped, or never reached the node
                self._broadcast(w3, watched)
        except _ERRORS as e:
            watched.error = self._error_text(e)
            logger.debug("x402 settlement %s: reading the chain failed: %s", s.id, watched.error)

    def _nonce_user(self, w3: Web3, payer: ChecksumAddress, nonce: int, until: int) -> str | None:
        """The hash of the transaction that used ``payer``'s ``nonce`` (in a block at or
        before ``until``), or None when no node we asked can show it."""
        block = _first_block_past(lambda n: w3.eth.get_transaction_count(payer, n) > nonce, until)
        found: Any = w3.eth.get_block(block, full_transactions=True)
        for tx in (found or {}).get("transactions", []):
            if tx["from"].lower() == payer.lower() and tx["nonce"] == nonce:
                return Web3.to_hex(tx["hash"]).lower()
        return None

    def _mined(self, watched: _Watched, receipt: Any, deep_enough: bool) -> None:
        if (watched.status, watched.block) != (S.OBSERVED, receipt["blockNumber"]):
            self._move(watched, S.OBSERVED, block=receipt["blockNumber"])
        if deep_enough and watched.status == S.OBSERVED:
            if receipt["status"] == 1:
                self._move(watched, S.CONFIRMED)
            else:
                self._move(watched, S.REVERTED, reason="transaction reverted")

    def _move(
        self, watched: _Watched, status: str, block: int | None = None, reason: str | None = None
    ) -> None:
        """Record a status the chain proved; the ledger checks it against its transitions."""
        s = watched.settlement
        try:
            if status in S.OPEN:
                self.book.settle_mark(s.id, status, block)
            else:
                self.book.settle_end(s.id, status, reason)
        except IllegalTransition as e:
            # Another settle (a crawl's and the command's at once) may have moved it on.
            self.illegal_transitions += 1
            logger.error("x402: %s; following the ledger", e)
            watched.status, watched.error = e.current or S.FAILED, str(e)
            return
        watched.status, watched.block = status, block if status in S.OPEN else watched.block
        self._log_final(watched)

    def _log_final(self, watched: _Watched) -> None:
        s = watched.settlement
        if watched.status == S.CONFIRMED:
            logger.info(
                "x402 settled %s to %s on %s: %s",
                self._format(s.network, s.asset, s.amount),
                s.payee,
                s.network,
                s.id,
            )
        elif watched.status == S.REVERTED:
            logger.error(
                "x402 settlement %s to %s reverted; its payments are owed again", s.id, s.payee
            )
        elif watched.status == S.REPLACED:
            logger.warning("x402 settlement %s was never mined; its payments are owed again", s.id)

    def _outcome_of(self, watched: _Watched) -> Outcome:
        s = watched.settlement
        owed = OwedTotal(s.network, s.asset, s.payer, s.payee, s.amount, watched.payment_ids)
        if watched.status == S.CONFIRMED:
            return _outcome(owed, "confirmed", s.id)
        if watched.status == S.REVERTED:
            return _outcome(owed, "reverted", s.id, "transaction reverted")
        if watched.status == S.REPLACED:
            return _outcome(owed, "replaced", s.id, "replaced by another transaction")
        reason = watched.error or (
            f"{watched.status}, not final after {self.timeout} s "
            f"({self.depth(s.network)} confirmations needed)"
        )
        logger.error(
            "x402 settlement %s to %s: fate unknown (%s); its payments stay settling; run "
            "`scrapy x402 settle` again to resolve it from the chain",
            s.id,
            s.payee,
            reason,
        )
        return _outcome(owed, "pending", s.id, reason)

    def _failed(self, owed: OwedTotal, error: Exception) -> Outcome:
        reason = self._error_text(error)
        logger.error("x402 settlement to %s on %s failed: %s", owed.payee, owed.network, reason)
        return _outcome(owed, "failed", reason=reason)

    def _format(self, network: str, asset: str, amount: int) -> str:
        known = self.assets.get(network, asset)
        return known.format(amount) if known else f"{amount} units of {asset}"


def _first_block_past(past: Callable[[int], bool], until: int) -> int:
    """The first block at or before ``until`` for which ``past`` holds (it holds at
    ``until``): galloping back from ``until`` (recent state is what every node keeps), then
    bisecting."""
    high, step = until, 1
    low = until - 1
    while low >= 0 and past(low):
        high, low, step = low, low - 2 * step, 2 * step
    low = max(low, -1)  # past(low) is false, or low is before the first block
    while high - low > 1:
        middle = (low + high) // 2
        if past(middle):
            high = middle
        else:
            low = middle
    return high


def _unless_absent(call: Callable[[Any], Any], tx_hash: str) -> Any:
    """A transaction or receipt, or None when the node does not know it."""
    try:
        return call(tx_hash)
    except TransactionNotFound:
        return None


def _outcome(
    owed: OwedTotal, status: str, tx_hash: str | None = None, reason: str | None = None
) -> Outcome:
    return Outcome(
        owed.network,
        owed.asset,
        owed.payee,
        owed.amount,
        len(owed.payment_ids),
        status,
        tx_hash,
        reason,
    )
