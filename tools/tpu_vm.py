#!/usr/bin/env python3
"""Runs one ctr training job on a Cloud TPU VM slice with `gcloud`: create, deploy, train, delete.

    tools/tpu_vm.py job --name=ctr-v5e --project=P --zone=us-west4-a --accelerator_type=v5litepod-16 \\
        --gin_file=configs/criteo_dcnv2.gin --gin_param='train.run_dir="gs://BUCKET/runs/dcnv2"' --delete

Steps (each is also a subcommand of its own, so a step can be rerun):
  create  requests the slice as a queued resource (how TPU capacity is obtained) and waits until it is ACTIVE;
  deploy  copies this checkout (`git archive HEAD`, so only committed files) to every worker and runs
          `tools/setup.sh tpu` and `bazel build //ctr:train` there;
  train   starts the same `bazel run //ctr:train -- ... --distributed` on every worker (`--worker=all`), each
          writing `ctr/train.log` on its VM, and streams worker 0's log until it ends, returning its status;
  delete  deletes the queued resource and its VMs.
`--dry_run` prints every command the step would run, one per line in shell quoting, and runs nothing. Only the
standard library is used: this runs on the user's workstation, next to `gcloud`, not in ctr's venv.
Running `train` again resumes from the run directory's last checkpoint (the trainer's own rule).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time

# Default TPU software image per generation (Cloud TPU's runtime versions for JAX on TPU VMs).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "ctr"
ARCHIVE = "ctr-src.tar.gz"


def generation(accelerator_type: str) -> str:
    family, sep, size = accelerator_type.rpartition("-")
    if not sep or family not in RUNTIME_VERSIONS or not size.isdigit():
        raise SystemExit(f"tpu_vm: --accelerator_type={accelerator_type!r} is not one of "
                         f"{', '.join(f'{g}-N' for g in RUNTIME_VERSIONS)} (for example v5litepod-16)")
    return family


def num_hosts(accelerator_type: str) -> int:
    """Worker VMs in a slice: v5e/v6e name chips (4 per host above 8 chips), v4/v5p name cores (8 per host)."""
    family = generation(accelerator_type)
    size = int(accelerator_type.rpartition("-")[2])
    if family in ("v5litepod", "v6e"):
        return 1 if size <= 8 else size // 4
    return max(1, size // 8)


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    project: str
    zone: str
    accelerator_type: str
    runtime_version: str
    spot: bool

    @property
    def where(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self.where, f"--worker={worker}",
                f"--command={command}"]


def create_commands(s: Slice) -> list[list[str]]:
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", s.name, f"--node-id={s.name}", *s.where,
              f"--accelerator-type={s.accelerator_type}", f"--runtime-version={s.runtime_version}"]
    if s.spot:
        create.append("--spot")
    state = ["gcloud", "compute", "tpus", "queued-resources", "describe", s.name, *s.where,
             "--format=value(state.state)"]
    return [create, state]


def deploy_commands(s: Slice, archive: str) -> list[list[str]]:
    unpack = " && ".join([
        f"rm -rf {REMOTE_DIR}", f"mkdir {REMOTE_DIR}", f"tar -xzf {ARCHIVE} -C {REMOTE_DIR}", f"cd {REMOTE_DIR}",
        "tools/setup.sh tpu", "bazel build //ctr:train",
    ])
    return [
        ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{s.name}:{ARCHIVE}", *s.where, "--worker=all"],
        s.ssh(unpack),
    ]


def train_commands(s: Slice, gin_files: list[str], gin_params: list[str]) -> list[list[str]]:
    train = ["bazel", "run", "//ctr:train", "--", *[f"--gin_file={f}" for f in gin_files],
             *[f"--gin_param={p}" for p in gin_params], "--distributed"]
    # Detached on every worker, so a dropped ssh session does not kill the job; train.exit marks the end.
    start = (f"cd {REMOTE_DIR} && rm -f train.exit && "
             f"(nohup sh -c {shlex.quote(shlex.join(train) + '; echo $? > train.exit')} > train.log 2>&1 "
             "< /dev/null &)")
    # `tail` itself is the background job (not a subshell around it), so `kill $!` ends it and ssh returns.
    follow = (f"tail -n +1 -F {REMOTE_DIR}/train.log & "
              f"while [ ! -f {REMOTE_DIR}/train.exit ]; do sleep 10; done; sleep 1; kill $!; "
              f"exit $(cat {REMOTE_DIR}/train.exit)")
    return [s.ssh(start), s.ssh(follow, worker="0")]


def delete_commands(s: Slice) -> list[list[str]]:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", s.name, *s.where, "--force", "--quiet"]]


class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, message: str) -> None:
        """Progress, as a shell comment in a dry run so its output stays a runnable script."""
        print(("# " if self.dry_run else "tpu_vm: ") + message, flush=True)

    def __call__(self, command: list[str], *, capture: bool = False) -> str:
        print(("" if self.dry_run else "+ ") + shlex.join(command), flush=True)
        if self.dry_run:
            return "ACTIVE" if capture else ""
        result = subprocess.run(command, check=False, text=True,
                                stdout=subprocess.PIPE if capture else None)
        if result.returncode != 0:
            raise SystemExit(f"tpu_vm: `{command[0]} {' '.join(command[1:5])} ...` exited {result.returncode}")
        return (result.stdout or "").strip()


def create(s: Slice, run: Runner, poll_s: float) -> None:
    request, state = create_commands(s)
    run(request)
    while (current := run(state, capture=True)) != "ACTIVE":
        if current in ("FAILED", "SUSPENDED"):
            raise SystemExit(f"tpu_vm: queued resource {s.name} is {current} (see `{shlex.join(state[:7])}`)")
        run.note(f"{s.name} is {current or 'not listed yet'}; waiting {poll_s:.0f} s")
        time.sleep(poll_s)
    run.note(f"{s.name} is ACTIVE ({num_hosts(s.accelerator_type)} worker VMs)")


def deploy(s: Slice, run: Runner) -> None:
    if not run.dry_run and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                          capture_output=True, text=True, check=True).stdout.strip():
        print("tpu_vm: the checkout has uncommitted changes; workers get HEAD only", file=sys.stderr)
    archive = os.path.join(os.environ.get("TMPDIR", "/tmp"), ARCHIVE)
    for command in deploy_commands(s, archive):
        run(command)


def train(s: Slice, run: Runner, gin_files: list[str], gin_params: list[str]) -> None:
    if not gin_files:
        raise SystemExit("tpu_vm: train needs at least one --gin_file")
    for command in train_commands(s, gin_files, gin_params):
        run(command)


def delete(s: Slice, run: Runner) -> None:
    for command in delete_commands(s):
        run(command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["job", "create", "deploy", "train", "delete"])
    parser.add_argument("--name", required=True, help="queued resource and TPU VM name")
    parser.add_argument("--project", required=True)
    parser.add_argument("--zone", required=True)
    parser.add_argument("--accelerator_type", default="v5litepod-16")
    parser.add_argument("--runtime_version", default=None, help="default: the generation's JAX image")
    parser.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--delete", action="store_true", help="job: delete the slice when training ends")
    parser.add_argument("--poll_s", type=float, default=60.0, help="create: seconds between state checks")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    s = Slice(args.name, args.project, args.zone, args.accelerator_type,
              args.runtime_version or RUNTIME_VERSIONS[generation(args.accelerator_type)], args.spot)
    run = Runner(args.dry_run)
    run.note(f"{s.accelerator_type}: {num_hosts(s.accelerator_type)} worker VMs, runtime {s.runtime_version}")
    if args.step == "job" and not args.gin_file:
        raise SystemExit("tpu_vm: job needs at least one --gin_file")
    if args.step in ("job", "create"):
        create(s, run, args.poll_s)
    if args.step in ("job", "deploy"):
        deploy(s, run)
    try:
        if args.step in ("job", "train"):
            train(s, run, args.gin_file, args.gin_param)
    finally:
        if args.step == "delete" or (args.step == "job" and args.delete):
            delete(s, run)


if __name__ == "__main__":
    main()
