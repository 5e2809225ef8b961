"""Categorical ids: a salted 63-bit fingerprint of (field, raw value), computed the same way everywhere.

``id = Fingerprint64(field + "\\x1f" + value) mod (2**63 - 1)`` through ``tf.strings.to_hash_bucket_fast``
(FarmHash Fingerprint64, stable across platforms and TensorFlow versions). The prepare step and the exported
SavedModel both compute exactly this, so serving sees exactly the ids training saw. The field name is the
salt: the same raw string in two fields gets two unrelated ids. A missing value is the empty string, so it
gets an id (and an embedding) of its own per field.

Two implementations of the one definition:

- :func:`fingerprint`: TensorFlow, for the exported SavedModel and anything holding ``tf.string`` values.
- :func:`fingerprint_spans` / :func:`fingerprint_strings`: numpy, for the raw-file readers. TensorFlow spends
  ~100 ns creating each string tensor element, which alone caps a Criteo parse at ~0.3M rows/s on one core;
  this version hashes values where they lie in the raw block (FarmHash ``farmhashna::Hash64`` for inputs of
  up to 64 bytes, vectorised over all values whose field names and values have the same lengths; longer
  inputs, which no supported dataset has, go through TensorFlow). Tests check it against :func:`fingerprint`.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ctr import tf_import
from ctr.data.text import Words

if TYPE_CHECKING:
    import tensorflow as tf

SEPARATOR = "\x1f"
ID_SPACE = 2**63 - 1


def fingerprint(field: str, values: tf.Tensor) -> tf.Tensor:
    """Ids for raw string ``values`` (any shape) of ``field``: int64, same shape, in ``[0, 2**63 - 1)``."""
    tf = tf_import.tensorflow()  # the numpy path below serves the readers and the input pipeline without TF

    return tf.strings.to_hash_bucket_fast(tf.add(field + SEPARATOR, values), ID_SPACE)


def fingerprint_spans(fields: Sequence[str], words: Words, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Ids of the values lying in byte spans of a raw block, equal to ``fingerprint(fields[j], values)``.

    Args:
      fields: ``F`` feature names (the salts), one per column of ``starts``.
      words: word access to the block holding the values.
      starts, ends: ``[n, F]`` int64 byte spans of the values.

    Returns:
      ``[n, F]`` int64 ids.
    """
    prefixes = [(field + SEPARATOR).encode() for field in fields]
    lengths = ends - starts
    out = np.empty(starts.shape, np.int64)
    by_prefix_len: dict[int, list[int]] = {}
    for j, prefix in enumerate(prefixes):
        by_prefix_len.setdefault(len(prefix), []).append(j)
    # One group per (prefix length, value length): a handful per block, each hashed with whole-array ops.
    for p, cols in by_prefix_len.items():
        # Row-major, so consecutive values of a group lie close together in the block (cache-friendly); a slice
        # when the columns are adjacent (cheaper than a fancy-index copy).
        selected = slice(cols[0], cols[-1] + 1) if cols[-1] - cols[0] == len(cols) - 1 else cols
        sub_starts = starts[:, selected].ravel()
        sub_lengths = lengths[:, selected].ravel()
        sub_ids = np.empty(len(sub_starts), np.int64)
        table = _prefix_words([prefixes[j] for j in cols])
        present = np.bincount(sub_lengths)
        for value_len in np.flatnonzero(present):
            where = np.flatnonzero(sub_lengths == value_len) if present[value_len] < len(sub_starts) else None
            group_starts = sub_starts if where is None else sub_starts[where]
            # Each value's column among ``cols`` (None for one column: its constants broadcast).
            which = None
            if len(cols) > 1:
                which = (np.arange(len(sub_starts)) if where is None else where) % len(cols)
            if value_len == 0:  # missing values: one id per field (Criteo has many)
                empty = np.array([_empty_id(fields[j]) for j in cols], np.int64)
                ids = empty[which] if which is not None else np.full(len(group_starts), empty[0])
            elif p + value_len > _MAX_FAST_LEN:
                names = np.asarray([fields[j] for j in cols], dtype=object)[which if which is not None else 0]
                names = np.broadcast_to(names, group_starts.shape)
                ids = _fingerprint_tf(names, words.data, group_starts, int(value_len))
            else:
                ids = _Group(table, which, p, int(value_len), group_starts, words).hash()
            if where is None:
                sub_ids[:] = ids
            else:
                sub_ids[where] = ids
        out[:, selected] = sub_ids.reshape(len(starts), len(cols))
    return out


def fingerprint_strings(field: str, values: Sequence[bytes | str] | np.ndarray) -> np.ndarray:
    """Ids of a list (or numpy ``S``/``U`` array) of raw values of ``field``: ``[n]`` int64."""
    encoded = [v.encode() if isinstance(v, str) else bytes(v) for v in np.asarray(values, dtype=object).ravel()]
    lengths = np.fromiter((len(v) for v in encoded), np.int64, len(encoded))
    ends = np.cumsum(lengths)
    data = np.frombuffer(b"".join(encoded), np.uint8)
    return fingerprint_spans([field], Words(data), (ends - lengths)[:, None], ends[:, None])[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# FarmHash Fingerprint64 (farmhashna::Hash64) in numpy, for strings of 1..64 bytes.

_MAX_FAST_LEN = 64
_U64 = np.uint64
_K0 = _U64(0xC3A5C85C97CB3127)
_K1 = _U64(0xB492B66FBE98F273)
_K2 = _U64(0x9AE16A3B2F90404F)
_LOW32 = _U64(0xFFFFFFFF)
_LOW8 = _U64(0xFF)
_ID_SPACE = _U64(ID_SPACE)


def _rotate(v: np.ndarray, shift: int) -> np.ndarray:
    return (v >> _U64(shift)) | (v << _U64(64 - shift))


def _shift_mix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> _U64(47))


def _hash_len16(u: np.ndarray, v: np.ndarray, mul: np.ndarray) -> np.ndarray:
    a = _shift_mix((u ^ v) * mul)
    b = _shift_mix((v ^ a) * mul)
    return b * mul


def _prefix_words(prefixes: list[bytes]) -> np.ndarray:
    """``[len(prefixes), p]`` uint64: the little-endian word of each prefix's bytes from each offset on."""
    table = np.zeros((len(prefixes), len(prefixes[0])), _U64)
    for i, prefix in enumerate(prefixes):
        for offset in range(len(prefix)):
            table[i, offset] = int.from_bytes(prefix[offset : offset + 8], "little")
    return table


class _Group:
    """Values that share a prefix length ``p`` and a value length: ``s = prefix + value`` has a fixed length
    ``n``, so every 8-byte fetch of ``s`` is a prefix constant, a word of the block, or a prefix constant OR-ed
    with a shifted block word, all at scalar offsets: plain whole-array arithmetic, no per-element branches."""

    def __init__(
        self, table: np.ndarray, which: np.ndarray | None, p: int, value_len: int, starts: np.ndarray, words: Words
    ):
        self.p, self.n = p, p + value_len
        self.table, self.which, self.starts, self.words = table, which, starts, words
        self._block_words: dict[int, np.ndarray] = {}

    def _prefix_word(self, offset: int) -> np.ndarray:
        if self.which is None:  # one field: a [1]-shaped constant broadcasts
            return self.table[:, offset]
        return np.take(self.table[:, offset], self.which)

    def _block_word(self, delta: int) -> np.ndarray:
        if delta not in self._block_words:
            self._block_words[delta] = self.words(self.starts + delta)
        return self._block_words[delta]

    def fetch(self, offset: int) -> np.ndarray:
        """``uint64`` little-endian word at ``offset`` of ``s`` (bytes past its end are garbage; callers mask)."""
        if offset >= self.p:
            return self._block_word(offset - self.p)
        inside = self.p - offset
        if inside >= 8:
            return self._prefix_word(offset)
        return self._prefix_word(offset) | (self._block_word(0) << _U64(8 * inside))

    def hash(self) -> np.ndarray:
        n, fetch = self.n, self.fetch
        length = np.array([n], _U64)
        mul = _K2 + length * _U64(2)
        if n > 32:
            a = fetch(0) * _K2
            b = fetch(8)
            c = fetch(n - 8) * mul
            d = fetch(n - 16) * _K2
            y = _rotate(a + b, 43) + _rotate(c, 30) + d
            z = _hash_len16(y, a + _rotate(b + _K2, 18) + c, mul)
            e = fetch(16) * mul
            f = fetch(24)
            g = (y + fetch(n - 32)) * mul
            h = (z + fetch(n - 24)) * mul
            result = _hash_len16(_rotate(e + f, 43) + _rotate(g, 30) + h, e + _rotate(f + a, 18) + g, mul)
        elif n > 16:
            a = fetch(0) * _K1
            b = fetch(8)
            c = fetch(n - 8) * mul
            d = fetch(n - 16) * _K2
            result = _hash_len16(_rotate(a + b, 43) + _rotate(c, 30) + d, a + _rotate(b + _K2, 18) + c, mul)
        elif n >= 8:
            a = fetch(0) + _K2
            b = fetch(n - 8)
            c = _rotate(b, 37) * mul + a
            d = (_rotate(a, 25) + b) * mul
            result = _hash_len16(c, d, mul)
        elif n >= 4:
            a = fetch(0) & _LOW32
            result = _hash_len16(length + (a << _U64(3)), fetch(n - 4) & _LOW32, mul)
        else:  # 1..3 bytes (a field name is never empty)
            a, b, c = fetch(0) & _LOW8, fetch(n >> 1) & _LOW8, fetch(n - 1) & _LOW8
            y = a + (b << _U64(8))
            z = length + (c << _U64(2))
            result = _shift_mix(y * _K2 ^ z * _K0) * _K2
        # mod 2**63 - 1 without a division: 2**63 = 1 (mod 2**63 - 1).
        folded = (result >> _U64(63)) + (result & _ID_SPACE)
        result = (folded - (folded >= _ID_SPACE).astype(_U64) * _ID_SPACE).astype(np.int64)
        return np.broadcast_to(result, self.starts.shape)


@functools.lru_cache(maxsize=None)
def _empty_id(field: str) -> int:
    """The id of the empty string (a missing value) in ``field``."""
    prefix = (field + SEPARATOR).encode()
    if len(prefix) > _MAX_FAST_LEN:
        return int(_fingerprint_tf(np.array([field], dtype=object), np.zeros(1, np.uint8), np.zeros(1, np.int64), 0)[0])
    group = _Group(_prefix_words([prefix]), None, len(prefix), 0, np.zeros(1, np.int64), Words(np.zeros(1, np.uint8)))
    return int(group.hash()[0])


def _fingerprint_tf(fields: np.ndarray, data: np.ndarray, starts: np.ndarray, value_len: int) -> np.ndarray:
    """The TensorFlow path for strings over 64 bytes: ``fields[i]`` is the field of the value at ``starts[i]``."""
    tf = tf_import.tensorflow()

    values = tf.constant([data[s : s + value_len].tobytes() for s in starts.tolist()], tf.string)
    names = tf.constant(fields.tolist(), tf.string)
    return tf.strings.to_hash_bucket_fast(tf.strings.join([names, values], separator=SEPARATOR), ID_SPACE).numpy()
