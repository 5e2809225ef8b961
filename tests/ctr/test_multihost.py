"""Two processes on 127.0.0.1 (jax.distributed, 2 CPU devices each) train like one process with 4 devices."""
import json
import os
import socket
import subprocess
import sys

import pytest

import ctr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(run_dir, data_dir, *extra):
    return [
        sys.executable, "-m", "ctr.train", f"--gin_file={TINY}",
        f'--gin_param=train.run_dir = "{run_dir}"',
        f'--gin_param=synthetic_criteo.data_dir = "{data_dir}"',
        "--gin_param=train.num_steps = 20",
        *extra,
    ]


def _env(devices):
    return dict(
        os.environ,
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )


def test_two_processes_match_one_process(tmp_path):
    data_dir = tmp_path / "data"
    single = subprocess.run(_command(tmp_path / "single", data_dir), env=_env(4), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            _command(tmp_path / "multi", data_dir, f"--coordinator_address=127.0.0.1:{port}",
                     "--num_processes=2", f"--process_id={i}"),
            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "Results:" in outs[0][0] and "Results:" not in outs[1][0]  # only process 0 reports and writes

    one = json.load(open(tmp_path / "single" / "results.json"))
    two = json.load(open(tmp_path / "multi" / "results.json"))
    assert two["processes"] == 2 and two["devices"] == 4 and one["devices"] == 4
    assert two["examples_seen"] == one["examples_seen"] == 20 * 256  # global batches (a host counting its own: half)
    for split in ("valid", "test"):
        assert two[split]["num_examples"] == one[split]["num_examples"]
        # Same global batches and math; only cross-process reduction order may differ.
        assert two[split]["auc"] == pytest.approx(one[split]["auc"], abs=1e-4)
        assert two[split]["logloss"] == pytest.approx(one[split]["logloss"], abs=1e-4)
