"""Web Bot Auth signatures, checked against RFC 9421's own example and an independent verifier."""

from __future__ import annotations

import datetime
import json

import pytest

from scrapy_x402._webbotauth import BotIdentity, IdentityError
from tests.edgeserver.verifier import Rejected, public_key, thumbprint, verify

# RFC 9421 appendix B.1.4, test-key-ed25519 (a published test key: it protects nothing)
RFC_KEY = {
    "kty": "OKP",
    "crv": "Ed25519",
    "x": "JrQLj5P_89iXES9-vFgrIy29clF9CC_oPPsw3c5D0bs",
    "d": "n4Ni-HpISpVObnQMW0wOhCKROaIKqKtW_2ZYb2p9KcU",
}
RFC_B26_SIGNATURE = (
    "wqcAqbmYJ2ji2glfAMaRy4gruYYnx2nEFN2HN6jrnDnQCK1u02Gb04v9EDgwUPiu4A0w6vuQv5lIp5WPpBKRCw=="
)
RFC_REQUEST = (
    "POST",
    "http://example.com/foo?param=Value&Pet=dog",
    {
        "Date": "Tue, 20 Apr 2021 02:07:55 GMT",
        "Content-Type": "application/json",
        "Content-Length": "18",
    },
)
RFC_COMPONENTS = [
    '"date"',
    '"@method"',
    '"@path"',
    '"@authority"',
    '"content-type"',
    '"content-length"',
]


def test_signing_library_reproduces_rfc_9421_b26():
    from http_message_signatures import HTTPMessageSigner, algorithms

    from scrapy_x402._webbotauth import _Message, _OwnKey

    identity = BotIdentity.load(json.dumps(RFC_KEY))
    message = _Message(RFC_REQUEST[0], RFC_REQUEST[1], dict(RFC_REQUEST[2]))
    HTTPMessageSigner(
        signature_algorithm=algorithms.ED25519, key_resolver=_OwnKey(identity.key)
    ).sign(
        message,
        key_id="test-key-ed25519",
        label="sig-b26",
        include_alg=False,
        created=datetime.datetime.fromtimestamp(1618884473, datetime.timezone.utc),
        covered_component_ids=RFC_COMPONENTS,
    )
    assert message.headers["Signature"] == f"sig-b26=:{RFC_B26_SIGNATURE}:"


def test_independent_verifier_accepts_rfc_9421_b26():
    headers = {
        **RFC_REQUEST[2],
        "Signature-Input": 'sig-b26=("date" "@method" "@path" "@authority" "content-type" '
        '"content-length");created=1618884473;keyid="test-key-ed25519"',
        "Signature": f"sig-b26=:{RFC_B26_SIGNATURE}:",
    }
    keys = {"test-key-ed25519": public_key(RFC_KEY)}
    assert verify(RFC_REQUEST[0], RFC_REQUEST[1], headers, keys).keyid == "test-key-ed25519"
    headers["Content-Length"] = "19"
    with pytest.raises(Rejected, match="invalid signature"):
        verify(RFC_REQUEST[0], RFC_REQUEST[1], headers, keys)


@pytest.mark.parametrize("syntax", ["legacy", "dictionary"])
def test_web_bot_auth_request_signature(syntax):
    identity = BotIdentity.generate(agent="https://crawler.example", syntax=syntax, label="bot1")
    now = datetime.datetime.now(datetime.timezone.utc)
    url = "https://news.example/paid/1"
    added = identity.sign_request("GET", url, {"Payment-Signature": "e30="}, now=now)
    verified = verify(
        "GET",
        url,
        {"Payment-Signature": "e30=", **added},
        {identity.keyid: identity.key.public_key()},
    )
    agent_component = "signature-agent"
    assert verified.components == ["@authority", agent_component, "payment-signature"]
    assert verified.params["tag"] == "web-bot-auth" and verified.params["alg"] == "ed25519"
    assert verified.params["expires"] - verified.params["created"] == 60
    assert len(verified.params["nonce"]) >= 32
    assert verified.label == "bot1"
    expected_agent = (
        '"https://crawler.example"' if syntax == "legacy" else 'bot1="https://crawler.example"'
    )
    assert added["Signature-Agent"] == expected_agent
    # keyid is the RFC 7638 thumbprint, computed independently here
    assert identity.keyid == thumbprint(identity.public_jwk())
    # Tampering with a covered payment header breaks it.
    with pytest.raises(Rejected):
        verify(
            "GET",
            url,
            {"Payment-Signature": "e31=", **added},
            {identity.keyid: identity.key.public_key()},
        )


def test_keyid_of_the_rfc_key_is_its_jwk_thumbprint():
    assert (
        BotIdentity.load(json.dumps(RFC_KEY)).keyid == "poqkLGiymh_W0uP6PZFw-dvez3QJT5SolqXBCW38r0U"
    )


def test_key_forms_and_errors(tmp_path):
    identity = BotIdentity.generate()
    seed = identity.private_jwk()["d"]
    path = tmp_path / "bot.jwk"
    path.write_text(json.dumps(identity.private_jwk()))
    for form in (seed, str(path), json.dumps(identity.private_jwk()), base64_to_hex(seed)):
        assert BotIdentity.load(form).keyid == identity.keyid
    with pytest.raises(IdentityError) as e:
        BotIdentity.load(seed[:-4])
    assert seed[:-4] not in str(e.value)


def base64_to_hex(seed: str) -> str:
    import base64

    return base64.urlsafe_b64decode(seed + "=").hex()


def test_directory_response_is_signed_for_the_directory():
    identity = BotIdentity.generate()
    body, headers = identity.directory("crawler.example")
    assert json.loads(body) == {"keys": [identity.public_jwk()]}
    assert headers["content-type"] == "application/http-message-signatures-directory+json"
    url = "https://crawler.example/.well-known/http-message-signatures-directory"
    verified = verify("GET", url, headers, {identity.keyid: identity.key.public_key()})
    assert verified.params["tag"] == "http-message-signatures-directory"
    assert verified.components == ["@authority"]
