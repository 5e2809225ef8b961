"""`tools/tpu_vm.py --dry_run` prints the whole job, and the shell commands it sends to the workers really run.

gcloud cannot run here, so its commands are checked by structure; the commands that the workers' shells run
(unpack and set up, start training detached, follow worker 0's log) are run here in a scratch home directory
with a stand-in `bazel` that records its arguments, which checks their quoting and their exit status.
"""
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).absolute().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import tpu_vm  # noqa: E402

GIN = ["--gin_file=configs/criteo_dcnv2.gin", "--gin_param=train.run_dir=\"gs://bucket/runs/it's\""]


def dry_run(*args):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "tpu_vm.py"), *args, "--dry_run"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def flag(command, name):
    values = [c.split("=", 1)[1] for c in command if c.startswith(f"--{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_v5e_16_job_is_a_complete_sequence():
    commands = dry_run("job", "--name=ctr-job", "--project=proj", "--zone=us-west4-a",
                       "--accelerator_type=v5litepod-16", *GIN, "--delete")
    create, describe, archive, scp, setup, start, follow, delete = commands
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ctr-job"]
    assert flag(create, "accelerator-type") == "v5litepod-16"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5-lite"
    assert flag(create, "node-id") == "ctr-job"
    assert describe[4:6] == ["describe", "ctr-job"] and flag(describe, "format") == "value(state.state)"
    assert archive[:2] == ["git", "archive"] and archive[-1] == "HEAD"
    assert scp[3:5] == ["tpu-vm", "scp"] and scp[5] == flag(archive, "output") and flag(scp, "worker") == "all"
    for command in (create, describe, scp, setup, start, follow, delete):
        assert command[0] == "gcloud"
        assert flag(command, "project") == "proj" and flag(command, "zone") == "us-west4-a"
    for command in (setup, start, follow):
        assert command[3:6] == ["tpu-vm", "ssh", "ctr-job"]
    assert flag(setup, "worker") == "all" and flag(start, "worker") == "all" and flag(follow, "worker") == "0"
    assert "tools/setup.sh tpu" in flag(setup, "command").split(" && ")
    assert delete[4:6] == ["delete", "ctr-job"] and "--quiet" in delete


def test_without_delete_the_slice_is_kept():
    commands = dry_run("job", "--name=n", "--project=p", "--zone=z", *GIN)
    assert not any("delete" in c for c in commands)


@pytest.fixture
def worker_home(tmp_path):
    """A worker's home: the unpacked archive is faked by an empty ctr/; `bazel` records argv and exits 3."""
    (tmp_path / "ctr").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "bazel").write_text(
        f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open('bazel_args.json', 'w'))\n"
        "print('step 1 loss 0.5')\nsys.exit(3)\n")
    (bin_dir / "bazel").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path))
    return tmp_path, env


def test_worker_commands_start_training_detached_and_follow_its_log(worker_home):
    home, env = worker_home
    commands = dry_run("train", "--name=n", "--project=p", "--zone=z", *GIN)
    start, follow = (flag(c, "command") for c in commands)
    subprocess.run(["bash", "-c", start], cwd=home, env=env, check=True, timeout=30)
    followed = subprocess.run(["bash", "-c", follow.replace("sleep 10", "sleep 0.2")], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    assert followed.returncode == 3  # the training command's own status comes back through ssh
    assert "step 1 loss 0.5" in followed.stdout
    recorded = json.loads((home / "ctr" / "bazel_args.json").read_text())
    assert recorded == ["run", "//ctr:train", "--", *GIN, "--distributed"]


def test_worker_setup_command_unpacks_into_a_fresh_checkout(tmp_path):
    commands = dry_run("deploy", "--name=n", "--project=p", "--zone=z")
    setup = flag(commands[-1], "command").split(" && ")
    assert setup[-2:] == ["tools/setup.sh tpu", "bazel build //ctr:train"]
    source = tmp_path / "src"
    (source / "tools").mkdir(parents=True)
    (source / "tools" / "marker").write_text("x")
    subprocess.run(["tar", "-czf", str(tmp_path / tpu_vm.ARCHIVE), "-C", str(source), "."], check=True)
    (tmp_path / "ctr").mkdir()
    (tmp_path / "ctr" / "stale").write_text("from an earlier deploy")
    subprocess.run(["bash", "-c", " && ".join(setup[:-2])], cwd=tmp_path, check=True)
    assert (tmp_path / "ctr" / "tools" / "marker").read_text() == "x"
    assert not (tmp_path / "ctr" / "stale").exists()


@pytest.mark.parametrize("accelerator_type,hosts", [("v5litepod-8", 1), ("v5litepod-16", 4), ("v5litepod-256", 64),
                                                   ("v4-32", 4), ("v5p-8", 1), ("v6e-16", 4)])
def test_worker_count(accelerator_type, hosts):
    assert tpu_vm.num_hosts(accelerator_type) == hosts


def test_unknown_accelerator_type_is_a_clear_error():
    with pytest.raises(SystemExit, match="v5litepod-16"):
        tpu_vm.main(["create", "--name=n", "--project=p", "--zone=z", "--accelerator_type=v9-8", "--dry_run"])
