"""Reading an EVM chain: the few calls settlement and held authorizations need."""

from __future__ import annotations

from collections.abc import Mapping

from eth_abi import encode as abi_encode
from web3 import Web3
from web3.exceptions import Web3Exception

from scrapy_x402._networks import evm_chain_id
from scrapy_x402._redact import hide_in_logs, redact, redact_url

BALANCE_OF = bytes.fromhex("70a08231")  # balanceOf(address)
AUTHORIZATION_STATE = bytes.fromhex("e94a0102")  # authorizationState(address,bytes32)


class ChainMismatch(Exception):
    pass


class ChainUnreachable(OSError):
    """The RPC did not answer; the message names it by scheme, host and port only."""


def connect(rpc_url: str, network: str) -> Web3:
    """A web3 client for ``network``, refusing an RPC that serves another chain.

    Without web3's silent retries: a retried eth_sendRawTransaction whose first attempt
    reached the node comes back "already known" or "nonce too low", hiding a transfer that
    was sent. Callers decide what is safe to repeat.
    """
    hide_in_logs(rpc_url)
    provider = Web3.HTTPProvider(
        rpc_url, request_kwargs={"timeout": 30}, exception_retry_configuration=None
    )
    w3 = Web3(provider)
    # web3's validation asks the node for the chain id before every call and estimate: the
    # chain is checked once, here, and every transaction we sign names it.
    w3.middleware_onion.remove("validation")
    try:
        actual = w3.eth.chain_id
    except (OSError, Web3Exception) as e:
        raise ChainUnreachable(redact(f"{network} RPC: {e}", [rpc_url])) from None
    if actual != evm_chain_id(network):
        raise ChainMismatch(
            f"the RPC URL for {network} ({redact_url(rpc_url)}) serves chain id {actual}; "
            "refusing to use it"
        )
    return w3


def _call(w3: Web3, token: str, data: bytes) -> bytes:
    return bytes(w3.eth.call({"to": Web3.to_checksum_address(token), "data": data}))  # type: ignore[typeddict-item]


def token_balance(w3: Web3, token: str, owner: str) -> int:
    return int.from_bytes(_call(w3, token, BALANCE_OF + abi_encode(["address"], [owner])), "big")


def authorization_used(w3: Web3, token: str, authorizer: str, nonce: str) -> bool:
    """EIP-3009: whether the token has consumed (or cancelled) this authorization."""
    data = AUTHORIZATION_STATE + abi_encode(
        ["address", "bytes32"], [authorizer, bytes.fromhex(nonce[2:])]
    )
    return int.from_bytes(_call(w3, token, data), "big") != 0


PERMIT2 = "0x000000000022D473030F116dDEE9F6B43aC78BA3"  # the same on every chain
ALLOWANCE = bytes.fromhex("dd62ed3e")  # allowance(address,address)
NONCE_BITMAP = bytes.fromhex("4fe02b44")  # nonceBitmap(address,uint256)


def token_allowance(w3: Web3, token: str, owner: str, spender: str) -> int:
    data = ALLOWANCE + abi_encode(["address", "address"], [owner, spender])
    return int.from_bytes(_call(w3, token, data), "big")


def permit2_nonce_used(w3: Web3, owner: str, nonce: int) -> bool:
    """Permit2's unordered nonces: bit (nonce & 255) of word (nonce >> 8)."""
    data = NONCE_BITMAP + abi_encode(["address", "uint256"], [owner, nonce >> 8])
    return bool(int.from_bytes(_call(w3, PERMIT2, data), "big") >> (nonce & 0xFF) & 1)


class ChainReader:
    """One checked connection per network with an RPC URL, made on first use."""

    def __init__(self, rpc_urls: Mapping[str, str]):
        self.rpc_urls = rpc_urls
        self._web3: dict[str, Web3] = {}

    def get(self, network: str) -> Web3 | None:
        if network not in self.rpc_urls:
            return None
        if network not in self._web3:
            self._web3[network] = connect(self.rpc_urls[network], network)
        return self._web3[network]
