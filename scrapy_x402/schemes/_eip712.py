"""EIP-712 hashing and secp256k1 signing on the hot path.

eth-account's typed-data encoder is general and slow (~0.3 ms); a payment per page only needs
fixed structs of static fields, so their hashes are built here from precomputed type hashes
and cached domain separators, and signed with coincurve directly. Tests check every digest
against eth-account's encoder and an independent one.
"""

from __future__ import annotations

from functools import lru_cache

import coincurve
import sha3  # safe-pysha3: a C keccak, about 5x faster than eth-hash's default backend


def keccak(data: bytes) -> bytes:
    return sha3.keccak_256(data).digest()


_DOMAIN_TYPES = {
    False: keccak(b"EIP712Domain(string name,string version,uint256 chainId)"),
    True: keccak(
        b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    ),
}


def word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def address_word(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\0")


def bytes32(value: str) -> bytes:
    return bytes.fromhex(value[2:])


@lru_cache(maxsize=256)
def domain_separator(
    name: str, version: str, chain_id: int, verifying_contract: str | None = None
) -> bytes:
    fields = (
        _DOMAIN_TYPES[verifying_contract is not None]
        + keccak(name.encode())
        + keccak(version.encode())
    )
    fields += word(chain_id)
    if verifying_contract is not None:
        fields += address_word(verifying_contract)
    return keccak(fields)


def digest(domain: bytes, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + domain + struct_hash)


class Signer:
    """A secp256k1 key that signs digests as Ethereum does (r ‖ s ‖ v, v = 27 or 28)."""

    def __init__(self, key: bytes):
        self._key = coincurve.PrivateKey(key)

    def __repr__(self) -> str:
        return "Signer(<secret>)"

    def sign(self, message_digest: bytes) -> bytes:
        signature = self._key.sign_recoverable(message_digest, hasher=None)
        return signature[:64] + bytes([signature[64] + 27])


@lru_cache(maxsize=16)
def signer_for(key: bytes) -> Signer:
    return Signer(key)


def recover(message_digest: bytes, signature: bytes) -> str:
    """The address that signed ``message_digest`` (checksum not applied: lowercase hex)."""
    if len(signature) != 65 or signature[64] not in (27, 28):
        raise ValueError("not a 65-byte signature with v = 27 or 28")
    public = coincurve.PublicKey.from_signature_and_message(
        signature[:64] + bytes([signature[64] - 27]), message_digest, hasher=None
    )
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()
