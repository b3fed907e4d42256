"""OpenAPI 3.1 for the HTTP API, generated from the protocol Structs.

Generated rather than written so it cannot drift from what the daemon decodes: every
command in `daemon.api.requests.COMMANDS` is a `POST /v1/<name>` whose request body is
the command Struct without `type` and `id`, and whose 200 is the ok envelope around the
command's result Struct (protocol.commands.RESULT_TYPES).
"""

from __future__ import annotations

from typing import Any

import msgspec

from daemon import __version__
from daemon.api.requests import COMMANDS
from protocol import commands as c


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1 for /v1, generated from the command and result Structs."""
    commands = COMMANDS
    results = [c.RESULT_TYPES[t] for t in commands.values()]
    template = "#/components/schemas/{name}"
    (_, *_), components = msgspec.json.schema_components(
        [*commands.values(), *results, c.Error], ref_template=template)
    for t in commands.values():
        schema = components.get(t.__name__, {})
        # Over HTTP the path names the command and there is no request id.
        schema.get("properties", {}).pop("id", None)
        schema["required"] = [f for f in schema.get("required", []) if f != "type"]
    error = {"description": "error envelope",
             "content": {"application/json": {"schema": {"$ref": template.format(name="Error")}}}}
    paths: dict[str, Any] = {}
    for name, t in sorted(commands.items()):
        result_schema = msgspec.json.schema_components([c.RESULT_TYPES[t]],
                                                       ref_template=template)[0][0]
        paths[f"/v1/{name}"] = {"post": {
            "operationId": name,
            "summary": (t.__doc__ or name).strip().splitlines()[0],
            "requestBody": {"required": False, "content": {"application/json": {
                "schema": {"$ref": template.format(name=t.__name__)}}}},
            "responses": {
                "200": {"description": "ok envelope", "content": {"application/json": {
                    "schema": _ok(result_schema)}}},
                "default": error,
            },
        }}
    paths["/v1/jobs/{id}"] = {"get": {
        "operationId": "get_job", "summary": "One job (same as POST /v1/get).",
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "integer"}}],
        "responses": {"200": {"description": "ok envelope", "content": {"application/json": {
            "schema": _ok({"$ref": template.format(name="JobView")})}}}, "default": error},
    }}
    for action, t in (("complete", c.JobComplete), ("fail", c.JobFail),
                      ("progress", c.JobProgress), ("heartbeat", c.JobHeartbeat)):
        # An HTTP handler's app calling back: the token in the body is the authorization;
        # the job id comes from the path (a body's job_id must be the same).
        paths[f"/v1/jobs/{{id}}/{action}"] = {"post": {
            "operationId": f"callback_{action}", "security": [],
            "summary": (t.__doc__ or action).strip().splitlines()[0],
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "integer"}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": template.format(name=t.__name__)}}}},
            "responses": {"200": {"description": "ok envelope", "content": {
                "application/json": {"schema": _ok(
                    {"$ref": template.format(name="CallbackResult")})}}}, "default": error},
        }}
    paths["/metrics"] = _plain("Prometheus exposition", "text/plain")
    paths["/healthz"] = _plain("200 while the event loop answers", "application/json")
    paths["/readyz"] = _plain("200 when ready, 503 with a reason when not", "application/json")
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobd", "version": __version__,
                 "description": "The control socket's commands as JSON over HTTP."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _ok(result: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["type", "result"], "properties": {
        "type": {"const": "ok"}, "result": result, "id": {"type": "null"},
        "more": {"type": "boolean"}}}


def _plain(summary: str, content_type: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [],
                    "responses": {"200": {"description": summary,
                                          "content": {content_type: {}}}}}}

