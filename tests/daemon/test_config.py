"""daemon.config: decoding (durations and rates into floats), defaults, overrides, errors
that name their key, the state dir."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from daemon.config import (
    EX_CONFIG,
    Config,
    ConfigError,
    load,
    read_dashboard_token,
    read_token,
    socket_path,
    state_dir,
)
from protocol.durations import format_duration


def write(tmp_path: Path, text: str, name: str = "jobd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path | None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    return str(info.value)


# --------------------------------------------------------------------------- defaults


def test_exit_code_is_ex_config() -> None:
    assert EX_CONFIG == 78


def test_no_file_gives_the_defaults() -> None:
    config = load(None, {})
    assert config == Config()
    assert config.region == "default"
    assert config.database.url is None  # -> embedded Postgres
    assert (config.database.pool_min, config.database.pool_max) == (2, 10)
    assert config.database.timeout == 30.0
    assert config.control.socket is None and config.control.max_connections == 256
    assert (config.log.level, config.log.format) == ("info", "auto")
    assert config.handlers.modules == [] and config.handlers.paths == []
    assert config.queues == {}
    assert config.queue("anything").concurrency == 10
    assert config.queue("anything").claim_batch == 200
    assert config.jobs.lease == 30.0
    assert config.jobs.retention.failed_max_age == 7 * 86400
    assert config.daemon.drain_grace == 30.0


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path, ""), {}) == Config()


def test_a_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
region = "eu-west"
[database]
url = "postgresql://db/jobd"
pool_min = 1
pool_max = 4
timeout = "5s"
[control]
socket = "/run/jobd/jobd.sock"
max_connections = 8
[log]
level = "debug"
format = "json"
[handlers]
modules = ["examples.basic"]
paths = ["lib", "/abs"]
[jobs]
lease = "2m"
poll_interval = 0.5
progress_every = "500ms"
[jobs.retention]
completed_max_age = "1h"
completed_max_count = 5
[daemon]
drain_grace = 10
[queues.effects]
concurrency = 3
timeout = "1h"
max_attempts = 7
""")
    config = load(path, {})
    assert config.region == "eu-west"
    assert config.database.url == "postgresql://db/jobd"
    assert (config.database.pool_min, config.database.pool_max) == (1, 4)
    assert config.control.socket == "/run/jobd/jobd.sock"
    assert socket_path(config, tmp_path) == Path("/run/jobd/jobd.sock")
    assert config.log.level == "debug"
    assert config.handlers.modules == ["examples.basic"]
    # Handler paths are relative to the file.
    assert config.handlers.paths == [str((tmp_path / "lib").resolve()), "/abs"]
    assert config.queue("effects").concurrency == 3
    assert config.queue("effects").max_attempts == 7
    assert config.queue("default").concurrency == 10


@pytest.mark.parametrize(("written", "seconds"), [
    ('"500ms"', 0.5), ('"30s"', 30), ('"10m"', 600), ('"2h"', 7200), ('"7d"', 604800),
    ("45", 45), ("1.5", 1.5), ('"90"', 90), ('" 3 s "', 3),
])
def test_durations(tmp_path: Path, written: str, seconds: float) -> None:
    config = load(write(tmp_path, f"[jobs]\nlease = {written}\n"), {})
    assert type(config.jobs.lease) is float
    assert config.jobs.lease == pytest.approx(seconds)


def test_every_duration_and_rate_decodes_to_a_float(tmp_path: Path) -> None:
    """Each kind of place a duration or rate sits: a section, a nested section, a queue,
    a key's overrides, and optional fields left unset."""
    config = load(write(tmp_path, """
[control]
http_keep_alive = "500ms"
[jobs.retention]
events_max_age = "2d"
[queues.crawl]
timeout = "10m"
rate = "30/m"
queue_rate = 2
aging = 90
[queues.crawl.keys.slow]
rate = "90/10s"
breaker_cooldown = "1m"
"""), {})
    assert config.control.http_keep_alive == 0.5
    assert config.jobs.retention.events_max_age == 2 * 86400
    crawl = config.queue("crawl")
    assert (crawl.timeout, crawl.aging, crawl.rate, crawl.queue_rate) == (600, 90, 0.5, 2)
    assert type(crawl.rate) is float and type(crawl.queue_rate) is float
    assert (crawl.keys["slow"].rate, crawl.keys["slow"].breaker_cooldown) == (9, 60)
    assert config.queue("other").timeout is None and config.queue("other").rate is None
    # The defaults are the same floats as the decoded file would give.
    assert type(Config().jobs.lease) is float and Config().jobs.max_runtime == 3600


def test_decoded_durations_are_plain_floats_every_encoder_takes(tmp_path: Path) -> None:
    """A float subclass would reach msgspec (error details, HTTP replies) and fail there;
    a message that names a config value writes it back with format_duration."""
    config = load(write(tmp_path, '[control]\nhttp_read_timeout = "500ms"\n'), {})
    assert msgspec.json.encode({"timeout_s": config.control.http_read_timeout}) == \
        b'{"timeout_s":0.5}'
    assert (format_duration(config.jobs.lease), format_duration(config.jobs.max_runtime)) == \
        ("30s", "1h")


def test_flow_limits_are_the_json_jobd_claim_flow_reads(tmp_path: Path) -> None:
    """The parameter sent to the SQL, field for field (a set limit only; no nulls)."""
    config = load(write(tmp_path, """
[queues.crawl]
key_concurrency = 2
rate = "30/m"
burst = 3
tokens_per_minute = 1000
adaptive = true
breaker_failures = 4
breaker_cooldown = "1m"
rate_limit_pause = "1.5s"
queue_rate = "5/s"
queue_burst = 2
[queues.crawl.keys.slow]
key_concurrency = 1
rate = 1
adaptive = false
breaker_cooldown = "10s"
[queues.crawl.keys.empty]
[queues.plain]
concurrency = 3
breaker_cooldown = "5s"
queue_burst = 4
[queues.keyed]
adaptive = false
[queues.keyed.keys.vip]
breaker_failures = 2
"""), {})
    limits = config.queue("crawl").flow_limits()
    assert limits is not None
    assert msgspec.json.decode(msgspec.json.encode(limits)) == {
        "default": {"concurrency": 2, "rate": 0.5, "burst": 3.0, "tpm": 1000.0,
                    "adaptive": True, "breaker_failures": 4, "breaker_cooldown_s": 60.0},
        "keys": {"slow": {"concurrency": 1, "rate": 1.0, "adaptive": False,
                          "breaker_cooldown_s": 10.0}, "empty": {}},
        "rate_limit_pause_s": 1.5, "queue_rate": 5.0, "queue_burst": 2.0,
    }
    assert limits.for_key("slow").concurrency == 1 and limits.for_key("x").concurrency == 2
    # A cooldown without a breaker, a burst without a queue rate: no limits at all.
    assert config.queue("plain").flow_limits() is None
    assert config.queue("unconfigured").flow_limits() is None
    # adaptive = false on the queue is no limit; the cooldown waits the SQL's default.
    keyed = config.queue("keyed").flow_limits()
    assert keyed is not None
    assert msgspec.json.decode(msgspec.json.encode(keyed)) == {
        "default": {}, "keys": {"vip": {"breaker_failures": 2}}, "rate_limit_pause_s": 30.0}


def test_socket_defaults_to_the_state_dir(tmp_path: Path) -> None:
    assert socket_path(load(None, {}), tmp_path) == tmp_path / "jobd.sock"


# --------------------------------------------------------------------------- overrides


def test_env_database_url_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\nurl = "postgresql://file/jobd"\n')
    assert load(path, {}).database.url == "postgresql://file/jobd"
    config = load(path, {"JOBD_DATABASE_URL": "postgresql://env/jobd"})
    assert config.database.url == "postgresql://env/jobd"
    # An empty variable is not an override.
    assert load(path, {"JOBD_DATABASE_URL": ""}).database.url == "postgresql://file/jobd"


def test_credentials_directory_database_url(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "database-url").write_text("postgresql://cred/jobd\n")
    path = write(tmp_path, '[database]\nurl = "postgresql://file/jobd"\n')
    environ = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert load(path, environ).database.url == "postgresql://cred/jobd"  # stripped
    assert load(None, environ).database.url == "postgresql://cred/jobd"
    # The environment variable beats the credential.
    environ["JOBD_DATABASE_URL"] = "postgresql://env/jobd"
    assert load(path, environ).database.url == "postgresql://env/jobd"


def test_missing_or_empty_credential_is_ignored(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    path = write(tmp_path, '[database]\nurl = "postgresql://file/jobd"\n')
    assert load(path, {"CREDENTIALS_DIRECTORY": str(creds)}).database.url == \
        "postgresql://file/jobd"
    (creds / "database-url").write_text("  \n")
    assert load(path, {"CREDENTIALS_DIRECTORY": str(creds)}).database.url == \
        "postgresql://file/jobd"


def test_env_log_level_overrides_and_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlevel = "info"\n')
    assert load(path, {"JOBD_LOG_LEVEL": "debug"}).log.level == "debug"
    message = error_of(path, {"JOBD_LOG_LEVEL": "loud"})
    assert "$.log.level" in message


def test_api_token_from_credentials_or_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-token").write_text("s3cret\n")
    config = load(None, {})
    assert read_token(config, {}) is None
    assert read_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) == "s3cret"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    config.control.token_file = str(token_file)
    assert read_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) == "from-file"
    config.control.token_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="control.token_file"):
        read_token(config, {})


def test_dashboard_read_token_and_bounds(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "dashboard-read-token").write_text("reader\n")
    config = load(None, {})
    assert config.dashboard.enabled and config.dashboard.refresh == 2.0
    assert read_dashboard_token(config, {}) is None
    assert read_dashboard_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) == "reader"
    config.dashboard.read_token_file = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="dashboard.read_token_file"):
        read_dashboard_token(config, {})
    assert "dashboard.refresh must be between 500ms and 1h" in error_of(
        write(tmp_path, '[dashboard]\nrefresh = "10ms"\n'))
    assert "dashboard.session_lifetime" in error_of(
        write(tmp_path, '[dashboard]\nsession_lifetime = "90d"\n'))
    assert "$.dashboard.enabled" in error_of(write(tmp_path, '[dashboard]\nenabled = "yes"\n'))


# --------------------------------------------------------------------------- errors name their key


@pytest.mark.parametrize(("text", "key_path"), [
    ('[queues.x]\nconcurrency = "ten"\n', "$.queues.x.concurrency"),
    ("[queues.x]\nconcurrency = 0\n", "$.queues.x.concurrency"),
    ("[queues.x]\nclaim_batch = 1.5\n", "$.queues.x.claim_batch"),
    ("[queues.ok]\n[queues.bad]\nmax_attempts = 0\n", "$.queues.bad.max_attempts"),
    ('[queues.x]\ntimeout = "soon"\n', "$.queues.x.timeout"),
    ("[database]\npool_max = 0\n", "$.database.pool_max"),
    ('[database]\npool_min = "2"\n', "$.database.pool_min"),
    ('[database]\ntimeout = "forever"\n', "$.database.timeout"),
    ('[log]\nlevel = "loud"\n', "$.log.level"),
    ('[log]\nformat = "xml"\n', "$.log.format"),
    ('[jobs]\nlease = "3 fortnights"\n', "$.jobs.lease"),
    ("[jobs]\nlease = -1\n", "$.jobs.lease"),
    ("[jobs]\nlease = true\n", "$.jobs.lease"),
    ('[jobs]\nreaper_interval = "1w"\n', "$.jobs.reaper_interval"),
    ('[jobs.retention]\nfailed_max_age = "x"\n', "$.jobs.retention.failed_max_age"),
    ("[jobs.retention]\ncompleted_max_count = -1\n", "$.jobs.retention.completed_max_count"),
    ('[daemon]\ndrain_grace = "later"\n', "$.daemon.drain_grace"),
    ("[daemon]\nheartbeat = 2030-01-01\n", "$.daemon.heartbeat"),
    ('[control]\nhttp_keep_alive = "0s"\n', "$.control.http_keep_alive"),
    ('[queues.x]\nbreaker_cooldown = "soon"\n', "$.queues.x.breaker_cooldown"),
    ('[queues.x]\nrate_limit_pause = -5\n', "$.queues.x.rate_limit_pause"),
    ("[queues.x]\naging = [1]\n", "$.queues.x.aging"),
    ('[queues.x]\nrate = "fast"\n', "$.queues.x.rate"),
    ("[queues.x]\nqueue_rate = 0\n", "$.queues.x.queue_rate"),
    ('[queues.x]\nrate = "5/fortnight"\n', "$.queues.x.rate"),
    ('[queues.ok]\n[queues.x.keys.ok]\n[queues.x.keys.slow]\nrate = "x"\n',
     "$.queues.x.keys.slow.rate"),
    ('[queues.x.keys.slow]\nbreaker_cooldown = "x"\n', "$.queues.x.keys.slow.breaker_cooldown"),
    ("[queues.x.keys.slow]\nkey_concurrency = -1\n", "$.queues.x.keys.slow.key_concurrency"),
    # Past what Postgres' fields hold: every claim of the queue would fail.
    ("[queues.x]\nkey_concurrency = 99999999999999999999\n", "$.queues.x.key_concurrency"),
    ("[queues.x.keys.slow]\nbreaker_failures = 9999999999\n",
     "$.queues.x.keys.slow.breaker_failures"),
    ("[queues.x]\nmax_attempts = 5000\n", "$.queues.x.max_attempts"),
    ("[queues.x]\naging_floor = 40000\n", "$.queues.x.aging_floor"),
    ('[handlers]\nmodules = "examples.basic"\n', "$.handlers.modules"),
    ('region = "has space"\n', "$.region"),
    ("region = 5\n", "$.region"),
])
def test_errors_name_the_key_path(tmp_path: Path, text: str, key_path: str) -> None:
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"`{key_path}`" in message, message
    assert str(path) in message  # and the file


@pytest.mark.parametrize(("text", "field", "where"), [
    ("bogus = 1\n", "bogus", None),  # top level: the field is the whole path
    ("[database]\nuser = 'x'\n", "user", "$.database"),
    ("[jobs.retention]\nkeep = 1\n", "keep", "$.jobs.retention"),
    ("[queues.x]\nconcurrency = 3\nbogus = 1\n", "bogus", "$.queues.x"),
    ("[nonsense]\na = 1\n", "nonsense", None),
])
def test_unknown_keys_are_refused_with_their_path(tmp_path: Path, text: str, field: str,
                                                  where: str | None) -> None:
    message = error_of(write(tmp_path, text))
    assert "unknown field" in message and f"`{field}`" in message, message
    if where is not None:
        assert f"`{where}`" in message, message


def test_bad_queue_name_is_refused(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[queues."no spaces"]\nconcurrency = 1\n'))
    assert "$.queues" in message


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    assert str(tmp_path / "jobd.toml") in error_of(write(tmp_path, "region = \n"))
    assert "no such file" in error_of(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- state dir


def test_state_dir_precedence(tmp_path: Path) -> None:
    env = {"JOBD_STATE_DIR": "/from/jobd", "STATE_DIRECTORY": "/from/systemd"}
    assert state_dir("/from/flag", env) == Path("/from/flag")
    assert state_dir(None, env) == Path("/from/jobd")
    assert state_dir(None, {"STATE_DIRECTORY": "/from/systemd"}) == Path("/from/systemd")
    assert state_dir(None, {}) == Path.home() / ".local" / "state" / "jobd"
    # Empty values do not count.
    assert state_dir("", {"JOBD_STATE_DIR": "", "STATE_DIRECTORY": "/s"}) == Path("/s")


def test_state_dir_systemd_list_and_home() -> None:
    # systemd passes several colon-separated directories when StateDirectory= names several.
    assert state_dir(None, {"STATE_DIRECTORY": "/var/lib/jobd:/var/lib/other"}) == \
        Path("/var/lib/jobd")
    assert state_dir("~/jobd", {}) == Path.home() / "jobd"
