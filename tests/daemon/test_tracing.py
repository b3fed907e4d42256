"""`[tracing]` (daemon/tracing.py): the section's defaults and refusals, the provider it
builds (resource, sampler), that off leaves actors.tracing off, and the exporter's log
lines held to one a minute."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from actors import tracing
from daemon import tracing as daemon_tracing
from daemon.config import ConfigError, load
from daemon.config import checks as config_checks
from daemon.config.sections import Tracing


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "jobd.toml"
    path.write_text(text)
    return load(path, {})


def test_off_by_default_with_a_local_endpoint(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    assert config.tracing == Tracing()
    assert (config.tracing.enabled, config.tracing.endpoint, config.tracing.sample_ratio,
            config.tracing.service_name) == (False, "http://127.0.0.1:4318/v1/traces", 1.0, "jobd")
    on = load_text(tmp_path, '[tracing]\nenabled = true\nsample_ratio = 0.25\n'
                             'endpoint = "https://otel.example:4318/v1/traces"\n'
                             'service_name = "jobd-eu"\n')
    assert on.tracing.enabled and on.tracing.sample_ratio == 0.25


@pytest.mark.parametrize("text", [
    "sample_ratio = 1.5", "sample_ratio = -0.1", "sample_ratio = nan", 'sample_ratio = "all"',
    'endpoint = "ftp://collector/v1/traces"', 'endpoint = "127.0.0.1:4318"', 'endpoint = ""',
    'service_name = ""', "enabled = 1", "exporter = 'zipkin'",
])
def test_a_bad_value_is_refused_at_load_in_one_line(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_text(tmp_path, f"[tracing]\n{text}\n")
    message = str(refused.value)
    assert "$.tracing" in message and "\n" not in message, message


def test_enabled_without_the_otlp_extra_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(config_checks, "OTLP_EXPORTER", "opentelemetry.exporter.nothere.http")
    with pytest.raises(ConfigError, match=r"jobd\[otlp\]") as refused:
        load_text(tmp_path, "[tracing]\nenabled = true\n")
    assert "\n" not in str(refused.value)
    assert not load_text(tmp_path, "[tracing]\nenabled = false\n").tracing.enabled


def test_the_provider_names_the_service_and_region_and_samples_by_ratio() -> None:
    exporter = InMemorySpanExporter()
    none = daemon_tracing.provider(Tracing(enabled=True, sample_ratio=0.0), region="us-east",
                                   daemon_id="d9", processor=SimpleSpanProcessor(exporter))
    tracer = none.get_tracer("t")
    with tracer.start_as_current_span("root"):
        pass
    assert exporter.get_finished_spans() == ()  # ratio 0: no root trace is kept
    every = daemon_tracing.provider(Tracing(enabled=True, service_name="svc"), region="us-east",
                                    daemon_id="d9", processor=SimpleSpanProcessor(exporter))
    with every.get_tracer("t").start_as_current_span("root"):
        pass
    [span] = exporter.get_finished_spans()
    attributes = span.resource.attributes
    assert (attributes["service.name"], attributes["jobd.region"],
            attributes["service.instance.id"]) == ("svc", "us-east", "d9")


async def test_off_installs_nothing() -> None:
    async with daemon_tracing.traced(Tracing(), region="r", daemon_id="d"):
        assert not tracing.active()
    assert not tracing.active()


def test_export_failures_are_logged_once_a_minute(caplog) -> None:
    quiet = daemon_tracing._OncePerMinute(every_s=60.0)
    logger = logging.getLogger("test.tracing.export")
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.WARNING, logger="test.tracing.export"):
            for _ in range(5):
                logger.warning("Transient error %s", "refused")
        assert [r.getMessage() for r in caplog.records] == ["Transient error refused"]
        quiet._last -= 61.0
        with caplog.at_level(logging.WARNING, logger="test.tracing.export"):
            logger.warning("Failed to export")
        assert caplog.records[-1].getMessage() == (
            "Failed to export (4 more export messages held back)")
        assert caplog.records[-1].event == "tracing.export_failed"
    finally:
        logger.removeFilter(quiet)
