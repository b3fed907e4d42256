import io
import logging
import os
import re
import time

import msgspec
import pytest

from daemon.logs import HumanFormatter, JsonFormatter, configure_logging, set_level

log = logging.getLogger("jobd.test")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("asyncio", "hypercorn.access")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def json_lines(stream: io.StringIO) -> list[dict]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [msgspec.json.decode(line) for line in text.splitlines()]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_line_has_core_fields():
    out = io.StringIO()
    configure_logging(stream=out, static={"service": "jobd", "region": "eu-west", "pid": 7})
    before = time.time()
    log.info("job %s finished", 42, extra={"event": "job.finished", "actor": "completer"})
    (line,) = json_lines(out)
    assert list(line) == [
        "ts", "level", "logger", "msg", "service", "region", "pid", "event", "actor",
    ]  # fmt: skip
    assert line["level"] == "info"
    assert line["logger"] == "jobd.test"
    assert line["msg"] == "job 42 finished"
    assert line["event"] == "job.finished"
    assert line["actor"] == "completer"
    assert (line["service"], line["region"], line["pid"]) == ("jobd", "eu-west", 7)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    ts = time.mktime(time.strptime(line["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert abs(ts - before) < 2


def test_event_and_actor_are_omitted_when_absent():
    out = io.StringIO()
    configure_logging(stream=out, fmt="json")
    log.warning("plain", extra={"event": None})
    (line,) = json_lines(out)
    assert "event" not in line and "actor" not in line
    assert line["level"] == "warning"


def test_extra_fields_are_encoded_natively():
    out = io.StringIO()
    configure_logging(stream=out)
    log.info(
        "claimed",
        extra={"job_id": 42, "queue": "default", "duration_s": 0.731, "tags": ["a", "b"]},
    )
    (line,) = json_lines(out)
    assert line["job_id"] == 42
    assert line["queue"] == "default"
    assert line["duration_s"] == 0.731
    assert line["tags"] == ["a", "b"]


def test_unencodable_extra_falls_back_to_repr():
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque thing>"

    out = io.StringIO()
    configure_logging(stream=out)
    log.info("odd", extra={"thing": Opaque(), "job_id": 1, "big": 1 << 80, "weird": {(1, 2): 3}})
    (line,) = json_lines(out)
    assert line["thing"] == "<Opaque thing>"
    assert line["job_id"] == 1
    assert line["weird"] == "{(1, 2): 3}"
    assert line["msg"] == "odd"


def test_extras_cannot_clobber_core_or_static_fields():
    out = io.StringIO()
    configure_logging(stream=out, static={"service": "jobd"})
    log.info("hi", extra={"level": "fake", "service": "other", "ts": 0})
    (line,) = json_lines(out)
    assert line["level"] == "info" and line["service"] == "jobd" and line["ts"] != 0


def test_traceback_is_one_line_under_exc():
    out = io.StringIO()
    configure_logging(stream=out)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("job failed", extra={"event": "job.failed", "job_id": 43})
    assert out.getvalue().count("\n") == 1
    (line,) = json_lines(out)
    assert line["level"] == "error"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].rstrip().endswith("ZeroDivisionError: division by zero")
    assert "\n" in line["exc"]


def test_no_exc_field_without_an_exception():
    out = io.StringIO()
    configure_logging(stream=out)
    log.error("no exception here", exc_info=True)  # logged outside an except block
    (line,) = json_lines(out)
    assert "exc" not in line


def test_journald_priority_prefix(tmp_path, monkeypatch):
    with open(tmp_path / "stdout", "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("debug", stream=stream)
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
    lines = (tmp_path / "stdout").read_text().splitlines()
    assert [line[:4] for line in lines] == ["<7>{", "<6>{", "<4>{", "<3>{", "<3>{"]
    assert [msgspec.json.decode(line[3:])["msg"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_no_prefix_when_journal_stream_is_another_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(tmp_path / "stdout", "w") as stream:
        configure_logging(stream=stream)
        log.info("i")
    assert (tmp_path / "stdout").read_text().startswith("{")


def test_human_format_on_a_tty():
    out = FakeTTY()
    configure_logging(stream=out)
    log.info("job finished", extra={"event": "job.finished", "job_id": 42, "queue": "my q"})
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d info +jobd\.test job\.finished job finished job_id=42 queue='my q'\n",
        out.getvalue(),
    )


def test_human_format_appends_traceback():
    out = io.StringIO()
    configure_logging(stream=out, fmt="human")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    first, *rest = out.getvalue().splitlines()
    assert first.endswith("error   jobd.test failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: boom"


def test_reconfigure_replaces_the_handler():
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    configure_logging("warning", stream=second, fmt="json")
    ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert len(ours) == 1
    log.info("dropped")
    log.warning("kept")
    assert first.getvalue() == ""
    assert [line["msg"] for line in json_lines(second)] == ["kept"]


def test_set_level_and_noisy_loggers():
    out = io.StringIO()
    configure_logging("info", stream=out)
    assert logging.getLogger("asyncio").level == logging.WARNING
    assert logging.getLogger("hypercorn.access").level == logging.WARNING
    log.debug("hidden")
    set_level("debug")
    log.debug("shown")
    assert [line["msg"] for line in json_lines(out)] == ["shown"]


def test_bad_level_or_format_is_rejected():
    with pytest.raises(ValueError, match="level"):
        configure_logging("loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="format"):
        configure_logging(stream=io.StringIO(), fmt="xml")
    with pytest.raises(ValueError):
        set_level("nope")


def test_formatters_work_standalone():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m %d", (1,), None)
    record.job_id = 5
    assert msgspec.json.decode(JsonFormatter().format(record))["job_id"] == 5
    assert HumanFormatter().format(record).endswith("info    x m 1 job_id=5")
