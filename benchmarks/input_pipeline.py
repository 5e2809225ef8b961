r"""Input pipeline throughput: (a) raw-file parse rows/s, (b) prepared-data examples/s as host batches, (c) the
same host batches from the TFDS-built dataset beside the numpy shards.

    python benchmarks/input_pipeline.py [--datasets=criteo,avazu,taobao] [--work_dir=/tmp/ctr_bench]

For each dataset it generates synthetic raw files in the real layout (kept in ``--work_dir`` for reruns),
then measures:

(a) parse: the dataset's streaming reader over the raw files (validation, fingerprints, TaobaoAds join and
    sequences included), rows per second of wall time, with 1 and ``--threads`` parser threads;
(b) pipeline: ``ctr.prepare`` writes the prepared shards, then ``prepared(...).train_batches`` delivers host
    batches (numpy dicts in the trainer's batch layout) for ``--batches`` steps of ``--batch_size``; examples
    per second of wall time, for an exact row permutation (``block_rows=1``) and for block shuffling;
(c) tfds: on a smaller raw file (``--tfds_<dataset>_rows``), ``ctr.prepare --format=tfds`` builds the TFDS
    dataset (its rows/s and rows per CPU-second, beside the numpy prepare's of the same file), then host batches
    of the same ``train_batches`` order from ``tfds_dataset`` (``tfds.data_source`` + one
    ``tf.io.parse_example`` per batch), from the numpy shards of the same raw file, and, for reference, from
    ``tfds.data_source`` with TFDS's per-example decoding (``--tfds_per_example_batches`` batches);
(d) object store: the prepared shards of (b) copied to a GCS emulator on 127.0.0.1 (fake-gcs-server, as in
    ``tests/ctr/test_object_store.py``), then host batches from ``gs://`` the two ways a job reads them:
    streamed (each shard read whole into memory at first use; the load is timed with the first batches) and
    staged (``prepared.stage_dir``: copied to local disk, then memory-mapped), beside the local figure of (b).

Each figure is the best of ``--repeats`` runs (wall clock), with the process's CPU use next to it (cores busy =
CPU seconds / wall seconds): on a shared machine other processes take cores, and the load average is printed with
every figure.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from ctr import prepare  # noqa: E402
from ctr.data import prepared, raw, row_accounting, splits, synthetic, tfds_builders, tfds_input  # noqa: E402
from ctr.data import dataset as dataset_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["criteo", "avazu", "taobao"], "Datasets to measure.")
flags.DEFINE_string("work_dir", "/tmp/ctr_input_bench", "Where generated raw files and prepared data go.")
flags.DEFINE_integer("criteo_rows", 1_000_000, "Synthetic Criteo rows.")
flags.DEFINE_integer("avazu_rows", 1_000_000, "Synthetic Avazu rows.")
flags.DEFINE_integer("taobao_users", 20_000, "Synthetic TaobaoAds users (~20 impressions, ~60 behaviours each).")
flags.DEFINE_integer("threads", 2, "Parser threads for (a).")
flags.DEFINE_integer("batch_size", 8192, "Global batch size for (b).")
flags.DEFINE_integer("batches", 200, "Batches timed in (b).")
flags.DEFINE_integer("block_rows", 64, "Block size of the block-shuffled variant of (b).")
flags.DEFINE_integer("repeats", 3, "Runs per figure; the best is reported.")
flags.DEFINE_list("sections", ["a", "b", "c"], "Which of (a) parse, (b) prepared, (c) TFDS, (d) gs:// (GCS "
                  "emulator) to measure; (d) needs (b)'s prepared data.")
flags.DEFINE_integer("tfds_criteo_rows", 100_000, "Synthetic Criteo rows for (c).")
flags.DEFINE_integer("tfds_avazu_rows", 100_000, "Synthetic Avazu rows for (c).")
flags.DEFINE_integer("tfds_taobao_users", 4_000, "Synthetic TaobaoAds users for (c).")
flags.DEFINE_integer("tfds_batches", 20, "Batches timed per run in (c).")
flags.DEFINE_integer("tfds_per_example_batches", 2, "Batches timed with TFDS's per-example decoding in (c).")


def _generate(dataset: str, raw_dir: str, size: int | None = None) -> None:
    """Synthetic raw files of ``dataset`` (``size`` rows, TaobaoAds: users; default the flag's) into ``raw_dir``."""
    if os.path.isdir(raw_dir):
        return
    tmp = raw_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    start = time.time()
    if dataset == "criteo":
        synthetic.criteo.write_synthetic(os.path.join(tmp, "train.txt"), size or FLAGS.criteo_rows, seed=0)
    elif dataset == "avazu":
        synthetic.avazu.write_synthetic(os.path.join(tmp, "train.csv"), size or FLAGS.avazu_rows, seed=0)
    else:
        synthetic.taobao.write_synthetic(tmp, num_users=size or FLAGS.taobao_users, seed=0)
    os.replace(tmp, raw_dir)
    print(f"{dataset}: generated raw files in {time.time() - start:.0f}s", flush=True)


def _best(measure: Callable[[], int], unit: str) -> str:
    """Best of ``--repeats`` runs of ``measure`` (which returns the ``unit``s it processed), formatted."""
    runs = []
    for _ in range(FLAGS.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        items = measure()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append((items / wall, cpu / wall))
    rate, busy = max(runs)
    return (f"{rate:,.0f} {unit}/s (cores busy {busy:.2f} -> {rate / busy:,.0f} {unit} per CPU-second; "
            f"load average {os.getloadavg()[0]:.1f})")  # fmt: skip


def _parse(dataset: str, raw_dir: str, threads: int) -> int:
    module = prepare.DATASETS[dataset]
    options = raw.ReadOptions(accounting=row_accounting.RowAccounting(), threads=threads, tmp_dir=FLAGS.work_dir)
    source = module.open_raw(raw_dir, processing=module.Processing(), options=options)
    return sum(len(chunk) for chunk in source.rows)


def _pipeline(data_dir: str, block_rows: int) -> Callable[[], int]:
    return _batches(prepared.prepared(data_dir, block_rows=block_rows), FLAGS.batches)


def _batches(data, batches: int) -> Callable[[], int]:
    """Times ``batches`` host batches of ``data.train_batches`` (the first, which draws the permutation, untimed)."""
    it = data.train_batches(FLAGS.batch_size, 0, seed=0)
    next(it)

    def measure() -> int:
        for _ in range(batches):
            next(it)
        return batches * FLAGS.batch_size

    return measure


def _per_example(name: str, data_dir: str, num_rows: int) -> Callable[[], int]:
    """TFDS's own decoding: ``tfds.data_source`` (decode each example), same rows as ``train_batches``."""
    import tensorflow_datasets as tfds

    source = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
    order = dataset_lib.train_rows(num_rows, FLAGS.batch_size, 0, 0)

    def measure() -> int:
        for _ in range(FLAGS.tfds_per_example_batches):
            source.__getitems__(sorted(next(order).tolist()))
        return FLAGS.tfds_per_example_batches * FLAGS.batch_size

    return measure


def _tfds(dataset: str, spec: splits.SplitSpec) -> None:
    """(c): the TFDS build and host batches from it, beside the numpy shards of the same raw file."""
    size = {"criteo": FLAGS.tfds_criteo_rows, "avazu": FLAGS.tfds_avazu_rows, "taobao": FLAGS.tfds_taobao_users}
    raw_dir = os.path.join(FLAGS.work_dir, f"{dataset}_raw_{size[dataset]}")
    _generate(dataset, raw_dir, size[dataset])
    numpy_dir, tfds_dir = raw_dir + "_prepared", raw_dir + "_tfds"
    shutil.rmtree(numpy_dir, ignore_errors=True)
    shutil.rmtree(tfds_dir, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    prepare.prepare(dataset, raw_dir, numpy_dir, spec, threads=FLAGS.threads, emit=lambda line: None)
    numpy_wall, numpy_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    builder = tfds_builders.prepare(dataset, raw_dir, tfds_dir, spec, threads=FLAGS.threads, emit=lambda line: None)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = sum(info.num_examples for info in builder.info.splits.values())
    name = f"{builder.name}/{builder.builder_config.name}"
    # The build is prepare (staged) + writing; CPU seconds are this process's (the parser threads included).
    print(f"{dataset}: (c) TFDS build of {rows:,} rows: {wall:.1f}s, {rows / wall:,.0f} rows/s, {rows / cpu:,.0f} "
          f"rows per CPU-s; numpy prepare of the same: {numpy_wall:.1f}s, {rows / numpy_wall:,.0f} rows/s, "
          f"{rows / numpy_cpu:,.0f} rows per CPU-s; the TFDS writing alone: {rows / max(cpu - numpy_cpu, 1e-9):,.0f} "
          f"rows per CPU-s (load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    tfds_data = tfds_input.tfds_dataset(name, tfds_dir)
    for label, data in (("numpy shards", prepared.prepared(numpy_dir)), ("tfds_dataset (batch-first)", tfds_data)):
        rate = _best(_batches(data, FLAGS.tfds_batches), "examples")
        print(f"{dataset}: (c) host batches of {FLAGS.batch_size} from {label}: {rate}", flush=True)
    rate = _best(_per_example(name, tfds_dir, tfds_data.num_rows("train")), "examples")
    print(f"{dataset}: (c) host batches of {FLAGS.batch_size} from tfds.data_source, per-example decoding: {rate}",
          flush=True)  # fmt: skip


def _object_store(dataset: str, local_dir: str) -> None:
    """(d): the prepared shards of (b) on a local GCS emulator, streamed and staged."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "ctr"))
    import gcs_testlib  # the tests' emulator: the same server and environment

    from ctr import paths

    with gcs_testlib.gcs_emulator("bench") as url:
        gcs_testlib.use_in_this_process(gcs_testlib.emulator_env(url))
        remote = f"gs://bench/{dataset}"
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(local_dir) for f in fs) / 2**20
        start = time.time()
        paths.copy_tree(local_dir, remote)
        print(f"{dataset}: (d) upload of {size:,.0f} MiB to the emulator: {size / (time.time() - start):,.0f} MiB/s",
              flush=True)  # fmt: skip
        start = time.time()
        streamed = prepared.prepared(remote)
        first = _batches(streamed, 0)  # opens (downloads) the train shards, draws the first batch
        load = time.time() - start
        print(f"{dataset}: (d) streamed from gs://: train shards loaded in {load:.1f}s; then host batches: "
              f"{_best(_batches(streamed, FLAGS.batches), 'examples')}", flush=True)  # fmt: skip
        del first
        stage = os.path.join(FLAGS.work_dir, f"{dataset}_stage")
        shutil.rmtree(stage, ignore_errors=True)
        start = time.time()
        staged = prepared.prepared(remote, stage_dir=stage)
        _batches(staged, 0)
        print(f"{dataset}: (d) staged from gs:// to local disk in {time.time() - start:.1f}s; then host batches "
              f"(memory-mapped): {_best(_batches(staged, FLAGS.batches), 'examples')}", flush=True)  # fmt: skip


def main(argv) -> None:
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    print(f"cpus available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}", flush=True)
    for dataset in FLAGS.datasets:
        spec = splits.SplitSpec(prepare.DEFAULT_SPLIT[dataset], test_day=prepare.DEFAULT_TEST_DAY.get(dataset),
                                valid=prepare.DEFAULT_VALID[dataset])  # fmt: skip
        raw_dir = os.path.join(FLAGS.work_dir, f"{dataset}_raw")
        if {"a", "b"} & set(FLAGS.sections):
            _generate(dataset, raw_dir)
        if "a" in FLAGS.sections:
            size = sum(os.path.getsize(os.path.join(raw_dir, f)) for f in os.listdir(raw_dir)) / 2**20
            for threads in sorted({1, FLAGS.threads}):
                rate = _best(lambda: _parse(dataset, raw_dir, threads), "rows")
                print(f"{dataset}: (a) parse ({size:,.0f} MiB raw), {threads} thread(s): {rate}", flush=True)
        if "b" in FLAGS.sections:
            out = os.path.join(FLAGS.work_dir, f"{dataset}_prepared")
            shutil.rmtree(out, ignore_errors=True)
            start = time.time()
            prepare.prepare(dataset, raw_dir, out, spec, threads=FLAGS.threads, emit=lambda line: None)
            print(f"{dataset}: prepare took {time.time() - start:.1f}s", flush=True)
            for block_rows in (1, FLAGS.block_rows):
                rate = _best(_pipeline(out, block_rows), "examples")
                print(f"{dataset}: (b) host batches of {FLAGS.batch_size}, block_rows={block_rows}: {rate}",
                      flush=True)  # fmt: skip
        if "c" in FLAGS.sections:
            _tfds(dataset, spec)
        if "d" in FLAGS.sections:
            _object_store(dataset, os.path.join(FLAGS.work_dir, f"{dataset}_prepared"))


if __name__ == "__main__":
    app.run(main)
