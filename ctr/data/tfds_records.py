"""Bulk ``tf.train.Example`` serialization and ArrayRecord shard writing for the TFDS builders.

TFDS's own writer encodes and serializes one example at a time in Python (~1 ms per Criteo example): a full
Criteo build would take hours. Here a chunk of prepared rows (``[n]`` / ``[n, d]`` columns) becomes ``n``
serialized Examples with numpy byte operations on the protobuf wire format, and the records go to the shards
of TFDS's ArrayRecord layout (``<name>-<split>.array_record-00000-of-00004``), so ``tfds.data_source``,
``tfds.load`` and the builder's ``tfds.features`` read them as if TFDS had written them.

Wire format (``tensorflow/core/example/example.proto``)::

    Example  { Features features = 1; }          Features { map<string, Feature> feature = 1; }
    map entry { string key = 1; Feature value = 2; }
    Feature  { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; }  (one of)
    FloatList { repeated float value = 1 [packed]; }   Int64List { repeated int64 value = 1 [packed]; }

Every field is length-delimited (tag byte ``field << 3 | 2``, varint length, payload); ints are base-128
varints (negative int64: 10 bytes, as two's complement), floats little-endian float32. Map entries are written
in sorted key order, as protobuf's deterministic serialization orders them (TFDS's own records follow upb's
hash order, which changes between processes; parsers accept any order). The records equal
``Example.FromString(tfds_record).SerializeToString(deterministic=True)`` byte for byte (tested).

A row's bytes are laid out as column blocks of one ``[n, W]`` uint8 matrix, varints in slots as wide as the
chunk's widest value with a mask of the bytes in use, so one boolean gather concatenates all ``n`` records.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable

import numpy as np

# ArrayRecord writer options: one record per chunk (random access, as TFDS writes them). Snappy instead of the
# default zstd: ~3x less CPU per record for the same size on these records (benchmarks/RESULTS.md); readers
# decompress any codec.
ARRAY_RECORD_OPTIONS = "group_size:1,snappy"
_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)  # the 10 groups of 7 bits of a uint64
_LIMITS = np.uint64(1) << _SHIFTS[1:]  # a varint of u has 1 + #{limits <= u} bytes


@dataclasses.dataclass(frozen=True)
class _Spec:
    key: str
    size: int  # values per example (the product of the shape)
    shape: tuple[int, ...]
    floating: bool


class _Row:
    """Byte blocks of one part of every row: ``(data, mask)`` with data ``[n, w]`` (or a constant ``[w]``) and
    mask ``[n, w]`` bool (None: all bytes used), and the part's length per row ``[n]``."""

    def __init__(self, n: int):
        self.n = n
        self.blocks: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.length = np.zeros(n, np.int64)

    def extend(self, other: "_Row") -> "_Row":
        for block in other.blocks:
            if block[0].ndim == 1:
                self._append_const_block(block[0])
            else:
                self.blocks.append(block)
        self.length += other.length
        return self

    def _append_const_block(self, data: np.ndarray) -> None:
        if self.blocks and self.blocks[-1][0].ndim == 1:
            data = np.concatenate([self.blocks.pop()[0], data])
        self.blocks.append((data, None))


def _const(n: int, data: bytes) -> _Row:
    row = _Row(n)
    row.blocks.append((np.frombuffer(data, np.uint8), None))
    row.length += len(data)
    return row


def _varint_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Base-128 varints of ``values`` (``[n, k]``, any int dtype; negatives as their uint64 two's complement):
    ``(bytes [n, k, w], lengths [n, k])`` with ``w`` the widest varint present (bytes past a length: unused)."""
    u = np.ascontiguousarray(values).astype(np.int64, copy=False).view(np.uint64)
    lengths = 1 + np.searchsorted(_LIMITS, u, side="right")  # bytes = 1 + the 7-bit limits u reaches
    w = int(lengths.max()) if lengths.size else 1
    groups = (u[..., None] >> _SHIFTS[:w]).astype(np.uint8)  # the low byte of each shift
    groups &= 0x7F
    groups |= (np.arange(w) < (lengths[..., None] - 1)).view(np.uint8) << np.uint8(7)  # continuation bits
    return groups, lengths


def _varints(values: np.ndarray) -> _Row:
    """One block: the varints of ``values`` ``[n, k]`` back to back (a packed repeated field's payload)."""
    n, k = values.shape
    row = _Row(n)
    if not values.size or (0 <= values.min() and values.max() < 0x80):  # one byte each: the value (lengths, small ids)
        row.blocks.append((values.astype(np.uint8), None))
        row.length += k
        return row
    data, lengths = _varint_bytes(values)
    w = data.shape[-1]
    mask = np.arange(w) < lengths[..., None]
    row.blocks.append((data.reshape(n, k * w), None if mask.all() else mask.reshape(n, k * w)))
    row.length += lengths.sum(axis=1)
    return row


def _delimited(tag: int, payload: _Row) -> _Row:
    """Field ``tag`` (its key byte) holding ``payload``: tag, varint length, payload."""
    row = _const(payload.n, bytes([tag]))
    row.extend(_varints(payload.length[:, None]))
    return row.extend(payload)


def _feature(spec: _Spec, column: np.ndarray) -> _Row:
    """The map entry (field 1 of Features) of one feature: key ``spec.key``, value its Feature."""
    n = len(column)
    values = column.reshape(n, spec.size)
    if spec.floating:  # FloatList (field 2 of Feature), packed float32
        payload = _Row(n)
        payload.blocks.append((np.ascontiguousarray(values, "<f4").view(np.uint8), None))
        payload.length += 4 * spec.size
        tag = 0x12
    else:  # Int64List (field 3 of Feature), packed varints (bools as 0/1)
        payload = _varints(values)
        tag = 0x1A
    listing = _delimited(0x0A, payload) if spec.size else _Row(n)  # an empty packed field is not written
    key = spec.key.encode()
    entry = _const(n, b"\x0a" + _varint_scalar(len(key)) + key)
    entry.extend(_delimited(0x12, _delimited(tag, listing)))
    return _delimited(0x0A, entry)


def _varint_scalar(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class ExampleEncoder:
    """Serializes chunks of rows as ``tf.train.Example`` records of a TFDS ``FeaturesDict``.

    Supports what the ctr builders declare: fixed-shape int, bool and float32 tensors (ClassLabel, Scalar,
    Tensor); any other feature is refused at construction.
    """

    def __init__(self, features) -> None:
        self._specs = []
        for key, info in sorted(features.get_serialized_info().items()):  # deterministic: sorted keys
            dtype = np.dtype(info.np_dtype)
            shape = tuple(info.shape)
            if not all(isinstance(d, int) and d >= 0 for d in shape) or dtype.kind not in "biuf" or (
                dtype.kind == "f" and dtype != np.float32
            ):
                raise ValueError(f"feature {key!r}: shape {shape} dtype {dtype.name}: not a fixed-shape int, bool or "
                                 "float32 tensor")  # fmt: skip
            self._specs.append(_Spec(key, int(np.prod(shape, dtype=np.int64)), shape, dtype.kind == "f"))

    def encode(self, columns: dict[str, np.ndarray]) -> tuple[bytes, np.ndarray]:
        """The records of ``n`` rows, ``columns[key]`` of shape ``[n, *shape]``: ``(bytes, offsets [n + 1])``,
        record ``i`` = ``bytes[offsets[i]:offsets[i + 1]]``."""
        n = len(next(iter(columns.values())))
        features = _Row(n)
        for spec in self._specs:
            column = np.asarray(columns[spec.key])
            if column.shape != (n, *spec.shape):
                raise ValueError(f"column {spec.key!r}: shape {column.shape}, expected {(n, *spec.shape)}")
            features.extend(_feature(spec, column))
        example = _delimited(0x0A, features)
        data = np.concatenate([np.broadcast_to(block, (n, block.shape[-1])) for block, _ in example.blocks], axis=1)
        mask = np.concatenate([np.broadcast_to(True, (n, block.shape[-1])) if used is None else used
                               for block, used in example.blocks], axis=1)  # fmt: skip
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(example.length, out=offsets[1:])
        return data[mask].tobytes(), offsets


def write_shards(paths: list[str], shard_rows: list[int], chunks: Iterable[tuple[bytes, np.ndarray]]) -> int:
    """Writes the records of ``chunks`` (as :meth:`ExampleEncoder.encode` returns them), in order, into
    ``paths[i]`` (``shard_rows[i]`` records each, all > 0); returns the bytes of the records."""
    from array_record.python import array_record_module

    total, shard, left, writer = 0, -1, 0, None
    try:
        for buf, offsets in chunks:
            total += len(buf)
            for i in range(len(offsets) - 1):
                if not left:
                    if writer is not None:
                        writer.close()
                    shard += 1
                    if shard == len(paths):
                        raise ValueError(f"{paths[-1]}: more records than the {sum(shard_rows)} planned")
                    writer = array_record_module.ArrayRecordWriter(os.fspath(paths[shard]), ARRAY_RECORD_OPTIONS)
                    left = shard_rows[shard]
                writer.write(buf[offsets[i] : offsets[i + 1]])
                left -= 1
    finally:
        if writer is not None:
            writer.close()
    if left or shard != len(paths) - 1:
        raise ValueError(f"{paths[max(shard, 0)]}: fewer records than the {sum(shard_rows)} planned")
    return total
