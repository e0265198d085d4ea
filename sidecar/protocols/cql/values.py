"""CQL values as Python objects, through the cassandra-driver's own codecs (``cassandra.cqltypes``).

Only the cold paths use these: the upstream's ``system.local`` row and the
overrides the sidecar writes into it, ``system_schema`` rows, and literal
partition-key values of un-prepared writes (serialized exactly as a driver
would bind them, so they key the journal like the same write prepared).  The
hot paths never decode a value: journaled writes carry the bound bytes as
sent, and forwarded results are relayed as raw frames.

Python types are the driver's (what ``session.execute`` returns): e.g.
timestamp -> naive UTC ``datetime``, inet -> ``str``, date -> ``util.Date``,
map -> ``OrderedMapSerializedKey``; unknown custom types stay raw ``bytes``.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Final

from cassandra import cqltypes

from .types import DURATION_CLASS, CqlProtocolError, DataType, TypeId

__all__ = ["decode_value", "driver_type", "encode_value"]

PROTOCOL_VERSION: Final = 4

_NATIVE_CODECS: Final[dict[int, type[cqltypes._CassandraType]]] = {
    TypeId.ASCII: cqltypes.AsciiType,
    TypeId.BIGINT: cqltypes.LongType,
    TypeId.BLOB: cqltypes.BytesType,
    TypeId.BOOLEAN: cqltypes.BooleanType,
    TypeId.COUNTER: cqltypes.CounterColumnType,
    TypeId.DECIMAL: cqltypes.DecimalType,
    TypeId.DOUBLE: cqltypes.DoubleType,
    TypeId.FLOAT: cqltypes.FloatType,
    TypeId.INT: cqltypes.Int32Type,
    TypeId.TEXT: cqltypes.UTF8Type,
    TypeId.TIMESTAMP: cqltypes.DateType,
    TypeId.UUID: cqltypes.UUIDType,
    TypeId.VARCHAR: cqltypes.UTF8Type,
    TypeId.VARINT: cqltypes.IntegerType,
    TypeId.TIMEUUID: cqltypes.TimeUUIDType,
    TypeId.INET: cqltypes.InetAddressType,
    TypeId.DATE: cqltypes.SimpleDateType,
    TypeId.TIME: cqltypes.TimeType,
    TypeId.SMALLINT: cqltypes.ShortType,
    TypeId.TINYINT: cqltypes.ByteType,
    TypeId.DURATION: cqltypes.DurationType,
}

# What the driver's codecs raise on data or values that do not fit the type.
_CODEC_ERRORS: Final = (
    ArithmeticError, AttributeError, LookupError, OSError, RuntimeError, TypeError, ValueError, struct.error,
)


@functools.lru_cache(maxsize=256)  # types come from the upstream's schema, not from apps
def driver_type(dt: DataType) -> type[cqltypes._CassandraType]:
    """The driver's codec class for ``dt`` (collections, tuples and UDTs parameterised)."""
    native = _NATIVE_CODECS.get(dt.type_id)
    if native is not None:
        return native
    params = [driver_type(p) for p in dt.params]
    if dt.type_id == TypeId.LIST:
        return cqltypes.ListType.apply_parameters(params)
    if dt.type_id == TypeId.SET:
        return cqltypes.SetType.apply_parameters(params)
    if dt.type_id == TypeId.MAP:
        return cqltypes.MapType.apply_parameters(params)
    if dt.type_id == TypeId.TUPLE:
        return cqltypes.TupleType.apply_parameters(params)
    if dt.type_id == TypeId.UDT:
        return cqltypes.UserType.make_udt_class(dt.keyspace or "", dt.name or "", list(dt.fields), params)
    if dt.type_id == TypeId.CUSTOM:
        # Not the driver's lookup_casstype: it registers a class per unknown name, globally.
        return cqltypes.DurationType if dt.custom == DURATION_CLASS else cqltypes.BytesType
    raise ValueError(f"no codec for type id 0x{dt.type_id:04x}")


def decode_value(dt: DataType, data: bytes | bytearray | memoryview | None) -> Any:
    """One CQL value of type ``dt`` as the driver returns it; null and legacy empty values give ``None``.

    Raises :class:`CqlProtocolError` on bytes that are not a ``dt``.
    """
    if data is None:
        return None
    try:
        return driver_type(dt).from_binary(bytes(data), PROTOCOL_VERSION)
    except _CODEC_ERRORS as exc:
        raise CqlProtocolError(f"malformed {dt.cql_name()} value: {exc}") from None


def encode_value(dt: DataType, value: Any) -> bytes | None:
    """Serialize ``value`` as CQL type ``dt`` the way the driver binds it; ``None`` stays ``None``.

    Raises ``ValueError`` on values that do not fit the type.
    """
    if value is None:
        return None
    try:
        return bytes(driver_type(dt).serialize(value, PROTOCOL_VERSION))
    except _CODEC_ERRORS as exc:
        raise ValueError(f"cannot encode a {type(value).__name__} as {dt.cql_name()}: {exc}") from None
