r"""Input pipeline throughput: (a) raw-file parse rows/s, (b) prepared-data examples/s as host batches.

    python benchmarks/input_pipeline.py [--datasets=criteo,avazu,taobao] [--work_dir=/tmp/ctr_bench]

For each dataset it generates synthetic raw files in the real layout (kept in ``--work_dir`` for reruns),
then measures:

(a) parse: the dataset's streaming reader over the raw files (validation, fingerprints, TaobaoAds join and
    sequences included), rows per second of wall time, with 1 and ``--threads`` parser threads;
(b) pipeline: ``ctr.prepare`` writes the prepared shards, then ``prepared(...).train_batches`` delivers host
    batches (numpy dicts in the trainer's batch layout) for ``--batches`` steps of ``--batch_size``; examples
    per second of wall time, for an exact row permutation (``block_rows=1``) and for block shuffling.

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
from ctr.data import prepared, raw, row_accounting, splits, synthetic  # noqa: E402

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


def _generate(dataset: str, raw_dir: str) -> None:
    if os.path.isdir(raw_dir):
        return
    tmp = raw_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    start = time.time()
    if dataset == "criteo":
        synthetic.criteo.write_synthetic(os.path.join(tmp, "train.txt"), FLAGS.criteo_rows, seed=0)
    elif dataset == "avazu":
        synthetic.avazu.write_synthetic(os.path.join(tmp, "train.csv"), FLAGS.avazu_rows, seed=0)
    else:
        synthetic.taobao.write_synthetic(tmp, num_users=FLAGS.taobao_users, seed=0)
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
    data = prepared.prepared(data_dir, block_rows=block_rows)
    batches = data.train_batches(FLAGS.batch_size, 0, seed=0)
    next(batches)  # draws the epoch's permutation

    def measure() -> int:
        for _ in range(FLAGS.batches):
            next(batches)
        return FLAGS.batches * FLAGS.batch_size

    return measure


def main(argv) -> None:
    del argv
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    print(f"cpus available: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}", flush=True)
    for dataset in FLAGS.datasets:
        raw_dir = os.path.join(FLAGS.work_dir, f"{dataset}_raw")
        _generate(dataset, raw_dir)
        size = sum(os.path.getsize(os.path.join(raw_dir, f)) for f in os.listdir(raw_dir)) / 2**20
        for threads in sorted({1, FLAGS.threads}):
            rate = _best(lambda: _parse(dataset, raw_dir, threads), "rows")
            print(f"{dataset}: (a) parse ({size:,.0f} MiB raw), {threads} thread(s): {rate}", flush=True)
        out = os.path.join(FLAGS.work_dir, f"{dataset}_prepared")
        shutil.rmtree(out, ignore_errors=True)
        spec = splits.SplitSpec(prepare.DEFAULT_SPLIT[dataset], test_day=prepare.DEFAULT_TEST_DAY.get(dataset),
                                valid=prepare.DEFAULT_VALID[dataset])  # fmt: skip
        start = time.time()
        prepare.prepare(dataset, raw_dir, out, spec, threads=FLAGS.threads, emit=lambda line: None)
        print(f"{dataset}: prepare took {time.time() - start:.1f}s", flush=True)
        for block_rows in (1, FLAGS.block_rows):
            rate = _best(_pipeline(out, block_rows), "examples")
            print(f"{dataset}: (b) host batches of {FLAGS.batch_size}, block_rows={block_rows}: {rate}", flush=True)


if __name__ == "__main__":
    app.run(main)
