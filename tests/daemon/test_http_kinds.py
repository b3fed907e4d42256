"""`[http.kinds]` into registered kinds: every bad value is a one-line ConfigError naming
its key (never the secret), and a reinstall replaces what the last one registered."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.errors import InvalidArgs
from actors.handlers import Handlers
from actors.http_handler import HttpCalls
from actors.ports import NullObserver
from actors.services.outbound import Outbound
from daemon import http_kinds
from daemon.config import ConfigError, load

ROOT = Path(__file__).resolve().parents[2]
SECRET = "not-to-be-seen-0123456789"


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "hook.secret").write_text(SECRET + "\n")
    path = tmp_path / "jobd.toml"
    path.write_text(body)
    return path


def kind(url: str = "https://app.example.com/run", **extra: str) -> str:
    lines = ['[http]', 'allow_hosts = ["app.example.com"]', '[http.kinds."predict.session"]',
             f'url = "{url}"']
    extra.setdefault("secret_file", '"hook.secret"')
    lines += [f"{k} = {v}" for k, v in extra.items() if v]
    return "\n".join(lines) + "\n"


def prepare(tmp_path: Path, body: str, environ: dict[str, str] | None = None):
    return http_kinds.prepare(load(write(tmp_path, body), environ={}), environ or {})


@pytest.mark.parametrize(("body", "names"), [
    (kind("ftp://app.example.com/x"), "url"),
    (kind("https://evil.example.org/x"), "allow_hosts"),
    (kind("https://user:pw@app.example.com/x"), "credentials"),
    (kind(secret_file=""), "secret_file or secret_credential"),
    (kind(secret_credential='"x"'), "one of them"),
    (kind(secret_file='"missing.secret"'), "cannot read"),
    (kind(secret_credential='"hook"', secret_file=""), "CREDENTIALS_DIRECTORY"),
    (kind(key='"/"'), "key"),
    (kind(timeout='"0s"'), "timeout"),
    (kind(args_schema='{ type = "no-such-type" }'), "args_schema"),
    ('[http]\ncallback_url = "ftp://x"\n', "callback_url"),
])
def test_a_bad_kind_is_one_line_naming_its_key(tmp_path, body, names):
    with pytest.raises(ConfigError) as caught:
        prepare(tmp_path, body)
    message = str(caught.value)
    assert names in message and "\n" not in message and SECRET not in message, message
    assert "- at `$.http" in message


def test_an_empty_or_bad_secret_is_refused_without_showing_it(tmp_path):
    path = write(tmp_path, kind())
    (tmp_path / "hook.secret").write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        http_kinds.prepare(load(path, environ={}), {})
    (tmp_path / "hook.secret").write_text("whsec_%%%not-base64\n")
    with pytest.raises(ConfigError, match="base64") as caught:
        http_kinds.prepare(load(path, environ={}), {})
    assert "%%%" not in str(caught.value)


def test_a_systemd_credential_and_a_rotation(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hook").write_text("old-secret\nnew-secret\n")
    [spec] = prepare(tmp_path, kind(secret_credential='"hook"', secret_file=""),
                     {"CREDENTIALS_DIRECTORY": str(creds)})
    assert spec.endpoint.signing_keys == [b"old-secret", b"new-secret"]
    assert "secret" not in repr(spec.endpoint)


def test_install_registers_replaces_and_refuses_a_module_kind(tmp_path):
    handlers = Handlers()
    calls = HttpCalls(Outbound(allow_hosts=[]), NullObserver())
    specs = prepare(tmp_path, kind(key='"/model/name"', args_schema=(
        '{ type = "object", required = ["model"] }')))
    http_kinds.install(calls, handlers, specs, ["app.example.com"])
    jobdef = handlers.lookup("predict.session")
    assert jobdef.key is not None and jobdef.key({"model": {"name": "gpt"}}) == "gpt"
    with pytest.raises(InvalidArgs, match="args_schema"):
        jobdef.decode_args(b'{"other": 1}')
    http_kinds.install(calls, handlers, specs, ["app.example.com"])  # a reload: fine
    http_kinds.install(calls, handlers, [], [])  # removed from the file
    assert handlers.get("predict.session") is None

    @handlers.job("predict.session")
    async def local(ctx, args: dict) -> None: ...

    with pytest.raises(ConfigError, match="a handler module declares"):
        http_kinds.install(calls, handlers, specs, ["app.example.com"])
    assert handlers.lookup("predict.session").fn is local
    # A module taking over a kind the file drops in the same reload keeps it.
    handlers.discard("predict.session")
    http_kinds.install(calls, handlers, specs, ["app.example.com"])
    handlers.job("predict.session")(local)
    http_kinds.install(calls, handlers, [], [])
    assert handlers.lookup("predict.session").fn is local


def test_check_config_exits_78_with_one_line(tmp_path):
    path = write(tmp_path, kind("https://evil.example.org/x"))
    result = subprocess.run([sys.executable, "-m", "daemon.main", "check-config", "--config",
                             str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result
    assert len(result.stderr.strip().splitlines()) == 1 and "allow_hosts" in result.stderr
    good = write(tmp_path, kind())
    result = subprocess.run([sys.executable, "-m", "daemon.main", "check-config", "--config",
                             str(good)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
