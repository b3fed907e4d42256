"""Protocol fuzzer: a hypothesis state machine against ONE real daemon's control socket.

It interleaves valid commands, malformed frames (random bytes, invalid UTF-8, NUL bytes,
lines over the cap, unterminated lines, deeply nested JSON), every field of every command
in protocol/commands.py given a wrong type or an out-of-range value (generated from the
Structs with msgspec.inspect, so a new command or field is covered without touching this
file), and hang-ups at random points (mid-frame, after sending before reading, mid-watch).

After every step: the daemon process is alive and a fresh connection's `ping` answers.
Every reply that arrives must be a well-formed frame whose error code is an ErrorCode;
a request the protocol Structs refuse must get `bad_request` (or `unknown_command`),
and nothing may be answered `internal`. At the end the jobs seeded at the start are
exactly as they were (checked in SQL).

Derandomized (a fixed seed). JOBD_FUZZ_EXAMPLES=N runs N examples instead of the
default; each example is up to STEPS steps.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
import typing
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from daemon.config import Limits
from protocol import commands as c
from protocol.errors import ErrorCode
from tests.support import JobdProcess, Sql, wait_until

EXAMPLES = int(os.environ.get("JOBD_FUZZ_EXAMPLES") or 20)
STEPS = 20
FRAME_CAP = Limits().max_frame_bytes
CODES = {str(code) for code in ErrorCode}
REPLY_TIMEOUT_S = 30.0
HELLO = {"type": "hello", "protocol": 1, "client": "fuzz"}
# A bulk command only ever matches nothing: no seeded job has this tag or kind.
NOTHING = {"tag": "fuzz-matches-nothing", "kind": "fuzz.none"}


class Raw(str):
    """JSON text sent as is (numbers JSON cannot hold exactly, nesting json.dumps refuses)."""


def dumps(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


# --------------------------------------------------------------------------- commands


def command_types() -> dict[str, type[msgspec.Struct]]:
    return {t.__struct_config__.tag: t for t in typing.get_args(c.Command)}


def bases(seeded: int, target: int, long_job: int) -> dict[str, dict[str, Any]]:
    """One valid, harmless instance of every command (never touching the seeded jobs).

    A command without an entry here gets one built from its required fields' types, so
    a new command is fuzzed too; give it an entry if that default is not harmless.
    """
    bulk = {**NOTHING, "dry_run": False}
    known = {
        "hello": dict(HELLO),
        "enqueue": {"job": {"kind": "noop", "tags": ["fuzz"]}},
        "enqueue_batch": {"jobs": [{"kind": "noop", "tags": ["fuzz"]}]},
        "get": {"job_id": seeded},
        "inspect": {"job_id": seeded},
        "cancel": {"job_id": target},
        "list": {"limit": 5},
        "summary": {"tag": "fuzz", "error": "100%_"},
        "cancel_many": bulk, "retry": bulk, "replay": bulk, "delete": bulk,
        "pause": {"queue": "fuzzq"}, "resume": {"queue": "fuzzq"},
        "drain": {"undo": True},  # claiming again: a no-op while not draining
        "watch": {"job_id": seeded, "interval_s": 0.05},  # finished: one frame, then the end
        "schedule_add": {"schedule": {"name": "fuzz-sched", "kind": "noop", "every": "1h",
                                      "queue": "fuzzq"}, "replace": True},
        "send_event": {"name": "fuzz.event", "data": {}},
        "send_events": {"events": [{"name": "fuzz.event", "idempotency_key": "fuzz"}]},
        "list_events": {"name": "fuzz.event", "limit": 5},
    }
    out = {}
    for tag, struct in command_types().items():
        if tag in known:
            out[tag] = {"type": tag, **known[tag]}
            continue
        fields = {f.encode_name: _valid(f.type) for f in mi.type_info(struct).fields
                  if f.required and f.name != "id"}
        out[tag] = {"type": tag, **fields}
    return out


def _valid(t: mi.Type) -> Any:
    """Some value of type `t`: the default base for a command nobody described."""
    match t:
        case mi.IntType():
            return max(t.ge or 1, (t.gt or 0) + 1)
        case mi.FloatType():
            return float(max(t.ge or 1.0, (t.gt or 0.0) + 1.0))
        case mi.StrType():
            return "fuzz-sched"
        case mi.BoolType():
            return False
        case mi.ListType():
            return []
        case mi.DictType():
            return {}
        case mi.UnionType():
            return _valid(next(m for m in t.types if not isinstance(m, mi.NoneType)))
        case mi.StructType():
            return {f.encode_name: _valid(f.type) for f in t.fields if f.required}
    return None


DEEP = Raw("[" * 5000 + "]" * 5000)
WRONG = [None, True, 0, -7, 1.5, "text", [], [1, "a"], {}, {"a": 1}]


def bad_values(t: mi.Type) -> list[Any]:
    """Wrong-typed and out-of-range values for a field of type `t`."""
    match t:
        case mi.IntType():
            values: list[Any] = [-1, 0, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30,
                                 Raw("1e400")]
            for bound, step in ((t.ge, -1), (t.gt, 0), (t.le, 1), (t.lt, 0)):
                if bound is not None:
                    values.append(bound + step)
        case mi.FloatType():
            values = [-1.0, 0.0, 5e-324, 1e16, 1e308, -1e308, Raw("1e400"), Raw("-1e400")]
            for bound, step in ((t.ge, -0.001), (t.gt, 0.0), (t.le, 0.001), (t.lt, 0.0)):
                if bound is not None:
                    values.append(bound + step)
        case mi.StrType():
            values = ["", "x" * 3000, "nul\u0000byte", "lone\ud800surrogate", " ", "*"]
            if t.max_length is not None:
                values.append("y" * (t.max_length + 1))
            if t.min_length:
                values.append("y" * (t.min_length - 1))
        case mi.BoolType():
            values = []
        case mi.ListType():
            values = [[], [0] * 20_000] + [[v] for v in bad_values(t.item_type)[:6]]
        case mi.DictType():
            values = [{"\u0000": 1}, {"a": "nul\u0000"}, {"a": "\ud800"}, {"a": 10**30},
                      {"a": Raw("1e400")}, {"deep": DEEP}, {"big": "z" * 100_000}]
        case mi.DateTimeType():
            values = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z",
                      "2025-06-01T00:00:00", "2025-13-01T00:00:00Z", "-infinity"]
        case mi.UnionType():
            values = [v for member in t.types for v in bad_values(member)]
        case mi.StructType():
            values = [{"unknown_field": 1}]
        case _:
            values = []
    return values + [w for w in WRONG if w not in values]


def mutations(base: dict[str, Any], struct: type[msgspec.Struct]) -> list[tuple[str, Any]]:
    """(path, value) for every field, nested Structs (and a list's first Struct) included."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, t: mi.StructType) -> None:
        for f in t.fields:
            if f.name == "id" and not prefix:
                continue
            path = f"{prefix}{f.encode_name}"
            out.extend((path, v) for v in bad_values(f.type))
            inner = f.type
            if isinstance(inner, mi.UnionType):
                inner = next((m for m in inner.types if isinstance(m, mi.StructType)), inner)
            if isinstance(inner, mi.StructType):
                walk(path + ".", inner)
            elif isinstance(inner, mi.ListType) and isinstance(inner.item_type, mi.StructType):
                walk(path + ".0.", inner.item_type)

    walk("", mi.type_info(struct))
    return out


def apply(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    command = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node: Any = command
    for part in parents:
        if isinstance(node, list):
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                return command
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return command


def expected(text: str) -> set[str] | None:
    """What the daemon must answer, judged by the same decoder it uses: a set of codes if
    the protocol refuses the request, else None (any well-formed answer but `internal`)."""
    try:
        c.command_decoder.decode(text)
    except msgspec.ValidationError:
        return {"bad_request", "unknown_command"}
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return {"bad_json", "bad_request"}
    return None


# --------------------------------------------------------------------------- the daemon


@pytest.fixture(scope="module")
def fuzz_db(pg_cluster) -> Iterator[str]:
    from tests.conftest import scratch_database

    with scratch_database(pg_cluster, "jobd_fuzz") as url:
        yield url


SEED_COLUMNS = "id, kind, queue, key, args, state, attempt, priority, tags, result, run_at"


class World:
    """The one daemon, the jobs seeded before fuzzing, and what went wrong so far."""

    def __init__(self, daemon: JobdProcess, sql: Sql):
        self.daemon = daemon
        self.sql = sql
        conn = Conn(daemon)
        try:
            call(conn, HELLO)
            completed = [call(conn, {"type": "enqueue", "job": {"kind": "noop", "tags": ["seed"]}})
                         ["id"] for _ in range(3)]
            scheduled = [call(conn, {"type": "enqueue", "job": {
                "kind": "sleep", "args": {"seconds": i}, "delay_s": 86400, "tags": ["seed"],
                "key": f"k{i}", "priority": i}})["id"] for i in range(3)]
            self.target = call(conn, {"type": "enqueue", "job": {"kind": "noop",
                                                                 "delay_s": 86400}})["id"]
            self.long_job = call(conn, {"type": "enqueue", "job": {
                "kind": "sleep", "args": {"seconds": 600, "steps": 6000}}})["id"]
            for job_id in completed:
                wait_until(lambda j=job_id: call(conn, {"type": "get", "job_id": j})["state"]
                           == "completed", "a seeded job to complete", daemons=(daemon,))
        finally:
            conn.close()
        self.seeded = completed + scheduled
        self.snapshot = self.seed_rows()
        self.bases = bases(self.seeded[0], self.target, self.long_job)
        self.mutations = [(tag, path, value) for tag, struct in command_types().items()
                          for path, value in mutations(self.bases[tag], struct)]
        self.violations: list[str] = []
        self.trace: list[str] = []  # this run's steps so far
        self.death: str | None = None  # the first failure of the daemon, with its steps
        self.replies = 0

    def seed_rows(self) -> list[Any]:
        rows = self.sql.fetch(f"SELECT {SEED_COLUMNS} FROM jobd.jobs WHERE id = any($1::bigint[])"
                              " ORDER BY id", self.seeded)
        return [dict(r) for r in rows]

    def violation(self, text: str) -> None:
        self.violations.append(text)


@pytest.fixture(scope="module")
def world(fuzz_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    daemon = JobdProcess(tmp_path_factory.mktemp("fuzz"), fuzz_db,
                         queues={"default": {"concurrency": 4}})
    try:
        daemon.start()
        yield World(daemon, Sql(fuzz_db))
    finally:
        daemon.kill()


# --------------------------------------------------------------------------- a connection


class Conn:
    def __init__(self, daemon: JobdProcess, timeout: float = REPLY_TIMEOUT_S):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(daemon.socket))
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> bytes | None:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buffer += chunk
        end = self.buffer.index(b"\n")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        return line

    def close(self) -> None:
        self.sock.close()


def call(conn: Conn, command: dict[str, Any]) -> Any:
    """One request, its result (for setting up; any error fails the test)."""
    conn.send(json.dumps({"id": 1, **command}).encode() + b"\n")
    reply = json.loads(conn.frame() or b"null")
    assert reply["type"] == "ok", reply
    return reply["result"]


def check_frame(world: World, line: bytes, what: str) -> c.Ok | c.Error:
    world.replies += 1
    try:
        reply = c.reply_decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise AssertionError(f"malformed reply frame to {what}: {line[:300]!r}: {exc}") from None
    if isinstance(reply, c.Error):
        assert reply.code in CODES, f"unknown error code {reply.code!r} for {what}"
    return reply


def exchange(world: World, conn: Conn, texts: list[str], labels: list[str]) -> None:
    """Pipeline the requests, read every reply (by id), check each against its request."""
    ids = list(range(1000, 1000 + len(texts)))
    frames = []
    for request_id, text in zip(ids, texts, strict=True):
        obj = text.encode("utf-8", "surrogatepass")
        # Give each request an id without re-encoding it (the text may be deliberately odd).
        if obj.startswith(b"{"):
            obj = b'{"id": %d, ' % request_id + obj[1:] if obj != b"{}" else \
                b'{"id": %d}' % request_id
        frames.append(obj + b"\n")
    conn.send(b"".join(frames))
    pending = dict(zip(ids, zip(texts, labels, strict=True), strict=True))
    streamed = 0
    while pending:
        line = conn.frame()
        assert line is not None, f"connection closed with {len(pending)} replies missing: " \
            f"{[label for _, label in pending.values()][:5]}"
        reply = check_frame(world, line, "a fuzzed request")
        key = reply.id
        if key is None and isinstance(reply, c.Error):
            # A line that is not JSON has no id to echo: it answers one of those.
            key = next((i for i, (text, _) in pending.items()
                        if (expected(text) or set()) & {reply.code}), None)
        if key not in pending:
            raise AssertionError(f"reply for no request sent: {line[:300]!r}")
        text, label = pending[key]
        if isinstance(reply, c.Ok) and reply.more:
            streamed += 1
            if streamed > 50:  # a watch that keeps going: hang up on it mid-stream
                return
            continue
        del pending[key]
        want = expected(text)
        code = reply.code if isinstance(reply, c.Error) else "ok"
        if code == "internal" or (want is not None and code not in want):
            world.violation(f"{label}: got {code} ({getattr(reply, 'message', '')[:160]!r}), "
                            f"expected {sorted(want) if want else 'not internal'}")


def ping_fresh(world: World) -> None:
    try:
        _ping_fresh(world)
    except AssertionError as exc:
        if world.death is None:
            world.death = f"{exc}\nafter the steps:\n  " + "\n  ".join(world.trace)
        raise


def _ping_fresh(world: World) -> None:
    daemon = world.daemon
    assert daemon.proc is not None and daemon.proc.poll() is None, \
        f"jobd exited ({daemon.proc.returncode}):\n{daemon.log_text()[-5000:]}"
    try:
        conn = Conn(daemon, timeout=REPLY_TIMEOUT_S)
    except OSError as exc:
        raise AssertionError(f"cannot connect to jobd ({exc}):\n{daemon.log_text()[-5000:]}") \
            from None
    try:
        conn.send(json.dumps({"id": 1, **HELLO}).encode() + b"\n"
                  + b'{"id": 2, "type": "ping"}\n')
        replies = [check_frame(world, conn.frame() or b"", "ping") for _ in range(2)]
        assert isinstance(replies[1], c.Ok) and replies[1].id == 2, replies
    finally:
        conn.close()


# --------------------------------------------------------------------------- the machine


SAFE_VALID = ["hello", "ping", "tree", "stats", "nodes", "get", "inspect", "activity",
              "list", "summary",
              "enqueue", "enqueue_batch", "schedule_list", "pause", "resume", "retry",
              "replay", "delete", "cancel_many", "send_event", "send_events", "list_events",
              "schedule_add",
              "schedule_trigger", "schedule_pause", "schedule_resume", "drain"]

garbage = st.one_of(
    st.binary(min_size=1, max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    st.sampled_from([b"\xff\xfe\xfd", b'{"type": "pi\xbeng"}', b"\xc3\x28", b"\x00" * 64,
                     b'{"type": "ping", "x": "\x00"}', b'{"type": "ping"' + b"\x00" + b"}",
                     b"[" * 100_000, b"{" * 50_000, b'{"a":' * 50_000,
                     b'{"id": 1, "type": "get", "job_id": ' + b"[" * 100_000,
                     b"}{", b"nul", b"1e400", b'"\\ud800"']),
)


def traced(step: typing.Callable[..., None]) -> typing.Callable[..., None]:
    """Records each step, so a run that kills the daemon can be told even though
    hypothesis cannot replay it (the next run meets a dead daemon at once)."""

    @functools.wraps(step)
    def run(self: SocketFuzz, **kwargs: Any) -> None:
        shown = {k: v for k, v in kwargs.items() if not isinstance(v, st.DataObject)}
        self.world.trace.append(f"{step.__name__}({json.dumps(shown, default=repr)[:120]})")
        try:
            step(self, **kwargs)
        except Exception as exc:
            world = self.world
            if world.death is None and not _answers(world.daemon):
                world.death = (f"jobd stopped answering ({exc!r}) after the steps:\n  "
                               + "\n  ".join(world.trace)
                               + f"\njobd log:\n{world.daemon.log_text()[-5000:]}")
            raise

    return run


def _answers(daemon: JobdProcess) -> bool:
    try:
        conn = Conn(daemon, timeout=10)
    except OSError:
        return False
    try:
        conn.send(json.dumps({"id": 1, **HELLO}).encode() + b"\n")
        return conn.frame() is not None
    except OSError:
        return False
    finally:
        conn.close()


class SocketFuzz(RuleBasedStateMachine):
    world: World  # set by the test before the machine runs

    def __init__(self) -> None:
        super().__init__()
        self.world.trace = []
        self.conn: Conn | None = None
        self.greeted = False

    def _conn(self) -> Conn:
        if self.conn is None:
            self.conn = Conn(self.world.daemon)
            self.greeted = False
        return self.conn

    def _greet(self) -> Conn:
        conn = self._conn()
        if not self.greeted:
            exchange(self.world, conn, [json.dumps(HELLO)], ["hello"])
            self.greeted = True
        return conn

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    @initialize()
    def start(self) -> None:
        self._greet()

    @rule(names=st.lists(st.sampled_from(SAFE_VALID), min_size=1, max_size=8))
    @traced
    def valid_commands(self, names: list[str]) -> None:
        conn = self._greet()
        texts = [json.dumps(self.world.bases[name]) for name in names]
        exchange(self.world, conn, texts, [f"valid {name}" for name in names])

    @rule(data=st.data(), count=st.integers(1, 12))
    @traced
    def fuzzed_fields(self, data: st.DataObject, count: int) -> None:
        conn = self._greet()
        picks = [data.draw(st.sampled_from(self.world.mutations)) for _ in range(count)]
        texts = [dumps(apply(self.world.bases[tag], path, value)) for tag, path, value in picks]
        labels = [f"{tag}.{path} = {_show(value)}" for tag, path, value in picks]
        exchange(self.world, conn, texts, labels)

    @rule(junk=garbage)
    @traced
    def malformed_frame(self, junk: bytes) -> None:
        conn = self._greet()
        if not junk.strip():  # a blank line (form feed, tab...) is skipped, unanswered
            junk = b" " + junk + b'{"type": "ping"'
        conn.send(junk + b"\n")
        line = conn.frame()
        assert line is not None, f"connection closed after {junk[:80]!r}"
        reply = check_frame(self.world, line, f"garbage {junk[:60]!r}")
        if not isinstance(reply, c.Error) or reply.code not in ("bad_json", "bad_request",
                                                                  "unknown_command"):
            self.world.violation(f"garbage {junk[:60]!r}: got {line[:200]!r}")

    @rule(extra=st.integers(1, 4096), newline=st.booleans())
    @traced
    def oversized_line(self, extra: int, newline: bool) -> None:
        conn = self._greet()
        conn.send(b"x" * (FRAME_CAP + extra) + (b"\n" if newline else b""))
        line = conn.frame()
        assert line is not None, "closed without frame_too_long"
        reply = check_frame(self.world, line, "an oversized line")
        assert isinstance(reply, c.Error) and reply.code == "frame_too_long", reply
        assert reply.details.get("limit") == FRAME_CAP, reply
        assert conn.frame() is None, "still open after frame_too_long"
        self._drop()

    @rule(data=st.data())
    @traced
    def hang_up_mid_frame(self, data: st.DataObject) -> None:
        conn = self._greet()
        text = json.dumps(self.world.bases[data.draw(st.sampled_from(SAFE_VALID))]).encode()
        conn.send(text[:data.draw(st.integers(0, max(0, len(text) - 1)))])
        self._drop()

    @rule(names=st.lists(st.sampled_from(SAFE_VALID), min_size=1, max_size=50),
          greet=st.booleans(), reset=st.booleans())
    @traced
    def hang_up_before_reading(self, names: list[str], greet: bool, reset: bool) -> None:
        self._drop()
        conn = self._conn()
        lines = [json.dumps(HELLO)] if greet else []
        lines += [json.dumps(self.world.bases[n]) for n in names]
        if reset:  # SO_LINGER 0: the close is a reset
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01" + b"\x00" * 7)
        conn.send("\n".join(lines).encode() + b"\n")
        self._drop()

    @rule(frames=st.integers(0, 1))  # the first frame is immediate, the next may take 1 s
    @traced
    def hang_up_mid_watch(self, frames: int) -> None:
        conn = self._greet()
        watch = {"id": 77, "type": "watch", "job_id": self.world.long_job, "interval_s": 0.05}
        conn.send(json.dumps(watch).encode() + b"\n")
        for _ in range(frames):
            line = conn.frame()
            assert line is not None
            check_frame(self.world, line, "watch")
        self._drop()

    @precondition(lambda self: self.conn is not None)
    @rule()
    @traced
    def reconnect_without_hello(self) -> None:
        self._drop()
        conn = self._conn()
        conn.send(b'{"id": 5, "type": "ping"}\n')
        reply = check_frame(self.world, conn.frame() or b"", "ping before hello")
        assert isinstance(reply, c.Error) and reply.code == "handshake_required", reply

    @invariant()
    def daemon_answers(self) -> None:
        ping_fresh(self.world)

    def teardown(self) -> None:
        self._drop()


def _show(value: Any) -> str:
    text = dumps(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


# --------------------------------------------------------------------------- the tests


def _settle(world: World) -> None:
    """Let the jobs the fuzzing enqueued run, then check the seeded ones and the log."""
    ping_fresh(world)
    assert world.seed_rows() == world.snapshot, "seeded jobs changed"
    assert "stopped on an error" not in world.daemon.log_text()


def _assert_no_violations(world: World) -> None:
    new = world.violations
    assert not new, f"{len(new)} wrong answers:\n" + "\n".join(sorted(set(new))[:60])


def test_every_field_of_every_command(world: World) -> None:
    """Each generated mutation once, in order: the sweep the state machine samples from."""
    start = time.monotonic()
    conn = Conn(world.daemon)
    exchange(world, conn, [json.dumps(HELLO)], ["hello"])
    batch = 16
    for i in range(0, len(world.mutations), batch):
        picks = world.mutations[i:i + batch]
        texts = [dumps(apply(world.bases[tag], path, value)) for tag, path, value in picks]
        labels = [f"{tag}.{path} = {_show(value)}" for tag, path, value in picks]
        exchange(world, conn, texts, labels)
    conn.close()
    _settle(world)
    print(f"swept {len(world.mutations)} mutations in {time.monotonic() - start:.1f}s")
    _assert_no_violations(world)


def test_socket_fuzz_state_machine(world: World) -> None:
    start = time.monotonic()
    SocketFuzz.world = world
    before = world.replies
    try:
        _run_machine()
    except Exception:
        if world.death is not None:  # say how it died, not that the replay went differently
            raise AssertionError(world.death) from None
        raise
    _settle(world)
    print(f"{EXAMPLES} examples x up to {STEPS} steps, {world.replies - before} replies "
          f"checked in {time.monotonic() - start:.1f}s")
    _assert_no_violations(world)


def _run_machine() -> None:
    run_state_machine_as_test(SocketFuzz, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, derandomize=True, database=None,
        deadline=None, print_blob=True,
        # No shrinking: there is one daemon and it cannot be reset between runs (once a
        # step has killed it every run fails at once), so the first failure is reported.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much]))
