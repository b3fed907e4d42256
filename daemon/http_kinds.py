"""`[http.kinds.<kind>]` from the config into registered kinds (actors/http_handler.py),
at start, on `jobd check-config` and on every reload.

Everything that can be wrong with one is found here, before anything is registered, and
is a ConfigError of one line naming its key: a URL that is not http(s), carries
credentials or whose host `[http] allow_hosts` refuses; a secret that cannot be read or
is empty; a JSON Schema that is not one; a kind a handler module declares too. Secrets
are read here and handed to the handler only: they are in no Struct that is logged,
shown or encoded.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from actors.errors import InvalidArgs
from actors.handlers import Handlers
from actors.http_handler import Endpoint, HttpCalls, HttpKind, field_key
from actors.services.outbound import DestinationRefused, check_destination
from daemon.config import Config, ConfigError
from daemon.config.sections import HttpKind as KindConfig
from protocol.webhook_signing import secret_key

_MAX_KIND = 200


def prepare(config: Config, environ: dict[str, str] | None = None) -> list[HttpKind]:
    """The config's HTTP kinds, checked and with their secrets read; ConfigError names
    the first problem."""
    environ = dict(os.environ if environ is None else environ)
    base = config.http.callback_url
    if base is not None and urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError("http.callback_url: must be an http(s) URL, e.g. "
                          "\"https://jobd.internal:9464\" - at `$.http.callback_url`")
    return [_prepare(kind, spec, config.http.allow_hosts, environ)
            for kind, spec in sorted(config.http.kinds.items())]


def install(calls: HttpCalls, handlers: Handlers, kinds: list[HttpKind],
            allow_hosts: list[str]) -> None:
    """Register `kinds` (replacing those of an earlier install); ConfigError when a
    handler module declares one of them too, and then nothing changes."""
    for spec in kinds:
        kind = spec.endpoint.kind
        if calls.declared_elsewhere(handlers, kind):
            raise ConfigError(f"http.kinds.{kind}: a handler module declares {kind!r} "
                              f"too; a kind has one handler - at `$.http.kinds.{kind}`")
    calls.outbound.allow_hosts = list(allow_hosts)
    calls.install(handlers, kinds)


def _prepare(kind: str, spec: KindConfig, allow_hosts: list[str],
             environ: dict[str, str]) -> HttpKind:
    at = f" - at `$.http.kinds.{kind}"
    if not 0 < len(kind) <= _MAX_KIND or "\x00" in kind:
        raise ConfigError(f"http.kinds: a kind is 1-{_MAX_KIND} characters without NUL{at}`")
    try:
        check_destination(spec.url, allow_hosts)
    except DestinationRefused as exc:
        raise ConfigError(f"http.kinds.{kind}.url: {exc}{at}.url`") from None
    parts = urllib.parse.urlsplit(spec.url)
    if parts.username is not None or parts.password is not None:
        # The URL appears in job errors and logs: a password in it would too.
        raise ConfigError(f"http.kinds.{kind}.url: must not carry credentials (user:"
                          f"password@); the request is signed with the kind's secret{at}.url`")
    for name in ("timeout", "callback_timeout"):
        if not 0 < getattr(spec, name) <= 86400 * 365:
            raise ConfigError(f"http.kinds.{kind}.{name} must be a positive duration of at "
                              f"most a year{at}.{name}`")
    key = None
    if spec.key is not None:
        if not spec.key or spec.key == "/":
            raise ConfigError(f"http.kinds.{kind}.key: name an args field or a JSON "
                              f"pointer (\"/model/name\"){at}.key`")
        key = field_key(spec.key)
    return HttpKind(
        endpoint=Endpoint(kind, spec.url, _signing_keys(kind, spec, environ, at),
                          timeout_s=spec.timeout, callback_timeout_s=spec.callback_timeout),
        queue=spec.queue, max_attempts=spec.max_attempts, priority=spec.priority, key=key,
        check_args=_schema_check(kind, spec.args_schema, at) if spec.args_schema is not None
        else None)


def _signing_keys(kind: str, spec: KindConfig, environ: dict[str, str], at: str) -> list[bytes]:
    """One secret per line (two while rotating: requests then carry both signatures)."""
    if (spec.secret_file is None) == (spec.secret_credential is None):
        raise ConfigError(f"http.kinds.{kind}: set secret_file or secret_credential (one "
                          f"of them): requests to an endpoint are always signed{at}`")
    if spec.secret_file is not None:
        path, field = Path(spec.secret_file), "secret_file"
    else:
        directory = environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(f"http.kinds.{kind}.secret_credential: $CREDENTIALS_DIRECTORY "
                              f"is not set (systemd LoadCredential=){at}.secret_credential`")
        path, field = Path(directory) / str(spec.secret_credential), "secret_credential"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        # The path, never the content: the message is logged.
        raise ConfigError(f"http.kinds.{kind}.{field}: cannot read {str(path)!r}: "
                          f"{type(exc).__name__}{at}.{field}`") from None
    secrets = [line.strip() for line in text.splitlines() if line.strip()]
    if not secrets:
        raise ConfigError(f"http.kinds.{kind}.{field}: {str(path)!r} is empty{at}.{field}`")
    try:
        return [secret_key(s) for s in secrets]
    except ValueError as exc:
        raise ConfigError(f"http.kinds.{kind}.{field}: {exc}{at}.{field}`") from None


def _schema_check(kind: str, schema: dict[str, Any], at: str) -> Callable[[Any], None]:
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ConfigError(f"http.kinds.{kind}.args_schema: not a valid JSON Schema: "
                          f"{' '.join(exc.message.split())[:300]}{at}.args_schema`") from None
    validator = cls(schema)

    def check(args: Any) -> None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(args))
        if error is not None:
            raise InvalidArgs(f"{kind}: args do not match the kind's args_schema: "
                              f"{' '.join(error.message.split())[:500]} - at `{error.json_path}`",
                              field=error.json_path)

    return check
