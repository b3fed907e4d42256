"""What one `@job` declaration is: a handler with its defaults, and how its args decode.

The strict check (unknown fields refused at any depth) is compiled once per args type,
so decoding a job's args costs msgspec's decode plus a walk of the fields it declares.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import msgspec.inspect

from actors.errors import InvalidArgs
from actors.tools import ToolSpec, batch_item_type


class JobDef(msgspec.Struct, kw_only=True):
    kind: str
    fn: Callable[..., Any]
    args_type: Any
    sync: bool = False  # a plain `def`: run on a worker thread (actors/services/worker.py)
    queue: str = "default"
    timeout_s: float | None = None
    max_attempts: int = 3
    priority: int = 0
    # A function of the decoded args, or a path into them ("marketplace", "user.id"):
    # a path also works where Python cannot run, in a send from SQL (actors/events.py).
    key: Callable[[Any], str] | str | None = None
    cost: Callable[[Any], int] | None = None
    base_delays: dict[str, float] = {}
    # async fn(ctx, args, last_error): runs once the job has failed (actors/failure_hooks.py)
    on_failure: Callable[..., Awaitable[Any]] | None = None
    # Unknown fields in args (a misspelling: {"secnds": 3}) are refused, not ignored.
    strict_args: bool = True
    # A check beyond the type (an HTTP kind's JSON Schema); raises InvalidArgs.
    check_args: Callable[[Any], None] | None = None
    # Events that start this kind, (name, match) each, and the events that cancel its
    # unfinished jobs, (name, fields) each (actors/events.py).
    on_event: list[tuple[str, dict[str, Any]]] = []
    cancel_on: list[tuple[str, list[str]]] = []

    def key_of(self, args: Any) -> str | None:
        """The flow-control key of decoded args. A path's value is written as Postgres'
        `#>>` writes it (a string as is, a number or boolean as JSON; missing: no key),
        so a job gets the same key however it was created."""
        if self.key is None:
            return None
        if not isinstance(self.key, str):
            return str(self.key(args))
        value: Any = msgspec.to_builtins(args)
        for part in self.key.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        if value is None:
            return None
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()
    # Flow-control tools (actors/tools.py); a batch kind's args type is list[Item].
    tools: ToolSpec | None = None
    # What @job declared, before the config's [kinds] overrides (daemon/kind_tools.py).
    declared_tools: ToolSpec | None = None

    @property
    def batched(self) -> bool:
        return self.tools is not None and self.tools.tools.batch_size is not None

    def enqueue_type(self) -> Any:
        """What one enqueue's args decode to: a batch kind's item, else the args type."""
        return batch_item_type(self.args_type) if self.batched else self.args_type

    def decode_enqueued(self, raw: bytes | str | dict[str, Any] | msgspec.Struct) -> Any:
        """One enqueue's args (a batch kind's: one item), checked as decode_args does."""
        if self.tools is None:  # the common case: one test, no lookups
            return self._decode(raw, self.args_type)
        return self._decode(raw, self.enqueue_type())

    def decode_args(self, raw: bytes | str | dict[str, Any] | msgspec.Struct) -> Any:
        """Args as the handler's type; InvalidArgs names the offending field.

        With `strict_args` a field the args type does not declare (at any depth of
        nested Structs) is refused too, as if every Struct forbade unknown fields.
        A batch job's stored args are {"items": [...]} (sealed by migration 0020's
        trigger, since a job's args are a JSON object); the handler gets the list.
        """
        if self.batched:
            plain = msgspec.json.decode(raw) if isinstance(raw, bytes | str) else raw
            if not isinstance(plain, dict) or not isinstance(plain.get("items"), list):
                raise InvalidArgs(f"{self.kind}: a batch job's args must be "
                                  '{"items": [...]}', field="$.items")
            raw = plain["items"]
        return self._decode(raw, self.args_type)

    def _decode(self, raw: Any, args_type: Any) -> Any:
        try:
            if isinstance(raw, bytes | str):
                args = msgspec.json.decode(raw, type=args_type)
            else:
                if isinstance(raw, msgspec.Struct):
                    raw = msgspec.to_builtins(raw)
                args = msgspec.convert(raw, args_type)
            info = _struct_info(args_type) if self.strict_args else None
            if info is not None:
                plain = msgspec.json.decode(raw) if isinstance(raw, bytes | str) else raw
                unknown = _unknown_field(plain, info, "$")
                if unknown is not None:
                    path, name = unknown
                    raise InvalidArgs(
                        f"{self.kind}: Object contains unknown field `{name}` - at `{path}` "
                        "(the handler's args do not declare it; a handler may accept "
                        "unknown fields with @job(..., strict_args=False))",
                        field=f"{path}.{name}")
            if self.check_args is not None:
                self.check_args(args)
            return args
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidArgs(f"{self.kind}: {exc}") from exc


class _StructShape:
    """What the strict check knows of one Struct: its JSON field names, and for each the
    shape below it (None: nothing below can hold an unknown field)."""

    __slots__ = ("array_like", "fields", "tag_field")

    def __init__(self, tag_field: str | None, array_like: bool):
        self.tag_field = tag_field
        self.array_like = array_like
        self.fields: dict[str, Any] = {}


_SHAPES: dict[Any, Any] = {}


def _struct_info(args_type: Any) -> Any:
    """The args type compiled for the strict check, or None if no Struct is in it."""
    try:
        return _SHAPES[args_type]
    except (KeyError, TypeError):
        pass
    shape = _compile(msgspec.inspect.type_info(args_type), {})
    try:
        _SHAPES[args_type] = shape
    except TypeError:  # an unhashable annotation: compile each time
        pass
    return shape


def _compile(info: Any, memo: dict[Any, _StructShape]) -> Any:
    mi = msgspec.inspect
    if isinstance(info, mi.StructType):
        if info.cls in memo:  # a recursive Struct
            return memo[info.cls]
        shape = memo[info.cls] = _StructShape(info.tag_field, info.array_like)
        for field in info.fields:
            shape.fields[field.encode_name] = _compile(field.type, memo)
        return shape
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        item = _compile(info.item_type, memo)
        return None if item is None else ("items", item)
    if isinstance(info, mi.TupleType):
        items = [_compile(t, memo) for t in info.item_types]
        return None if all(i is None for i in items) else ("tuple", items)
    if isinstance(info, mi.DictType):
        value = _compile(info.value_type, memo)
        return None if value is None else ("dict", value)
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        if any(isinstance(t, mi.DictType) for t in info.types):
            return None  # an object could be either: msgspec's own validation is all we have
        if len(structs) == 1:
            return _compile(structs[0], memo)
        if len(structs) > 1 and structs[0].tag_field is not None:
            return ("tagged", structs[0].tag_field,
                    {t.tag: _compile(t, memo) for t in structs})
    return None


def _unknown_field(value: Any, shape: Any, path: str) -> tuple[str, str] | None:
    """(path, name) of the first object key no Struct on the way declares."""
    if shape.__class__ is _StructShape:
        if shape.array_like or value.__class__ is not dict:
            return None
        fields = shape.fields
        for name, item in value.items():
            if name in fields:
                below = fields[name]
                if below is not None:
                    found = _unknown_field(item, below, f"{path}.{name}")
                    if found is not None:
                        return found
            elif name != shape.tag_field:
                return path, name
        return None
    kind = shape[0]
    if kind == "items" and value.__class__ is list:
        for i, item in enumerate(value):
            found = _unknown_field(item, shape[1], f"{path}[{i}]")
            if found is not None:
                return found
    elif kind == "tuple" and value.__class__ is list:
        for i, (item, below) in enumerate(zip(value, shape[1], strict=False)):
            if below is not None:
                found = _unknown_field(item, below, f"{path}[{i}]")
                if found is not None:
                    return found
    elif kind == "dict" and value.__class__ is dict:
        for name, item in value.items():
            found = _unknown_field(item, shape[1], f"{path}.{name}")
            if found is not None:
                return found
    elif kind == "tagged" and value.__class__ is dict:
        below = shape[2].get(value.get(shape[1]))
        if below is not None:
            return _unknown_field(value, below, path)
    return None
