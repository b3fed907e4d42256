"""`[[webhooks]]` checks that need more than a field's type: unique names and events,
a URL the `[http]` allow-list admits, durations in range, and a secret that can be read.

A secret is read here and nowhere else, so a missing or unreadable one is a one-line
config error at load and reload, like any other key; its value never enters a message.
"""

from __future__ import annotations

import os
from pathlib import Path

from actors.services.courier import Subscription
from actors.services.outbound import DestinationRefused, check_destination
from daemon.config.checks import ConfigError
from daemon.config.sections import Config, Webhook
from protocol.webhook_signing import secret_key

_YEAR_S = 86400 * 365


def check_webhooks(config: Config, where: str, environ: dict[str, str] | None = None) -> None:
    seen: set[str] = set()
    for i, hook in enumerate(config.webhooks):
        path = f"$.webhooks[{i}]"
        if hook.name in seen:
            raise ConfigError(f"{where}: webhook {hook.name!r} is declared twice - at `{path}.name`")
        seen.add(hook.name)
        if len(set(hook.events)) != len(hook.events):
            raise ConfigError(f"{where}: webhook {hook.name!r} names an event twice - at `{path}.events`")
        try:
            check_destination(hook.url, config.http.allow_hosts)
        except DestinationRefused as exc:
            # The URL itself is not repeated: it may carry a token.
            raise ConfigError(f"{where}: webhook {hook.name!r}: {_no_url(exc, hook.url)} "
                              f"- at `{path}.url`") from None
        for name in ("timeout", "backoff", "max_backoff"):
            if not 0 < getattr(hook, name) <= 86400:
                raise ConfigError(f"{where}: webhook {hook.name!r}: {name} must be above 0 and "
                                  f"at most 1 day - at `{path}.{name}`")
        for name in ("retry_for", "keep_delivered", "keep_failed"):
            if not 0 < getattr(hook, name) <= 10 * _YEAR_S:
                raise ConfigError(f"{where}: webhook {hook.name!r}: {name} must be above 0 and "
                                  f"at most 10 years - at `{path}.{name}`")
        try:
            read_secrets(hook, environ)
        except ValueError as exc:
            raise ConfigError(f"{where}: webhook {hook.name!r}: {exc} - at `{path}`") from None


def read_secrets(hook: Webhook, environ: dict[str, str] | None = None) -> list[str]:
    """The webhook's signing secrets, one per non-empty line; ValueError naming the file
    (never its content) when there is none to read."""
    environ = dict(os.environ if environ is None else environ)
    if (hook.secret_file is None) == (hook.secret_credential is None):
        raise ValueError("set exactly one of secret_file and secret_credential")
    if hook.secret_file is not None:
        source = Path(hook.secret_file)
    else:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(f"secret_credential {hook.secret_credential!r} needs "
                             "$CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
        source = Path(directory) / str(hook.secret_credential)
    try:
        text = source.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"cannot read the secret from {str(source)!r}: {reason}") from None
    secrets = [line.strip() for line in text.splitlines() if line.strip()]
    if not secrets:
        raise ValueError(f"the secret file {str(source)!r} is empty")
    for secret in secrets:
        secret_key(secret)  # a whsec_ secret that is not base64 is refused now
    return secrets


def _no_url(exc: DestinationRefused, url: str) -> str:
    return str(exc).replace(repr(url), "the url")


def subscriptions(config: Config, environ: dict[str, str] | None = None
                  ) -> dict[str, Subscription]:
    """The courier's view of `[[webhooks]]`, secrets read (ConfigError if one cannot be)."""
    found = {}
    for i, hook in enumerate(config.webhooks):
        try:
            secrets = read_secrets(hook, environ)
        except ValueError as exc:
            raise ConfigError(f"webhook {hook.name!r}: {exc} - at `$.webhooks[{i}]`") from None
        found[hook.name] = Subscription.signed_with(
            secrets, name=hook.name, url=hook.url, events=tuple(hook.events),
            kinds=tuple(hook.kinds), queues=tuple(hook.queues), timeout_s=hook.timeout,
            retry_for_s=hook.retry_for, backoff_s=hook.backoff, max_backoff_s=hook.max_backoff,
            concurrency=hook.concurrency, keep_delivered_s=hook.keep_delivered,
            keep_failed_s=hook.keep_failed)
    return found
