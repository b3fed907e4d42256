"""The flow-control tools each kind runs with: its @job declaration with the config's
[kinds."<kind>"] laid over it, published into jobd.kind_tools where every insertion
path reads them (migration 0020). At start and after each reload."""

from __future__ import annotations

import msgspec

from actors.handlers import Handlers
from actors.tools import Tools, override
from daemon.config.checks import ConfigError
from daemon.config.sections import KindTools

_MODES = {"throttle_mode": ("delay", "drop"), "singleton_mode": ("skip", "cancel")}


def settings(cfg: KindTools) -> Tools:
    """A [kinds] table as Tools (durations and rates are already floats)."""
    for name, allowed in _MODES.items():
        value = getattr(cfg, name)
        if value is not None and value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.singleton_mode is not None and cfg.singleton_key is None:
        raise ValueError("singleton_mode needs singleton_key")
    return Tools(
        debounce_s=cfg.debounce, debounce_max_s=cfg.debounce_max, debounce_field=cfg.debounce_key,
        batch_size=cfg.batch_size, batch_timeout_s=cfg.batch_timeout, batch_field=cfg.batch_key,
        throttle_per_s=cfg.throttle, throttle_burst=cfg.throttle_burst,
        throttle_mode=cfg.throttle_mode, throttle_field=cfg.throttle_key,
        singleton_mode=cfg.singleton_mode or ("skip" if cfg.singleton_key else None),
        singleton_field=cfg.singleton_key, unique_for_s=cfg.unique_for,
        unique_mode=cfg.unique_mode)


def apply(handlers: Handlers, kinds: dict[str, KindTools]) -> dict[str, Tools | None]:
    """Lay `kinds` over the handlers' declarations (ConfigError names the kind); each
    declared kind's resulting tools, for store.sync_kind_tools. A [kinds] table for a
    kind no handler here declares is refused: a typo must not silently do nothing."""
    laid = {}
    for kind, cfg in kinds.items():
        jobdef = handlers.get(kind)
        if jobdef is None:
            raise ConfigError(f"kinds.{kind}: no handler declares this kind")
        try:
            laid[kind] = override(jobdef.declared_tools, jobdef.args_type, settings(cfg))
        except (ValueError, TypeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"kinds.{kind}: {exc}") from None
    # Only once every table checked out, so a refused reload changes nothing.
    for kind, jobdef in handlers.registered().items():
        jobdef.tools = laid.get(kind, jobdef.declared_tools)
    return {kind: (d.tools.tools if d.tools is not None else None)
            for kind, d in handlers.registered().items()}
