"""Delimited text as numpy arrays: line and field spans, 8-byte words at any offset, integers.

The readers never split text into Python or TensorFlow strings: a block of raw lines is one ``uint8`` array,
a field is a ``(start, end)`` byte span into it, and values are decoded from spans with whole-array numpy
operations (one pass per operation over a block, no per-row Python). This is what makes raw parsing run at
several hundred thousand rows per second per core instead of the ~15-70k of per-string approaches.

Unquoted formats only (Criteo TSV, Avazu and TaobaoAds CSV have no quoting).
"""
from __future__ import annotations

import dataclasses

import numpy as np

NEWLINE = 10
CARRIAGE_RETURN = 13
_U64 = np.uint64
_ASCII_ZEROS = _U64(0x3030303030303030)
_HIGH_NIBBLES = _U64(0xF0F0F0F0F0F0F0F0)
_SIXES = _U64(0x0606060606060606)
_ALL_ONES = _U64(0xFFFFFFFFFFFFFFFF)
_MAX_FAST_DIGITS = 16  # two 8-byte words; longer integers (rare) take a Python path


class Words:
    """The little-endian 8-byte word starting at any byte offset of ``data``.

    Each word is two aligned ``uint64`` gathers and a shift (numpy gathers from an unaligned byte-strided view
    are several times slower). Bytes past the end of ``data`` read as zero.
    """

    def __init__(self, data: np.ndarray):
        self.data = data
        padded = np.zeros(len(data) // 8 * 8 + 16, np.uint8)
        padded[: len(data)] = data
        self._aligned = padded.view("<u8")

    def __call__(self, offsets: np.ndarray) -> np.ndarray:
        """``uint64`` words at byte ``offsets`` (any shape, int64)."""
        index = offsets >> 3
        shift = (offsets & 7).astype(_U64) << _U64(3)
        # numpy defines a shift by 64 as 0, so an aligned offset needs no special case.
        low = np.take(self._aligned, index)  # np.take: several times faster than fancy indexing
        high = np.take(self._aligned, index + 1)
        return (low >> shift) | (high << (_U64(64) - shift))


@dataclasses.dataclass
class Spans:
    """Field spans of the well-formed lines of a block.

    Attributes:
      starts, ends: ``[n, num_fields]`` int64 byte offsets (``ends`` exclusive; a ``\\r`` before the newline
        is not part of the last field).
      line_index: ``[n]`` int64 index of each row among all lines of the block (0-based).
      bad_lines: ``[k]`` int64 line indices whose field count is wrong, with ``bad_counts`` ``[k]`` their count.
      num_lines: lines in the block.
    """

    starts: np.ndarray
    ends: np.ndarray
    line_index: np.ndarray
    bad_lines: np.ndarray
    bad_counts: np.ndarray
    num_lines: int


def split_fields(data: np.ndarray, delimiter: bytes, num_fields: int) -> Spans:
    """Finds the fields of every line of ``data`` (``uint8``, complete lines each ending in a newline).

    Fast path: one scan for delimiters and newlines together; when every line has ``num_fields`` fields the
    separator positions reshape straight into ``[n, num_fields]`` field ends. Otherwise a second, per-line
    count finds the lines with the wrong number of fields.
    """
    separators = np.flatnonzero((data == ord(delimiter)) | (data == NEWLINE))
    if len(separators) % num_fields == 0:
        ends = separators.reshape(-1, num_fields)
        newline_count = int(np.count_nonzero(data[separators] == NEWLINE))
        if newline_count == len(ends) and (data[ends[:, -1]] == NEWLINE).all():
            return _spans(data, ends, np.arange(len(ends)), np.zeros(0, np.int64), np.zeros(0, np.int64), len(ends))
    newlines = np.flatnonzero(data == NEWLINE)
    delims = np.flatnonzero(data == ord(delimiter))
    per_line = np.diff(np.searchsorted(delims, newlines), prepend=0)
    good = per_line == num_fields - 1
    line_index = np.flatnonzero(good)
    ends = np.empty((len(line_index), num_fields), np.int64)
    ends[:, :-1] = delims[np.repeat(good, per_line)].reshape(len(line_index), num_fields - 1)
    ends[:, -1] = newlines[line_index]
    bad = np.flatnonzero(~good)
    return _spans(data, ends, line_index, bad, per_line[bad] + 1, len(newlines))


def _spans(
    data: np.ndarray, separators: np.ndarray, line_index: np.ndarray, bad: np.ndarray, bad_counts: np.ndarray,
    num_lines: int,
) -> Spans:
    """Spans from each row's separator positions (its delimiters, then its newline)."""
    starts = np.empty_like(separators)
    starts[:, 1:] = separators[:, :-1] + 1
    newline = separators[:, -1]
    # A line starts after the previous line's newline; find that for the first field of every row.
    if len(line_index) and (line_index[-1] == len(line_index) - 1):  # every line is a row
        starts[1:, 0] = newline[:-1] + 1
        starts[:1, 0] = 0
    else:
        all_newlines = np.flatnonzero(data == NEWLINE)
        starts[:, 0] = np.where(line_index > 0, all_newlines[np.maximum(line_index - 1, 0)] + 1, 0)
    ends = separators.copy()
    ends[:, -1] -= data[np.maximum(newline - 1, 0)] == CARRIAGE_RETURN  # "\r\n" line ends
    return Spans(starts, ends, line_index, bad, bad_counts, num_lines)


def parse_ints(words: Words, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decimal integers (optional leading ``-``, up to 18 digits) in byte spans, all at once.

    Args:
      words: word access to the block.
      starts, ends: int64 spans, any shape.

    Returns:
      ``(values, present, valid)``, each of the spans' shape: int64 values (0 where missing or invalid),
      ``present`` = the span is non-empty, ``valid`` = empty or a well-formed integer that fits in int64.
    """
    length = ends - starts
    first = words(starts)
    negative = (length > 0) & ((first & _U64(0xFF)) == _U64(ord("-")))
    digits = length - negative
    if length.size and length.max() <= 8:  # the common case: one word holds sign and digits
        values, valid = _digits8(first >> (negative.astype(_U64) * _U64(8)), digits)
        values = values.astype(np.int64)
    else:
        digit_start = starts + negative
        hi_len = np.clip(digits - 8, 0, 8)
        lo, lo_ok = _digits8(words(digit_start + hi_len), np.minimum(digits, 8))
        hi, hi_ok = _digits8(words(digit_start), hi_len)
        values = hi.astype(np.int64) * 100_000_000 + lo.astype(np.int64)
        valid = lo_ok & hi_ok & (digits <= _MAX_FAST_DIGITS)
    values *= 1 - 2 * negative.astype(np.int64)
    valid &= (digits > 0) | (length == 0)
    long = np.flatnonzero((digits > _MAX_FAST_DIGITS).ravel())
    if long.size:  # 17+ digits: exact Python ints, so int64 overflow is caught
        flat_values, flat_valid = values.reshape(-1), valid.reshape(-1)
        flat_starts, flat_ends = starts.reshape(-1), ends.reshape(-1)
        for i in long:
            text = words.data[flat_starts[i] : flat_ends[i]].tobytes()
            ok = text.lstrip(b"-").isdigit() and -(2**63) <= int(text) < 2**63
            flat_values[i], flat_valid[i] = (int(text), True) if ok else (0, False)
    return values * valid, length > 0, valid


def _digits8(word: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of the first ``count`` (0..8) ASCII digits of each ``word``, and whether they all are digits.

    SWAR: the digit bytes are left-aligned so missing leading digits read as zeros, then pairs, quads and
    octets of digits are combined with three multiplies.
    """
    bits = (count * 8).astype(_U64)
    # np.where is ~10x slower than arithmetic on uint64 arrays, so selections here are masks and products.
    keep = ((_U64(1) << np.minimum(bits, _U64(63))) - _U64(1)) | ((count >= 8).astype(_U64) * _ALL_ONES)
    x = (word ^ _ASCII_ZEROS) & keep
    ok = ((x & _HIGH_NIBBLES) == 0) & ((((x + _SIXES) & _HIGH_NIBBLES) & keep) == 0)
    x <<= np.minimum(_U64(64) - bits, _U64(63))  # count 0: x is already 0
    x = ((x & _U64(0x0F0F0F0F0F0F0F0F)) * _U64(2561)) >> _U64(8)
    x = ((x & _U64(0x00FF00FF00FF00FF)) * _U64(6553601)) >> _U64(16)
    x = ((x & _U64(0x0000FFFF0000FFFF)) * _U64(42949672960001)) >> _U64(32)
    return x, ok


def span_bytes(data: np.ndarray, start: int, end: int) -> bytes:
    """The raw bytes of one span (for error messages)."""
    return data[start:end].tobytes()
