"""Bulk settlement: one ERC-20 transfer per (network, token, payee) of what the ledger owes.

Idempotent by construction: the signed transaction is written to the ledger before it is
broadcast, so a crash at any point leaves either nothing sent or a known transaction whose
fate the next run reads from the chain (mined, reverted, replaced) before paying anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_abi import encode as abi_encode
from eth_typing import HexStr
from web3 import Web3
from web3.exceptions import TimeExhausted, TransactionNotFound, Web3RPCError

from scrapy_x402._chain import ChainMismatch, connect, token_balance
from scrapy_x402._networks import evm_chain_id
from scrapy_x402.ledger import OwedTotal, Settlement
from scrapy_x402.payments import PaymentBook
from scrapy_x402.schemes.deferred import settlement_reference

if TYPE_CHECKING:
    from collections.abc import Mapping

    from eth_account.signers.local import LocalAccount

    from scrapy_x402._assets import AssetTable
    from scrapy_x402._config import X402Config

logger = logging.getLogger(__name__)

TRANSFER_SELECTOR = bytes.fromhex("a9059cbb")  # transfer(address,uint256)


class SettlementError(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    network: str
    asset: str
    payee: str
    amount: int
    payment_count: int
    status: str  # planned, confirmed, failed, pending (fate unknown yet), skipped
    tx_hash: str | None = None
    reason: str | None = None


class Settler:
    def __init__(
        self,
        book: PaymentBook,
        account: LocalAccount,
        rpc_urls: Mapping[str, str],
        assets: AssetTable,
        timeout: int = 120,
        max_gas_price: int | None = None,
    ):
        self.book = book
        self.ledger = book.store  # reads; every write goes through the book
        self.account = account
        self.rpc_urls = rpc_urls
        self.assets = assets
        self.timeout = timeout
        self.max_gas_price = max_gas_price  # wei per gas
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
        )

    def settle(self, dry_run: bool = False) -> list[Outcome]:
        """Resolve settlements a crash left pending, then pay everything owed."""
        outcomes = [] if dry_run else [self._recover(s) for s in self._pending()]
        for owed in self.ledger.owed(self.account.address):
            if evm_chain_id(owed.network) is None:
                continue  # not paid on-chain: e.g. Cloudflare invoices cloudflare:402
            outcome = self._skip_reason(owed)
            if outcome is None:
                outcome = _outcome(owed, "planned") if dry_run else self._pay(owed)
            outcomes.append(outcome)
        return outcomes

    def _pending(self) -> list[Settlement]:
        return [s for s in self.ledger.settlements("pending") if s.payer == self.account.address]

    def _skip_reason(self, owed: OwedTotal) -> Outcome | None:
        if owed.network not in self.rpc_urls:
            return _outcome(
                owed, "skipped", reason=f"no RPC URL for {owed.network} in X402_RPC_URLS"
            )
        return None

    def _w3(self, network: str) -> Web3:
        if network not in self._web3:
            self._web3[network] = connect(self.rpc_urls[network], network)
        return self._web3[network]

    def _pay(self, owed: OwedTotal) -> Outcome:
        try:
            w3 = self._w3(owed.network)
            balance = token_balance(w3, owed.asset, self.account.address)
            if balance < owed.amount:
                raise SettlementError(
                    f"token balance {balance} is below the {owed.amount} owed; nothing was sent"
                )
            settlement = self._sign_transfer(w3, owed)
        except (SettlementError, ChainMismatch, Web3RPCError, OSError, ValueError) as e:
            logger.error("x402 settlement to %s on %s failed: %s", owed.payee, owed.network, e)
            return _outcome(owed, "failed", reason=str(e))
        # Written before it is broadcast: from here on, the chain decides what happened.
        if not self.book.settle_begin(settlement, owed.payment_ids):
            return _outcome(owed, "skipped", reason="its payments changed meanwhile; not sent")
        try:
            w3.eth.send_raw_transaction(HexStr(settlement.raw_tx))
        except Web3RPCError as e:
            # The node refused it outright: not broadcast, so the payments are owed again.
            self.book.settle_end(settlement.id, confirmed=False, reason=str(e))
            logger.error("x402 settlement to %s refused by the node: %s", owed.payee, e)
            return _outcome(owed, "failed", settlement.id, str(e))
        except OSError as e:
            return self._unknown(owed, settlement, e)
        return self._await(w3, settlement, owed.payment_ids)

    def _sign_transfer(self, w3: Web3, owed: OwedTotal) -> Settlement:
        data = (
            TRANSFER_SELECTOR
            + abi_encode(["address", "uint256"], [owed.payee, owed.amount])
            # Trailing bytes the token ignores; they let the payee tell which commitments
            # this transfer pays (docs/deferred-scheme.md, reconciliation).
            + settlement_reference(list(owed.payment_ids))
        )
        tx: dict[str, Any] = {
            "from": self.account.address,
            "to": owed.asset,
            "data": data,
            "value": 0,
            "chainId": evm_chain_id(owed.network),
            "nonce": w3.eth.get_transaction_count(self.account.address, "pending"),
        }
        tx["gas"] = w3.eth.estimate_gas(tx)  # type: ignore[arg-type]
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
        tx.update(maxPriorityFeePerGas=priority, maxFeePerGas=max_fee)
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
            status="pending",
            raw_tx=Web3.to_hex(signed.raw_transaction),
            tx_nonce=tx["nonce"],
        )

    def _await(self, w3: Web3, s: Settlement, payment_ids: tuple[str, ...] | list[str]) -> Outcome:
        owed = OwedTotal(s.network, s.asset, s.payer, s.payee, s.amount, tuple(payment_ids))
        try:
            receipt = w3.eth.wait_for_transaction_receipt(s.id, timeout=self.timeout)  # type: ignore[arg-type]
        except TimeExhausted as e:
            return self._unknown(owed, s, e)
        if receipt["status"] == 1:
            self.book.settle_end(s.id, confirmed=True)
            logger.info(
                "x402 settled %s to %s on %s: %s",
                self._format(s.network, s.asset, s.amount),
                s.payee,
                s.network,
                s.id,
            )
            return _outcome(owed, "confirmed", s.id)
        self.book.settle_end(s.id, confirmed=False, reason="transaction reverted")
        logger.error(
            "x402 settlement %s to %s reverted; its payments are owed again", s.id, s.payee
        )
        return _outcome(owed, "failed", s.id, "transaction reverted")

    def _recover(self, s: Settlement) -> Outcome:
        """A settlement left pending by a crash or a timeout: read its fate from the chain."""
        payment_ids = self.ledger.payment_ids(s.id)
        owed = OwedTotal(s.network, s.asset, s.payer, s.payee, s.amount, tuple(payment_ids))
        if s.network not in self.rpc_urls:
            return _outcome(owed, "pending", s.id, f"no RPC URL for {s.network}")
        try:
            w3 = self._w3(s.network)
            try:
                w3.eth.get_transaction_receipt(s.id)  # type: ignore[arg-type]
                return self._await(w3, s, payment_ids)
            except TransactionNotFound:
                pass
            if (
                w3.eth.get_transaction_count(Web3.to_checksum_address(s.payer), "latest")
                > s.tx_nonce
            ):
                # Its nonce was used by another transaction, so it can never be mined.
                # Its payments are owed again and are paid by the loop in settle().
                self.book.settle_end(s.id, confirmed=False, reason="replaced")
                logger.warning(
                    "x402 settlement %s was never mined; its payments are owed again", s.id
                )
                return _outcome(owed, "failed", s.id, "replaced by another transaction")
            try:  # same signed bytes, same nonce: re-broadcasting can never pay twice
                w3.eth.send_raw_transaction(HexStr(s.raw_tx))
            except Web3RPCError as e:
                if "known" not in str(e).lower():
                    raise
            return self._await(w3, s, payment_ids)
        except (SettlementError, ChainMismatch, Web3RPCError, OSError) as e:
            return self._unknown(owed, s, e)

    def _unknown(self, owed: OwedTotal, s: Settlement, error: Exception) -> Outcome:
        logger.error(
            "x402 settlement %s to %s: fate unknown (%s); run `scrapy x402 settle` "
            "again to resolve it from the chain",
            s.id,
            s.payee,
            error,
        )
        return _outcome(owed, "pending", s.id, str(error))

    def _format(self, network: str, asset: str, amount: int) -> str:
        known = self.assets.get(network, asset)
        return known.format(amount) if known else f"{amount} units of {asset}"


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
