"""deploy/systemd and deploy/config, checked with the real tools.

- `systemd-analyze verify --man=no` on a tmp copy of the units (ExecStart pointed at
  this venv's `jobd`, since verify refuses a missing binary): exit 0 AND empty stderr,
  because verify exits 0 on unknown keys and unparsable values and only warns.
  `User=jobd` needs no rewrite: verify does not look the user up.
- `systemd-analyze security --offline=true`: the exposure score parses and is < 3.0.
- The unit agrees with jobd: credentials it reads, exit status 78, stop timeout longer
  than the drain grace, per-instance runtime/state directories, the socket path.
- Every example config passes `jobd check-config` and lists every config key.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from daemon import config as jobd_config
from protocol.durations import parse_duration

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "jobd@.service"
TARGET = SYSTEMD / "jobd.target"
CONFIGS = sorted((ROOT / "deploy" / "config").glob("*.toml"))
INSTALLED_JOBD = "/usr/local/bin/jobd"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install -y systemd; .ci/run does it as root)",
)


def unit_entries(path: Path) -> dict[str, list[str]]:
    """`Key` -> its values in file order (systemd keys may repeat), across sections."""
    entries: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(key)
    assert values, f"{key}= missing from {UNIT.name}"
    return values[-1]


def venv_jobd(tmp_path: Path) -> Path:
    """The installed `jobd` console script next to this interpreter, else a stub."""
    candidate = Path(sys.executable).parent / "jobd"
    if candidate.exists():
        return candidate
    stub = tmp_path / "jobd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return stub


def copy_units(tmp_path: Path, text_edit=lambda s: s) -> Path:
    directory = tmp_path / "units"
    directory.mkdir()
    exe = str(venv_jobd(tmp_path))
    text = text_edit(UNIT.read_text().replace(INSTALLED_JOBD, exe))
    (directory / UNIT.name).write_text(text)
    (directory / "jobd@eu-west.service").write_text(text)
    shutil.copy(TARGET, directory / TARGET.name)
    return directory


def verify(directory: Path, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(directory / n) for n in names)],
        capture_output=True, text=True, timeout=60, cwd=directory,
    )


@needs_systemd_analyze
@pytest.mark.parametrize("names", [
    ("jobd@.service",), ("jobd@eu-west.service",), ("jobd.target",),
    ("jobd@.service", "jobd.target"),
])
def test_units_verify_clean(tmp_path: Path, names: tuple[str, ...]) -> None:
    directory = copy_units(tmp_path)
    result = verify(directory, *names)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


@needs_systemd_analyze
def test_verify_reports_a_typo_on_stderr(tmp_path: Path) -> None:
    """The control for the test above: a bad key exits 0 but is not silent."""
    directory = copy_units(tmp_path, lambda s: s.replace("WatchdogSec=", "WatchDogSecc="))
    result = verify(directory, "jobd@.service")
    assert "Unknown key 'WatchDogSecc'" in result.stderr


@needs_systemd_analyze
def test_security_score(tmp_path: Path) -> None:
    directory = copy_units(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         str(directory / "jobd@.service")],
        capture_output=True, text=True, timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\w+)", result.stdout)
    assert match, f"no score in:\n{result.stdout}\n{result.stderr}"
    score = float(match.group(1))
    assert score < 3.0, f"exposure {score} {match.group(2)}:\n{result.stdout}"


def test_unit_matches_what_jobd_expects() -> None:
    e = unit_entries(UNIT)
    assert one(e, "Type") == "notify"
    assert one(e, "NotifyAccess") == "main"
    assert one(e, "KillMode") == "mixed"
    assert one(e, "Restart") == "on-failure"
    assert parse_duration(one(e, "WatchdogSec")) >= 10
    assert one(e, "RestartPreventExitStatus") == str(jobd_config.EX_CONFIG)
    assert one(e, "ExecStart") == f"{INSTALLED_JOBD} run --config /etc/jobd/%i.toml"
    assert one(e, "RuntimeDirectory") == "jobd/%i"  # never a shared jobd/: stop removes it
    assert one(e, "StateDirectory") == "jobd/%i"
    assert (one(e, "User"), one(e, "Group")) == ("jobd", "jobd")
    assert "JOBD_STATE_DIR" not in UNIT.read_text()  # jobd reads $STATE_DIRECTORY
    assert "PYTHONUNBUFFERED=1" in one(e, "Environment").split()
    # The credential names are the files daemon/config/ reads.
    creds = {v.split(":", 1)[0]: v.split(":", 1)[1] for v in e["LoadCredential"]}
    assert creds == {"database-url": "/etc/jobd/credentials/%i.database-url",
                     "api-token": "/etc/jobd/credentials/%i.api-token"}
    source = Path(jobd_config.__file__).read_text()
    for name in creds:
        assert f'"{name}"' in source
    # Stop must outlast the drain, or jobs are SIGKILLed mid-drain.
    stop = parse_duration(one(e, "TimeoutStopSec"))
    drain_default = parse_duration(jobd_config.Daemon().drain_grace)
    assert stop >= drain_default + 30
    for path in CONFIGS:
        cfg = jobd_config.load(path, environ={})
        assert stop >= parse_duration(cfg.daemon.drain_grace) + 30, path.name
    # Hardening that fits, and what must stay out.
    for key, value in {
        "ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "RestrictNamespaces": "yes", "RestrictRealtime": "yes",
        "LockPersonality": "yes", "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "UMask": "0027",
        "CapabilityBoundingSet": "",
    }.items():
        assert one(e, key) == value, key
    assert "ProcSubset" not in e  # hides /proc/stat: prometheus_client drops process_*
    assert "DynamicUser" not in e


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_passes_check_config(path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "daemon.main", "check-config", "--config", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": ok")


def _fields(struct: type[msgspec.Struct], prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for field in msgspec.structs.fields(struct):
        sub = field.type
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            out += _fields(sub, f"{prefix}{field.name}.")
        else:
            out.append((f"{prefix}{field.name}", field))
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_lists_every_key(path: Path) -> None:
    """Each key of daemon/config/ appears, set or (for unset-by-default keys) commented."""
    text = path.read_text()
    data = msgspec.toml.decode(path.read_bytes())
    region = path.stem
    assert data["region"] == region
    missing = []
    for dotted, _field in _fields(jobd_config.Config):
        if dotted == "queues":
            continue
        node = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        name = dotted.rsplit(".", 1)[-1]
        if node is None and not re.search(rf"^#\s*{re.escape(name)}\s*=", text, re.M):
            missing.append(dotted)
    for qname, queue in data.get("queues", {}).items():
        for name in (f.name for f in msgspec.structs.fields(jobd_config.Queue)):
            if name not in queue and not re.search(rf"^#\s*{name}\s*=", text, re.M):
                missing.append(f"queues.{qname}.{name}")
    assert not missing, f"{path.name} does not list: {missing}"
    assert "url" not in data.get("database", {}), "the database URL is a credential"
    # The socket lives in the instance's RuntimeDirectory=jobd/%i.
    assert data["control"]["socket"] == f"/run/jobd/{region}/jobd.sock"
    assert data["control"]["http"], "Prometheus scrapes control.http"
    # Defaults are written as the defaults (deploy-specific lines say "deploy:").
    cfg = jobd_config.load(path, environ={})
    defaults = jobd_config.Config()
    for dotted, _field in _fields(jobd_config.Config):
        if dotted in ("region", "queues"):
            continue
        section, _, name = dotted.rpartition(".")
        got = cfg
        want = defaults
        for part in dotted.split("."):
            got, want = getattr(got, part), getattr(want, part)
        line = next((ln for ln in text.splitlines() if re.match(rf"{name}\s*=", ln)), "")
        if "deploy:" in line or got is None:
            continue
        assert got == want, f"{path.name}: {dotted} = {got!r}, default {want!r} (mark 'deploy:')"
