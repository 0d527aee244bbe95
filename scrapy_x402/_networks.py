"""Network names: x402 v1 names, CAIP-2 ids, and which networks are test networks."""

from __future__ import annotations

import re

# x402 v1 network names and the CAIP-2 ids that v2 uses for them.
V1_NAMES = {
    "base": "eip155:8453",
    "base-sepolia": "eip155:84532",
    "ethereum": "eip155:1",
    "sepolia": "eip155:11155111",
    "polygon": "eip155:137",
    "polygon-amoy": "eip155:80002",
    "avalanche": "eip155:43114",
    "avalanche-fuji": "eip155:43113",
    "arbitrum": "eip155:42161",
    "arbitrum-sepolia": "eip155:421614",
    "optimism": "eip155:10",
    "optimism-sepolia": "eip155:11155420",
}
CAIP2_TO_V1 = {v: k for k, v in V1_NAMES.items()}

# Chains that move no real money. Any other chain counts as mainnet, so an unknown
# chain is refused unless X402_ALLOW_MAINNET is set.
TESTNET_CHAIN_IDS = frozenset({84532, 11155111, 80002, 43113, 421614, 11155420, 31337, 1337})

# CAIP-2 allows 3-8 characters of namespace; Cloudflare's "cloudflare:402" has 10.
_CAIP2 = re.compile(r"^[-a-z0-9]{3,16}:[-_a-zA-Z0-9]{1,32}$")


def normalize_network(name: str) -> str | None:
    """Return the CAIP-2 id for a v1 name or a CAIP-2 id, or None if it is neither."""
    name = name.strip()
    if name.lower() in V1_NAMES:
        return V1_NAMES[name.lower()]
    if _CAIP2.match(name):
        return name
    return None


def evm_chain_id(network: str) -> int | None:
    """The chain id of an ``eip155:N`` network, else None."""
    namespace, _, reference = network.partition(":")
    if namespace != "eip155" or not reference.isdigit():
        return None
    return int(reference)


def is_testnet(network: str) -> bool:
    chain_id = evm_chain_id(network)
    return chain_id is not None and chain_id in TESTNET_CHAIN_IDS
