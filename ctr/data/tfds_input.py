"""Training from a TFDS-built dataset (``ctr_criteo``, ``ctr_avazu``, ``ctr_taobao``): ``train.dataset_fn = @tfds_dataset``.

The dataset is read through ``tfds.data_source`` (ArrayRecord, random access) behind the trainer's Dataset
interface, with the numpy shards' order rule (:func:`ctr.data.dataset.train_rows`): the training order is a
pure function of (seed, step), so resume is exact and every host reads only its slice of each global batch. As
TFDS index ``i`` of a split is prepared row ``i`` (:mod:`ctr.data.tfds_builders`), a run reads the very batches
it would read from the numpy shards of the same build.

Decoding is batch-first: a host batch's records are read in one ``__getitems__`` (sorted indices, as the
numpy path gathers) and parsed together by one ``tf.io.parse_example`` into ``[B]`` / ``[B, d]`` arrays, never
example by example. Only the keys the batch needs are parsed (the sequences' masks come from
``history_length``).

Before any batch, the stored dataset is checked against what this code and the config expect: the builder
version, the ctr metadata format, the features (names, shapes, dtypes) against the ones the builder declares for
the stored schema, and any ``processing`` values the config names; a mismatch is one error naming both sides.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import gin
import numpy as np

from ctr import errors, tf_import
from ctr.data import allocator
from ctr.data import dataset as dataset_lib
from ctr.data import prepared as prepared_lib
from ctr.data import rows as rows_lib
from ctr.data import schema as schema_lib
from ctr.data import splits as splits_lib
from ctr.data import vocab as vocab_lib


class NotBuilt(errors.UserError, FileNotFoundError):
    """No (complete) TFDS dataset of that name in that data directory."""


class Mismatch(errors.UserError, ValueError):
    """The stored TFDS dataset is not the one the config (or this code) expects."""


def _parse_spec(features: Any, keys: list[str]) -> dict:
    tf = tf_import.tensorflow()

    spec = {}
    for key in keys:
        info = features[key].get_tensor_info()
        dtype = tf.float32 if np.issubdtype(np.dtype(info.np_dtype), np.floating) else tf.int64  # ints, bools
        spec[key] = tf.io.FixedLenFeature(info.shape, dtype)
    return spec


def _describe(features: Any) -> dict[str, tuple]:
    """``{key: (shape, dtype)}`` of a TFDS FeaturesDict."""
    return {k: (tuple(v.shape), np.dtype(v.np_dtype).name) for k, v in features.get_tensor_info().items()}


def _open(name: str, data_dir: str | None, version: str | None, arg: str = "tfds_dataset") -> tuple[Any, dict]:
    """(builder read from the dataset's directory, its ``metadata["ctr"]``) of a complete build whose builder
    version and ctr metadata format are the expected ones."""
    tf_import.tensorflow()  # TF without its CUDA-probe noise, before TFDS imports it
    import tensorflow_datasets as tfds

    from ctr.data import tfds_builders

    where = f"{arg}: name={name!r}, data_dir={data_dir!r}"
    build = (f"build it with `bazel run //ctr:prepare -- --format=tfds --dataset=... --raw_dir=... "
             f"--out_dir={data_dir or '<data_dir>'}`")  # fmt: skip
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises ValueError, DatasetNotFoundError, ... with long texts
        raise NotBuilt(f"{where}: no such TFDS dataset ({errors.one_line(e, 300)}); {build}") from e
    if not builder.is_prepared():
        raise NotBuilt(f"{where}: {builder.data_dir} is not built; {build}")
    # What is on disk (features.json, dataset_info.json), not what the registered builder code declares.
    path = os.fspath(builder.data_dir)
    builder = tfds.builder_from_directory(path)
    info = builder.info
    expected_version = version or tfds_builders.BUILDER_VERSION
    if str(info.version) != expected_version:
        raise Mismatch(f"{path}: builder version {info.version}, the config expects {expected_version} "
                       f"(tfds_dataset.version); rebuild it, or pin the version in tfds_dataset.name")  # fmt: skip
    meta = dict(info.metadata or {}).get("ctr")
    if not isinstance(meta, dict) or meta.get("format_version") != tfds_builders.FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else None
        raise Mismatch(f"{path}: ctr metadata format {got}, expected {tfds_builders.FORMAT_VERSION} "
                       "(not built by ctr.data.tfds_builders, or by another version; rebuild it)")  # fmt: skip
    return builder, meta


def vocabulary(name: str, data_dir: str | None) -> tuple[dict[str, np.ndarray], schema_lib.FeatureSchema]:
    """(vocabulary name -> sorted int64 kept values, schema) of a TFDS build, as ``ctr.prepare`` kept them (the
    build copies its ``vocab/`` into the version folder); for ``vocabularies(tfds_name=...)``.

    Raises:
      NotBuilt, Mismatch: as :func:`tfds_dataset`; ValueError: built without a vocabulary.
    """
    from ctr.data import tfds_builders

    builder, meta = _open(name, data_dir, None, arg="vocabularies")
    folder = f"{builder.data_dir}/{tfds_builders.VOCAB_DIR}"
    if not meta.get("vocab"):
        raise ValueError(f"{builder.data_dir} was built without a vocabulary (set the dataset's Processing.min_count)")
    try:
        kept = vocab_lib.Vocabulary.load(str(builder.data_dir)).kept  # the build's copy of prepare's vocab/
    except OSError as e:
        raise NotBuilt(f"{folder}: {e} (built before builds kept their vocabulary; rebuild it)") from e
    except ValueError as e:
        raise Mismatch(f"{e}; rebuild it") from e
    for v, values in kept.items():
        if len(values) + 1 != meta["vocab"]["sizes"].get(v):
            raise Mismatch(f"{folder}/{v}.npy: {len(values)} kept values, the dataset's metadata says "
                           f"{meta['vocab']['sizes'].get(v)} rows (kept + OOV); rebuild it")  # fmt: skip
    return kept, prepared_lib.schema_from_json(meta["schema"])


class TfdsDataset:
    """A TFDS-built ctr dataset behind the trainer's Dataset interface (see the module docstring).

    Attributes:
      schema: the batch schema (from the dataset's metadata).
      metadata: the dataset's ``metadata["ctr"]`` (options, row accounting, schema).
      data_dir: the builder's directory (for messages).
    """

    def __init__(self, name: str, data_dir: str | None, split_names: dict[str, str], version: str | None,
                 processing: dict[str, Any] | None):  # fmt: skip
        tf_import.tensorflow()  # TF without its CUDA-probe noise, before TFDS imports it
        import tensorflow_datasets as tfds

        from ctr.data import tfds_builders, tfds_features

        allocator.keep_freed_memory()
        builder, meta = _open(name, data_dir, version)
        info = builder.info
        self.data_dir = os.fspath(builder.data_dir)
        self.metadata = meta
        self.schema = prepared_lib.schema_from_json(meta["schema"])
        vocab = bool(meta.get("vocab"))
        stored = _describe(info.features)
        declared = _describe(tfds_features.features_for(self.schema, vocab))
        if stored != declared:
            diff = sorted(
                f"{k}: stored {stored.get(k, 'absent')}, expected {declared.get(k, 'absent')}"
                for k in set(stored) | set(declared) if stored.get(k) != declared.get(k)
            )  # fmt: skip
            raise Mismatch(f"{self.data_dir}: features do not match the {self.schema.name} schema this code reads "
                           f"({'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''}); rebuild the dataset")  # fmt: skip
        for key, value in (processing or {}).items():
            if key not in meta["processing"]:
                raise Mismatch(f"tfds_dataset.processing: {key!r} is not a {self.schema.name} Processing field "
                               f"({', '.join(sorted(meta['processing']))})")  # fmt: skip
            if meta["processing"][key] != value:
                raise Mismatch(f"{self.data_dir}: built with {self.schema.name}.Processing.{key} = "
                               f"{meta['processing'][key]!r}, the config expects {value!r} (tfds_dataset.processing)")
        if meta["valid_is_test"]:
            split_names = dict(split_names)
            if split_names[splits_lib.VALID] == tfds_builders.SPLIT_NAMES[splits_lib.VALID]:
                split_names[splits_lib.VALID] = split_names[splits_lib.TEST]
        self._sources = {}
        for ours, theirs in split_names.items():
            try:
                self._sources[ours] = builder.as_data_source(
                    split=theirs, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
                ).data_source  # the ArrayRecord reader itself: bytes out, no per-record Python wrapper
            except Exception as e:
                raise NotBuilt(f"{self.data_dir}: split {theirs!r} (tfds_dataset.{ours}_split): "
                               f"{errors.one_line(e, 200)} (splits: {', '.join(info.splits)})") from e  # fmt: skip
        keys = [schema_lib.LABEL] + ([schema_lib.DENSE] if self.schema.dense else []) + list(self.schema.categorical)
        keys += [s.name for s in self.schema.sequences]
        keys += [tfds_builders.HISTORY_LENGTH] if self.schema.sequences else []
        keys += [schema_lib.GROUP] if self.schema.group_key is not None else []
        self._spec = _parse_spec(info.features, keys)

    def num_rows(self, split: str) -> int:
        return len(self._sources[split])

    host_shards = False  # every host reads rows of one global order (the numpy shards' default)

    def steps_per_epoch(self, global_batch: int, process_count: int = 1) -> int:
        return dataset_lib.steps_per_epoch(self.num_rows(splits_lib.TRAIN), global_batch)

    def read(self, split: str, rows: np.ndarray) -> rows_lib.Batch:
        """The examples at ``rows`` of ``split`` in the batch layout of :mod:`ctr.data.schema`: one read of the
        records, one ``tf.io.parse_example`` over all of them."""
        tf = tf_import.tensorflow()

        from ctr.data import tfds_builders

        records = self._sources[split].__getitems__(rows.tolist())
        parsed = {k: v.numpy() for k, v in tf.io.parse_example(records, self._spec).items()}
        batch: rows_lib.Batch = {schema_lib.LABEL: parsed.pop(schema_lib.LABEL).astype(np.float32)}
        if self.schema.sequences:
            mask = rows_lib.sequence_mask(parsed.pop(tfds_builders.HISTORY_LENGTH), self.schema.sequences[0].max_len)
            for seq in self.schema.sequences:
                batch[seq.mask_key] = mask
        batch.update(parsed)
        return batch

    def train_batches(
        self, global_batch: int, start_step: int, seed: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[rows_lib.Batch]:
        """This host's part of every global training batch from ``start_step`` on, forever
        (:func:`ctr.data.dataset.train_rows`); rows within a host batch in index order, as the numpy shards'."""
        for rows in dataset_lib.train_rows(
            self.num_rows(splits_lib.TRAIN), global_batch, start_step, seed, process_index, process_count
        ):
            yield self.read(splits_lib.TRAIN, np.sort(rows))

    def eval_batches(
        self, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> Iterator[tuple[rows_lib.Batch, int]]:
        """The whole ``split`` in order, as (host batch, number of real rows); the last batch is padded with
        row 0 (:func:`ctr.data.dataset.eval_rows`)."""
        for rows, real in dataset_lib.eval_rows(self.num_rows(split), batch_size, process_index, process_count):
            yield self.read(split, rows), real


@gin.configurable
def tfds_dataset(
    name: str = gin.REQUIRED,
    data_dir: str | None = None,
    train_split: str = "train",
    valid_split: str = "validation",
    test_split: str = "test",
    version: str | None = None,
    processing: dict[str, Any] | None = None,
) -> TfdsDataset:
    """A dataset built by ``ctr.prepare --format=tfds`` (or the TFDS API), read through ``tfds.data_source``.

    Args:
      name: TFDS name, ``ctr_<dataset>/<config>[:<version>]`` (``--format=tfds`` prints it).
      data_dir: the TFDS data directory (``--out_dir``); None = TFDS's default (``TFDS_DATA_DIR``).
      train_split, valid_split, test_split: the TFDS splits the trainer's train/valid/test read (TFDS slicing
        works: ``"train[:10%]"``). Where valid is the test split (TaobaoAds' default) ``validation`` reads test.
      version: the builder version the config expects; None = this code's.
      processing: ``Processing`` values the config relies on, e.g. ``{"max_len": 50}``; a dataset built with
        others is refused.
    """
    for arg, value in (("name", name), ("train_split", train_split), ("valid_split", valid_split),
                       ("test_split", test_split)):  # fmt: skip
        if not isinstance(value, str) or not value:
            raise errors.ConfigError(f"tfds_dataset.{arg}: expected a non-empty string, got {value!r}")
    splits = {splits_lib.TRAIN: train_split, splits_lib.VALID: valid_split, splits_lib.TEST: test_split}
    data_dir = None if data_dir is None else os.path.expanduser(data_dir)
    return TfdsDataset(name, data_dir, splits, version, processing)
