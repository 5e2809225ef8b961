"""Two processes on 127.0.0.1 (4 CPU devices each) under faults injected at fixed steps (``inject_fault``, gin):
SIGTERM to one process, SIGKILL of one, a hang of one; and checkpoints moving between 1 process and 2.

Both faulted runs start as 2 processes from a 1-process checkpoint (step 20, 8 devices):
- SIGTERM to process 1 at step 32: both stop at the next boundary (35) with a checkpoint, having run the
  preemption check's all-gather only at boundaries (counted in each process by count_train.py: 3 for steps
  25, 30, 35, where a per-step check runs 15); resumed as 1 process with 8 devices, the run finishes.
- Process 1 SIGKILLed at step 35, after the checkpoint at 30: process 0 exits 4 naming process 1 within 60 s;
  the same command again resumes from 30 and finishes.
- Process 1 hangs at step 7: its watchdog exits 5 with its stack; process 0, waiting for it in a collective,
  exits non-zero too (its own watchdog, or the lost heartbeat), both within the bound.

The watchdog's bound itself (recent step times, slow phases) is checked on a fake clock.

The reference is one uninterrupted 2-process run from the same checkpoint at 20 (``two_from_20``): the SIGTERM
test compares its state at 35 leaf by leaf and its final metrics after the same 1-process resume, the SIGKILL
test its final metrics, all exactly (the same programs on the same devices). Not with a 1-process run: there the
collectives' summation order differs (gloo between processes), and Adam amplifies that round-off from step to
step, on some CPUs past any useful bound within 15 steps. test_multihost.py compares 2 processes with 1, over 12
steps, from a fresh start.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import ctr
from state_testlib import assert_states_close, checkpoint_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(ctr.__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
COUNT = os.path.join(HERE, "count_train.py")
TINY = os.path.join(HERE, "tiny.gin")
HEARTBEAT_S = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, counts=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")  # fmt: skip
    if counts:
        env["CTR_COLLECTIVES"] = str(counts)
    return env


def _command(run_dir, data_dir, *params):
    return [sys.executable, COUNT, f"--gin_file={TINY}", f'--gin_param=synthetic_criteo.data_dir = "{data_dir}"',
            f'--gin_param=train.run_dir = "{run_dir}"', '--gin_param=train.final_eval_splits = ("test",)',
            *(f"--gin_param={p}" for p in params)]  # fmt: skip


def _one(run_dir, data_dir, *params):
    done = subprocess.run(_command(run_dir, data_dir, *params), env=_env(8), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _two(run_dir, data_dir, *params, faulty=(), counts=None, timeout=300):
    """Both processes of a 2-process run; ``faulty`` bindings go to process 1 only. Returns [(rc, out, err,
    seconds to exit)]."""
    port, start = _free_port(), time.monotonic()
    procs = [
        subprocess.Popen(
            _command(run_dir, data_dir, *params, *(faulty if i == 1 else ())) + [
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                f"--heartbeat_timeout_s={HEARTBEAT_S}"],
            env=_env(4, counts), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e, time.monotonic() - start))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, data dir); root/uninterrupted holds a 1-process 8-device run of tiny.gin's first 20 steps, whose
    last checkpoint every 2-process run here resumes from."""
    root = tmp_path_factory.mktemp("faults")
    _one(root / "uninterrupted", root / "data", "train.num_steps = 20")
    return root, root / "data"


def _truncate(run, step):
    """``run`` as it was at ``step``: later checkpoints and the results removed."""
    for later in os.listdir(run / "checkpoints"):
        if int(later) > step:
            shutil.rmtree(run / "checkpoints" / later)
    os.remove(run / "results.json")


def _copy_at(source, run, step):
    """``source`` as it was at ``step``, copied to ``run``."""
    shutil.copytree(source, run)
    _truncate(run, step)


def _assert_all_exit_0(outs):
    for rc, _, err, _ in outs:
        assert rc == 0, err[-3000:]
    return outs


@pytest.fixture(scope="module")
def two_from_20(setup):
    """The 1-process run's checkpoint at 20 resumed by 2 processes that are never faulted, to step 40, with a
    checkpoint every 5 steps."""
    root, data = setup
    run = root / "two_from_20"
    _copy_at(root / "uninterrupted", run, 20)
    _assert_all_exit_0(_two(run, data, "Checkpointer.every_steps = 5", "Checkpointer.keep = 8"))
    return run


def _assert_same_metrics(run_dir, want):
    """``run_dir``'s results match ``want`` exactly."""
    got = json.load(open(os.path.join(run_dir, "results.json")))
    assert got["examples_seen"] == want["examples_seen"] == 40 * 256 and got["steps"] == 40
    for key in ("auc", "logloss"):
        assert got["test"][key] == want["test"][key], key
    return got


def test_sigterm_stops_both_at_a_boundary_and_two_processes_resume_as_one(setup, two_from_20, tmp_path):
    root, data = setup
    run = tmp_path / "run"
    _copy_at(root / "uninterrupted", run, 20)
    outs = _assert_all_exit_0(_two(run, data, faulty=(
        "inject_fault.process = 1", "inject_fault.step = 32", 'inject_fault.action = "sigterm"'),
        counts=tmp_path / "count"))  # fmt: skip
    assert "Resuming from the checkpoint at step 20" in outs[0][1]
    assert "Stopped by SIGTERM at step 35; checkpoint saved" in outs[0][1]
    assert sorted(os.listdir(run / "checkpoints"), key=int)[-2:] == ["30", "35"]
    # The check's collective ran at the boundaries 25, 30, 35 only, on both processes.
    assert [int(open(f"{tmp_path / 'count'}{i}").read()) for i in range(2)] == [3, 3]
    # What the 2 processes saved at 35 is, exactly, what the 2 uninterrupted processes hold at 35.
    assert_states_close(checkpoint_state(two_from_20, 35), checkpoint_state(run, 35), atol=0)

    done = _one(run, data)
    assert "Resuming from the checkpoint at step 35" in done.stdout
    # And it ends exactly where the uninterrupted 2 processes' own checkpoint at 35, resumed as 1 process, ends.
    reference = tmp_path / "reference"
    _copy_at(two_from_20, reference, 35)
    _one(reference, data)
    got = _assert_same_metrics(run, json.load(open(reference / "results.json")))
    assert got["processes"] == 1 and got["devices"] == 8


def test_sigkill_of_one_process_stops_the_other_and_the_rerun_finishes(setup, two_from_20, tmp_path):
    root, data = setup
    run = tmp_path / "run"
    _copy_at(root / "uninterrupted", run, 20)
    outs = _two(run, data, faulty=("inject_fault.process = 1", "inject_fault.step = 35",
                                   'inject_fault.action = "sigkill"'))  # fmt: skip
    assert outs[1][0] == -9
    rc, out, err, seconds = outs[0]
    assert "Resuming from the checkpoint at step 20" in out
    assert rc == 4 and "process 0 of 2: lost process 1: no heartbeat for" in err, err[-3000:]
    assert seconds < 60 + 30  # 30 s: start-up and 15 steps, before the kill

    outs = _assert_all_exit_0(_two(run, data))
    assert "Resuming from the checkpoint at step 30" in outs[0][1]
    # Exactly where the 2 processes that resumed from the same checkpoint at 20 and were never killed end.
    got = _assert_same_metrics(run, json.load(open(two_from_20 / "results.json")))
    assert got["processes"] == 2 and got["devices"] == 8


def test_a_hang_in_one_process_stops_both_within_the_watchdog_bound(setup, tmp_path):
    _, data = setup
    # Process 1 gets the tighter bound, so that its own watchdog, not the loss of process 0, ends it (measured
    # on 2 loaded cores: ~1.6 s per step, process 1 out after 10 s, process 0 after 5 s more).
    outs = _two(tmp_path / "run", data, "Watchdog.floor_s = 20.0", "Watchdog.multiple = 4.0",
                faulty=("inject_fault.process = 1", "inject_fault.step = 7", 'inject_fault.action = "hang"',
                        "Watchdog.floor_s = 2.0", "Watchdog.multiple = 1.0"), timeout=200)  # fmt: skip
    (rc0, _, err0, t0), (rc1, _, err1, t1) = outs
    assert rc1 == 5, err1[-3000:]
    assert "process 1 of 2: watchdog: no progress for" in err1 and "in step 8 (bound" in err1
    assert re.search(r'File ".*faults.py", line \d+ in at', err1)  # the stack, down to the injected sleep
    # Process 0 waits for process 1 in a collective: its watchdog or the lost heartbeat ends it.
    assert rc0 in (4, 5), err0[-3000:]
    assert "process 0 of 2: watchdog: no progress" in err0 or "process 0 of 2: lost process 1" in err0
    assert max(t0, t1) < 150  # start-up included


def test_watchdog_bound_follows_recent_steps_and_leaves_out_slow_phases(monkeypatch):
    from ctr import faults

    clock = [100.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])
    watch = faults.Watchdog(steps_per_sync=5, multiple=2.0, floor_s=1.0, slow_phase_s=50.0)  # thread not started
    assert watch.bound_s() == 50.0  # the first step compiles
    for seconds in (7.0, 0.5, 1.5):  # the first step's time (compilation) is not counted
        clock[0] += seconds
        watch.step_done(int(clock[0]))
    assert watch.bound_s() == pytest.approx(1.0 + 2.0 * 5 * 1.0)  # floor + multiple x 5 steps of their mean
    with watch.phase("evaluation"):
        assert watch.bound_s() == 50.0
        clock[0] += 30.0
    clock[0] += 1.0
    watch.step_done(200)  # the step the evaluation interrupted is not timed: its 31 s are no step time
    assert watch.bound_s() == pytest.approx(1.0 + 2.0 * 5 * 1.0)
    assert faults.Watchdog(slow_phase_s=0.0).bound_s() is None


def test_watchdog_leaves_out_time_the_whole_process_was_stopped(monkeypatch):
    from ctr import faults

    clock = [100.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: clock[0])

    def run_for(watch, seconds):  # the process runs: the thread checks every period
        for _ in range(round(seconds / 0.1)):
            clock[0] += 0.1
            assert watch.overdue() is None

    def training(then_s):  # thread not started: it would check every 0.1 s
        watch = faults.Watchdog(steps_per_sync=5, multiple=2.0, floor_s=1.0)
        for step in range(1, 4):  # the first step compiles; then 0.5 s per step
            run_for(watch, 7.0 if step == 1 else 0.5)
            watch.step_done(step)
        assert watch.bound_s() == pytest.approx(1.0 + 2.0 * 5 * 0.5)
        run_for(watch, then_s)
        return watch

    watch = training(3.0)
    clock[0] += 600.0  # SIGSTOP ... SIGCONT: neither thread ran
    assert watch.overdue() is None
    run_for(watch, 2.5)
    clock[0] += 1.0
    assert "no progress for 7 s in step 4" in watch.overdue()
    # A thread late by less than FROZEN_S (a busy machine) is not a stopped process: that time counts.
    watch = training(1.0)
    clock[0] += faults.FROZEN_S - 1.0
    assert watch.overdue() is None
    clock[0] += 2.0
    assert "no progress for 7 s in step 4" in watch.overdue()
