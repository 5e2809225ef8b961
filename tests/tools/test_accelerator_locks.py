"""The cpu, tpu and cuda locks pin one consistent set, and `tools/setup.sh TARGET` selects among them.

The accelerator locks cannot be installed here (libtpu and CUDA wheels need the hardware to load); what can be
checked offline is that each is the cpu lock plus only its accelerator's packages, at the jaxlib version the cpu
lock pins. `tools/lock_requirements.sh --check TARGET` runs pip's own dry-run resolution of a lock (network).
"""
import pathlib
import shutil
import subprocess

import pytest

# Not resolved: under Bazel the files are the runfiles the target declares.
ROOT = pathlib.Path(__file__).absolute().parents[2]
# Packages an accelerator's jax extra may add on top of the cpu lock, by name prefix.
ACCELERATOR_PACKAGES = {"tpu": ("libtpu",), "cuda": ("jax-cuda12-", "nvidia-")}


def read_lock(name: str) -> dict[str, str]:
    pins = {}
    for number, line in enumerate((ROOT / name).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        package, sep, version = line.partition("==")
        assert sep, f"{name}:{number}: not a name==version pin: {line!r}"
        pins[package.lower()] = version
    return pins


@pytest.mark.parametrize("target", ["tpu", "cuda"])
def test_accelerator_lock_is_cpu_lock_plus_its_own_packages(target):
    cpu = read_lock("requirements.lock")
    accelerated = read_lock(f"requirements-{target}.lock")
    changed = {p: (v, accelerated.get(p)) for p, v in cpu.items() if accelerated.get(p) != v}
    assert not changed, f"requirements-{target}.lock moves cpu pins (cpu, {target}): {changed}"
    added = set(accelerated) - set(cpu)
    foreign = {p for p in added if not p.startswith(ACCELERATOR_PACKAGES[target])}
    assert not foreign, f"requirements-{target}.lock adds packages that are not {target}'s: {sorted(foreign)}"
    assert added, f"requirements-{target}.lock adds no {target} package: it would install the cpu build"
    jax_plugins = {p: v for p, v in accelerated.items() if p.startswith("jax-cuda12-")}
    assert all(v == cpu["jaxlib"] for v in jax_plugins.values()), (jax_plugins, cpu["jaxlib"])
    if target == "cuda":
        assert set(jax_plugins) == {"jax-cuda12-plugin", "jax-cuda12-pjrt"}
    else:
        assert "libtpu" in accelerated


def test_workspace_names_every_lock():
    workspace = (ROOT / "WORKSPACE").read_text()
    for lock in ("requirements.lock", "requirements-tpu.lock", "requirements-cuda.lock"):
        assert f'"//:{lock}"' in workspace, lock


@pytest.fixture
def setup_copy(tmp_path):
    """tools/setup.sh in a scratch checkout, with bazel and Python present (so it installs nothing)."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "setup.sh", tmp_path / "tools" / "setup.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bazel", "python3.11"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}

    def run(*args):
        return subprocess.run(["bash", str(tmp_path / "tools" / "setup.sh"), *args], env=env,
                              capture_output=True, text=True, check=False)

    return tmp_path, run


def test_setup_target_writes_the_bazel_setting(setup_copy):
    root, run = setup_copy
    rc_file = root / ".bazelrc.accelerator"
    result = run("tpu")
    assert result.returncode == 0, result.stderr
    assert "build --repo_env=CTR_ACCELERATOR=tpu" in rc_file.read_text().splitlines()
    assert run("cuda").returncode == 0
    assert "build --repo_env=CTR_ACCELERATOR=cuda" in rc_file.read_text().splitlines()
    assert run().returncode == 0  # no target: cpu, the default, which needs no setting
    assert not rc_file.exists()


def test_setup_rejects_an_unknown_target(setup_copy):
    root, run = setup_copy
    result = run("rocm")
    assert result.returncode == 2
    assert "unknown target 'rocm'" in result.stderr and "cpu (default), tpu or cuda" in result.stderr
    assert not (root / ".bazelrc.accelerator").exists()


def test_bazelrc_imports_the_setting():
    assert "try-import %workspace%/.bazelrc.accelerator" in (ROOT / ".bazelrc").read_text()
    assert "/.bazelrc.accelerator" in (ROOT / ".gitignore").read_text().splitlines()
