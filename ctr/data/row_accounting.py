"""Bad-row accounting: every rejected row is reported as a :class:`Rejection` and counted, or stops the run.

:class:`RowAccounting` raises a :class:`~ctr.data.raw.ParseError` naming file, line and field on the first bad
row (the default, ``max_bad_rows=0``) or, under an explicit ``max_bad_rows`` budget, counts the skip by reason.
Rows read, written per split and rejected per reason balance, and are stored with the prepared data.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Callable, Iterable

import numpy as np

from ctr import errors
from ctr.data import text
from ctr.data.raw import Block, ParseError

_MAX_EXAMPLES = 20  # rejected rows quoted in accounting.json and the log


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One bad row: 1-based ``line`` of its file, a short ``reason`` key, the ``field`` at fault (``*`` for
    the whole row) and a human-readable ``detail``."""

    line: int
    reason: str
    field: str
    detail: str


class RowAccounting:
    """Rows read, written per split and rejected per reason, with the bad-row budget.

    Args:
      max_bad_rows: bad rows that may be skipped (counted) over the whole run before the next one is an
        error; 0 makes the first bad row an error.
    """

    def __init__(self, max_bad_rows: int = 0):
        self.max_bad_rows = max_bad_rows
        self.read_rows: collections.Counter[str] = collections.Counter()
        self.rejected: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.written: collections.Counter[str] = collections.Counter()
        self.notes: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []
        self._bad = 0

    def read(self, input_name: str, rows: int) -> None:
        self.read_rows[input_name] += rows

    def reject(self, input_name: str, source: str, rejections: Iterable[Rejection]) -> None:
        """Counts ``rejections`` (in line order) or raises on the first one over the budget."""
        for r in rejections:
            message = f"{source}:{r.line}: field {r.field}: {errors.shorten(r.detail, 300)}"
            self._bad += 1
            if self._bad > self.max_bad_rows:
                if self.max_bad_rows:
                    message += f" (more than --max_bad_rows={self.max_bad_rows} bad rows)"
                raise ParseError(message)
            self.rejected[input_name][r.reason] += 1
            if len(self.examples) < _MAX_EXAMPLES:
                self.examples.append(message)
                logging.warning("skipping bad row: %s", message)

    def write(self, split: str, rows: int) -> None:
        self.written[split] += rows

    def note(self, what: str, rows: int) -> None:
        """Counts rows kept with a remark (e.g. TaobaoAds impressions of users without a profile)."""
        self.notes[what] += rows

    def total_rejected(self, input_name: str) -> int:
        return sum(self.rejected[input_name].values())

    def to_json(self) -> dict:
        return {
            "rows_read": dict(self.read_rows),
            "rows_written": dict(self.written),
            "rows_rejected": {name: dict(c) for name, c in self.rejected.items() if c},
            "rows_noted": dict(self.notes),
            "max_bad_rows": self.max_bad_rows,
            "rejected_examples": list(self.examples),
        }

    def summary(self) -> str:
        lines = [f"rows read: {dict(self.read_rows)}", f"rows written: {dict(self.written)}"]
        for name, counts in self.rejected.items():
            if counts:
                lines.append(f"rows rejected from {name}: {dict(counts)}")
        if self.notes:
            lines.append(f"rows noted: {dict(self.notes)}")
        return "\n".join(lines)


Check = tuple[np.ndarray, str, str, Callable[[int], str]]


def block_rejections(
    block: Block, spans: text.Spans, checks: list[Check], layout: str
) -> tuple[np.ndarray, list[Rejection]]:
    """The bad rows of a tokenised block, each reported once, in line order.

    A line is bad for the first of: its field count (``spans.bad_lines``), being the truncated last line, or
    the first failing check in ``checks`` order.

    Args:
      block: the block.
      spans: its field spans.
      checks: ``(ok [rows] bool, reason, field, describe(row) -> detail)`` over the rows of ``spans``, in field
        order.
      layout: what a well-formed line holds, for the field-count message (e.g. "40 tab-separated fields").

    Returns:
      ``keep`` (``[rows]`` bool over the rows of ``spans``) and the rejections.
    """
    found: dict[int, Rejection] = {}
    for index, count in zip(spans.bad_lines.tolist(), spans.bad_counts.tolist()):
        found[index] = Rejection(block.first_line + index, "wrong_field_count", "*", f"expected {layout}, got {count}")
    keep = np.ones(len(spans.line_index), bool)
    for ok, reason, field, describe in checks:
        for row in np.flatnonzero(~ok & keep).tolist():
            keep[row] = False
            index = int(spans.line_index[row])
            found[index] = Rejection(block.first_line + index, reason, field, describe(row))
    if block.truncated:
        last = block.num_lines - 1
        found[last] = truncation_rejection(block)
        if len(spans.line_index) and spans.line_index[-1] == last:
            keep[-1] = False
    return keep, [found[i] for i in sorted(found)]


def truncation_rejection(block: Block) -> Rejection:
    """The bad row a truncated file's last line (no newline) becomes."""
    line = block.first_line + block.num_lines - 1
    return Rejection(line, "truncated_last_line", "*", "last line has no newline: truncated file?")
