"""Two processes on 127.0.0.1 (jax.distributed, 4 CPU devices each) train like one process with 8 devices, on
prepared TaobaoAds data with tables row-sharded over all 8 devices: the shard_map route sends ids and rows
across the process boundary, each host reads its slice of every batch, and evaluation gathers every
prediction and gAUC group to process 0.

The two runs compute the same global batches with the same programs; only the collectives differ (gloo between
processes, in-process copies within one), which reorder float32 sums of gradients. Adam divides by the root of
the squared-gradient average, so for an entry whose gradients are near 0 a few-ulp change moves its update by
more than a few ulps: measured over 12 steps, parameters differ by at most 1.6e-6 and test logits by 2.4e-7.
The bounds are atol 1e-5 for both: 1e-3 of one Adam step (lr 1e-2), while a row read from the wrong shard
moves entries by ~1e-2 and more. Labels and groups are gathered, not computed: they are compared exactly.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import ctr
from state_testlib import assert_states_close, checkpoint_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
CAPTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "capture_train.py")
STEPS, BATCH = 12, 256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, capture=None):
    env = dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    if capture:
        env["CTR_CAPTURE"] = str(capture)
    return env


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    from ctr.data import synthetic

    root = tmp_path_factory.mktemp("taobao")
    synthetic.taobao.write_synthetic(str(root / "raw"), num_users=250, seed=5)
    done = subprocess.run(
        [sys.executable, "-m", "ctr.prepare", "--dataset=taobao", f"--raw_dir={root / 'raw'}",
         f"--out_dir={root / 'prepared'}", f"--gin_file={REPO}/configs/taobao_data.gin", "--shard_mib=1"],
        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "prepared"


def _command(run_dir, data_dir, *extra):
    return [
        sys.executable, CAPTURE, f"--gin_file={REPO}/configs/taobao_dcnv2.gin",
        f'--gin_param=DATA_DIR = "{data_dir}"',
        f'--gin_param=train.run_dir = "{run_dir}"',
        f"--gin_param=train.num_steps = {STEPS}", f"--gin_param=train.batch_size = {BATCH}",
        "--gin_param=train.eval_batch_size = 512", "--gin_param=train.log_every = 4", "--gin_param=train.progress = False",
        "--gin_param=Checkpointer.every_steps = 0",
        "--gin_param=build_collection.default_dim = 8", "--gin_param=DCNv2.num_cross_layers = 2",
        "--gin_param=DCNv2.mlp = (32, 16)", "--gin_param=DCNv2.dropout = 0.0",
        "--gin_param=dense_optimizer.learning_rate = 0.01",
        # Tables over all 8 devices of a 4x2 mesh: each process holds half of every table's shards.
        "--gin_param=make_mesh.model = 2", '--gin_param=logical_rules.table_rows = ("data", "model")',
        '--gin_param=LookupOptions.path = "shard_map"',
        *extra,
    ]  # fmt: skip


def test_two_processes_match_one_process(tmp_path, prepared_dir):
    single = subprocess.run(_command(tmp_path / "single", prepared_dir), env=_env(8, tmp_path / "single_eval"),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(tmp_path / "multi", prepared_dir, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}"),
            env=_env(4, tmp_path / "multi_eval"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "Results:" in outs[0][0] and "Results:" not in outs[1][0]  # only process 0 reports and writes

    one = json.load(open(tmp_path / "single" / "results.json"))
    two = json.load(open(tmp_path / "multi" / "results.json"))
    assert two["processes"] == 2 and two["devices"] == 8 and one["processes"] == 1 and one["devices"] == 8
    assert two["examples_seen"] == one["examples_seen"] == STEPS * BATCH  # global batches (a host's own: half)

    # Per-example outputs of the final evaluations (valid, then test), as the metrics saw them.
    for i, split in enumerate(("valid", "test")):
        want, got = np.load(tmp_path / f"single_eval{i}.npz"), np.load(tmp_path / f"multi_eval{i}.npz")
        assert len(got["labels"]) == one[split]["num_examples"] == two[split]["num_examples"]
        np.testing.assert_array_equal(got["labels"], want["labels"])
        np.testing.assert_array_equal(got["groups"], want["groups"])  # the users, gathered from both hosts
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=0, atol=1e-5)
        for key in ("auc", "gauc", "logloss"):
            assert two[split][key] == pytest.approx(one[split][key], abs=1e-5), (split, key)

    assert_states_close(checkpoint_state(tmp_path / "single", STEPS), checkpoint_state(tmp_path / "multi", STEPS),
                        atol=1e-5)
