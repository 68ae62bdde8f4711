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
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


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
    path = path or cls.__name__
    return _convert(cls, value, path)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _convert(option, value, path)
            except SchemaError:
                continue
        raise SchemaError(f"{path}: {value!r:.60} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise SchemaError(f"{path}: {value!r:.60} is not one of {args}")
        return value
    if hint is type(None):
        if value is not None:
            raise SchemaError(f"{path}: expected null")
        return None
    if dataclasses.is_dataclass(hint):
        return _convert_dataclass(hint, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SchemaError(f"{path}: expected a list, got {type(value).__name__}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise SchemaError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected a map, got {type(value).__name__}")
        key_hint, value_hint = args or (Any, Any)
        return {_convert(key_hint, k, f"{path}.key"): _convert(value_hint, v, f"{path}[{k!r:.30}]") for k, v in value.items()}
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{path}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path}: expected an integer, got {type(value).__name__}")
        return value
    if hint in (str, bool, bytes):
        if type(value) is not hint:
            raise SchemaError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise SchemaError(f"{path}: unsupported schema type {hint!r}")


@functools.cache
def _schema(cls: Any) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """A record type's field types and init fields, resolved once (resolving string annotations
    is most of what decoding a record costs)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls) if f.init}


def _convert_dataclass(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: expected a map, got {type(value).__name__}")
    hints, fields = _schema(cls)
    unknown = set(value) - set(fields)
    if unknown:
        raise SchemaError(f"{path}: unknown keys {sorted(map(str, unknown))}")
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if has_default:
                continue
            raise SchemaError(f"{path}: missing key {name!r}")
        kwargs[name] = _convert(hints[name], value[name], f"{path}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise SchemaError(f"{path}: {e}") from None
