"""Datasets as the trainer sees them: named splits of host arrays and a resumable batch order.

A :class:`Dataset` holds each split as a dict of numpy arrays in the batch layout of
:mod:`ctr.data.schema`. The training order is a pure function of (seed, step): epoch ``e`` visits the rows in
``permutation(seed, e)``, global batch ``b`` of that epoch is rows ``[b*B, (b+1)*B)`` of it and the last partial
batch is dropped. So the input position is just the step number, which the checkpoint already holds, and a
resumed run reads exactly the examples an uninterrupted run would. In a multi-host job every host computes the
same global batch indices and takes its own contiguous ``B / num_processes`` slice of them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Iterator

import gin
import numpy as np

from ctr.data import criteo
from ctr.data import schema as schema_lib

Batch = dict[str, np.ndarray]
TRAIN, VALID, TEST = "train", "valid", "test"


@dataclasses.dataclass
class Dataset:
    """Parsed splits of one dataset, in host memory."""

    schema: schema_lib.FeatureSchema
    splits: dict[str, Batch]

    def num_rows(self, split: str) -> int:
        return len(self.splits[split][schema_lib.LABEL])

    def steps_per_epoch(self, global_batch: int) -> int:
        steps = self.num_rows(TRAIN) // global_batch
        if steps == 0:
            raise ValueError(
                f"train split has {self.num_rows(TRAIN)} rows, fewer than one global batch of {global_batch}"
            )
        return steps

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
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        local = global_batch // process_count
        steps = self.steps_per_epoch(global_batch)
        data = self.splits[TRAIN]
        step = start_step
        while True:
            epoch, index = divmod(step, steps)
            order = _epoch_order(self.num_rows(TRAIN), seed, epoch)
            while index < steps:
                begin = index * global_batch + process_index * local
                rows = order[begin : begin + local]
                yield {key: value[rows] for key, value in data.items()}
                index += 1
                step += 1

    def eval_batches(self, split: str, batch_size: int, process_index: int = 0, process_count: int = 1):
        """The whole ``split`` in order, as (host batch, number of real rows) pairs.

        Every batch has exactly ``batch_size // process_count`` rows per host so that one compiled eval step
        serves them all; the last one is padded by repeating row 0 and the count says how many rows are real.
        """
        data = self.splits[split]
        n = self.num_rows(split)
        local = batch_size // process_count
        for begin in range(0, n, batch_size):
            rows = np.arange(begin + process_index * local, begin + (process_index + 1) * local)
            real = int(np.clip(n - rows[0], 0, local))
            rows = np.where(rows < n, rows, 0)
            yield {key: value[rows] for key, value in data.items()}, real


def _epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


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


@gin.configurable
def synthetic_criteo(
    data_dir: str = gin.REQUIRED,
    num_rows: int = 400_000,
    seed: int = 0,
    int_buckets: bool = False,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> Dataset:
    """The built-in synthetic dataset in the raw Criteo layout (see :func:`ctr.data.criteo.write_synthetic`).

    The raw file is generated once into ``data_dir`` (reused when present), parsed by the real Criteo parser
    and split at random 8:1:1.

    Args:
      data_dir: directory for the generated ``train.txt`` (relative paths are taken from the run directory).
      num_rows: rows to generate.
      seed: generator and split seed.
      int_buckets: also use the integer columns as bucketised categorical features.
      split_fractions: train/valid/test fractions.
    """
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, f"criteo_synthetic_{num_rows}_{seed}.txt")
    if not os.path.exists(path):
        logging.info("generating %d synthetic Criteo rows into %s", num_rows, path)
        tmp = path + ".partial"
        criteo.write_synthetic(tmp, num_rows, seed=seed)
        os.replace(tmp, path)
    return Dataset(
        schema=criteo.feature_schema(int_buckets=int_buckets),
        splits=split_random(read_criteo_file(path, int_buckets=int_buckets), split_fractions, seed),
    )


def read_criteo_file(path: str, int_buckets: bool = False, lines_per_chunk: int = 262_144) -> Batch:
    """Parses a whole raw Criteo file into one host batch (chunked, so memory stays ~2x the result)."""
    import tensorflow as tf  # heavy import, only where raw files are parsed

    parts = []
    line_no = 1
    for chunk in tf.data.TextLineDataset(path).batch(lines_per_chunk):
        parts.append(criteo.parse_lines(chunk, source=path, first_line=line_no, int_buckets=int_buckets))
        line_no += int(chunk.shape[0])
    if not parts:
        raise ValueError(f"{path}: empty file")
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
