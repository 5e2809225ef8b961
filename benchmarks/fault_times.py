"""Seconds from an injected fault to the job's exit, and the cost of one preemption check, on 2 processes x 4 CPU
devices on 127.0.0.1 (tests/ctr/tiny.gin).

``PYTHONPATH=. python benchmarks/fault_times.py [work_dir]`` from the repository root (it reuses the launch
helpers of tests/ctr/test_faults.py, so it is not a Bazel target). Process 1 is SIGKILLed at step 15 (heartbeat
timeouts 5 and 30 s), or hangs at step 15 (its watchdog: floor 2 s, multiple 1; process 0's: floor 20 s,
multiple 4). Prints each run's exit codes, the seconds from the fault to the last exit and each process's first
message; then the mean time of the all-gather the preemption check runs (once per log boundary now, once per
step before).
"""
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ctr"))
import test_faults as t  # noqa: E402

KILL = ("inject_fault.process = 1", "inject_fault.step = 15", 'inject_fault.action = "sigkill"')
HANG = ("inject_fault.process = 1", "inject_fault.step = 15", 'inject_fault.action = "hang"',
        "Watchdog.floor_s = 2.0", "Watchdog.multiple = 1.0")  # fmt: skip


def run(work, name, params, faulty, heartbeat_s):
    port, procs, marks = t._free_port(), [], {}
    for i in range(2):
        cmd = t._command(os.path.join(work, name), os.path.join(work, "data"), *params, *(faulty if i else ())) + [
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
            f"--heartbeat_timeout_s={heartbeat_s}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=t._env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip

    def read(i, p):
        for line in p.stderr:
            if "injected fault" in line:
                marks["fault"] = time.monotonic()
            elif line.startswith("ctr.train: process"):
                marks.setdefault(i, line.strip()[:170])

    readers = [threading.Thread(target=read, args=(i, p)) for i, p in enumerate(procs)]
    for r in readers:
        r.start()
    ends = []
    for p in procs:
        p.wait()
        ends.append(time.monotonic())
    for r in readers:
        r.join()
    after = round(max(ends) - marks["fault"], 1) if "fault" in marks else None
    print(f"{name}: heartbeat_timeout_s {heartbeat_s}, exit codes {[p.returncode for p in procs]}, "
          f"last exit {after} s after the fault")  # fmt: skip
    for i in range(2):
        print(f"  process {i}: {marks.get(i)}")


def allgather(process_id, port):
    import jax
    import numpy as np

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils

    for _ in range(10):
        multihost_utils.process_allgather(np.array([False]))
    n, start = 200, time.perf_counter()
    for _ in range(n):
        multihost_utils.process_allgather(np.array([False]))
    if process_id == 0:
        print(f"preemption check (process_allgather of one bool): {(time.perf_counter() - start) / n * 1e3:.2f} ms "
              f"per call, mean of {n}")  # fmt: skip


def main():
    if sys.argv[1:2] == ["--allgather"]:
        return allgather(int(sys.argv[2]), sys.argv[3])
    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ctr_fault_times"
    shutil.rmtree(work, ignore_errors=True)
    for heartbeat_s in (5, 30):
        run(work, f"sigkill_{heartbeat_s}", ("train.num_steps = 400",), KILL, heartbeat_s)
    run(work, "hang", ("Watchdog.floor_s = 20.0", "Watchdog.multiple = 4.0", "train.num_steps = 400"), HANG, 5)
    port = t._free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--allgather", str(i), str(port)], env=t._env(4),
                              stderr=subprocess.DEVNULL) for i in range(2)]  # fmt: skip
    for p in procs:
        p.wait()


if __name__ == "__main__":
    main()
