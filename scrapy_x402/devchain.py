"""A local EVM chain for trying scrapy-x402 and for its tests: anvil plus the TestUSD token.

anvil comes from the npm package ``@foundry-rs/anvil-linux-amd64`` (``make setup`` installs
it in ./node_modules); set ``ANVIL_BIN`` to use another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3

CHAIN_ID = 31337
# Where the x402 SDKs expect Permit2 and x402's Permit2 proxies (the same on every chain).
PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
EXACT_PERMIT2_PROXY = "0x402085c248EeA27D92E8b30b2C58ed07f9E20001"
UPTO_PERMIT2_PROXY = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
# Where the x402 SDKs expect the batch-settlement contracts, and Multicall3 (which they read through).
BATCH_SETTLEMENT = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR = "0x4020806089470a89826cB9fB1f4059150b550004"
PERMIT2_DEPOSIT_COLLECTOR = "0x4020425FAf3B746C082C2f942b4E5159887B0005"
MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11"


def find_anvil() -> str:
    candidates = [
        os.environ.get("ANVIL_BIN"),
        str(Path(__file__).resolve().parent.parent / "node_modules" / ".bin" / "anvil"),
        shutil.which("anvil"),
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "anvil not found: run `make setup` (npm package @foundry-rs/anvil-linux-amd64) "
        "or set ANVIL_BIN"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    """An anvil node on a free loopback port, stopped with the context manager."""

    def __init__(self, chain_id: int = CHAIN_ID, port: int | None = None):
        self.chain_id = chain_id
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None
        self.w3 = Web3(Web3.HTTPProvider(self.url))

    def __enter__(self) -> Anvil:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        self._process = subprocess.Popen(
            [
                find_anvil(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--chain-id",
                str(self.chain_id),
                "--accounts",
                "1",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # readiness poll, not a timing assumption
            if self._process.poll() is not None:
                raise RuntimeError(f"anvil exited with code {self._process.returncode}")
            try:
                if self.w3.eth.chain_id == self.chain_id:
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"anvil did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None

    def new_account(self, eth: int = 10) -> Any:
        """A fresh random account holding ``eth`` ether for gas."""
        account = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [account.address, hex(eth * 10**18)])  # type: ignore[arg-type]
        return account

    def install_permit2(self) -> None:
        """Put Permit2 and x402's exact and upto Permit2 proxies at their canonical addresses
        (test doubles from contracts/Permit2Lite.sol)."""
        self._install(
            (PERMIT2, "Permit2Lite"),
            (EXACT_PERMIT2_PROXY, "X402ExactPermit2ProxyLite"),
            (UPTO_PERMIT2_PROXY, "X402UptoPermit2ProxyLite"),
        )

    def install_batch_settlement(self) -> None:
        """Put x402's batch-settlement contract, its EIP-3009 and Permit2 deposit collectors and
        Multicall3 at their canonical addresses (test doubles from
        contracts/X402BatchSettlementLite.sol; Permit2 deposits also need install_permit2)."""
        self._install(
            (BATCH_SETTLEMENT, "X402BatchSettlementLite"),
            (ERC3009_DEPOSIT_COLLECTOR, "ERC3009DepositCollectorLite"),
            (PERMIT2_DEPOSIT_COLLECTOR, "Permit2DepositCollectorLite"),
            (MULTICALL3, "Multicall3Lite"),
        )

    def _install(self, *contracts: tuple[str, str]) -> None:
        for address, name in contracts:
            code = _artifact(name)["deployedBytecode"]
            self.w3.provider.make_request("anvil_setCode", [address, code])  # type: ignore[arg-type]

    def transact(self, sender: Any, tx: dict[str, Any]) -> Any:
        tx = {
            "from": sender.address,
            "chainId": self.chain_id,
            "nonce": self.w3.eth.get_transaction_count(sender.address),
            **tx,
        }
        tx.setdefault("gas", self.w3.eth.estimate_gas(tx))  # type: ignore[arg-type]
        tx.setdefault("gasPrice", self.w3.eth.gas_price)
        del tx["from"]
        signed = sender.sign_transaction(tx)
        receipt = self.w3.eth.wait_for_transaction_receipt(
            self.w3.eth.send_raw_transaction(signed.raw_transaction), timeout=30
        )
        if receipt["status"] != 1:
            raise RuntimeError(f"transaction reverted: {receipt['transactionHash'].hex()}")
        return receipt


class TestUSD:
    """The repo's USDC-like test token (ERC-20 + EIP-3009, 6 decimals)."""

    __test__ = False  # not a pytest test class

    def __init__(self, chain: Anvil, address: str, owner: Any):
        self.chain = chain
        self.address = address
        self.owner = owner
        self.contract = chain.w3.eth.contract(address=address, abi=_artifact("TestUSD")["abi"])  # type: ignore[call-overload]

    @classmethod
    def deploy(cls, chain: Anvil, owner: Any, name: str = "Test USD") -> TestUSD:
        artifact = _artifact("TestUSD")
        factory = chain.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        data = factory.constructor(name, "tUSD").data_in_transaction
        receipt = chain.transact(owner, {"data": data})
        return cls(chain, receipt["contractAddress"], owner)

    def mint(self, to: str, amount: int) -> None:
        self.chain.transact(
            self.owner, {"to": self.address, "data": self.contract.encode_abi("mint", [to, amount])}
        )

    def approve(self, owner: Any, spender: str, amount: int = 2**256 - 1) -> None:
        data = self.contract.encode_abi("approve", [spender, amount])
        self.chain.transact(owner, {"to": self.address, "data": data})

    def balance_of(self, owner: str) -> int:
        return int(self.contract.functions.balanceOf(owner).call())

    def asset_setting(self) -> dict[str, dict[str, dict[str, str | int]]]:
        """The X402_ASSETS entry that pegs this token at 1 USD."""
        return {
            f"eip155:{self.chain.chain_id}": {
                self.address: {"symbol": "tUSD", "decimals": 6, "usd": "1"}
            }
        }


def _artifact(name: str) -> dict[str, Any]:
    data = resources.files("scrapy_x402").joinpath(f"contracts/{name}.json").read_text()
    return dict(json.loads(data))
