"""`[[schedules]]` in the config file: decoded, validated with the key's path."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, load


def write(tmp_path, body: str):
    path = tmp_path / "jobd.toml"
    path.write_text(body)
    return path


def test_schedules_decode(tmp_path):
    config = load(write(tmp_path, """
[[schedules]]
name = "daily"
kind = "report"
cron = "0 6 * * *"
tz = "Europe/Berlin"
args = { full = true }
jitter = "30s"
missed = "all"
missed_limit = 10

[[schedules]]
name = "tick"
kind = "noop"
every = "10s"
"""), environ={})
    daily, tick = config.schedules
    assert (daily.name, daily.cron, daily.tz, daily.args, daily.jitter, daily.missed,
            daily.missed_limit) == ("daily", "0 6 * * *", "Europe/Berlin", {"full": True}, "30s",
                                    "all", 10)
    assert (tick.every, tick.cron, tick.missed) == ("10s", None, "latest")


@pytest.mark.parametrize("body, message", [
    ('name = "a"\nkind = "k"', "exactly one of `cron` and `every`"),
    ('name = "a"\nkind = "k"\ncron = "0 6 * *"', "5 fields"),
    ('name = "a"\nkind = "k"\nevery = "soon"', "schedules[0].every"),
    ('name = "a"\nkind = "k"\nevery = "1s"\ntz = "Moon/Base"', "unknown time zone"),
    ('name = "a"\nkind = "k"\nevery = "1s"\nmissed = "never"', "missed"),
    ('name = "a"\nkind = "k"\nevery = "1s"\nsurprise = 1', "surprise"),
    ('name = "a b"\nkind = "k"\nevery = "1s"', "name"),
])
def test_bad_schedules_are_refused_with_their_path(tmp_path, body, message):
    with pytest.raises(ConfigError, match="schedules") as info:
        load(write(tmp_path, "[[schedules]]\n" + body + "\n"), environ={})
    assert message in str(info.value)


def test_duplicate_names_are_refused(tmp_path):
    body = '[[schedules]]\nname = "a"\nkind = "k"\nevery = "1s"\n'
    with pytest.raises(ConfigError, match="declared twice"):
        load(write(tmp_path, body * 2), environ={})
