"""Datasets as the trainer sees them: named splits of host arrays and a resumable batch order.

:class:`Dataset` is the trainer's contract; :class:`InMemoryDataset` holds each split as a dict of numpy arrays
in the batch layout of :mod:`ctr.data.schema` (the synthetic datasets of :mod:`ctr.data.synthetic` are
in-memory ones). The training order is a pure function of (seed, step): epoch ``e`` visits the rows in
``permutation(seed, e)``, global batch ``b`` of that epoch is rows ``[b*B, (b+1)*B)`` of it and the last partial
batch is dropped. So the input position is just the step number, which the checkpoint already holds, and a
resumed run reads exactly the examples an uninterrupted run would. In a multi-host job every host computes the
same global batch indices and takes its own contiguous ``B / num_processes`` slice of them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Protocol

import numpy as np

from ctr import errors
from ctr.data import schema as schema_lib
from ctr.data.splits import TEST, TRAIN, VALID

Batch = dict[str, np.ndarray]


class Dataset(Protocol):
    """What the trainer consumes: a schema, named splits and a resumable batch order (see the module docstring).

    Host batches are dicts of numpy arrays in the batch layout of :mod:`ctr.data.schema` (``label [b]``,
    ``dense [b, n_dense]``, one ``[b]`` int64 fingerprint array per categorical feature, ``[b, L]`` per sequence
    with its ``[b, L]`` bool mask, ``group [b]``), ``b`` being this host's rows of the global batch.
    Implementations: :class:`InMemoryDataset` (synthetic data, tests) and
    :class:`ctr.data.prepared.PreparedDataset` (memory-mapped prepared shards).
    """

    schema: schema_lib.FeatureSchema
    # True when the training order depends on the host count (each host reading only the shards it owns:
    # ``prepared.host_shards``); a resume on another host count is then allowed at epoch boundaries only.
    host_shards: bool

    def num_rows(self, split: str) -> int:
        """Examples in ``split`` (``"train"``, ``"valid"`` or ``"test"``)."""

    def steps_per_epoch(self, global_batch: int, process_count: int = 1) -> int:
        """Whole global batches in one pass over the train split (the last partial batch is dropped), on
        ``process_count`` hosts."""

    def train_batches(self, global_batch: int, start_step: int, seed: int, process_index: int = 0,
                      process_count: int = 1) -> Iterator[Batch]:  # fmt: skip
        """This host's ``global_batch // process_count`` rows of every global training batch from ``start_step``
        on, forever, in an order that is a pure function of (seed, step): :func:`train_rows`."""

    def eval_batches(self, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1) -> Iterator[tuple[Batch, int]]:  # fmt: skip
        """The whole ``split`` in order as (host batch of ``batch_size // process_count`` rows, number of real
        rows) pairs: the last batch is padded by repeating row 0 (:func:`eval_rows`)."""


@dataclasses.dataclass
class InMemoryDataset:
    """Parsed splits of one dataset, in host memory (a :class:`Dataset`)."""

    schema: schema_lib.FeatureSchema
    splits: dict[str, Batch]
    host_shards = False

    def num_rows(self, split: str) -> int:
        return len(self.splits[split][schema_lib.LABEL])

    def steps_per_epoch(self, global_batch: int, process_count: int = 1) -> int:
        return steps_per_epoch(self.num_rows(TRAIN), global_batch)

    def train_batches(
        self,
        global_batch: int,
        start_step: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Iterator[Batch]:
        """This host's part of every global training batch from ``start_step`` on, forever.

        Args:
          global_batch: examples per step over all hosts; divisible by ``process_count``.
          start_step: the first step to produce (the restored step when resuming).
          seed: shuffling seed.
          process_index, process_count: this host's slice of each global batch.

        Yields:
          Host batches of ``global_batch // process_count`` rows.
        """
        data = self.splits[TRAIN]
        for rows in train_rows(self.num_rows(TRAIN), global_batch, start_step, seed, process_index, process_count):
            yield {key: value[rows] for key, value in data.items()}

    def eval_batches(
        self, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[Batch, int]]:
        """The whole ``split`` in order, as (host batch, number of real rows) pairs.

        Every batch has exactly ``batch_size // process_count`` rows per host so that one compiled eval step
        serves them all; the last one is padded by repeating row 0 and the count says how many rows are real.
        """
        data = self.splits[split]
        for rows, real in eval_rows(self.num_rows(split), batch_size, process_index, process_count):
            yield {key: value[rows] for key, value in data.items()}, real


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    steps = num_rows // global_batch
    if steps == 0:
        raise ValueError(f"train split has {num_rows} rows, fewer than one global batch of {global_batch}")
    return steps


def train_rows(
    num_rows: int,
    global_batch: int,
    start_step: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    block_rows: int = 1,
) -> Iterator[np.ndarray]:
    """The train-split rows of this host's part of every global batch from ``start_step`` on, forever.

    Epoch ``e`` visits the rows in :func:`epoch_order` ``(num_rows, seed, e, block_rows)``; global batch ``b``
    of an epoch is positions ``[b*B, (b+1)*B)`` of that order (the last partial batch is dropped) and host
    ``p`` takes its contiguous ``B / process_count`` slice. A pure function of (seed, step): resuming at a
    step reproduces the uninterrupted run.
    """
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    steps = steps_per_epoch(num_rows, global_batch)
    step = start_step
    while True:
        epoch, index = divmod(step, steps)
        order = epoch_order(num_rows, seed, epoch, block_rows)
        while index < steps:
            begin = index * global_batch + process_index * local
            yield order[begin : begin + local]
            index += 1
            step += 1


def eval_rows(
    num_rows: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[tuple[np.ndarray, int]]:
    """(rows, number of real rows) of this host's part of each eval batch over a whole split, in order; the
    last batch is padded with row 0."""
    local = batch_size // process_count
    for begin in range(0, num_rows, batch_size):
        rows = np.arange(begin + process_index * local, begin + (process_index + 1) * local)
        real = int(np.clip(num_rows - rows[0], 0, local))
        yield np.where(rows < num_rows, rows, 0), real


def epoch_order(num_rows: int, seed: int, epoch: int, block_rows: int = 1, stream: tuple[int, ...] = ()) -> np.ndarray:
    """The row order of one epoch: a permutation drawn from (seed, epoch, *stream).

    With ``block_rows > 1`` it permutes blocks of ``block_rows`` consecutive rows instead (rows within a
    block stay together and in order): a prepared split is already shuffled once, so this keeps batches
    random while reading contiguous runs. ``stream`` tells apart orders drawn for different hosts.
    """
    rng = np.random.default_rng([seed, epoch, *stream])
    if block_rows == 1:
        return rng.permutation(num_rows)
    blocks = rng.permutation(-(-num_rows // block_rows))
    order = (blocks[:, None] * block_rows + np.arange(block_rows)).reshape(-1)
    return order[order < num_rows]


def split_random(batch: Batch, fractions: tuple[float, float, float], seed: int) -> dict[str, Batch]:
    """Random train/valid/test split of one batch by ``fractions`` (they must sum to 1)."""
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {fractions} do not sum to 1")
    n = len(batch[schema_lib.LABEL])
    order = np.random.default_rng(seed).permutation(n)
    cut1 = int(round(n * fractions[0]))
    cut2 = cut1 + int(round(n * fractions[1]))
    parts = {TRAIN: order[:cut1], VALID: order[cut1:cut2], TEST: order[cut2:]}
    return {name: {k: v[np.sort(rows)] for k, v in batch.items()} for name, rows in parts.items()}


def assign_shards(shard_rows: list[int], process_count: int) -> list[list[int]]:
    """The shards (indices, ascending) each of ``process_count`` hosts owns when every host reads only its own.

    Largest shard first, each to the host with the fewest rows so far (ties: the lower host), so the hosts'
    row counts differ by at most one shard's rows. A pure function of the shard sizes and the host count.

    Raises:
      errors.ConfigError: fewer shards than hosts (some host would own nothing).
    """
    if len(shard_rows) < process_count:
        raise errors.ConfigError(f"{len(shard_rows)} train shards cannot be spread over {process_count} hosts: "
                                 "prepare the data again with more shards (a smaller --shard_mib), or read the "
                                 "whole split on every host (prepared.host_shards=False)")
    owned: list[list[int]] = [[] for _ in range(process_count)]
    totals = [0] * process_count
    for k in sorted(range(len(shard_rows)), key=lambda k: (-shard_rows[k], k)):
        host = min(range(process_count), key=lambda p: (totals[p], p))
        owned[host].append(k)
        totals[host] += shard_rows[k]
    return [sorted(o) for o in owned]


def host_steps_per_epoch(host_rows: list[int], global_batch: int) -> int:
    """Steps in one epoch when host ``p`` reads only its own ``host_rows[p]`` rows: until the host with the
    fewest rows has used them up (every host contributes ``global_batch / len(host_rows)`` rows a step)."""
    local = global_batch // len(host_rows)
    steps = min(n // local for n in host_rows)
    if steps < 1:
        raise errors.ConfigError(f"a host owns only {min(host_rows)} train rows, fewer than its {local} rows of a "
                                 f"global batch of {global_batch}")
    return steps


def host_train_rows(
    host_rows: list[int],
    global_batch: int,
    start_step: int,
    seed: int,
    process_index: int = 0,
    block_rows: int = 1,
) -> Iterator[np.ndarray]:
    """Rows (indices into this host's own rows) of this host's part of every global batch, when each host reads
    only the shards it owns (:func:`assign_shards`).

    Epoch ``e`` on host ``p`` of ``P`` visits its rows in :func:`epoch_order` ``(host_rows[p], seed, e,
    block_rows, stream=(P, p))``, ``B / P`` rows a step, for :func:`host_steps_per_epoch` steps; a host with
    more rows than that leaves its last rows of each epoch's order unread (other rows every epoch). A pure
    function of (seed, step, host count): resume is exact. With one host it is :func:`train_rows` exactly.
    """
    process_count = len(host_rows)
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    steps = host_steps_per_epoch(host_rows, global_batch)
    stream = () if process_count == 1 else (process_count, process_index)
    step = start_step
    while True:
        epoch, index = divmod(step, steps)
        order = epoch_order(host_rows[process_index], seed, epoch, block_rows, stream)
        while index < steps:
            yield order[index * local : (index + 1) * local]
            index += 1
            step += 1


def check_resume_host_count(step: int, steps_per_epoch: int, saved: int | None, current: int) -> None:
    """A run whose data order depends on the host count may resume on another count only at an epoch boundary:
    mid-epoch, the new hosts' shards would repeat some of the epoch's examples and skip others.

    Raises:
      errors.ConfigError: mid-epoch, on a host count other than the one that wrote the checkpoint.
    """
    if saved is not None and saved != current and step % steps_per_epoch:
        raise errors.ConfigError(
            f"the checkpoint at step {step} was written by {saved} hosts, this job has {current}, and with "
            f"prepared.host_shards=True the data order depends on the host count: resume on {saved} hosts, or "
            f"from a checkpoint at an epoch boundary (a multiple of {steps_per_epoch} steps)")


def probe_split(dataset: Dataset) -> str:
    """The split to take shape probes from (state initialisation, export): an evaluation split when one has
    rows, since every host reads those anyway, so a host that reads only its own train shards
    (``prepared.host_shards``) opens no other host's."""
    return next((name for name in (VALID, TEST) if dataset.num_rows(name)), TRAIN)
