"""The deferred scheme's EIP-712 encoding, checked against an independent implementation
(the spec's encoding written out with pycryptodome's keccak and coincurve's recovery)."""

import coincurve
from Crypto.Hash import keccak as _keccak
from eth_account import Account

from scrapy_x402._protocol import Offer
from scrapy_x402.schemes.deferred import Commitment, DeferredScheme, resource_hash

KEY = "0x" + "4c" * 32  # the docs' test vector key; it holds nothing anywhere
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAYEE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def keccak(data: bytes) -> bytes:
    return _keccak.new(digest_bits=256, data=data).digest()


def word(value: int | str | bytes) -> bytes:
    if isinstance(value, int):
        return value.to_bytes(32, "big")
    if isinstance(value, str):
        value = bytes.fromhex(value[2:])
    return value.rjust(32, b"\0")


def spec_digest(c: Commitment) -> bytes:
    domain_type = b"EIP712Domain(string name,string version,uint256 chainId)"
    commitment_type = (
        b"Commitment(address payer,address payee,address token,uint256 amount,"
        b"bytes32 resource,bytes32 nonce,uint256 validUntil)"
    )
    domain = keccak(
        keccak(domain_type) + keccak(b"x402 deferred") + keccak(b"1") + word(c.chain_id)
    )
    struct = keccak(
        keccak(commitment_type)
        + word(c.payer)
        + word(c.payee)
        + word(c.token)
        + word(c.amount)
        + word(c.resource)
        + word(c.nonce)
        + word(c.valid_until)
    )
    return keccak(b"\x19\x01" + domain + struct)


def spec_recover(digest: bytes, signature: str) -> str:
    sig = bytes.fromhex(signature[2:])
    recoverable = sig[:64] + bytes([sig[64] - 27])
    public = coincurve.PublicKey.from_signature_and_message(recoverable, digest, hasher=None)
    return "0x" + keccak(public.format(compressed=False)[1:])[-20:].hex()


def vector_commitment() -> Commitment:
    return Commitment(
        chain_id=84532,
        payer=Account.from_key(KEY).address,
        payee=PAYEE,
        token=TOKEN,
        amount=10_000,
        resource=resource_hash("https://news.example/world/1"),
        nonce="0x" + "00" * 31 + "01",
        valid_until=1_800_000_000,
    )


def test_digest_matches_the_spec_encoding():
    c = vector_commitment()
    assert c.id == "0x" + spec_digest(c).hex()


def test_signed_commitment_recovers_independently():
    account = Account.from_key(KEY)
    offer = Offer(
        "deferred", "eip155:84532", 10_000, TOKEN, PAYEE, 60, "https://news.example/world/1", {}, {}
    )
    signed = DeferredScheme().sign(
        account, offer, offer.resource, now=1_700_000_000, max_timeout=300
    )
    c = Commitment.from_json(84532, signed.payload["commitment"])
    assert c.valid_until == 1_700_000_060  # the offer's timeout, under the cap
    assert signed.id == c.id == "0x" + spec_digest(c).hex()
    assert (
        spec_recover(spec_digest(c), signed.payload["signature"]).lower() == account.address.lower()
    )


def test_documented_test_vector():
    # The values in docs/deferred-scheme.md, "Test vector".
    c = vector_commitment()
    signature = Account.from_key(KEY).sign_message(c.signable()).signature.hex()
    assert Account.from_key(KEY).address == "0xdB00079cad3e665853Bf766eFe26F4C38cdbdCDA"
    assert c.resource == "0x0c59bd1b81afc42f7b9fb1f97ad91fed36c462ba47701a0c235752c5cfc6d966"
    assert c.id == "0x73a2cef5811b7d7770b9f2f7862757eb93f2f1d3a6eb269edd30037a92eb4771"
    assert "0x" + signature.removeprefix("0x") == (
        "0x7acc8dfeda6c67fbe5ee47ea5a902f990b3498633d99159e0e24e6ced1e9336e"
        "64bfd6c4e5838651cc9c8f0bdbe72ebe6a23ab9cd18b40482e3a9b7d5f83699a1c"
    )


def test_fast_digests_equal_eth_accounts_encoder_on_random_input():
    import os
    import random

    from eth_account.messages import encode_typed_data

    from scrapy_x402.schemes._eip712 import recover
    from scrapy_x402.schemes.exact import authorization_digest, authorization_typed_data

    def eth_account_digest(m) -> bytes:
        return keccak(b"\x19" + m.version + m.header + m.body)

    rng = random.Random(402)
    for _ in range(50):
        account = Account.create()
        c = Commitment(
            chain_id=rng.choice([1, 8453, 84532, 31337, 2**40]),
            payer=account.address,
            payee=Account.create().address,
            token=Account.create().address,
            amount=rng.randrange(1, 2**256),
            resource="0x" + os.urandom(32).hex(),
            nonce="0x" + os.urandom(32).hex(),
            valid_until=rng.randrange(1, 2**64),
        )
        assert c.digest() == eth_account_digest(c.signable()) == spec_digest(c)
        signature = "0x" + account.sign_message(c.signable()).signature.hex().removeprefix("0x")
        assert c.recover_signer(signature) == account.address
        assert recover(c.digest(), bytes.fromhex(signature[2:])) == account.address.lower()
        authorization = {
            "from": account.address,
            "to": c.payee,
            "value": str(c.amount),
            "validAfter": str(rng.randrange(2**32)),
            "validBefore": str(rng.randrange(2**40)),
            "nonce": c.nonce,
        }
        name, version = rng.choice([("USD Coin", "2"), ("Test USD", "1"), ("é", "")])
        typed = authorization_typed_data(authorization, c.chain_id, c.token, name, version)
        assert authorization_digest(authorization, c.chain_id, c.token, name, version) == (
            eth_account_digest(encode_typed_data(full_message=typed))
        )
