"""Prepare a dataset: raw files -> shuffled, split, fixed-width numpy shards + vocabulary + row accounting.

    python -m ctr.prepare --dataset=criteo --raw_dir=/data/criteo --out_dir=/data/criteo_prepared \\
        --gin_file=configs/criteo_data.gin
    bazel run //ctr:prepare -- --dataset=avazu --raw_dir=... --out_dir=...   (relative paths: from where you ran it)

Three passes (:mod:`ctr.data.shard_writer`), memory bounded by one shuffle bucket whatever the input size:

1. Stream the raw files through the dataset's reader (:mod:`ctr.data.criteo`, ``avazu``, ``taobao``), which
   parses, validates and fingerprints them block by block. Each row goes to one of ``K`` temporary bucket
   files chosen by a hash of (seed, row ordinal), ``K`` sized so a bucket is ~``--shard_mib`` MiB.
2. Per bucket: assign each row its split (:mod:`ctr.data.splits`), count vocabulary values of train rows,
   permute each split's rows (seeded) and write them as one shard per split. Random buckets + a random
   permutation within each is a uniform shuffle of the whole split.
3. With a vocabulary (``Processing.min_count > 0``): keep the values seen at least ``min_count`` times in
   train, and rewrite every shard's rare ids to the OOV id in place.

The output directory gets ``metadata.json`` (schema, shards, splits, options; written last, so a directory
with it is complete), ``accounting.json`` (rows read, written per split, rejected by reason) and
``vocab/`` when asked. The prepared data is read by :func:`ctr.data.prepared.prepared`.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
from typing import Sequence

from absl import app, flags

from ctr import config, errors
from ctr.data import avazu, criteo, prepared, raw, row_accounting, shard_writer, splits, taobao
from ctr.data import rows as rows_lib
from ctr.data import vocab as vocab_lib

DATASETS: dict[str, raw.RawReader] = {"criteo": criteo, "avazu": avazu, "taobao": taobao}
DEFAULT_SPLIT = {"criteo": "random", "avazu": "random", "taobao": "time"}
DEFAULT_VALID = {"criteo": "half", "avazu": "half", "taobao": "test"}
DEFAULT_TEST_DAY = {"taobao": taobao.TEST_DAY}

FLAGS = flags.FLAGS

class OutputExists(errors.UserError, FileExistsError):
    """``--out_dir`` already holds files."""


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
    emit: raw.Emit = logging.info,
    raw_files: Sequence[str] = (),
    processing: object | None = None,
) -> dict:
    """Prepares ``dataset`` from ``raw_dir`` into ``out_dir`` (see the module docstring); returns the metadata.

    The dataset's ``Processing`` (int buckets, vocabulary ``min_count``, TaobaoAds ``max_len``) is ``processing``,
    default the gin-bound one.
    ``raw_files`` (shell globs, ``--raw_files``) picks the inputs of a raw directory that holds more than one
    candidate. On any failure nothing is left in ``out_dir`` (a directory it creates is removed).

    Raises:
      errors.UserError: a bad option or binding; ``out_dir`` not empty (:class:`OutputExists`) or not writable,
        or the disk full; an empty split; bad input beyond ``max_bad_rows`` or missing, ambiguous inputs
        (:class:`raw.ParseError`, naming file, line and field).
    """
    errors.check_int("max_bad_rows", max_bad_rows, 0)
    errors.check_int("shard_bytes", shard_bytes, 1)
    errors.check_int("threads", threads, 1)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise OutputExists(f"{out_dir}: output directory is not empty (remove it to prepare again)")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputExists(f"--out_dir={out_dir}: exists and is not a directory")
    module = DATASETS[dataset]
    processing = _checked_processing(module, processing)
    created = not os.path.exists(out_dir)
    try:
        return _prepare(module, dataset, raw_dir, out_dir, spec, processing, seed, max_bad_rows, shard_bytes,
                        threads, tmp_dir, emit, raw_files)  # fmt: skip
    except OSError as e:
        _remove_output(out_dir, created)
        raise errors.UserError(_describe_os_error(e, tmp_dir or out_dir)) from e
    except BaseException:
        _remove_output(out_dir, created)
        raise


def _prepare(
    module: types.ModuleType,
    dataset: str,
    raw_dir: str,
    out_dir: str,
    spec: splits.SplitSpec,
    processing: object,
    seed: int,
    max_bad_rows: int,
    shard_bytes: int,
    threads: int,
    tmp_dir: str | None,
    emit: raw.Emit,
    raw_files: Sequence[str],
) -> dict:
    """:func:`prepare` once its arguments are checked; may leave partial output (the caller removes it)."""
    os.makedirs(out_dir, exist_ok=True)
    if tmp_dir:
        os.makedirs(tmp_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prepare-", dir=tmp_dir or out_dir)
    accounting = row_accounting.RowAccounting(max_bad_rows)
    start = time.monotonic()
    try:
        options = raw.ReadOptions(accounting=accounting, time_split=spec.kind == "time", threads=threads, emit=emit,
                                  tmp_dir=tmp, raw_files=raw_files)  # fmt: skip
        source = module.open_raw(raw_dir, processing=processing, options=options)
        buckets, days = shard_writer.write_buckets(source, seed, shard_bytes, tmp)
        emit(f"{dataset}: read {sum(b.rows for b in buckets):,} rows into {len(buckets)} shuffle buckets "
             f"in {time.monotonic() - start:.0f}s; writing shards")  # fmt: skip
        vocab_names = sorted(set(vocab_lib.vocab_features(source.schema).values()))
        counter = vocab_lib.Counter(vocab_names) if processing.min_count > 0 else None
        shards = shard_writer.write_shards(source.schema, buckets, spec, seed, days[1], out_dir, counter, accounting,
                                           emit)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_not_empty(shards, spec, days, raw_dir)
    vocab = None
    if counter is not None:
        vocab = vocab_lib.Vocabulary.from_counter(counter, vocab_names, processing.min_count)
        shard_writer.apply_vocab(source.schema, vocab, out_dir, shards, emit)
        vocab.save(out_dir)
    if spec.valid_is_test:
        shards[splits.VALID] = shards[splits.TEST]
    _check_balance(accounting, source.main_input)
    metadata = {
        "format_version": prepared.FORMAT_VERSION,
        "dataset": dataset,
        "schema": prepared.schema_to_json(source.schema),
        "arrays": [name for name in rows_lib.STORED if name in shard_writer.record_dtype(source.schema).names],
        "splits": {
            name: {"rows": sum(s["rows"] for s in shards[name]), "shards": shards[name]} for name in splits.NAMES
        },
        "valid_is_test": spec.valid_is_test,
        "split": {"kind": spec.kind, "fractions": list(spec.fractions),
                  "test_day": days[1] if spec.test_day is None else spec.test_day,
                  "valid": spec.valid, "seed": seed},  # fmt: skip
        "processing": {k: getattr(processing, k) for k in processing.__dataclass_fields__},
        "vocab": None if vocab is None else {"min_count": vocab.min_count, "sizes": vocab.sizes()},
        "raw_dir": os.path.abspath(raw_dir),
        "accounting": accounting.to_json(),
    }
    with open(os.path.join(out_dir, prepared.ACCOUNTING), "w") as f:
        json.dump(accounting.to_json(), f, indent=1)
    with open(os.path.join(out_dir, prepared.METADATA + ".partial"), "w") as f:
        json.dump(metadata, f, indent=1)
    os.replace(os.path.join(out_dir, prepared.METADATA + ".partial"), os.path.join(out_dir, prepared.METADATA))
    emit(f"{dataset}: done in {time.monotonic() - start:.0f}s\n{accounting.summary()}")
    return metadata


def _checked_processing(module: types.ModuleType, processing: object | None = None) -> object:
    """``processing`` (default the dataset's gin-bound ``Processing``), each field of its default's type (gin
    passes any value)."""
    processing = module.Processing() if processing is None else processing
    for field in dataclasses.fields(processing):
        value = getattr(processing, field.name)
        if type(value) is not type(field.default) and not (type(field.default) is float and type(value) is int):
            raise errors.ConfigError(
                f"{module.NAME}.Processing.{field.name}: expected {type(field.default).__name__}, got "
                f"{errors.shorten(repr(value), 80)} ({type(value).__name__})"
            )
        if type(value) is int and value < 0:
            raise errors.ConfigError(f"{module.NAME}.Processing.{field.name}: must be >= 0, got {value}")
    return processing


def _check_not_empty(shards: dict[str, list[dict]], spec: splits.SplitSpec, days: tuple[int, int], raw_dir: str):
    """Every split a run reads has rows (valid is test's rows when ``spec.valid_is_test``). Test is named before
    valid, which the time split takes from the test day."""
    for name in (splits.TRAIN, splits.TEST, splits.VALID):
        if name == splits.VALID and spec.valid_is_test or sum(s["rows"] for s in shards[name]):
            continue
        if spec.kind == "random":
            why = f"--split_fractions={','.join(f'{f:g}' for f in spec.fractions)}"
        else:
            test_day = days[1] if spec.test_day is None else spec.test_day
            valid = f", --valid={spec.valid}" if name == splits.VALID else ""
            why = f"--split=time with test day {test_day}{valid}; the rows' days run from {days[0]} to {days[1]}"
        raise errors.UserError(f"split {name!r} of {raw_dir} would be empty ({why})")


def _remove_output(out_dir: str, created: bool) -> None:
    """Removes what a failed prepare wrote (``out_dir`` was empty or absent before)."""
    if not os.path.isdir(out_dir):
        return
    if created:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def _describe_os_error(e: OSError, out_dir: str) -> str:
    """One line for a failed read or write: the path, what happened, and free space when a write fell short."""
    where = e.filename or out_dir
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC or "requested and" in str(e):  # numpy's tofile/save on a full disk say only this
        try:
            free = shutil.disk_usage(out_dir if os.path.isdir(out_dir) else os.path.dirname(out_dir) or ".").free
        except OSError:
            free = None
        room = "" if free is None else f"; {free / 2**20:,.0f} MiB free"
        what = f"no space left on the device ({what}{room})"
    return f"{where}: {what}"


def _check_balance(accounting: row_accounting.RowAccounting, main_input: str) -> None:
    """Every row read is written once or rejected: nothing is dropped silently."""
    written = sum(accounting.written.values())
    read = accounting.read_rows[main_input]
    rejected = accounting.total_rejected(main_input)
    if read != written + rejected:
        raise AssertionError(f"row accounting does not balance: read {read} != written {written} + rejected {rejected}")


def _define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The command line (defined only when run as a program, so importing this module defines no flags)."""
    flags.DEFINE_enum("dataset", None, sorted(DATASETS), "Which raw layout to read.", flag_values=fv)
    flags.DEFINE_string("raw_dir", None, "Directory of the raw files (see docs/DATASETS.md).", flag_values=fv)
    flags.DEFINE_string("out_dir", None, "Directory to write the prepared data to (must be empty or absent).",
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_list("raw_files", [], "Shell globs picking the raw files of a directory that holds more than "
                      "one candidate (e.g. train.txt.gz, or 'day_*' beside a Kaggle train.txt).",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_enum("split", None, ["random", "time"],
                      "Split protocol; default random (Criteo, Avazu), time (TaobaoAds).", flag_values=fv)  # fmt: skip
    flags.DEFINE_list("split_fractions", ["0.8", "0.1", "0.1"], "train,valid,test fractions of the random split.",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("test_day", None, "time split: the test day (YYYYMMDD; Criteo: day index); default last day "
                         "(TaobaoAds: 20170513).", flag_values=fv)  # fmt: skip
    flags.DEFINE_string("valid", None, "time split: 'half' (a random half of the test day), 'test' (valid = test) or a "
                        "day; default half (TaobaoAds: test, as BARS).", flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("seed", 0, "Shuffle and split seed.", flag_values=fv)
    flags.DEFINE_enum("format", "numpy", ["numpy", "tfds"], "numpy: shards for prepared(data_dir=out_dir); tfds: "
                      "the same examples as a TFDS dataset (ArrayRecord) in the TFDS data_dir out_dir, for "
                      "tfds_dataset.", flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("max_bad_rows", 0, "Bad rows to skip (and count) before failing; 0: the first bad row fails.",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("shard_mib", 512, "Target shard (and shuffle bucket, i.e. memory) size in MiB.",
                         flag_values=fv)  # fmt: skip
    flags.DEFINE_integer("threads", 2, "Parser threads.", flag_values=fv)
    flags.DEFINE_string("tmp_dir", None, "Directory for temporary files (default: out_dir).", flag_values=fv)
    flags.DEFINE_multi_string("gin_file", [], "Gin files with the dataset's Processing bindings "
                              "(configs/<dataset>_data.gin).", flag_values=fv)  # fmt: skip
    flags.DEFINE_multi_string("gin_param", [], "Extra gin bindings, e.g. 'criteo.Processing.min_count = 10'.",
                              flag_values=fv)  # fmt: skip
    flags.mark_flags_as_required(["dataset", "raw_dir", "out_dir"], flag_values=fv)


def _resolve(path: str) -> str:
    """Relative paths are taken from where the user ran ``bazel run`` (BUILD_WORKING_DIRECTORY)."""
    return os.path.join(os.environ.get("BUILD_WORKING_DIRECTORY", ""), os.path.expanduser(path))


def _split_spec(fv: flags.FlagValues) -> splits.SplitSpec:
    """The split flags as a spec; a bad value is a ConfigError naming its flag. Every split must be able to get
    rows: a zero fraction is refused here, before any data is read."""
    dataset = fv.dataset
    fractions = []
    for f in fv.split_fractions:
        try:
            fractions.append(float(f))
        except ValueError:
            raise errors.ConfigError(f"--split_fractions={','.join(fv.split_fractions)}: {f!r} is not a number")
    if len(fractions) != 3:
        raise errors.ConfigError(f"--split_fractions={','.join(fv.split_fractions)}: expected 3 fractions "
                                 f"(train,valid,test), got {len(fractions)}")  # fmt: skip
    kind = fv.split or DEFAULT_SPLIT[dataset]
    try:
        spec = splits.SplitSpec(
            kind=kind,
            fractions=tuple(fractions),
            test_day=fv.test_day if fv.test_day is not None else DEFAULT_TEST_DAY.get(dataset),
            valid=fv.valid or DEFAULT_VALID[dataset],
        )
    except ValueError as e:
        flag = "--split_fractions" if "fractions" in str(e) else "--valid" if "valid" in str(e) else "--split"
        raise errors.ConfigError(f"{flag}: {e}") from e
    if kind == "random":
        for name, fraction in zip(splits.NAMES, fractions):
            if fraction <= 0:
                raise errors.ConfigError(f"--split_fractions={','.join(fv.split_fractions)}: the {name} split would "
                                         "be empty (every fraction must be > 0)")  # fmt: skip
    return spec


def run(fv: flags.FlagValues) -> int:
    """Runs the command on parsed flags; returns the exit code (see docs/ERRORS.md)."""
    try:
        for name, minimum in (("shard_mib", 1), ("threads", 1), ("max_bad_rows", 0)):
            if fv[name].value < minimum:
                raise errors.ConfigError(f"--{name}={fv[name].value}: must be >= {minimum}")
        spec = _split_spec(fv)
        try:  # The data configs also bind training-time settings (train.dataset_fn...): only Processing matters.
            config.parse(fv.gin_file, fv.gin_param, skip_unknown=True,
                         base_dir=os.environ.get("BUILD_WORKING_DIRECTORY", ""))  # fmt: skip
        except errors.ConfigError as e:
            return errors.report("ctr.prepare", e, "configuration error")

        def emit(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        args = (fv.dataset, _resolve(fv.raw_dir), _resolve(fv.out_dir), spec, fv.seed, fv.max_bad_rows,
                fv.shard_mib << 20, fv.threads, fv.tmp_dir and _resolve(fv.tmp_dir), emit, fv.raw_files)  # fmt: skip
        if fv.format == "tfds":  # this prepare, staged, written as a TFDS dataset (ctr/data/tfds_builders.py)
            from ctr.data import tfds_builders

            tfds_builders.prepare(*args, processing=_checked_processing(DATASETS[fv.dataset]))
        else:
            prepare(*args)
    except errors.UserError as e:
        return errors.report("ctr.prepare", e)
    return errors.EXIT_OK


def cli(argv: Sequence[str]) -> int:
    """The command line in-process: parses ``argv`` (``argv[0]`` is the program) into fresh flags and runs."""
    fv = flags.FlagValues()
    _define_flags(fv)
    try:
        rest = fv(list(argv))
    except flags.Error as e:
        return errors.report("ctr.prepare", e, "usage error")
    if len(rest) > 1:
        return errors.report("ctr.prepare", f"unexpected arguments: {rest[1:]}", "usage error")
    return run(fv)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser, but a bad or missing flag is one line and exit 2 (absl: the usage text, exit 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(errors.report("ctr.prepare", e, "usage error"))


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        return errors.report("ctr.prepare", f"unexpected arguments: {list(argv[1:])}", "usage error")
    return run(FLAGS)


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)
