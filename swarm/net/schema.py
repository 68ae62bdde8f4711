"""Strict msgpack encoding of typed dataclasses: the schema of every DHT record and RPC header.

A record is the msgpack map of its dataclass fields plus a format version. Decoding checks every
field against its type hint (nested dataclasses, list/tuple/dict, Optional, Literal), rejects
unknown and missing keys, and runs the dataclass's own __post_init__ validation, so a peer never
acts on a record it could not have written itself.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

import msgpack

SCHEMA_VERSION = 1
MAX_RECORD_BYTES = 256 * 1024

T = TypeVar("T")


class SchemaError(ValueError):
    """A record or header that does not match its schema."""


def to_plain(obj: Any) -> Any:
    """Dataclasses to dicts, tuples to lists, recursively (msgpack-ready)."""
    names = _field_names(typing.cast(Any, type(obj)))
    if names is not None:
        return {name: to_plain(getattr(obj, name)) for name in names}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


@functools.cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """A dataclass's field names (None for any other type), looked up once per type."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None


def encode_record(obj: Any) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "body": to_plain(obj)}, use_bin_type=True)


def record_limit(cls: type) -> int:
    """The most bytes a record of this type may take: MAX_RECORD_BYTES unless the type says
    otherwise (a class attribute `MAX_BYTES`: a manifest lists every contribution of a round)."""
    limit = getattr(cls, "MAX_BYTES", MAX_RECORD_BYTES)
    return limit if isinstance(limit, int) else MAX_RECORD_BYTES


def decode_record(cls: type[T], data: bytes, *, max_bytes: int | None = None) -> T:
    """Parse and validate bytes written by encode_record; raises SchemaError on anything off."""
    max_bytes = record_limit(cls) if max_bytes is None else max_bytes
    if not isinstance(data, (bytes, bytearray)):
        raise SchemaError(f"{cls.__name__}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise SchemaError(f"{cls.__name__}: {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes)
    except Exception as e:  # msgpack raises a zoo of types on hostile input
        raise SchemaError(f"{cls.__name__}: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(outer, dict) or set(outer) != {"v", "body"}:
        raise SchemaError(f"{cls.__name__}: not a versioned record")
    if outer["v"] != SCHEMA_VERSION:
        raise SchemaError(f"{cls.__name__}: unsupported record version {outer['v']!r}")
    return from_plain(cls, outer["body"])


def from_plain(cls: type[T], value: Any, path: str = "") -> T:
    """`value` (plain msgpack data) as a `cls`, checked against its type hints all the way down;
    SchemaError names where it is off (`path`, default the type's name, then fields and indices)."""
    try:
        return typing.cast(T, _converter(typing.cast(Any, cls))(value))
    except _Off as e:
        raise SchemaError(f"{path or cls.__name__}{''.join(reversed(e.at))}: {e.why}") from None


class _Off(Exception):
    """A value off its schema while converting: why, and where (path parts, innermost first, added
    on the way out, so a record that converts cleanly builds no path at all)."""

    def __init__(self, why: str) -> None:
        self.why = why
        self.at: list[str] = []


Converter = typing.Callable[[Any], Any]


@functools.cache
def _converter(hint: Any) -> Converter:
    """The checking converter for one type hint, built once per hint (decoding records is most of
    what reading heartbeats costs a node of a large swarm)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return _as_is
    if origin in (typing.Union, types.UnionType):
        return _union(hint, args)
    if origin is typing.Literal:
        return _literal(args)
    if hint is type(None):
        return _null
    if dataclasses.is_dataclass(hint):
        return _dataclass(hint)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return _fixed_tuple(args)
        return _sequence(args[0] if args else Any, tuple if origin is tuple else list)
    if origin is dict:
        return _mapping(*(args or (Any, Any)))
    return _scalar(hint)


def _as_is(value: Any) -> Any:
    return value


def _null(value: Any) -> None:
    if value is not None:
        raise _Off("expected null")


def _union(hint: Any, args: tuple[Any, ...]) -> Converter:
    def convert(value: Any) -> Any:
        for option in args:
            try:
                return _converter(option)(value)
            except _Off:
                continue
        raise _Off(f"{value!r:.60} matches none of {hint}")

    return convert


def _literal(args: tuple[Any, ...]) -> Converter:
    def convert(value: Any) -> Any:
        if value not in args:
            raise _Off(f"{value!r:.60} is not one of {args}")
        return value

    return convert


def _within(convert: Converter, value: Any, where: str) -> Any:
    try:
        return convert(value)
    except _Off as e:
        e.at.append(where)
        raise


def _sequence(item: Any, kind: type) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _Off(f"expected a list, got {type(value).__name__}")
        each = _converter(item)
        try:
            items = [each(v) for v in value]
        except _Off as e:  # rare: find the index again, the cheap path keeps none
            for i, v in enumerate(value):
                _within(each, v, f"[{i}]")
            raise e from None
        return tuple(items) if kind is tuple else items

    return convert


def _fixed_tuple(args: tuple[Any, ...]) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _Off(f"expected a list, got {type(value).__name__}")
        if len(value) != len(args):
            raise _Off(f"expected {len(args)} items, got {len(value)}")
        return tuple(_within(_converter(a), v, f"[{i}]") for i, (a, v) in enumerate(zip(args, value)))

    return convert


def _mapping(key_hint: Any, value_hint: Any) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Off(f"expected a map, got {type(value).__name__}")
        keys, values = _converter(key_hint), _converter(value_hint)
        return {_within(keys, k, ".key"): _within(values, v, f"[{k!r:.30}]") for k, v in value.items()}

    return convert


def _scalar(hint: Any) -> Converter:
    if hint is float:
        return _float
    if hint is int:
        return _int
    if hint in (str, bool, bytes):
        return _exactly(hint)

    def unsupported(value: Any) -> Any:
        raise _Off(f"unsupported schema type {hint!r}")

    return unsupported


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Off(f"expected a number, got {type(value).__name__}")
    return float(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Off(f"expected an integer, got {type(value).__name__}")
    return value


def _exactly(hint: type) -> Converter:
    def convert(value: Any) -> Any:
        if type(value) is not hint:
            raise _Off(f"expected {hint.__name__}, got {type(value).__name__}")
        return value

    return convert


@functools.cache
def _schema(cls: Any) -> dict[str, tuple[Converter, bool]]:
    """A record type's init fields: each one's converter and whether it must be present (resolving
    string annotations is most of what decoding a record would cost otherwise)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: (_converter(hints[f.name]), f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
        if f.init
    }


def _dataclass(cls: Any) -> Converter:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _Off(f"expected a map, got {type(value).__name__}")
        fields = _schema(cls)
        unknown = value.keys() - fields.keys()
        if unknown:
            raise _Off(f"unknown keys {sorted(map(str, unknown))}")
        kwargs = {}
        for name, (field, required) in fields.items():
            if name in value:
                try:
                    kwargs[name] = field(value[name])
                except _Off as e:
                    e.at.append(f".{name}")
                    raise
            elif required:
                raise _Off(f"missing key {name!r}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise _Off(str(e)) from None

    return convert
