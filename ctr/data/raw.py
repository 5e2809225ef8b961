"""Streaming raw files: blocks of whole lines (plain or gzip), bad-row accounting, progress, parallel parsing.

Every reader goes through here, so every dataset gets the same guarantees:

- Memory is bounded by the block size whatever the file size: a file is read ``block_bytes`` at a time and
  cut after its last newline; the partial line is carried into the next block.
- gzip is detected from the file's magic bytes, not its name. A corrupt or truncated gzip stream, a missing
  file and a file without data rows are errors naming the file (and the line reached).
- A file whose last line has no newline is treated as truncated: that line is a bad row.
- Nothing is dropped silently. A parser reports each bad row as a :class:`~ctr.data.row_accounting.Rejection`
  (line, reason, field); :class:`~ctr.data.row_accounting.RowAccounting` either raises a :class:`ParseError`
  naming file, line and field (the default,
  ``max_bad_rows=0``) or, under an explicit ``max_bad_rows`` budget, counts the skip by reason. Rows read,
  written per split and rejected per reason balance, and are stored with the prepared data.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import fnmatch
import gzip
import os
import time
import zlib
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np

from ctr import errors
from ctr.data import allocator
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import text

if TYPE_CHECKING:
    from ctr.data.row_accounting import Rejection, RowAccounting

DEFAULT_BLOCK_BYTES = 1 << 20  # ~4k Criteo rows: big enough to amortise numpy calls, small enough for cache
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_LINE_BYTES = 64 << 20
NEWLINE = 10

T = TypeVar("T")
R = TypeVar("R")


class ParseError(errors.UserError, ValueError):
    """Raw input that does not fit its layout (or is missing); the message names the file, line and field."""


@dataclasses.dataclass
class Block:
    """Whole lines of one raw file.

    Attributes:
      source: the file's path (for messages).
      data: ``uint8`` bytes of complete lines, each ending in ``\\n``.
      first_line: 1-based line number of the block's first line in ``source``.
      num_lines: lines in the block.
      truncated: the file's last line had no newline (one was appended); it is the block's last line.
      file_bytes_done: bytes of the file (compressed bytes for gzip) consumed up to the end of this block.
    """

    source: str
    data: np.ndarray
    first_line: int
    num_lines: int
    truncated: bool
    file_bytes_done: int


def list_dir(raw_dir: str, patterns: Sequence[str] = ()) -> list[str]:
    """The file names in ``raw_dir``, sorted; with ``patterns`` (``--raw_files``, shell globs) only those matching
    one, each pattern having to match something. A missing directory lists as empty (the reader then says which
    files it expected)."""
    names = sorted(os.listdir(raw_dir)) if os.path.isdir(raw_dir) else []
    if not patterns:
        return names
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ParseError(f"{raw_dir}: --raw_files={pattern} matches no file")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def ambiguous(raw_dir: str, names: Sequence[str]) -> ParseError:
    """The error for a raw directory holding two inputs of which only one can be read."""
    listed = " and ".join(names)
    return ParseError(f"{raw_dir}: both {listed}, which hold the same data; choose one with --raw_files={names[0]} "
                      f"(or move the other away)")  # fmt: skip


def is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def check_inputs(paths: Iterable[str]) -> None:
    """Fails before any work is done if an input is missing or empty."""
    for path in paths:
        if not os.path.isfile(path):
            raise ParseError(f"{path}: no such file")
        if os.path.getsize(path) == 0:
            raise ParseError(f"{path}: empty file")


def read_header(path: str) -> list[str]:
    """The comma-separated names on the first line of a CSV file, stripped of surrounding whitespace."""
    check_inputs([path])
    for block in read_blocks(path, block_bytes=1 << 16, skip_lines=0, require_rows=True):
        first = block.data[: int(np.argmax(block.data == NEWLINE))].tobytes().decode("utf-8", "replace")
        return [name.strip() for name in first.rstrip("\r").split(",")]
    raise AssertionError("unreachable: read_blocks raises on a file without lines")


def read_blocks(
    path: str, block_bytes: int = DEFAULT_BLOCK_BYTES, skip_lines: int = 0, require_rows: bool = True
) -> Iterator[Block]:
    """Blocks of whole lines of ``path`` (plain or gzip), after its first ``skip_lines`` lines (a header).

    Each block is read straight into a fresh numpy buffer behind the carried partial line (one copy of the
    data, no Python ``bytes`` concatenation): this loop runs on the main thread while blocks are parsed on
    others, so it must stay cheap.

    Raises:
      ParseError: the file is missing or empty, has no data lines after the header (``require_rows``), holds a
        line over 64 MiB, or its gzip stream is corrupt or truncated.
    """
    check_inputs([path])
    line = 1
    compressed = is_gzip(path)
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        carry = np.zeros(0, np.uint8)
        to_skip = skip_lines
        emitted = False
        while True:
            buf = np.empty(len(carry) + block_bytes, np.uint8)
            buf[: len(carry)] = carry
            try:
                got = stream.readinto(memoryview(buf)[len(carry) :])
            except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
                raise ParseError(f"{path}:{line}: corrupt or truncated gzip stream ({e})") from e
            if not got:
                break
            total = len(carry) + got
            cut = _after_last_newline(buf, total)
            if cut == 0:
                if total > _MAX_LINE_BYTES:
                    raise ParseError(f"{path}:{line}: line longer than {_MAX_LINE_BYTES} bytes")
                carry = buf[:total]
                continue
            carry, whole = buf[cut:total].copy(), buf[:cut]
            while to_skip and len(whole):
                end = int(np.argmax(whole == NEWLINE)) + 1
                whole, to_skip, line = whole[end:], to_skip - 1, line + 1
            if len(whole):
                num_lines = int(np.count_nonzero(whole == NEWLINE))
                yield Block(path, whole, line, num_lines, False, raw.tell())
                emitted = True
                line += num_lines
        if len(carry) and to_skip == 0:
            yield Block(path, np.append(carry, np.uint8(NEWLINE)), line, 1, True, raw.tell())
            emitted = True
        elif len(carry):
            to_skip -= 1
    if require_rows and not emitted:
        what = "empty file" if skip_lines == 0 or to_skip else "no data rows after the header"
        raise ParseError(f"{path}: {what}")


def _after_last_newline(buf: np.ndarray, total: int) -> int:
    """1 + the index of the last newline in ``buf[:total]``, or 0; searches backwards in growing windows."""
    window = 4096
    while True:
        lo = max(0, total - window)
        found = np.flatnonzero(buf[lo:total] == NEWLINE)
        if len(found):
            return lo + int(found[-1]) + 1
        if lo == 0:
            return 0
        window *= 4


Emit = Callable[[str], None]


def progress_for(label: str, paths: list[str], emit: Emit | None) -> "Progress | None":
    """A progress reporter over the bytes of ``paths``, or None when there is nowhere to report to."""
    return Progress(label, sum(os.path.getsize(p) for p in paths), emit) if emit else None


class Progress:
    """Logs rows done, rows/s and (when the input size is known) bytes done and ETA, every few seconds."""

    def __init__(self, label: str, total_bytes: int | None, emit: Emit, every_s: float = 5.0):
        self.label, self.total_bytes, self.every_s, self.emit = label, total_bytes, every_s, emit
        self.rows = 0
        self.start = self._last = time.monotonic()

    def update(self, rows: int, bytes_done: int | None = None) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.emit(self._line(now, bytes_done))

    def done(self) -> None:
        self.emit(self._line(time.monotonic(), self.total_bytes) + " (done)")

    def _line(self, now: float, bytes_done: int | None) -> str:
        elapsed = max(now - self.start, 1e-9)
        text = f"{self.label}: {self.rows:,} rows, {self.rows / elapsed:,.0f} rows/s, {_duration(elapsed)} elapsed"
        if self.total_bytes and bytes_done:
            frac = min(bytes_done / self.total_bytes, 1.0)
            eta = elapsed * (1 - frac) / max(frac, 1e-9)
            text += f", {frac:.1%} of {self.total_bytes / 2**20:,.0f} MiB, ETA {_duration(eta)}"
        return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{secs:02d}s" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int = 2) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` worker threads, in input order, with at most ``2 * threads`` items in
    flight (so memory stays bounded). numpy releases the GIL inside its array loops, which is where the
    parsers spend their time, so two threads use two cores."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque[concurrent.futures.Future[R]] = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How a dataset's raw files are read: the one argument every dataset's ``open_raw`` shares (see
    :class:`RawReader`).

    Attributes:
      accounting: counts the rows read and rejected (by reason) and stops at too many bad rows.
      time_split: the split needs each row's day (for Criteo's Kaggle file that costs a line-counting pass).
      threads: parser threads.
      emit: where progress lines go (None: no progress).
      tmp_dir: directory for temporary files (TaobaoAds' partitions; None: the system's).
      raw_files: glob patterns selecting input files in the raw directory (empty: the dataset's own names).
    """

    accounting: RowAccounting
    time_split: bool = False
    threads: int = 2
    emit: Emit | None = None
    tmp_dir: str | None = None
    raw_files: Sequence[str] = ()


class RawReader(Protocol):
    """A dataset module as :mod:`ctr.prepare` reads it (:mod:`ctr.data.criteo`, ``avazu``, ``taobao``).

    Attributes:
      NAME: the dataset's name (``--dataset``).
      Processing: the dataset's gin-configurable processing options (a frozen dataclass with ``min_count``).
    """

    NAME: str
    Processing: type

    def open_raw(self, raw_dir: str, *, processing: Any, options: ReadOptions) -> RawSource:
        """The raw files in ``raw_dir`` opened for one streaming pass of parsed, validated rows."""


@dataclasses.dataclass
class RawSource:
    """A dataset's raw files opened for one streaming pass (what prepare and the synthetic datasets read).

    Attributes:
      schema: the batch schema of the rows.
      rows: parsed rows, in input order, chunk by chunk; bad rows already reported to the accounting.
      estimated_rows: about how many rows to expect (sizes the prepare step's shuffle buckets).
      main_input: the accounting input whose rows become examples (read = written + rejected).
    """

    schema: schema_lib.FeatureSchema
    rows: Iterator[rows_lib.Rows]
    estimated_rows: int
    main_input: str


def stream_rows(
    paths: list[str],
    parse: Callable[[Block], tuple[R, list[Rejection]]],
    accounting: RowAccounting,
    input_name: str,
    threads: int = 2,
    skip_lines: int = 0,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: Progress | None = None,
) -> Iterator[R]:
    """``parse`` of every block of ``paths``, in order (``parse`` runs on ``threads`` threads).

    Reports every block's lines and bad rows to ``accounting`` (in file order, so the first bad row of the
    input is the one an error names) and, per parsed result (anything with a length: its rows), progress in
    bytes of all ``paths`` together.
    """
    check_inputs(paths)
    allocator.keep_freed_memory()  # parsing a block allocates dozens of large temporaries
    offsets = dict(zip(paths, np.cumsum([0] + [os.path.getsize(p) for p in paths])[:-1].tolist()))

    def blocks() -> Iterator[Block]:
        for path in paths:
            yield from read_blocks(path, block_bytes, skip_lines)

    for block, (parsed, rejections) in ordered_map(lambda b: (b, parse(b)), blocks(), threads):
        accounting.read(input_name, block.num_lines)
        accounting.reject(input_name, block.source, rejections)
        if progress is not None:
            progress.update(len(parsed), offsets[block.source] + block.file_bytes_done)
        yield parsed
    if progress is not None:
        progress.done()


def estimate_lines(paths: list[str], skip_lines: int = 0) -> int:
    """About how many lines ``paths`` hold, from the line density of the first 4 MiB of the first file."""
    for block in read_blocks(paths[0], 4 << 20, skip_lines):
        per_byte = block.num_lines / max(block.file_bytes_done, 1)
        return max(1, int(per_byte * sum(os.path.getsize(p) for p in paths)))
    return 1


def count_lines(path: str) -> int:
    """Lines of a raw file (plain or gzip), streaming."""
    return sum(block.num_lines for block in read_blocks(path, 16 << 20, require_rows=False))
