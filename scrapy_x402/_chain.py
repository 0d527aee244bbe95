"""Reading an EVM chain: the few calls settlement and held authorizations need."""

from __future__ import annotations

from eth_abi import encode as abi_encode
from web3 import Web3

from scrapy_x402._networks import evm_chain_id

BALANCE_OF = bytes.fromhex("70a08231")  # balanceOf(address)
AUTHORIZATION_STATE = bytes.fromhex("e94a0102")  # authorizationState(address,bytes32)


class ChainMismatch(Exception):
    pass


def connect(rpc_url: str, network: str) -> Web3:
    """A web3 client for ``network``, refusing an RPC that serves another chain."""
    w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
    actual = w3.eth.chain_id
    if actual != evm_chain_id(network):
        raise ChainMismatch(
            f"the RPC URL for {network} serves chain id {actual}; refusing to use it"
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
