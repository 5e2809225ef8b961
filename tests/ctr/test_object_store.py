"""A run whose prepared data and run directory are on gs:// (a local GCS emulator): it trains, checkpoints,
resumes exactly, and writes its results there, and nothing lands in a local ``gs:`` folder."""
import json
import os
import subprocess
import sys

import pytest

import ctr
from ctr import export as export_lib
from ctr import paths, prepare
from ctr.data import splits, synthetic

import gcs_testlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


@pytest.fixture(scope="module")
def emulator():
    with gcs_testlib.gcs_emulator("bkt") as url:
        env = gcs_testlib.emulator_env(url)
        saved = {k: os.environ.get(k) for k in env}
        gcs_testlib.use_in_this_process(env)
        yield env
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcs_testlib.use_in_this_process({})


def test_paths_on_the_store(emulator, tmp_path):
    base = "gs://bkt/paths"
    paths.resolve(f"{base}/a/x.txt").write_text("one")
    assert paths.read_text(f"{base}/a/x.txt") == "one" and paths.exists(f"{base}/a/x.txt")
    assert os.fspath(paths.resolve(base)) == base  # a URI is never made a local absolute path
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "y.bin").write_bytes(b"\x00\x01")
    assert paths.copy_tree(tmp_path / "d", f"{base}/copy") == ["e/y.bin"]
    assert paths.read_bytes(f"{base}/copy/e/y.bin") == b"\x00\x01"
    paths.move_tree(f"{base}/copy", f"{base}/moved")
    assert paths.read_bytes(f"{base}/moved/e/y.bin") == b"\x00\x01"
    assert not paths.exists(f"{base}/copy/e/y.bin")


def _train(run_dir, data_dir, steps, cwd, env):
    cmd = [sys.executable, "-m", "ctr.train", f"--gin_file={TINY}",
           "--gin_param=train.dataset_fn = @prepared", f"--gin_param=prepared.data_dir = '{data_dir}'",
           f"--gin_param=train.run_dir = '{run_dir}'", f"--gin_param=train.num_steps = {steps}"]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **env, PYTHONPATH=REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_train_checkpoint_resume_and_results_on_gs(emulator, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 6000, seed=2)
    local_data = str(tmp_path / "prepared")
    prepare.prepare("criteo", str(raw_dir), local_data, splits.SplitSpec(), seed=0, shard_bytes=200_000)
    paths.copy_tree(local_data, "gs://bkt/prepared")
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    out = _train("gs://bkt/run", "gs://bkt/prepared", 20, cwd, emulator)
    assert "Run directory: gs://bkt/run" in out
    assert paths.exists("gs://bkt/run/checkpoints/20") and paths.exists("gs://bkt/run/results.json")
    out = _train("gs://bkt/run", "gs://bkt/prepared", 40, cwd, emulator)
    assert "Resuming from the checkpoint at step 20" in out
    # The same 40 steps uninterrupted, all on local disk: the resumed run on gs:// must end the same.
    _train(str(tmp_path / "local_run"), local_data, 40, cwd, {})

    assert os.listdir(cwd) == []  # no local `gs:` folder, nothing else written where the command ran
    remote = json.loads(paths.read_text("gs://bkt/run/results.json"))
    local = json.loads((tmp_path / "local_run" / "results.json").read_text())
    assert remote["test"] == local["test"] and remote["valid"] == local["valid"]
    # The training losses, logged on gs:// by two runs (synced at checkpoints), equal the uninterrupted run's.
    def losses(text):
        return [(e["step"], e["train/loss"]) for e in map(json.loads, text.splitlines()) if "train/loss" in e]

    remote_losses = losses(paths.read_text("gs://bkt/run/metrics.jsonl"))
    assert remote_losses == losses((tmp_path / "local_run" / "metrics.jsonl").read_text())
    assert [step for step, _ in remote_losses] == list(range(5, 41, 5))
    for name in ("config.gin", "operative_config.gin", "plots/eval.png", "checkpoints/40"):
        assert paths.exists(f"gs://bkt/run/{name}"), name
    assert any("tfevents" in os.fspath(p) for p in paths.resolve("gs://bkt/run/tensorboard").iterdir())

    # The run exports from gs:// to gs:// (TF Serving's layout: <export_dir>/<step>/saved_model.pb + variables/).
    export_lib.parse_run_config("gs://bkt/run")
    written = export_lib.export("gs://bkt/run", "gs://bkt/export", verbose=False)
    assert written == "gs://bkt/export/40"
    assert paths.exists(f"{written}/saved_model.pb")
    assert any("variables.index" in os.fspath(p) for p in paths.resolve(f"{written}/variables").iterdir())
    assert os.listdir(cwd) == []
