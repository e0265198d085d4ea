"""Decoding a config document, and the walk that names every type error with its path.

msgspec stops at the first error; `walk` goes on and yields one message per problem
(``namespaces.a.targets[0].servers: expected array, got str``), so `walcar config check`
can print them all at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from sidecar.units import ByteSize, Duration

_CUSTOM = {Duration: Duration.parse, ByteSize: ByteSize.parse}


def dec_hook(tp: type, obj: object) -> object:
    parse = _CUSTOM.get(tp)
    if parse is None:
        raise NotImplementedError(tp)
    return parse(obj)


def enc_hook(obj: object) -> object:
    if isinstance(obj, Duration | ByteSize):
        return str(obj)
    raise NotImplementedError(type(obj))


_JSON_NAMES = {
    msgspec.inspect.IntType: "int",
    msgspec.inspect.FloatType: "float",
    msgspec.inspect.StrType: "str",
    msgspec.inspect.BoolType: "bool",
    msgspec.inspect.NoneType: "null",
    msgspec.inspect.ListType: "array",
    msgspec.inspect.DictType: "object",
    msgspec.inspect.StructType: "object",
}


# What a parsed TOML/YAML value is called in messages; bool before int (a bool is an int in Python).
_RAW_NAMES: tuple[tuple[type, str], ...] = (
    (type(None), "null"), (bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "array"),
    (dict, "object"),
)


def _raw_name(value: object) -> str:
    return next((name for kind, name in _RAW_NAMES if isinstance(value, kind)), type(value).__name__)


def _type_name(info: msgspec.inspect.Type) -> str:
    if isinstance(info, msgspec.inspect.CustomType):
        return "duration" if info.cls is Duration else "size"
    if isinstance(info, msgspec.inspect.LiteralType):
        return " | ".join(repr(v) for v in info.values)
    if isinstance(info, msgspec.inspect.UnionType):
        return " | ".join(_type_name(t) for t in info.types)
    return _JSON_NAMES.get(type(info), type(info).__name__)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def walk(value: object, info: msgspec.inspect.Type, path: str) -> Iterator[str]:
    """Yield one error per problem in `value` against the type `info`."""
    where = path or "(top level)"
    if isinstance(info, msgspec.inspect.UnionType):
        yield from _walk_union(value, info, path)
    elif isinstance(info, msgspec.inspect.StructType):
        yield from _walk_struct(value, info, path)
    elif isinstance(info, msgspec.inspect.ListType):
        if not isinstance(value, list):
            yield f"{where}: expected array, got {_raw_name(value)}"
            return
        for index, item in enumerate(value):
            yield from walk(item, info.item_type, _join(path, index))
    elif isinstance(info, msgspec.inspect.DictType):
        if not isinstance(value, dict):
            yield f"{where}: expected object, got {_raw_name(value)}"
            return
        for key, item in value.items():
            yield from walk(item, info.value_type, _join(path, str(key)))
    else:
        yield from _walk_scalar(value, info, where)


def _walk_union(value: object, info: msgspec.inspect.UnionType, path: str) -> Iterator[str]:
    if value is None and any(isinstance(t, msgspec.inspect.NoneType) for t in info.types):
        return
    structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
    if structs and structs[0].tag_field is not None:
        yield from _walk_tagged(value, structs, path)
        return
    candidates = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
    if len(candidates) == 1:
        yield from walk(value, candidates[0], path)
        return
    for candidate in candidates:
        if not list(walk(value, candidate, path)):
            return
    yield f"{path or '(top level)'}: expected {_type_name(info)}, got {_raw_name(value)}"


def _walk_scalar(value: object, info: msgspec.inspect.Type, where: str) -> Iterator[str]:
    if isinstance(info, msgspec.inspect.LiteralType):
        if value not in info.values:
            allowed = ", ".join(repr(v) for v in info.values)
            yield f"{where}: expected one of {allowed}, got {value!r}"
        return
    if isinstance(info, msgspec.inspect.CustomType):
        try:
            _CUSTOM[info.cls](value)
        except ValueError as exc:
            yield f"{where}: {exc}"
        return
    expected = _JSON_NAMES.get(type(info))
    got = _raw_name(value)
    if expected is None:
        return
    if expected == "float" and got == "int":
        return
    if expected != got:
        yield f"{where}: expected {expected}, got {got}"


def _walk_struct(value: object, info: msgspec.inspect.StructType, path: str) -> Iterator[str]:
    where = path or "(top level)"
    if not isinstance(value, dict):
        yield f"{where}: expected object, got {_raw_name(value)}"
        return
    fields = {f.encode_name: f for f in info.fields}
    for key in value:
        if key == info.tag_field:
            continue
        if key not in fields:
            known = ", ".join(sorted(fields))
            yield f"{_join(path, key)}: unknown field (known: {known})"
    for name, field in fields.items():
        if name not in value:
            if field.required:
                yield f"{where}: missing required field `{name}`"
            continue
        yield from walk(value[name], field.type, _join(path, name))


def _walk_tagged(value: object, structs: list[msgspec.inspect.StructType], path: str) -> Iterator[str]:
    where = path or "(top level)"
    if not isinstance(value, dict):
        yield f"{where}: expected object, got {_raw_name(value)}"
        return
    tag_field = structs[0].tag_field
    assert tag_field is not None  # _walk_union sends only tagged unions here
    tags = {s.tag: s for s in structs}
    tag = value.get(tag_field)
    if tag not in tags:
        allowed = ", ".join(repr(t) for t in tags)
        if tag is None:
            yield f"{where}: missing required field `{tag_field}` (one of {allowed})"
        else:
            yield f"{_join(path, tag_field)}: expected one of {allowed}, got {tag!r}"
        return
    yield from _walk_struct(value, tags[tag], path)

