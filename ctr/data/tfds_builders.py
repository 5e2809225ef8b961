"""TensorFlow Datasets builders ``ctr_criteo``, ``ctr_avazu``, ``ctr_taobao``: the prepared examples as TFDS.

Each builder reads the raw files from ``manual_dir`` and produces, split for split and row for row, the examples
``ctr.prepare`` writes as numpy shards: generation runs that very prepare step (the dataset's raw reader,
fingerprints, Criteo buckets and dense features, Avazu time features, the TaobaoAds join and sequences, the
seeded split and shuffle, the vocabulary) into a staging directory, then writes its splits in their stored
order as ArrayRecord (random access), with ``disable_shuffling`` so TFDS index ``i`` of a split is prepared row
``i``, serialized in bulk by :mod:`ctr.data.tfds_records` (TFDS's per-example writer only for other file
formats), and keeps the vocabulary's ``vocab/`` next to the shards. So there is one copy of every transform,
and the training order rule (:mod:`ctr.data.dataset`) picks the same rows from either format. The staging directory (about the prepared size) is removed when the build ends.

    bazel run //ctr:prepare -- --format=tfds --dataset=criteo --raw_dir=/data/criteo_raw --out_dir=/data/tfds
    # or through the TFDS API (default configs; the `tfds build` command needs apache-beam, not in the lock):
    tfds.builder("ctr_criteo/random", data_dir=...).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/criteo_raw"))   # after import ctr.data.tfds_builders

Configs: one per set of split options (the ``ctr.prepare`` flags) and ``Processing`` values. The defaults are
``random`` (Criteo, Avazu: 8:1:1, seed 0), ``time`` (all three: ``ctr.prepare``'s default time split) with the
``Processing`` defaults; :func:`config_for` names any other combination ``<kind>-<digest>`` (``--format=tfds``
prints the name to train with). Splits are ``train``, ``validation``, ``test``; where valid is the test split
(TaobaoAds by default) ``validation`` is not written and ``metadata["valid_is_test"]`` says so. The dataset's
``metadata`` holds the schema, the options and the row accounting (rows read, written per split, rejected per
reason under ``max_bad_rows``) of the build.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import types
from typing import Any, Iterator, Sequence

import numpy as np
from ctr import tf_import

tf_import.tensorflow()  # TF without its CUDA-probe noise, before TFDS imports it
import tensorflow_datasets as tfds  # noqa: E402
from absl import logging as absl_logging
from etils import epath

from ctr import errors
from ctr.data import avazu, criteo, raw, splits, taobao, tfds_features, tfds_records
from ctr.data import schema as schema_lib

BUILDER_VERSION = "1.0.0"
FORMAT_VERSION = 1  # of metadata["ctr"], read by ctr.data.tfds_input
SPLIT_NAMES = {splits.TRAIN: "train", splits.VALID: "validation", splits.TEST: "test"}  # ctr -> TFDS
HISTORY_LENGTH = tfds_features.HISTORY_LENGTH
HISTORY_MASK = tfds_features.HISTORY_MASK
_CHUNK_ROWS = 16384  # rows read from the staged shards and serialized at a time while writing
VOCAB_DIR = "vocab"  # in the version folder: the staged vocab/ as ctr.data.vocab saves it


@dataclasses.dataclass(eq=False)
class CtrConfig(tfds.core.BuilderConfig):
    """One build of a dataset: the ``ctr.prepare`` options that decide its examples.

    Attributes:
      split: ``random`` or ``time`` (``--split``).
      fractions: train/valid/test fractions of the random split (``--split_fractions``).
      test_day: time split's test day, None = the last day seen (``--test_day``).
      valid: time split's valid: ``half``, ``test`` or a day (``--valid``).
      seed: shuffle and split seed (``--seed``).
      max_bad_rows: bad rows skipped (and counted) before failing (``--max_bad_rows``).
      processing: the dataset's ``Processing`` fields, as ``(name, value)`` pairs, all of them.
      raw_files: shell globs picking the raw inputs (``--raw_files``).
    """

    split: str = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_day: int | None = None
    valid: str = "half"
    seed: int = 0
    max_bad_rows: int = 0
    processing: tuple[tuple[str, Any], ...] = ()
    raw_files: tuple[str, ...] = ()

    @property
    def spec(self) -> splits.SplitSpec:
        return splits.SplitSpec(kind=self.split, fractions=tuple(self.fractions), test_day=self.test_day,
                                valid=self.valid)  # fmt: skip

    def options(self) -> dict:
        """Every option that decides the examples, JSON-ready (stored in the dataset's metadata)."""
        return {"split": self.split, "fractions": list(self.fractions), "test_day": self.test_day,
                "valid": self.valid, "seed": self.seed, "max_bad_rows": self.max_bad_rows,
                "processing": dict(self.processing), "raw_files": list(self.raw_files)}  # fmt: skip


def default_processing(module: types.ModuleType) -> tuple[tuple[str, Any], ...]:
    """The dataset's ``Processing`` defaults as written in its class (not gin-bound)."""
    return tuple((f.name, f.default) for f in dataclasses.fields(module.Processing))


def _default_spec(dataset: str, kind: str) -> dict:
    from ctr import prepare  # ctr.prepare imports this module for --format=tfds

    if kind == "random":
        return {"split": "random"}
    return {"split": "time", "test_day": prepare.DEFAULT_TEST_DAY.get(dataset), "valid": prepare.DEFAULT_VALID[dataset]}


def _default_configs(dataset: str, module: types.ModuleType, kinds: Sequence[str]) -> list[CtrConfig]:
    return [
        CtrConfig(name=kind, description=f"ctr.prepare's default {kind} split, Processing defaults",
                  processing=default_processing(module), **_default_spec(dataset, kind))  # fmt: skip
        for kind in kinds
    ]


def config_for(
    dataset: str,
    spec: splits.SplitSpec,
    seed: int = 0,
    max_bad_rows: int = 0,
    processing: object | None = None,
    raw_files: Sequence[str] = (),
) -> CtrConfig:
    """The config of these ``ctr.prepare`` options: a default config when they equal one, else a new config
    named ``<split kind>-<8 hex digits of their digest>`` (same options, same name)."""
    module = BUILDERS[dataset].MODULE
    pairs = (default_processing(module) if processing is None
             else tuple((f.name, getattr(processing, f.name)) for f in dataclasses.fields(processing)))  # fmt: skip
    config = CtrConfig(name="", split=spec.kind, fractions=tuple(spec.fractions), test_day=spec.test_day,
                       valid=spec.valid, seed=seed, max_bad_rows=max_bad_rows, processing=pairs,
                       raw_files=tuple(raw_files))  # fmt: skip
    for default in BUILDERS[dataset].BUILDER_CONFIGS:
        if default.options() == config.options():
            return default
    digest = hashlib.sha256(json.dumps(config.options(), sort_keys=True).encode()).hexdigest()[:8]
    config.name = f"{spec.kind}-{digest}"
    config.description = "ctr.prepare options " + json.dumps(config.options(), sort_keys=True)
    return config


# --------------------------------------------------------------------------------------------------------------
# Builders.


class _CtrBuilder(tfds.core.GeneratorBasedBuilder):
    """Common builder: stage with ``ctr.prepare``, write the staged splits in order (see the module docstring).

    Extra constructor arguments (``tfds.builder(name, ..., emit=print)``): ``emit`` (progress lines, as
    ``ctr.prepare`` prints them; default logging), ``tmp_dir`` (staging and temporary files; default under the
    data directory, or the system's temporary directory for an object-store ``data_dir``), ``threads`` (parser
    threads), ``shard_bytes`` (prepare's shuffle bucket size).
    """

    MODULE: types.ModuleType
    VERSION = tfds.core.Version(BUILDER_VERSION)
    RELEASE_NOTES = {BUILDER_VERSION: "Initial release: the examples of ctr.prepare format version 1."}

    def __init__(self, *, emit: raw.Emit | None = None, tmp_dir: str | None = None, threads: int = 2,
                 shard_bytes: int = 512 << 20, file_format: str | None = None, **kwargs):  # fmt: skip
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._emit, self._tmp_dir, self._threads, self._shard_bytes = emit, tmp_dir, threads, shard_bytes
        self._staging: str | None = None

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS finds it through importlib_resources, which the locked environment does not have (nor need).
        return epath.Path(__file__)

    @property
    def _processing(self) -> object:
        return self.MODULE.Processing(**dict(self.builder_config.processing))

    def _schema(self) -> schema_lib.FeatureSchema:
        p = self._processing
        if self.MODULE is criteo:
            return criteo.feature_schema(p.int_buckets)
        if self.MODULE is taobao:
            return taobao.feature_schema(p.max_len)
        return avazu.feature_schema()

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=tfds_features.features_for(self._schema(), self._processing.min_count > 0),
            supervised_keys=None,
            homepage=tfds_features.HOMEPAGES[self.MODULE.NAME],
            citation=tfds_features.CITATIONS[self.MODULE.NAME],
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # TFDS index i of a split = prepared row i: the order rule needs it
        )

    def _stage(self, dl_manager: tfds.download.DownloadManager) -> tuple[Any, list[str]]:
        """Runs ``ctr.prepare`` into the staging directory, records its metadata in ``self.info``; returns the
        staged dataset (:func:`ctr.data.prepared.prepared`) and the ctr splits to write."""
        from ctr import prepare  # ctr.prepare imports this module for --format=tfds
        from ctr.data import prepared

        config = self.builder_config
        root = self._tmp_dir or os.fspath(self._data_dir_root)
        if "://" in root:  # an object store (gs://...): numpy stages on a local disk
            root = tempfile.gettempdir()
        os.makedirs(root, exist_ok=True)
        self._staging = tempfile.mkdtemp(prefix=f".{self.name}-staging-", dir=root)
        metadata = prepare.prepare(
            self.MODULE.NAME, os.fspath(dl_manager.manual_dir), os.path.join(self._staging, "prepared"),
            config.spec, config.seed, config.max_bad_rows, self._shard_bytes, self._threads, self._tmp_dir,
            self._emit or _log, config.raw_files, processing=self._processing,
        )  # fmt: skip
        self.info.metadata["ctr"] = {
            "format_version": FORMAT_VERSION,
            "prepared_format_version": metadata["format_version"],
            "schema": metadata["schema"],
            "valid_is_test": metadata["valid_is_test"],
            "split": metadata["split"],
            "processing": metadata["processing"],
            "options": config.options(),
            "vocab": metadata["vocab"],
            "accounting": metadata["accounting"],
        }
        data = prepared.prepared(os.path.join(self._staging, "prepared"))
        return data, [s for s in splits.NAMES if not (s == splits.VALID and metadata["valid_is_test"])]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        # TFDS's own per-example writer: only for what the bulk writer does not do (see _download_and_prepare).
        data, names = self._stage(dl_manager)
        return {SPLIT_NAMES[s]: self._generate_examples(data, s) for s in names}

    def _columns(self, data, split: str) -> Iterator[dict[str, np.ndarray]]:
        """The staged ``split`` in its stored order, as chunks of the TFDS features' columns."""
        schema = data.schema
        progress = raw.Progress(f"writing TFDS {SPLIT_NAMES[split]}", None, self._emit or _log)
        for batch, real in data.eval_batches(split, _CHUNK_ROWS):
            columns = {key: batch[key][:real] for key in (schema_lib.LABEL, schema_lib.DENSE, schema_lib.GROUP,
                                                          *schema.categorical, *(s.name for s in schema.sequences))
                       if key in batch}  # fmt: skip
            columns[schema_lib.LABEL] = columns[schema_lib.LABEL].astype(np.int64)
            if schema.sequences:
                mask = batch[schema.sequences[0].mask_key][:real]
                columns[HISTORY_MASK] = mask
                columns[HISTORY_LENGTH] = mask.sum(axis=1, dtype=np.int32)
            yield columns
            progress.update(real)
        progress.done()

    def _generate_examples(self, data, split: str) -> Iterator[tuple[int, dict]]:
        """(row index, example) of the staged ``split`` in its stored order."""
        row = 0
        for columns in self._columns(data, split):
            real = len(columns[schema_lib.LABEL])
            for i in range(real):
                yield row + i, {key: value[i] for key, value in columns.items()}
            row += real

    def _write_split(self, data, split: str, shard_config) -> tfds.core.SplitInfo:
        """Writes the staged ``split`` as TFDS's ArrayRecord shards with the bulk serializer
        (:mod:`ctr.data.tfds_records`); returns its SplitInfo."""
        name = SPLIT_NAMES[split]
        rows = data.num_rows(split)
        encoder = tfds_records.ExampleEncoder(self.info.features)
        chunks = (encoder.encode(columns) for columns in self._columns(data, split))
        first = next(chunks)  # its bytes per row size the shards (TFDS's rule: about 1 GiB or less each)
        estimate = int(len(first[0]) / max(len(first[1]) - 1, 1) * rows)
        num_shards = min(shard_config.get_number_shards(estimate, rows), rows)
        shard_rows = np.diff([0, *tfds.core.utils.shard_utils.get_shard_boundaries(rows, num_shards)]).tolist()
        template = self._get_filename_template(split_name=name)
        paths = template.sharded_filepaths(num_shards)
        total = tfds_records.write_shards(paths, shard_rows, itertools.chain([first], chunks))
        return tfds.core.SplitInfo(name=name, shard_lengths=shard_rows, num_bytes=total, filename_template=template)

    def _download_and_prepare(self, dl_manager, download_config=None):
        try:
            if (self.info.file_format != tfds.core.FileFormat.ARRAY_RECORD
                    or download_config.max_examples_per_split is not None):  # fmt: skip
                super()._download_and_prepare(dl_manager, download_config)
            else:
                data, names = self._stage(dl_manager)
                shard_config = download_config.get_shard_config()
                self.info.set_splits(tfds.core.SplitDict([self._write_split(data, s, shard_config) for s in names]))
            self._copy_vocabulary()
        finally:
            if self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)

    def _copy_vocabulary(self) -> None:
        """The staged ``vocab/`` (kept values per vocabulary) into the dataset's version folder, next to its
        shards, for ``vocabularies(tfds_name=...)``."""
        staged = epath.Path(self._staging) / "prepared" / VOCAB_DIR
        if not self.info.metadata["ctr"]["vocab"]:
            return
        (self.data_path / VOCAB_DIR).mkdir(parents=True, exist_ok=True)
        for path in staged.iterdir():
            path.copy(self.data_path / VOCAB_DIR / path.name)


def _log(line: str) -> None:
    logging.info(line)


@contextlib.contextmanager
def _quiet_tfds(quiet: bool) -> Iterator[None]:
    """With ``quiet``: no TFDS progress bars, and TFDS's absl log lines below errors held back (the command
    prints ctr.prepare's progress instead)."""
    if not quiet:
        yield
        return
    tfds.disable_progress_bar()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(verbosity)


def _remove_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


class CtrCriteo(_CtrBuilder):
    """Criteo display-ads logs (Kaggle Display Advertising Challenge, or the 1TB Click Logs), as ctr prepares them."""

    MODULE = criteo
    BUILDER_CONFIGS = _default_configs("criteo", criteo, ("random", "time"))
    DESCRIPTION = (
        "Criteo display advertising click logs: label, 13 integer columns as dense log(1 + max(x, 0)) features, "
        "26 hashed categorical columns and (int_buckets) 13 BARS-bucketised integer columns as categorical ids. "
        "Generated by ctr's own reader and prepare step (ctr.data.criteo, ctr.prepare): the same examples, "
        "splits and order as its numpy shards."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the Kaggle Display Advertising Challenge archive (dac.tar.gz, from Kaggle or Criteo AI Lab) and "
        "extract `train.txt` into manual_dir (gzip `train.txt.gz` is read too); or place the 1TB Criteo Click Logs "
        "`day_0` .. `day_23` (plain or .gz) there, without gaps between the first and last day. Expected rows "
        "of train.txt: 45,840,617."
    )


class CtrAvazu(_CtrBuilder):
    """Avazu mobile-ads click logs (Kaggle Click-Through Rate Prediction), as ctr prepares them."""

    MODULE = avazu
    BUILDER_CONFIGS = _default_configs("avazu", avazu, ("random", "time"))
    DESCRIPTION = (
        "Avazu mobile ads click logs (10 days, 2014-10-21..30): label (click), 21 raw categorical fields and the "
        "hour of day, weekday and weekend derived from `hour`, all as categorical ids; `id` is dropped. Generated "
        "by ctr's own reader and prepare step (ctr.data.avazu, ctr.prepare): the same examples, splits and order "
        "as its numpy shards."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download `train.gz` from the Kaggle competition Avazu Click-Through Rate Prediction and place it in "
        "manual_dir (as `train.gz`, `train.csv` or `train.csv.gz`, with its header). Expected rows: 40,428,967."
    )


class CtrTaobao(_CtrBuilder):
    """TaobaoAds (Ali_Display_Ad_Click, Tianchi dataset 56) with behaviour sequences, as ctr prepares them."""

    MODULE = taobao
    BUILDER_CONFIGS = _default_configs("taobao", taobao, ("time",))
    DESCRIPTION = (
        "Taobao display ad impressions (8 days, 2017-05-06..13) joined with their ad's features and their user's "
        "profile, with the cate, brand and btag of the user's last max_len behaviours strictly before the "
        "impression as right-aligned sequences and their mask; dense log(1 + price); gAUC group = user. Test is "
        "2017-05-13 and, by default, validation is the test split (not written twice). Generated by ctr's own "
        "reader and prepare step (ctr.data.taobao, ctr.prepare): the same examples, splits and order as its "
        "numpy shards."
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Tianchi dataset 56 (Ali_Display_Ad_Click) and place its four files in manual_dir: "
        "`raw_sample.csv`, `ad_feature.csv`, `user_profile.csv`, `behavior_log.csv` (each may be .csv.gz). "
        "Expected rows of raw_sample: 26,557,961."
    )


BUILDERS: dict[str, type[_CtrBuilder]] = {"criteo": CtrCriteo, "avazu": CtrAvazu, "taobao": CtrTaobao}


class AlreadyBuilt(errors.UserError, FileExistsError):
    """The TFDS data directory already holds this dataset, config and version."""


def prepare(
    dataset: str,
    raw_dir: str,
    out_dir: str,
    spec: splits.SplitSpec,
    seed: int = 0,
    max_bad_rows: int = 0,
    shard_bytes: int = 512 << 20,
    threads: int = 2,
    tmp_dir: str | None = None,
    emit: raw.Emit | None = None,
    raw_files: Sequence[str] = (),
    processing: object | None = None,
) -> tfds.core.DatasetBuilder:
    """``ctr.prepare --format=tfds``: builds ``dataset`` from ``raw_dir`` as a TFDS dataset in the TFDS data
    directory ``out_dir``, under the config of these options (:func:`config_for`); returns the builder.

    The arguments are :func:`ctr.prepare.prepare`'s (``processing`` default: the Processing defaults).
    Progress goes to ``emit`` as ``ctr.prepare`` prints it (TFDS's own progress bars are turned off), ending
    with the ``tfds_dataset`` bindings to train on the result.

    Raises:
      errors.UserError: what :func:`ctr.prepare.prepare` raises; :class:`AlreadyBuilt`; a failed write.
    """
    BUILDERS[dataset].MODULE.input_files(raw_dir, raw_files)  # the reader's own check, before TFDS's
    config = config_for(dataset, spec, seed, max_bad_rows, processing, raw_files)
    with _quiet_tfds(emit is not None):
        builder = BUILDERS[dataset](config=config, data_dir=out_dir, emit=emit, tmp_dir=tmp_dir, threads=threads,
                                    shard_bytes=shard_bytes)  # fmt: skip
        if builder.is_prepared():
            raise AlreadyBuilt(f"{builder.data_dir}: already built (remove it to build again)")
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    manual_dir=raw_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP
                )
            )
        except OSError as e:
            raise errors.UserError(f"{e.filename or builder.data_dir}: {e.strerror or e}") from e
        finally:
            if not builder.is_prepared():  # TFDS removes its incomplete files; an empty config folder stays
                _remove_empty(os.path.dirname(os.fspath(builder.data_dir)))
    (emit or _log)(
        f"{dataset}: TFDS dataset in {builder.data_dir}; train on it with train.dataset_fn = @tfds_dataset, "
        f'tfds_dataset.name = "{builder.name}/{config.name}", tfds_dataset.data_dir = "{out_dir}"'
    )
    return builder
