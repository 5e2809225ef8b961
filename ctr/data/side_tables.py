"""Side tables of a raw dataset: CSVs keyed by an integer, joined onto the main rows (TaobaoAds' ad features and
user profiles), parsed with the same bad-row accounting as every reader."""
from __future__ import annotations

import dataclasses

import numpy as np

from ctr.data import raw, row_accounting, text
from ctr.data.fingerprint import fingerprint_spans

NULL = b"NULL"  # how the raw files spell a missing value


@dataclasses.dataclass
class SideTable:
    """A side table keyed by an integer: ``keys [k]`` sorted, ``ids [k, f]`` fingerprints, ``dense [k, d]``."""

    keys: np.ndarray
    ids: np.ndarray
    dense: np.ndarray

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of each key, whether it was found)."""
        pos = np.minimum(np.searchsorted(self.keys, keys), max(len(self.keys) - 1, 0))
        found = self.keys[pos] == keys if len(self.keys) else np.zeros(len(keys), bool)
        return pos, found


def null_as_missing(words: text.Words, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``ends`` with every span that reads ``NULL`` emptied (a missing value is the empty string)."""
    null = np.uint64(int.from_bytes(NULL, "little"))
    is_null = (ends - starts == len(NULL)) & ((words(starts) & np.uint64(0xFFFFFFFF)) == null)
    return np.where(is_null, starts, ends)


def _parse_floats(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal floats of spans (a side table's few columns: per-value Python is fine): (values, valid)."""
    values = np.zeros(len(starts), np.float64)
    valid = np.ones(len(starts), bool)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        try:
            values[i] = float(data[s:e].tobytes())
        except ValueError:
            valid[i] = False
    return values, valid & np.isfinite(values) & (values >= 0)


def load(
    path: str, columns: tuple[str, ...], id_fields: tuple[str, ...], accounting: row_accounting.RowAccounting,
    input_name: str, threads: int, price_column: int | None = None,
) -> SideTable:
    """A side table from a CSV whose first column is an integer key and the others categorical (plus a price)."""
    id_columns = [columns.index(f) for f in id_fields]
    layout = f"{len(columns)} comma-separated fields"

    Parsed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

    def parse(block: raw.Block) -> tuple[Parsed, list[row_accounting.Rejection]]:
        data = block.data
        spans = text.split_fields(data, b",", len(columns))
        words = text.Words(data)
        key, _, key_ok = text.parse_ints(words, spans.starts[:, 0], spans.ends[:, 0])
        key_ok &= spans.ends[:, 0] > spans.starts[:, 0]
        checks: list[row_accounting.Check] = [
            (key_ok, "not_an_integer", columns[0], lambda r: "key must be an integer")
        ]
        price = np.zeros(len(key))
        if price_column is not None:
            price, price_ok = _parse_floats(data, spans.starts[:, price_column], spans.ends[:, price_column])
            checks.append((price_ok, "bad_price", columns[price_column], lambda r: "price must be a number >= 0"))
        keep, rejections = row_accounting.block_rejections(block, spans, checks, layout)
        starts, ends = spans.starts[keep][:, id_columns], spans.ends[keep][:, id_columns]
        ends = null_as_missing(words, starts, ends)
        lines = block.first_line + spans.line_index[keep]
        return (key[keep], fingerprint_spans(id_fields, words, starts, ends), price[keep], lines), rejections

    parts = list(raw.stream_rows([path], parse, accounting, input_name, threads, skip_lines=1))
    keys = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    price = np.concatenate([p[2] for p in parts])
    lines = np.concatenate([p[3] for p in parts])
    order = np.argsort(keys, kind="stable")
    duplicate = np.zeros(len(keys), bool)
    duplicate[order[1:]] = keys[order[1:]] == keys[order[:-1]]
    if duplicate.any():
        accounting.reject(input_name, path, [
            row_accounting.Rejection(int(line), "duplicate_key", columns[0], f"{columns[0]} {keys[i]} appeared before")
            for i, line in sorted(zip(np.flatnonzero(duplicate), lines[duplicate]), key=lambda t: t[1])
        ])
    order = order[~duplicate[order]]
    return SideTable(keys[order], ids[order], np.log1p(price[order]).astype(np.float32)[:, None])
