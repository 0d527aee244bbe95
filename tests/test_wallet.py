import json

import pytest
from eth_account import Account
from scrapy.settings import Settings

from scrapy_x402 import X402Config
from scrapy_x402._wallet import WalletError, load_account


def config(**settings):
    return X402Config.from_settings(Settings(settings))


def test_key_from_setting_then_environment(monkeypatch):
    account = Account.create()
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    assert load_account(config()) is None
    monkeypatch.setenv("X402_PRIVATE_KEY", account.key.hex())
    assert load_account(config()).address == account.address
    other = Account.create()
    assert load_account(config(X402_PRIVATE_KEY=other.key.hex())).address == other.address


def test_keystore_with_password_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    account = Account.create()
    path = tmp_path / "key.json"
    path.write_text(json.dumps(Account.encrypt(account.key, "s3cret", kdf="pbkdf2", iterations=2)))
    with pytest.raises(WalletError, match="CRAWLER_PW"):
        load_account(config(X402_KEYSTORE_PATH=str(path), X402_KEYSTORE_PASSWORD_ENV="CRAWLER_PW"))
    monkeypatch.setenv("CRAWLER_PW", "wrong")
    with pytest.raises(WalletError, match="wrong password"):
        load_account(config(X402_KEYSTORE_PATH=str(path), X402_KEYSTORE_PASSWORD_ENV="CRAWLER_PW"))
    monkeypatch.setenv("CRAWLER_PW", "s3cret")
    loaded = load_account(
        config(X402_KEYSTORE_PATH=str(path), X402_KEYSTORE_PASSWORD_ENV="CRAWLER_PW")
    )
    assert loaded.address == account.address


def test_errors_never_quote_the_key(monkeypatch):
    monkeypatch.delenv("X402_PRIVATE_KEY", raising=False)
    bad = "ab" * 31  # one byte short
    with pytest.raises(WalletError) as e:
        load_account(config(X402_PRIVATE_KEY=bad))
    assert bad not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
    assert "X402_PRIVATE_KEY setting" in str(e.value)
