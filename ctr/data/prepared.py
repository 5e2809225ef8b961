"""The input pipeline over prepared data: memory-mapped fixed-width numpy shards, gathered into host batches.

A prepared directory (written by :mod:`ctr.prepare`) holds ``metadata.json`` and, per split, shards of
row-major arrays (``<split>/<k>.<array>.npy``: ``label [n]``, ``dense [n, d]``, ``ids [n, f]``, ``seq [n, s, L]``,
``seq_len [n]``, ``group [n]``; see :mod:`ctr.data.rows`). :func:`prepared` opens them with ``np.load(...,
mmap_mode="r")`` and serves the trainer's :class:`~ctr.data.dataset.Dataset` interface:

- The training order is :func:`ctr.data.dataset.train_rows`: a pure function of (seed, step), so resuming at a
  step is exact, and each host computes the same global batches and takes only its slice.
- A host batch is gathered row-wise, never parsed: this host's row indices are sorted (so reads go forward
  through the files), split by shard, taken with ``np.take`` (one contiguous read per row per array) and
  turned into the batch layout by one transpose of the id matrix. No per-example work, no TensorFlow.
- Each host reads only its rows: the page cache pages in what ``np.take`` touches and nothing else.

Why not TFRecord: the same batch-first TFRecord parse runs at ~0.3M examples/s on 2 cores (PLATFORM.md), the
gather at several M/s (docs/DATASETS.md has the measurements). Random row access needs the shards in page
cache or on local SSD; ``block_rows > 1`` permutes contiguous blocks of the (once-shuffled) split instead, for
data on slower storage.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Iterator

import gin
import numpy as np

from ctr import errors, paths
from ctr.data import allocator
from ctr.data import dataset as dataset_lib
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import splits as splits_lib
from ctr.data import vocab as vocab_lib

METADATA = "metadata.json"
ACCOUNTING = "accounting.json"
FORMAT_VERSION = 1


def schema_from_json(info: dict) -> schema_lib.FeatureSchema:
    return schema_lib.FeatureSchema(
        name=info["name"],
        dense=tuple(info["dense"]),
        categorical=tuple(info["categorical"]),
        sequences=tuple(schema_lib.SequenceFeature(**s) for s in info["sequences"]),
        group_key=info["group_key"],
    )


def schema_to_json(schema: schema_lib.FeatureSchema) -> dict:
    return {
        "name": schema.name,
        "dense": list(schema.dense),
        "categorical": list(schema.categorical),
        "sequences": [{"name": s.name, "item_feature": s.item_feature, "max_len": s.max_len} for s in schema.sequences],
        "group_key": schema.group_key,
    }


class NotPrepared(errors.UserError, FileNotFoundError):
    """A data directory that is not (or not completely) a prepared dataset."""


def read_metadata(data_dir: str) -> dict:
    """``metadata.json`` of a prepared dataset.

    Raises:
      NotPrepared: ``data_dir`` has no (readable) ``metadata.json``, or one of another format version; the
        message names the directory and the binding that points at it.
    """
    path = paths.join(data_dir, METADATA)
    where = "prepared.data_dir / DATA_DIR"
    if not paths.exists(path):
        what = "no such directory" if not paths.is_dir(data_dir) else f"no {METADATA}"
        raise NotPrepared(f"{data_dir}: not a prepared dataset ({what}; check {where}, or run ctr.prepare first)")
    try:
        metadata = json.loads(paths.read_text(path))
    except (OSError, ValueError) as e:
        raise NotPrepared(f"{path}: unreadable ({errors.one_line(e, 120)}); prepare the dataset again") from e
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        version = metadata.get("format_version") if isinstance(metadata, dict) else None
        raise NotPrepared(f"{path}: format version {version}, expected {FORMAT_VERSION} (prepare the dataset again)")
    return metadata


def load_array(path: str) -> np.ndarray:
    """A stored ``.npy``: memory-mapped from a local disk; read whole into memory from an object store, which
    cannot be mapped (one request per file, streamed)."""
    if paths.is_remote(path):
        return np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False)
    return np.load(path, mmap_mode="r")


class _Split:
    """One split's shards (memory-mapped, or in memory from an object store), addressed by a global row index."""

    def __init__(self, data_dir: str, shards: list[dict], arrays: list[str]):
        self.arrays = arrays
        self.shards = [
            {name: load_array(paths.join(data_dir, f"{s['path']}.{name}.npy")) for name in arrays} for s in shards
        ]
        sizes = [s["rows"] for s in shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self.offsets[-1])

    def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays at ``rows`` (sorted ascending), each ``[len(rows), ...]``."""
        bounds = np.searchsorted(rows, self.offsets)
        out = {}
        for name in self.arrays:
            first = self.shards[0][name]
            out[name] = np.empty((len(rows),) + first.shape[1:], first.dtype)
        for k in np.flatnonzero(np.diff(bounds)):
            lo, hi = bounds[k], bounds[k + 1]
            local = rows[lo:hi] - self.offsets[k]
            for name in self.arrays:
                np.take(self.shards[k][name], local, axis=0, out=out[name][lo:hi], mode="clip")  # clip: no buffering
        return out


class PreparedDataset:
    """A prepared dataset behind the trainer's Dataset interface (see the module docstring).

    Attributes:
      schema: the batch schema.
      metadata: the prepared directory's ``metadata.json``.
      host_shards: each host reads only the train shards it owns (see :func:`prepared`).
      opened: the shard files this process has opened (``<split>/<k>.<array>.npy``), in order.
    """

    def __init__(self, data_dir: str, block_rows: int = 1, host_shards: bool = False, stage_dir: str | None = None):
        allocator.keep_freed_memory()  # every batch allocates MBs of arrays (see ctr.data.allocator)
        self.data_dir = data_dir
        self.metadata = read_metadata(data_dir)
        self.schema = schema_from_json(self.metadata["schema"])
        self.block_rows = block_rows
        self.host_shards = host_shards
        self.stage_dir = stage_dir
        self.opened: list[str] = []
        self._splits: dict[tuple[str, tuple[int, ...] | None], _Split] = {}

    def _split(self, name: str, owned: tuple[int, ...] | None = None) -> _Split:
        """The split's shards (``owned``: only those), opened on first use, so a host never opens the train
        shards it does not own (and an object store is never asked for them)."""
        if (name, owned) not in self._splits:
            shards = self.metadata["splits"][name]["shards"]
            chosen = shards if owned is None else [shards[k] for k in owned]
            files = [f"{s['path']}.{a}.npy" for s in chosen for a in self.metadata["arrays"]]
            self.opened += files
            source = self.data_dir
            if self.stage_dir is not None:
                _stage(self.data_dir, self.stage_dir, files)
                source = self.stage_dir
            self._splits[name, owned] = _Split(source, chosen, self.metadata["arrays"])
        return self._splits[name, owned]

    def num_rows(self, split: str) -> int:
        return int(self.metadata["splits"][split]["rows"])

    def _host_rows(self, process_count: int) -> tuple[list[list[int]], list[int]]:
        """(shards each host owns, rows each host owns) of the train split."""
        shard_rows = [s["rows"] for s in self.metadata["splits"][splits_lib.TRAIN]["shards"]]
        owned = dataset_lib.assign_shards(shard_rows, process_count)
        return owned, [sum(shard_rows[k] for k in o) for o in owned]

    def steps_per_epoch(self, global_batch: int, process_count: int = 1) -> int:
        if self.host_shards:
            return dataset_lib.host_steps_per_epoch(self._host_rows(process_count)[1], global_batch)
        return dataset_lib.steps_per_epoch(self.num_rows(splits_lib.TRAIN), global_batch)

    def train_batches(
        self, global_batch: int, start_step: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[rows_lib.Batch]:
        """This host's part of every global training batch from ``start_step`` on, forever (see
        :func:`ctr.data.dataset.train_rows`, or :func:`~ctr.data.dataset.host_train_rows` with
        ``host_shards``). Rows within a host batch come in file order."""
        if self.host_shards:
            owned, host_rows = self._host_rows(process_count)
            data = self._split(splits_lib.TRAIN, tuple(owned[process_index]))
            unread = host_rows[process_index] - dataset_lib.host_steps_per_epoch(host_rows, global_batch) * (
                global_batch // process_count)
            logging.info("host %d of %d reads train shards %s (%d rows; %d of them unread in each epoch)",
                         process_index, process_count, owned[process_index], host_rows[process_index], unread)
            order = dataset_lib.host_train_rows(host_rows, global_batch, start_step, seed, process_index,
                                                self.block_rows)
        else:
            data = self._split(splits_lib.TRAIN)
            order = dataset_lib.train_rows(
                data.num_rows, global_batch, start_step, seed, process_index, process_count, self.block_rows
            )
        for rows in order:
            yield rows_lib.to_batch(self.schema, data.read(np.sort(rows)))

    def eval_batches(
        self, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[rows_lib.Batch, int]]:
        """The whole ``split`` in order, as (host batch, number of real rows); the last batch is padded with
        row 0 to keep every batch ``batch_size // process_count`` rows. Every host opens the whole split (eval
        splits are small next to train), and reads only its slices."""
        data = self._split(split)
        for rows, real in dataset_lib.eval_rows(self.num_rows(split), batch_size, process_index, process_count):
            arrays = data.read(rows[:real])  # ascending
            if real < len(rows):
                padding = data.read(rows[real:])  # all row 0
                arrays = {name: np.concatenate([arrays[name], padding[name]]) for name in arrays}
            yield rows_lib.to_batch(self.schema, arrays), real


def _stage(data_dir: str, stage_dir: str, files: list[str]) -> None:
    """Copies ``files`` of a prepared directory to a local ``stage_dir`` (skipping those already there at the
    same size, so a restarted job copies only what is missing); each lands through a ``.partial`` name."""
    copied = 0
    for name in files:
        source, target = paths.resolve(paths.join(data_dir, name)), os.path.join(stage_dir, name)
        if os.path.exists(target) and os.path.getsize(target) == source.stat().length:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        paths.copy_file(source, target + ".partial")
        os.replace(target + ".partial", target)
        copied += 1
    logging.info("staged %d of %d shard files from %s to %s", copied, len(files), data_dir, stage_dir)


@gin.configurable
def prepared(
    data_dir: str = gin.REQUIRED, block_rows: int = 1, host_shards: bool = False, stage_dir: str | None = None
) -> PreparedDataset:
    """The prepared dataset in ``data_dir`` (written by ``ctr.prepare``; a local path or a ``gs://`` URI).

    Args:
      data_dir: the prepare step's ``--out_dir``.
      block_rows: 1 = each epoch is an exact permutation of the train rows; >1 = a permutation of blocks of
        that many consecutive rows (the split was shuffled once at prepare time), for storage where random
        reads are slow.
      host_shards: False = every host reads rows of one global order of the whole train split (the order does
        not depend on the host count; every host needs every shard). True = each host reads only the train
        shards it owns, balanced by rows, and shuffles within them (for a split too large for one host's disk,
        or on an object store); the order then depends on the host count, and with one host it is the same as
        False. Resuming mid-epoch on another host count is refused (see ``docs/TPU.md``).
      stage_dir: a local directory (a TPU VM's disk) to copy the shards this host reads to before reading
        them memory-mapped from there. Without it, shards on an object store are read whole into memory.
    """
    return PreparedDataset(data_dir, block_rows, host_shards, stage_dir)


@gin.configurable
def vocabularies(data_dir: str = gin.REQUIRED, tfds_name: str | None = None,
                 features: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """The kept values (sorted int64 fingerprints) of every embedded feature of a prepared dataset, for
    ``PerFeature.vocabularies = @vocabularies()``: one row per kept value plus an OOV row, no collisions.
    Keys are the features that own an embedding (categorical features and sequences with their own ids), or
    only ``features`` (those the family serves, when families are mixed per feature).

    With ``tfds_name`` (``ctr_<dataset>/<config>``, as ``tfds_dataset.name``) ``data_dir`` is the TFDS data
    directory of a ``--format=tfds`` build, which keeps the same values next to its shards.

    Raises:
      errors.ConfigError: ``features`` names a feature without a vocabulary.
    """
    if tfds_name is not None:
        from ctr.data import tfds_input  # TFDS only where asked for

        kept, schema = tfds_input.vocabulary(tfds_name, data_dir)
    else:
        metadata = read_metadata(data_dir)
        if not metadata.get("vocab"):
            raise ValueError(f"{data_dir} was prepared without a vocabulary (set the dataset's Processing.min_count)")
        kept = vocab_lib.Vocabulary.load(data_dir).kept
        schema = schema_from_json(metadata["schema"])
    out = {key: kept[name] for key, name in vocab_lib.vocab_features(schema).items()
           if not any(s.name == key and s.item_feature for s in schema.sequences)}  # fmt: skip
    if features is None:
        return out
    unknown = sorted(set(features) - set(out))
    if unknown:
        raise errors.ConfigError(
            f"vocabularies.features: {unknown} have no vocabulary in {data_dir} (have {sorted(out)})")
    return {key: out[key] for key in features}
