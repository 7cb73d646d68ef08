"""A minimal Parquet writer (standard library only) for the predict function's prediction log.

The serving image has no pyarrow (tests/test_serving_image.py: it would add ~100 MB and its
import to a scale-to-zero function that only ever writes a few small flat tables), so this
module writes the one shape the log needs itself: a flat schema of required or optional
columns of type string (BYTE_ARRAY, UTF8), int64, timestamp (INT64, TIMESTAMP_MILLIS) or
double; one row group; one data page (v1) per column, PLAIN values, RLE definition levels,
the page gzip-compressed (level 1: a thread of the serving process writes it). Metadata is
Thrift compact protocol, as the format specifies
(https://github.com/apache/parquet-format). Any Parquet reader reads it (tests read it back
with pyarrow).

Contract: `write_table(columns, rows_count)` returns the bytes of one Parquet file; each
`Column` holds exactly `rows_count` values, None only in an optional column (else ValueError).
A string column's values are `str`, or `bytes` that already hold UTF-8 (written as they are).
"""

from __future__ import annotations

import gzip
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Parquet enums (parquet.thrift)
_BYTE_ARRAY, _INT64, _DOUBLE = 6, 2, 5
_REQUIRED, _OPTIONAL = 0, 1
_UTF8, _TIMESTAMP_MILLIS = 0, 9
_PLAIN, _RLE = 0, 3
_GZIP = 2
_DATA_PAGE = 0
# Thrift compact protocol field types
_T_I32, _T_I64, _T_BINARY, _T_LIST, _T_STRUCT = 5, 6, 8, 9, 12

KINDS = ("string", "int64", "timestamp_ms", "double")
_PHYSICAL = {"string": _BYTE_ARRAY, "int64": _INT64, "timestamp_ms": _INT64, "double": _DOUBLE}


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of KINDS
    values: Sequence[Any]
    optional: bool = False


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _zigzag(value: int) -> bytes:
    return _varint((value << 1) ^ (value >> 63))


class _Struct:
    """A Thrift compact-protocol struct, fields added in increasing id order."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.last = 0

    def _header(self, field_id: int, kind: int) -> None:
        delta = field_id - self.last
        if 0 < delta <= 15:
            self.out.append((delta << 4) | kind)
        else:
            self.out.append(kind)
            self.out += _zigzag(field_id)
        self.last = field_id

    def i32(self, field_id: int, value: int) -> _Struct:
        self._header(field_id, _T_I32)
        self.out += _zigzag(value)
        return self

    def i64(self, field_id: int, value: int) -> _Struct:
        self._header(field_id, _T_I64)
        self.out += _zigzag(value)
        return self

    def binary(self, field_id: int, value: bytes) -> _Struct:
        self._header(field_id, _T_BINARY)
        self.out += _varint(len(value)) + value
        return self

    def struct(self, field_id: int, value: _Struct) -> _Struct:
        self._header(field_id, _T_STRUCT)
        self.out += value.end()
        return self

    def list(self, field_id: int, kind: int, items: Sequence[Any]) -> _Struct:
        self._header(field_id, _T_LIST)
        size = len(items)
        self.out += (
            bytes([(size << 4) | kind]) if size < 15 else bytes([0xF0 | kind]) + _varint(size)
        )
        for item in items:
            if kind == _T_I32:
                self.out += _zigzag(item)
            elif kind == _T_BINARY:
                self.out += _varint(len(item)) + item
            else:  # a struct
                self.out += item.end()
        return self

    def end(self) -> bytes:
        return bytes(self.out) + b"\x00"


def _plain(kind: str, values: list[Any]) -> bytes:
    if kind == "string":
        encoded = [
            v if type(v) is bytes else (v if type(v) is str else str(v)).encode() for v in values
        ]
        lengths = [struct.pack("<i", len(data)) for data in encoded]
        return b"".join([part for pair in zip(lengths, encoded, strict=True) for part in pair])
    if kind == "double":
        return struct.pack(f"<{len(values)}d", *values)
    return struct.pack(f"<{len(values)}q", *values)


def _definition_levels(values: Sequence[Any], present: int) -> bytes:
    """RLE runs (bit width 1) of present (1) / null (0), prefixed by their byte length."""
    if present == len(values):  # the usual case: one run
        runs = _varint(len(values) << 1) + b"\x01"
    else:
        runs = b"".join(
            _varint(len(list(run)) << 1) + (b"\x00" if null else b"\x01")
            for null, run in itertools.groupby(values, key=_is_none)
        )
    return struct.pack("<i", len(runs)) + runs


def _is_none(value: Any) -> bool:
    return value is None


def _column_chunk(column: Column, rows: int, offset: int) -> tuple[bytes, _Struct]:
    if column.kind not in KINDS:
        raise ValueError(f"column {column.name!r}: unknown kind {column.kind!r}")
    if len(column.values) != rows:
        raise ValueError(f"column {column.name!r} has {len(column.values)} values, not {rows}")
    present = [v for v in column.values if v is not None]
    if len(present) != rows and not column.optional:
        raise ValueError(f"column {column.name!r} is required but holds a null")
    levels = _definition_levels(column.values, len(present)) if column.optional else b""
    page = levels + _plain(column.kind, present)
    compressed = gzip.compress(page, compresslevel=1, mtime=0)
    header = (
        _Struct()
        .i32(1, _DATA_PAGE)
        .i32(2, len(page))
        .i32(3, len(compressed))
        .struct(5, _Struct().i32(1, rows).i32(2, _PLAIN).i32(3, _RLE).i32(4, _RLE))
        .end()
    )
    chunk = header + compressed
    meta = (
        _Struct()
        .i32(1, _PHYSICAL[column.kind])
        .list(2, _T_I32, [_PLAIN, _RLE])
        .list(3, _T_BINARY, [column.name.encode()])
        .i32(4, _GZIP)
        .i64(5, rows)
        .i64(6, len(header) + len(page))
        .i64(7, len(chunk))
        .i64(9, offset)
    )
    return chunk, _Struct().i64(2, offset).struct(3, meta)


def _schema_element(column: Column) -> _Struct:
    element = _Struct().i32(1, _PHYSICAL[column.kind])
    element.i32(3, _OPTIONAL if column.optional else _REQUIRED).binary(4, column.name.encode())
    if column.kind == "string":
        element.i32(6, _UTF8)
    elif column.kind == "timestamp_ms":
        element.i32(6, _TIMESTAMP_MILLIS)
    return element


def write_table(columns: Sequence[Column], rows: int, created_by: str = "readmission") -> bytes:
    """One Parquet file holding `columns` (each of `rows` values) in one row group."""
    out = bytearray(b"PAR1")
    chunks = []
    for column in columns:
        data, chunk = _column_chunk(column, rows, len(out))
        out += data
        chunks.append(chunk)
    root = _Struct().binary(4, b"schema").i32(5, len(columns))
    row_group = _Struct().list(1, _T_STRUCT, chunks).i64(2, len(out) - 4).i64(3, rows)
    footer = (
        _Struct()
        .i32(1, 1)
        .list(2, _T_STRUCT, [root, *(_schema_element(c) for c in columns)])
        .i64(3, rows)
        .list(4, _T_STRUCT, [row_group])
        .binary(6, created_by.encode())
        .end()
    )
    out += footer + struct.pack("<i", len(footer)) + b"PAR1"
    return bytes(out)
