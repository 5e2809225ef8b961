"""The command line: config errors fail fast and clearly; a killed or preempted run resumes exactly."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import gin
import pytest

import ctr
from ctr import errors, train as train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.gin")


pytestmark = pytest.mark.usefixtures("clean_gin")


@pytest.mark.parametrize(
    "binding, message",
    [
        ("no_such_thing.value = 1", "no_such_thing"),
        ("train.no_such_parameter = 1", "no_such_parameter"),
        ("DCNv2.num_cross_layerz = 2", "num_cross_layerz"),
        ("train.batch_size = ", "Unable to parse value"),
    ],
)
def test_bad_bindings_are_rejected_at_parse_time(binding, message):
    with pytest.raises((ValueError, SyntaxError), match=message):
        train_cli.parse_config([TINY], [binding])


def test_missing_gin_file_is_named():
    with pytest.raises(errors.ConfigError, match="--gin_file=configs/nope.gin: no such file"):
        train_cli.parse_config(["configs/nope.gin"], [])


CONFIGS = sorted(
    os.path.relpath(os.path.join(d, f), REPO)
    for d, _, files in os.walk(os.path.join(REPO, "configs"))
    for f in files
    if f.endswith(".gin") and os.path.basename(d) != "base"
)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_shipped_config_parses_with_every_include(path):
    """Strict parse (unknown names fail); embedding mixins are parsed on top of the quick start."""
    files = [path] if "/embeddings/" not in path else ["configs/quickstart.gin", path]
    train_cli.parse_config([os.path.join(REPO, f) for f in files], ['train.run_dir = "unused"'])
    stem = os.path.splitext(os.path.basename(path))[0]
    if os.path.dirname(path) == "configs" and "_" in stem and not stem.endswith("_data"):
        assert gin.query_parameter("train.model_name") == stem.split("_", 1)[1]


@pytest.mark.parametrize("dataset", ["criteo", "avazu", "taobao"])
def test_cetnet_configs_give_each_tower_its_own_embeddings(dataset):
    from ctr.data import avazu, criteo, taobao
    from embeddings import towers

    # No prepared vocabulary here: the DHEN towers get hashed per-feature tables instead of vocabulary ones.
    train_cli.parse_config([os.path.join(REPO, f"configs/{dataset}_cetnet.gin")], ["PerFeature.vocabularies = None"])
    schema = {"criteo": criteo, "avazu": avazu, "taobao": taobao}[dataset].feature_schema()
    collection = towers.tower_collections(schema)
    families = {name: {part.family for part in c.parts} for name, c in collection.towers}
    # The DHEN towers read tables: on DHE their dots are mostly a constant (benchmarks/RESULTS.md, issue 10).
    assert families == {"interformer": {"unified"}, "dhen": {"per_feature"}}


@pytest.mark.parametrize("dataset", ["criteo", "avazu", "taobao"])
def test_cetnet_configs_learn_the_tower_prior(dataset):
    train_cli.parse_config([os.path.join(REPO, f"configs/{dataset}_cetnet.gin")], ["PerFeature.vocabularies = None"])
    # A plain confidence fusion fell below the better tower (benchmarks/RESULTS.md, "CETNet's learned tower prior").
    assert gin.query_parameter("CETNet.learn_prior") is True


def _cli(*args, cwd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return [sys.executable, "-m", "ctr.train", f"--gin_file={TINY}", *args], dict(cwd=cwd, env=env)


def test_cli_reports_unknown_binding_before_any_work(tmp_path):
    cmd, kw = _cli("--gin_param=train.no_such_parameter = 3", cwd=tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 2
    assert "configuration error" in done.stderr and "no_such_parameter" in done.stderr
    assert not os.path.exists(tmp_path / "runs")  # nothing was created


NUM_STEPS = 120
BATCH_SIZE, LOG_EVERY, EVERY_STEPS = 256, 5, 10  # tiny.gin's batch size, log and checkpoint periods


def _start(tmp_path, run_name, *extra):
    cmd, kw = _cli(
        f'--gin_param=train.run_dir = "{run_name}"',
        '--gin_param=synthetic_criteo.data_dir = "data"',
        f"--gin_param=train.num_steps = {NUM_STEPS}",
        *extra,
        cwd=tmp_path,
        # One device keeps the three runs quick; resume across meshes is covered in test_checkpointing.
        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_checkpoint(proc, ckpt_dir, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ckpt_dir) and any(n.isdigit() for n in os.listdir(ckpt_dir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def _results(tmp_path, run_name):
    with open(tmp_path / run_name / "results.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    _finish(_start(tmp_path, "full"))
    return _results(tmp_path, "full"), _train_losses(tmp_path, "full")


def _same_final_metrics(a, b):
    for split in ("valid", "test"):
        for key in ("auc", "logloss"):
            assert a[split][key] == pytest.approx(b[split][key], rel=1e-6, abs=1e-7), (split, key)
    # The counter is restored from the checkpoint's record: a resumed run that lost it counts only its own steps.
    assert a["examples_seen"] == NUM_STEPS * BATCH_SIZE


def _resumed_step(out: str) -> int:
    """The step the restarted run says it restored (its "Resuming from the checkpoint at step N" line)."""
    match = re.search(r"Resuming from the checkpoint at step (\d+) ", out)
    assert match, out[-2000:]
    return int(match.group(1))


def _train_losses(tmp_path, run_name) -> list[tuple[int, float]]:
    """(step, mean train loss) of every log line, in file order (a restarted run appends)."""
    rows = [json.loads(line) for line in open(tmp_path / run_name / "metrics.jsonl")]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _continued_from(tmp_path, run_name, resumed_at, uninterrupted_losses):
    """The restarted run trained only the steps after `resumed_at` (steps up to it were logged once, by the
    first process), and the log windows it ran whole have the uninterrupted run's mean losses: it continued
    the same trajectory, from the restored state."""
    logged = _train_losses(tmp_path, run_name)
    before = [s for s, _ in logged if s <= resumed_at]
    stop_log = [resumed_at] if resumed_at % LOG_EVERY else []  # SIGTERM logs the step it stops at
    assert before == list(range(LOG_EVERY, resumed_at + 1, LOG_EVERY)) + stop_log, before
    last = dict(logged)  # the restarted run's value where both processes logged a step
    expected = dict(uninterrupted_losses)
    full_windows = [s for s in sorted(expected) if s - LOG_EVERY >= resumed_at]
    assert full_windows and set(full_windows) <= set(last)
    for step in full_windows:
        assert last[step] == pytest.approx(expected[step], rel=1e-5), step


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path, uninterrupted):
    proc = _start(tmp_path, "killed")
    _wait_for_checkpoint(proc, tmp_path / "killed" / "checkpoints")
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    out = _finish(_start(tmp_path, "killed"))
    resumed_at = _resumed_step(out)
    # The kill landed mid-run: the restored checkpoint is a periodic one, before the last (step NUM_STEPS).
    assert 0 < resumed_at < NUM_STEPS and resumed_at % EVERY_STEPS == 0, resumed_at
    _continued_from(tmp_path, "killed", resumed_at, uninterrupted[1])
    _same_final_metrics(_results(tmp_path, "killed"), uninterrupted[0])


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, uninterrupted):
    proc = _start(tmp_path, "preempted")
    _wait_for_checkpoint(proc, tmp_path / "preempted" / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "Stopped by SIGTERM at step" in out
    stopped_at = int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert str(stopped_at) in os.listdir(tmp_path / "preempted" / "checkpoints")
    out = _finish(_start(tmp_path, "preempted"))
    assert _resumed_step(out) == stopped_at
    _continued_from(tmp_path, "preempted", stopped_at, uninterrupted[1])
    _same_final_metrics(_results(tmp_path, "preempted"), uninterrupted[0])
