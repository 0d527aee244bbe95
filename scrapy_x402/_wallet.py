"""The crawler's wallet key: from a setting, the environment, or an encrypted keystore.

Error messages name where the key came from, never the key.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from eth_account import Account

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

    from scrapy_x402._config import X402Config


class WalletError(ValueError):
    pass


def load_account(config: X402Config) -> LocalAccount | None:
    """The configured account, or None when no key is configured anywhere."""
    if config.private_key:
        return _from_key(config.private_key, "X402_PRIVATE_KEY setting")
    if os.environ.get("X402_PRIVATE_KEY"):
        return _from_key(os.environ["X402_PRIVATE_KEY"], "X402_PRIVATE_KEY environment variable")
    if config.keystore_path:
        return _from_keystore(config.keystore_path, config.keystore_password_env)
    return None


def _from_key(key: str, source: str) -> LocalAccount:
    try:
        return Account.from_key(key.strip())
    except Exception:  # the library's message may quote the key: never chain it
        raise WalletError(
            f"the {source} is not a valid private key (expected 32 bytes as 64 hex digits)"
        ) from None


def _from_keystore(path: str, password_env: str) -> LocalAccount:
    password = os.environ.get(password_env)
    if password is None:
        raise WalletError(
            f"X402_KEYSTORE_PATH is set but the environment variable {password_env} "
            "(X402_KEYSTORE_PASSWORD_ENV) holding its password is not"
        )
    try:
        with open(path, encoding="utf-8") as f:
            keystore = json.load(f)
        key = Account.decrypt(keystore, password)
    except OSError as e:
        raise WalletError(f"cannot read the keystore {path}: {e.strerror}") from None
    except Exception:
        raise WalletError(
            f"cannot decrypt the keystore {path}: wrong password or not a JSON keystore"
        ) from None
    return Account.from_key(key)
