"""``system.local`` / ``system.peers`` / ``system.peers_v2`` as the sidecar answers them.

Drivers discover the cluster from these tables and then connect to every peer
they find; an app that talks to the sidecar must find exactly one host, the
sidecar.  So the sidecar answers them itself (sans-I/O, from a cached copy of
the upstream's own rows): ``system.local`` is the upstream coordinator's row
with the node-specific columns replaced -- addresses and ports are the ones
the client connected to, data center and rack come from the listener (so
DC-aware load balancing keeps working), the host owns the whole ring (one
token), ``host_id`` is stable per listener, and ``native_protocol_version`` is
the v4 the sidecar speaks; ``cluster_name``, ``release_version``,
``schema_version``, ``partitioner``, ``cql_version`` are the upstream's.  The
peers tables are empty with the upstream's column metadata.

Column types always come from the upstream's result metadata, so the answer
matches what the driver's parser expects for that Cassandra version.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Any, Final

import msgspec

from .messages import ColumnSpec, Error, ErrorCode, RowsMetadata, RowsResult
from .values import decode_value, encode_value

__all__ = [
    "LocalNode",
    "SystemInfo",
    "answer",
    "local_overrides",
    "parse_projection",
    "rewrite",
]

PROTOCOL_VERSION: Final = "4"


class LocalNode(msgspec.Struct, frozen=True):
    """What the sidecar says about itself to one client connection."""

    address: str  # the local address the client connected to
    port: int
    data_center: str
    rack: str
    host_id: uuid.UUID


class SystemInfo(msgspec.Struct):
    """The upstream's system tables as last read: metadata and the coordinator's local row."""

    local_columns: list[ColumnSpec]
    local_row: list[bytes | None]
    peers_columns: list[ColumnSpec]
    peers_v2_columns: list[ColumnSpec] | None  # None: the upstream has no peers_v2 (Cassandra < 4)
    peers_v2_error: str = ""
    fetched_at: float = 0.0

    def local_value(self, name: str) -> Any:
        for spec, cell in zip(self.local_columns, self.local_row, strict=False):
            if spec.name == name:
                return decode_value(spec.type, cell)
        return None

    @property
    def partitioner(self) -> str:
        return str(self.local_value("partitioner") or "org.apache.cassandra.dht.Murmur3Partitioner")


def host_id_for(bind: str) -> uuid.UUID:
    """A host id that stays the same for a listener across restarts (drivers key hosts by it)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"walcar-cql://{bind}")


def _token_for(partitioner: str) -> str:
    """One token owns the whole ring; its spelling depends on the partitioner."""
    if partitioner.endswith(("ByteOrderedPartitioner", "OrderPreservingPartitioner")):
        return "00"
    return "0"


def local_overrides(node: LocalNode, partitioner: str) -> dict[str, Any]:
    address = str(ipaddress.ip_address(node.address))  # the driver's inet codec takes the text form
    return {
        "key": "local",
        "broadcast_address": address,
        "listen_address": address,
        "rpc_address": address,
        "broadcast_port": node.port,
        "listen_port": node.port,
        "rpc_port": node.port,
        "data_center": node.data_center,
        "rack": node.rack,
        "host_id": node.host_id,
        "tokens": [_token_for(partitioner)],
        "native_protocol_version": PROTOCOL_VERSION,
    }


_IDENT: Final = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_]*)'
_SELECT_RE: Final = re.compile(r"^\s*select\s+(?P<cols>.+?)\s+from\s", re.IGNORECASE | re.DOTALL)
_ITEM_RE: Final = re.compile(rf"^\s*(?P<name>{_IDENT})(?:\s+as\s+(?P<alias>{_IDENT}))?\s*$", re.IGNORECASE)
_SPECIAL: Final = re.compile(r"^\s*(distinct|json)\s", re.IGNORECASE)


def _ident(text: str) -> str:
    if text.startswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower()


def parse_projection(query: str) -> list[tuple[str, str]] | None:
    """[(column, output name)] of a plain ``SELECT a, b AS c FROM``; [] for ``*``; None if anything fancier."""
    m = _SELECT_RE.match(query)
    if m is None:
        return None
    cols = m.group("cols").strip()
    if cols == "*":
        return []
    if _SPECIAL.match(cols):
        return None
    out = []
    for item in cols.split(","):
        im = _ITEM_RE.match(item)
        if im is None:
            return None
        name = _ident(im.group("name"))
        alias = im.group("alias")
        out.append((name, _ident(alias) if alias else name))
    return out


def _project(
    columns: list[ColumnSpec], rows: list[list[bytes | None]], projection: list[tuple[str, str]], table: str
) -> RowsResult | Error:
    if not projection:
        return RowsResult(RowsMetadata(list(columns)), rows)
    index = {c.name: i for i, c in enumerate(columns)}
    specs = []
    picks = []
    for name, alias in projection:
        i = index.get(name)
        if i is None:
            return Error(ErrorCode.INVALID, f"Undefined column name {name} in table system.{table}")
        spec = columns[i]
        specs.append(ColumnSpec(spec.keyspace, spec.table, alias, spec.type))
        picks.append(i)
    return RowsResult(RowsMetadata(specs), [[row[i] for i in picks] for row in rows])


def _local_row(info: SystemInfo, node: LocalNode) -> list[bytes | None]:
    overrides = local_overrides(node, info.partitioner)
    row = []
    for spec, cell in zip(info.local_columns, info.local_row, strict=False):
        if spec.name in overrides:
            try:
                cell = encode_value(spec.type, overrides[spec.name])
            except (TypeError, ValueError):
                pass  # a type this Cassandra spells differently: keep its own value
        row.append(cell)
    return row


def answer(query: str, table: str, info: SystemInfo, node: LocalNode) -> RowsResult | Error | None:
    """The sidecar's answer to a SELECT on ``system.<table>``; None when it must be forwarded and rewritten."""
    projection = parse_projection(query)
    if projection is None or "?" in query:
        return None
    if table == "local":
        return _project(info.local_columns, [_local_row(info, node)], projection, table)
    if table == "peers":
        return _project(info.peers_columns, [], projection, table)
    if info.peers_v2_columns is None:
        return Error(ErrorCode.INVALID, info.peers_v2_error or "unconfigured table peers_v2")
    return _project(info.peers_v2_columns, [], projection, table)


def rewrite(result: RowsResult, table: str, info: SystemInfo | None, node: LocalNode) -> RowsResult:
    """Fix up an upstream answer to a system-table query the sidecar could not answer from its cache."""
    if table != "local":
        return RowsResult(result.metadata, [])
    columns = result.metadata.columns
    if columns is None:
        return result
    partitioner = info.partitioner if info is not None else "org.apache.cassandra.dht.Murmur3Partitioner"
    overrides = local_overrides(node, partitioner)
    rows = []
    for row in result.rows:
        new = list(row)
        for i, spec in enumerate(columns):
            if spec.name in overrides:
                try:
                    new[i] = encode_value(spec.type, overrides[spec.name])
                except (TypeError, ValueError):
                    pass
        rows.append(new)
    return RowsResult(result.metadata, rows)
