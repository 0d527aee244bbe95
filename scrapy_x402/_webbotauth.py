"""Web Bot Auth: the crawler's Ed25519 identity and its RFC 9421 request signatures.

Signing goes through the `http-message-signatures` library. Cloudflare verifies the key named
by ``keyid`` (the JWK SHA-256 thumbprint, RFC 7638) in the directory that ``Signature-Agent``
points to.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageSigner,
    HTTPSignatureKeyResolver,
    algorithms,
)
from http_message_signatures.structures import CaseInsensitiveDict

TAG = "web-bot-auth"
DIRECTORY_TAG = "http-message-signatures-directory"
DIRECTORY_CONTENT_TYPE = "application/http-message-signatures-directory+json"
DIRECTORY_PATH = "/.well-known/http-message-signatures-directory"
# Payment headers a signature must cover whenever the request carries them.
PAYMENT_HEADERS = ("payment-signature", "x-payment", "crawler-exact-price", "crawler-max-price")
# What a signature travels in: never kept from an earlier attempt or another host's request.
SIGNATURE_HEADERS = ("signature", "signature-input", "signature-agent")
# What every request signature covers besides the agent and the payment: the method and the
# whole request target, so a captured signature verifies for this request only (another
# method, path or query on the same host is rejected). The web-bot-auth draft requires only
# @authority (and signature-agent when sent) and lets a signer cover more; Cloudflare verifies
# whatever Signature-Input lists. @path and @query rather than @target-uri: they are read
# from the request line as sent, while @target-uri makes the verifier rebuild scheme and
# port (TLS ended at a CDN, a default port spelled or not) and is easier to get wrong there.
REQUEST_COMPONENTS = ('"@method"', '"@authority"', '"@path"', '"@query"')
# RFC 8941 sf-string characters (printable ASCII) and sf-key syntax.
_SF_STRING = re.compile(r"[\x20-\x7e]*")
_SF_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*")


class IdentityError(ValueError):
    pass


class Unsignable(ValueError):
    """This request cannot be signed (its URL, method or a covered header value is not
    something RFC 9421 can sign); nothing was signed. The message names the part, never a
    key or a header's value."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Message:
    """The request view the signing library reads and writes."""

    def __init__(self, method: str, url: str, headers: dict[str, str]):
        self.method = method.upper()
        self.url = url
        self.headers = CaseInsensitiveDict(headers)


class _Response(_Message):
    def __init__(self, status: int, headers: dict[str, str], request: _Message):
        super().__init__(request.method, request.url, headers)
        self.status_code = status
        self.request = request


class _OwnKey(HTTPSignatureKeyResolver):
    def __init__(self, key: Ed25519PrivateKey):
        self.key = key

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey:
        return self.key

    def resolve_public_key(self, key_id: str) -> Any:
        return self.key.public_key()


class BotIdentity:
    """An Ed25519 key, and how requests signed with it name their agent."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        agent: str | None = None,
        *,
        syntax: str = "legacy",
        label: str = "sig1",
        validity: int = 60,
    ):
        if syntax not in ("legacy", "dictionary"):
            raise IdentityError("X402_SIGNATURE_AGENT_SYNTAX must be 'legacy' or 'dictionary'")
        # Checked once here, so that no request fails to sign for the agent or the label.
        if agent is not None and not _SF_STRING.fullmatch(agent):
            raise IdentityError("X402_SIGNATURE_AGENT must be printable ASCII (an https URL)")
        if not isinstance(label, str) or not _SF_KEY.fullmatch(label):
            raise IdentityError(
                "X402_BOT_AUTH_LABEL must be a structured-field key (a-z, 0-9, _ - . *)"
            )
        self.key = key
        self.agent = agent
        self.syntax = syntax
        self.label = label
        self.validity = validity
        self._signer = HTTPMessageSigner(
            signature_algorithm=algorithms.ED25519, key_resolver=_OwnKey(key)
        )

    @classmethod
    def generate(cls, **kwargs: Any) -> BotIdentity:
        return cls(Ed25519PrivateKey.generate(), **kwargs)

    @classmethod
    def load(cls, value: str, **kwargs: Any) -> BotIdentity:
        """From a file path, a private JWK (JSON), a PEM, or a raw 32-byte seed (base64url or hex).
        Errors name the form that failed, never the key."""
        text = value.strip()
        if (
            not text.startswith(("{", "-----"))
            and len(text) < 512
            and Path(text).expanduser().is_file()
        ):
            text = Path(text).expanduser().read_text().strip()
        try:
            if text.startswith("{"):
                seed = _b64url_decode(json.loads(text)["d"])
            elif text.startswith("-----"):
                key = serialization.load_pem_private_key(text.encode(), password=None)
                if not isinstance(key, Ed25519PrivateKey):
                    raise IdentityError("X402_BOT_AUTH_KEY: the PEM key is not Ed25519")
                return cls(key, **kwargs)
            elif len(text) == 64:
                seed = bytes.fromhex(text)
            else:
                seed = _b64url_decode(text)
            return cls(Ed25519PrivateKey.from_private_bytes(seed), **kwargs)
        except IdentityError:
            raise
        except Exception:
            raise IdentityError(
                "X402_BOT_AUTH_KEY is not an Ed25519 private key (a file, a JWK, a PEM, or a "
                "32-byte seed as base64url or hex)"
            ) from None

    def public_jwk(self) -> dict[str, str]:
        raw = self.key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}

    def private_jwk(self) -> dict[str, str]:
        raw = self.key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return {**self.public_jwk(), "d": b64url(raw)}

    @property
    def keyid(self) -> str:
        """RFC 7638 thumbprint: SHA-256 of the required members, sorted, without spaces."""
        canonical = json.dumps(self.public_jwk(), sort_keys=True, separators=(",", ":"))
        return b64url(hashlib.sha256(canonical.encode()).digest())

    def signature_agent(self) -> str | None:
        if self.agent is None:
            return None
        quoted = '"' + self.agent.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return quoted if self.syntax == "legacy" else f"{self.label}={quoted}"

    def sign_request(
        self, method: str, url: str, headers: dict[str, str], now: datetime.datetime | None = None
    ) -> dict[str, str]:
        """The headers to add: Signature-Agent (when an agent is set), Signature-Input and
        Signature, covering the method, authority, path and query, the agent and any payment
        header present. Raises Unsignable (and only that) when the request cannot be signed."""
        given = {k.lower(): v for k, v in headers.items()}
        # Only what is covered goes to the signer: an odd header it does not cover is no reason
        # to refuse, and the agent is ours, never one the request came with.
        covered = {name: given[name] for name in PAYMENT_HEADERS if name in given}
        agent = self.signature_agent()
        components = list(REQUEST_COMPONENTS)
        if agent is not None:
            covered["signature-agent"] = agent
            components.append(
                '"signature-agent"'
                if self.syntax == "legacy"
                else f'"signature-agent";key="{self.label}"'
            )
        components += [f'"{name}"' for name in PAYMENT_HEADERS if name in covered]
        created = now or datetime.datetime.now(datetime.timezone.utc)
        try:
            message = _Message(method, url, covered)
            self._signer.sign(
                message,
                key_id=self.keyid,
                created=created,
                expires=created + datetime.timedelta(seconds=self.validity),
                nonce=b64url(os.urandom(32)),
                label=self.label,
                tag=TAG,
                covered_component_ids=components,
            )
        except (HTTPMessageSignaturesException, ValueError, TypeError) as e:
            # The library's messages name the component, never a value or the key.
            raise Unsignable(str(e)[:200]) from None
        added = {
            "Signature-Input": message.headers["Signature-Input"],
            "Signature": message.headers["Signature"],
        }
        if agent is not None:
            added["Signature-Agent"] = agent
        return added

    def directory(
        self, authority: str, now: datetime.datetime | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The key directory to host at ``https://<authority>/.well-known/...``: body and
        headers, the response signed with the directory tag."""
        body = json.dumps({"keys": [self.public_jwk()]}, indent=2).encode()
        request = _Message("GET", f"https://{authority}{DIRECTORY_PATH}", {})
        response = _Response(200, {"content-type": DIRECTORY_CONTENT_TYPE}, request)
        created = now or datetime.datetime.now(datetime.timezone.utc)
        self._signer.sign(
            response,
            key_id=self.keyid,
            created=created,
            expires=created + datetime.timedelta(days=1),
            nonce=b64url(os.urandom(32)),
            label="binding0",
            tag=DIRECTORY_TAG,
            covered_component_ids=['"@authority";req'],
        )
        return body, dict(response.headers.items())
