"""TaobaoAds as a user runs it: the four raw CSVs -> ``ctr.prepare`` (the CLI, with configs/taobao_data.gin) ->
``@prepared`` data -> InterFormer from configs/taobao_interformer.gin (shrunk) with sequences, masks and tables
row-sharded on the shard_map route -> a stopped-and-resumed run -> results.json with gAUC. (That a resumed run
ends exactly where an uninterrupted one does is test_train_cli.py's and test_trainer_sharded.py's.)

The test split's users and clicks are counted from raw_sample.csv with the csv module, and the gAUC is recomputed
by brute force over pairs from the per-example predictions: neither goes through the code under test.
"""
import collections
import csv
import datetime
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

import ctr
from ctr import metrics, train as train_cli, trainer
from ctr.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
STEPS = 8
CONFIG = [
    "train.batch_size = 256", "train.eval_batch_size = 512", f"train.num_steps = {STEPS}", "train.log_every = 2",
    "train.progress = False", 'train.final_eval_splits = ("test",)', "Checkpointer.every_steps = 4",
    "build_collection.default_dim = 8", "InterFormer.dim = 8", "InterFormer.num_layers = 1",
    "InterFormer.head = (16,)", "DHENStack.dcn_rank = 4", "dense_optimizer.learning_rate = 0.01",
    # Tables over the 2 "model" devices (4 replicas each), read and updated through the all-to-all route.
    "make_mesh.model = 2", 'logical_rules.table_rows = ("model",)', 'LookupOptions.path = "shard_map"',
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(raw dir, prepared dir): 250 synthetic users, prepared by the command-line tool."""
    root = tmp_path_factory.mktemp("taobao")
    raw_dir, out_dir = root / "raw", root / "prepared"
    synthetic.taobao.write_synthetic(str(raw_dir), num_users=250, seed=4)
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(
        [sys.executable, "-m", "ctr.prepare", "--dataset=taobao", f"--raw_dir={raw_dir}", f"--out_dir={out_dir}",
         f"--gin_file={REPO}/configs/taobao_data.gin", "--shard_mib=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return raw_dir, out_dir


def _train(run_dir, out_dir, *bindings):
    """One in-process run of the shrunk InterFormer config; returns (results, [(labels, logits, groups)])."""
    gin.clear_config()
    train_cli.parse_config(
        [os.path.join(REPO, "configs/taobao_interformer.gin")], [f'DATA_DIR = "{out_dir}"', *CONFIG, *bindings]
    )
    seen = []
    evaluate = metrics.evaluate

    def capture(labels, logits, groups=None):
        seen.append((np.asarray(labels), np.asarray(logits), None if groups is None else np.asarray(groups)))
        return evaluate(labels, logits, groups)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(metrics, "evaluate", capture)
            results = trainer.train(run_dir=str(run_dir))
    finally:
        gin.clear_config()
    return results, seen


def _raw_test_day(raw_dir):
    """{user: (impressions, clicks)} on the test day (2017-05-13, China time), from the raw CSV."""
    china = datetime.timezone(datetime.timedelta(hours=8))
    test_day = datetime.date(2017, 5, 13)
    out = collections.defaultdict(lambda: [0, 0])
    with open(raw_dir / "raw_sample.csv", newline="") as f:
        for row in csv.DictReader(f):
            if datetime.datetime.fromtimestamp(int(row["time_stamp"]), china).date() == test_day:
                out[int(row["user"])][0] += 1
                out[int(row["user"])][1] += int(row["clk"])
    return {user: tuple(v) for user, v in out.items()}


def _brute_force_gauc(labels, scores, groups):
    """Impression-weighted mean over users with both classes of P(score_pos > score_neg) (ties count 1/2)."""
    total, weight = 0.0, 0
    for user in np.unique(groups):
        y, s = labels[groups == user], scores[groups == user]
        pos, neg = s[y == 1], s[y == 0]
        if len(pos) and len(neg):
            wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
            total += len(y) * wins / (len(pos) * len(neg))
            weight += len(y)
    return total / weight


def test_prepared_taobao_trains_resumes_and_reports_gauc(tmp_path, data, capsys):
    raw_dir, out_dir = data
    # A run stopped after step 4's checkpoint (a run of 4 steps stands for it), then the full command again.
    _train(tmp_path / "run", out_dir, "train.num_steps = 4")
    capsys.readouterr()
    results, (seen,) = _train(tmp_path / "run", out_dir)
    assert "Resuming from the checkpoint at step 4 " in capsys.readouterr().out
    logged = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [s for s in logged if s <= STEPS] == [2, 4, 4, 6, 8, 8]  # (the final evaluations log at 4, then 8)
    assert results["examples_seen"] == STEPS * 256
    labels, logits, groups = seen

    # The test split is the raw file's test day, every impression once, grouped by its user.
    raw_users = _raw_test_day(raw_dir)
    assert groups is not None
    assert results["test"]["num_examples"] == len(labels) == sum(n for n, _ in raw_users.values())
    got_users = {int(u): (int((groups == u).sum()), int(labels[groups == u].sum())) for u in np.unique(groups)}
    assert got_users == raw_users

    on_disk = json.load(open(tmp_path / "run" / "results.json"))
    assert on_disk["dataset"] == "taobao" and on_disk["model"] == "interformer" and on_disk["steps"] == STEPS
    assert on_disk["test"]["gauc"] == pytest.approx(_brute_force_gauc(labels, logits, groups), abs=1e-12)
    assert on_disk["test"]["auc"] == pytest.approx(results["test"]["auc"], abs=1e-12)
    assert 0 < on_disk["test"]["gauc"] < 1
