"""Training from a TFDS-built dataset: the same metrics as from the numpy shards; SIGKILL and restart is exact."""
import json
import os
import re
import subprocess
import sys
import time

import gin
import pytest

import ctr
from ctr import prepare, trainer
from ctr import train as train_cli
from ctr.data import criteo, splits, synthetic, tfds_builders

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")
NUM_STEPS, EVERY_STEPS = 60, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(numpy prepared dir, TFDS data dir, TFDS name): one synthetic Criteo file, prepared both ways (with a
    vocabulary)."""
    root = tmp_path_factory.mktemp("data")
    (root / "raw").mkdir()
    synthetic.criteo.write_synthetic(str(root / "raw" / "train.txt"), 6000, seed=0)
    spec = splits.SplitSpec()
    gin.clear_config()
    processing = criteo.Processing(min_count=2)
    prepare.prepare("criteo", str(root / "raw"), str(root / "numpy"), spec, seed=1, processing=processing)
    builder = tfds_builders.prepare("criteo", str(root / "raw"), str(root / "tfds"), spec, seed=1,
                                    processing=processing)  # fmt: skip
    return str(root / "numpy"), str(root / "tfds"), f"{builder.name}/{builder.builder_config.name}"


def _config(data, fmt):
    """(gin files, bindings): TINY with per-feature tables indexed by the vocabulary, as the shipped configs
    bind it (PerFeature.vocabularies = @vocabularies()); TFDS through configs/tfds.gin."""
    numpy_dir, tfds_dir, name = data
    files = [TINY, os.path.join(REPO, "configs", "embeddings", "per_feature.gin")]
    common = [f"train.num_steps = {NUM_STEPS}", f"Checkpointer.every_steps = {EVERY_STEPS}",
              "PerFeature.vocabularies = @vocabularies()"]  # fmt: skip
    if fmt == "numpy":
        return files, common + ["train.dataset_fn = @prepared", f'prepared.data_dir = "{numpy_dir}"',
                                f'vocabularies.data_dir = "{numpy_dir}"']  # fmt: skip
    return files + [os.path.join(REPO, "configs", "tfds.gin")], common + [f'TFDS_NAME = "{name}"',
                                                                          f'TFDS_DIR = "{tfds_dir}"']  # fmt: skip


def _train(run_dir, config):
    gin.clear_config()
    train_cli.parse_config(*config)
    try:
        return trainer.train(run_dir=str(run_dir))
    finally:
        gin.clear_config()


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


@pytest.fixture(scope="module")
def tfds_run(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tfds_run") / "run"
    return run_dir, _train(run_dir, _config(data, "tfds"))


def test_tfds_and_numpy_shards_train_to_identical_metrics(data, tfds_run, tmp_path):
    """Same batches and the same vocabulary (the build's kept values, through configs/tfds.gin): the same run."""
    tfds_dir, from_tfds = tfds_run
    from_numpy = _train(tmp_path / "run", _config(data, "numpy"))
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            assert from_tfds[split][key] == from_numpy[split][key], (split, key)
    assert from_tfds["test"]["auc"] > 0.5
    assert from_tfds["examples_seen"] == from_numpy["examples_seen"] == NUM_STEPS * 256
    assert _losses(tfds_dir) == _losses(tmp_path / "run")  # every logged train loss, bit for bit


def test_sigkill_then_rerun_on_tfds_resumes_exactly(data, tfds_run, tmp_path):
    uninterrupted_dir, uninterrupted = tfds_run
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    files, bindings = _config(data, "tfds")
    cmd = [sys.executable, "-m", "ctr.train", *(f"--gin_file={f}" for f in files), '--gin_param=train.run_dir = "run"',
           *(f"--gin_param={b}" for b in bindings)]  # fmt: skip

    def start():
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = start()
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (ckpt_dir.is_dir() and any(n.isdigit() for n in os.listdir(ckpt_dir))):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not (tmp_path / "run" / "results.json").exists()
    proc = start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    resumed_at = int(re.search(r"Resuming from the checkpoint at step (\d+) ", out).group(1))
    assert 0 < resumed_at < NUM_STEPS and resumed_at % EVERY_STEPS == 0, resumed_at
    with open(tmp_path / "run" / "results.json") as f:
        resumed = json.load(f)
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            assert resumed[split][key] == pytest.approx(uninterrupted[split][key], rel=1e-6, abs=1e-7), (split, key)
    assert resumed["examples_seen"] == NUM_STEPS * 256
    expected = dict(_losses(uninterrupted_dir))
    after = {s: v for s, v in _losses(tmp_path / "run") if s >= resumed_at + 5}  # log windows run whole after it
    assert after and all(v == pytest.approx(expected[s], rel=1e-5) for s, v in after.items()), (after, expected)
