"""Web Bot Auth signatures, checked against RFC 9421's own example and an independent verifier."""

from __future__ import annotations

import datetime
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scrapy_x402._webbotauth import BotIdentity, IdentityError, Unsignable
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
    assert verified.components == [
        "@method",
        "@authority",
        "@path",
        "@query",
        "signature-agent",
        "payment-signature",
    ]
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


def test_a_captured_signature_verifies_only_for_its_method_path_and_query():
    """A signature made for GET /a cannot be replayed on the same host as another request."""
    identity = BotIdentity.generate(agent="https://crawler.example")
    keys = {identity.keyid: identity.key.public_key()}
    signed = identity.sign_request("GET", "https://news.example/a", {})
    assert verify("GET", "https://news.example/a", signed, keys).keyid == identity.keyid
    for method, url in [
        ("POST", "https://news.example/admin/delete?all=1"),
        ("POST", "https://news.example/a"),
        ("GET", "https://news.example/admin/delete"),
        ("GET", "https://news.example/a?all=1"),
        ("GET", "https://other.example/a"),
    ]:
        with pytest.raises(Rejected, match="invalid signature"):
            verify(method, url, signed, keys)
    assert verify("GET", "https://news.example/a", signed, keys).components[:4] == [
        "@method",
        "@authority",
        "@path",
        "@query",
    ]
    # The query is covered as sent: one with a query verifies only with that query.
    signed = identity.sign_request("GET", "https://news.example/a?page=2", {})
    assert verify("GET", "https://news.example/a?page=2", signed, keys)
    with pytest.raises(Rejected, match="invalid signature"):
        verify("GET", "https://news.example/a?page=3", signed, keys)


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        ("https://news.example/%zz", {}),  # Scrapy keeps a malformed escape; RFC 9421 cannot
        ("https://news.example/a", {"crawler-max-price": "USD 0.01\x00"}),
        ("https://news.example/a", {"crawler-max-price": "USD \u20ac1"}),
        ("https://news.example/a", {"payment-signature": "e30=\r\nX-Evil: 1"}),
        ("https://news.example/a", {"payment-signature": "\ud800"}),
    ],
)
def test_an_unsignable_request_raises_unsignable_only(url, headers):
    identity = BotIdentity.generate(agent="https://crawler.example")
    with pytest.raises(Unsignable) as e:
        identity.sign_request("GET", url, headers)
    assert identity.private_jwk()["d"] not in str(e.value)


def test_headers_the_signature_does_not_cover_never_stop_it():
    identity = BotIdentity.generate(agent="https://crawler.example")
    odd = {"X-Odd": "\x00\u20ac\ud800", "Signature-Agent": "\u20ac", "Cookie": "a=\x01"}
    signed = identity.sign_request("GET", "https://news.example/a", odd)
    # The agent signed is ours, not the one the request came with.
    assert signed["Signature-Agent"] == '"https://crawler.example"'
    assert verify(
        "GET", "https://news.example/a", signed, {identity.keyid: identity.key.public_key()}
    )


@pytest.mark.parametrize("agent", ["https://cr\u00e4wler.example", "https://c.example/\n", "\x7f"])
def test_an_agent_that_is_no_structured_field_string_is_refused_at_start(agent):
    with pytest.raises(IdentityError, match="X402_SIGNATURE_AGENT"):
        BotIdentity.generate(agent=agent)
    with pytest.raises(IdentityError, match="X402_BOT_AUTH_LABEL"):
        BotIdentity.generate(label="Sig 1")


PROPERTY_IDENTITY = BotIdentity.generate(agent="https://crawler.example", syntax="dictionary")
# Any text, and text that mostly can be signed (printable ASCII), so that both outcomes occur.
texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)


@settings(max_examples=300, deadline=None)
@given(
    method=st.one_of(st.sampled_from(["GET", "POST", "HEAD"]), st.text(max_size=8)),
    path=texts,
    query=st.one_of(st.none(), texts),
    headers=st.dictionaries(
        st.one_of(
            st.sampled_from(["payment-signature", "Crawler-Max-Price", "crawler-exact-price"]),
            st.text(max_size=12),
        ),
        texts,
        max_size=4,
    ),
)
def test_sign_request_signs_what_verifies_or_raises_unsignable(method, path, query, headers):
    """For any method, URL and header values: headers that the independent verifier accepts
    for exactly that request, or Unsignable; never another exception."""
    url = "https://news.example/" + path + ("" if query is None else "?" + query)
    try:
        signed = PROPERTY_IDENTITY.sign_request(method, url, headers)
    except Unsignable:
        return
    sent = {**headers, **signed}
    keys = {PROPERTY_IDENTITY.keyid: PROPERTY_IDENTITY.key.public_key()}
    verified = verify(method.upper(), url, sent, keys)
    assert verified.components[:4] == ["@method", "@authority", "@path", "@query"]


def test_an_x402_v1_payment_header_is_covered_too():
    identity = BotIdentity.generate()
    url = "https://news.example/paid/1"
    added = identity.sign_request("GET", url, {"X-PAYMENT": "e30="})
    keys = {identity.keyid: identity.key.public_key()}
    assert "x-payment" in verify("GET", url, {"X-PAYMENT": "e30=", **added}, keys).components
    with pytest.raises(Rejected):  # another payment under our signature
        verify("GET", url, {"X-PAYMENT": "e31=", **added}, keys)
