"""Two processes x 4 CPU devices on 127.0.0.1 with ``prepared.host_shards=True``: each process opens only the
train shards it owns, and in one epoch the two together are handed every train row exactly once."""
import json
import os
import socket
import subprocess
import sys

import numpy as np

import ctr
from ctr import prepare
from ctr.data import splits, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
SHARD_ROWS, SHARDS, BATCH = 640, 4, 256


def _equal_shards(data_dir):
    """Rewrites the train split as ``SHARDS`` shards of ``SHARD_ROWS`` rows (the prepare step's shards are as
    uneven as its random buckets), so that one epoch reads every row: the stored format, written as prepare does."""
    meta_path = os.path.join(data_dir, "metadata.json")
    meta = json.load(open(meta_path))
    train = meta["splits"]["train"]
    arrays = {a: np.concatenate([np.load(os.path.join(data_dir, f"{s['path']}.{a}.npy")) for s in train["shards"]])
              for a in meta["arrays"]}
    assert len(arrays["label"]) >= SHARD_ROWS * SHARDS
    for s in train["shards"]:
        for a in meta["arrays"]:
            os.remove(os.path.join(data_dir, f"{s['path']}.{a}.npy"))
    train["shards"] = []
    for k in range(SHARDS):
        path = f"train/eq{k:02d}"
        for a, values in arrays.items():
            np.save(os.path.join(data_dir, f"{path}.{a}.npy"), values[k * SHARD_ROWS : (k + 1) * SHARD_ROWS])
        train["shards"].append({"path": path, "rows": SHARD_ROWS})
    train["rows"] = SHARD_ROWS * SHARDS
    json.dump(meta, open(meta_path, "w"))
    return np.concatenate([arrays["label"][: SHARD_ROWS * SHARDS, None].astype(np.float64),
                           arrays["dense"][: SHARD_ROWS * SHARDS]], axis=1)


def test_each_process_reads_only_its_shards_and_one_epoch_covers_the_split_once(tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 4000, seed=3)
    data_dir = str(tmp_path / "prepared")
    prepare.prepare("criteo", str(raw_dir), data_dir, splits.SplitSpec(), seed=0)
    split_rows = _equal_shards(data_dir)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               CTR_HOST_INPUT=str(tmp_path / "input"))
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "host_input_train.py"), f"--gin_file={HERE}/tiny.gin",
         "--gin_param=train.dataset_fn = @prepared", f"--gin_param=prepared.data_dir = '{data_dir}'",
         "--gin_param=prepared.host_shards = True", f"--gin_param=train.run_dir = '{tmp_path / 'run'}'",
         "--gin_param=train.num_steps = None", "--gin_param=train.num_epochs = 1",
         f"--gin_param=train.batch_size = {BATCH}", "--gin_param=Checkpointer.every_steps = 0",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "Training 10 steps" in outs[0][0]  # 2 hosts x 1280 rows, 128 rows each a step

    train_files = []
    for i in range(2):
        opened = json.load(open(tmp_path / f"input{i}.json"))
        train_files.append({os.path.basename(f).split(".")[0] for f in opened if f"{os.sep}train{os.sep}" in f})
    assert len(train_files[0]) == len(train_files[1]) == 2 and not train_files[0] & train_files[1]
    assert train_files[0] | train_files[1] == {f"eq{k:02d}" for k in range(SHARDS)}

    # The input thread reads a few batches ahead of the last step: the first 10 host batches are the epoch.
    read = np.concatenate([np.load(tmp_path / f"input{i}.npz")["rows"][: 10 * BATCH // 2] for i in range(2)])
    assert len(read) == len(split_rows)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(order(read), order(split_rows.astype(read.dtype)))
