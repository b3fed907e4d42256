"""The control surfaces: the Unix control socket and the HTTP API.

Both speak the same commands (protocol/commands.py) with the same envelopes and codes.
The transports own what differs, framing and authentication: `control_socket` (NDJSON
lines, the file's permissions, the handshake, `watch` streams) and `http` (the ASGI app:
routes, the bearer token, status codes) served by `http_server` (hypercorn's protocol
code under our own accept loop), with `openapi` describing it. `requests` owns what is
the same: decoding a request into a command, the audit line of a mutating command, and
the ok/error envelope of the answer.
"""
