"""`[[webhooks]]` at load: secrets from a file (relative to the config) or a systemd
credential, rotation, and refusals that name the key but never a secret or the URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load, subscriptions

ENTRY = '[[webhooks]]\nname = "w"\nurl = "https://hooks.example.com/in?token=t0k"\n'


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "jobd.toml"
    path.write_text('[http]\nallow_hosts = [".example.com"]\n' + body)
    return path


def test_secret_file_relative_to_the_config_and_rotation(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("old-secret\n\nnew-secret\n")
    config = load(write(tmp_path, ENTRY + 'secret_file = "secret"\n'))
    [sub] = subscriptions(config).values()
    assert sub.keys == (b"old-secret", b"new-secret")
    assert config.webhooks[0].events == ["completed", "failed", "cancelled"]


def test_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "webhook-w").write_text("cred-secret")
    path = write(tmp_path, ENTRY + 'secret_credential = "webhook-w"\n')
    config = load(path, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")})
    [sub] = subscriptions(config, {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}).values()
    assert sub.keys == (b"cred-secret",)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        load(path, {})


@pytest.mark.parametrize(("body", "needle"), [
    ('secret_file = "missing"\n', "cannot read the secret"),
    ('secret_file = "empty"\n', "is empty"),
    ('secret_file = "bad-whsec"\n', "base64"),
    ('secret_file = "secret"\nsecret_credential = "x"\n', "exactly one"),
    ('secret_file = "secret"\nevents = ["completed", "completed"]\n', "event twice"),
    ('secret_file = "secret"\nevents = []\n', "at `$.webhooks[0].events`"),
    ('secret_file = "secret"\nconcurrency = 0\n', "at `$.webhooks[0].concurrency`"),
    ('secret_file = "secret"\nretry_for = "0s"\n', "retry_for"),
    ('secret_file = "secret"\nurl2 = "x"\n', "url2"),
])
def test_refusals_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    (tmp_path / "secret").write_text("s3cret-value\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "bad-whsec").write_text("whsec_not*base64\n")
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, ENTRY + body))
    message = str(caught.value)
    assert needle in message and "\n" not in message
    assert "s3cret-value" not in message and "t0k" not in message


def test_a_host_outside_the_allow_list_and_a_duplicate_name(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s\n")
    evil = ENTRY.replace("hooks.example.com", "evil.test") + 'secret_file = "secret"\n'
    with pytest.raises(ConfigError, match=r"not in \[http\] allow_hosts .*\$\.webhooks\[0\]\.url"):
        load(write(tmp_path, evil))
    twice = (ENTRY + 'secret_file = "secret"\n') * 2
    with pytest.raises(ConfigError, match="declared twice"):
        load(write(tmp_path, twice))
