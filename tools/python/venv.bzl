"""A Python toolchain backed by a virtualenv that Bazel builds itself from the pinned lock file.

Bazel 4.2.3 has no rules_python offline, so this repository rule creates `venv/` inside Bazel's output base
with the machine's Python 3.11 and `pip install -r requirements.lock`, then declares a `py_runtime` for it.
The interpreter's absolute path exists only in the output base, never in the source tree. Editing
the lock re-runs the rule. Set CTR_PYTHON to choose the base interpreter (default: python3.11, then python3).

CTR_ACCELERATOR (cpu, tpu or cuda; `tools/setup.sh TARGET` sets it through `.bazelrc.accelerator`) picks the
lock: `requirements.lock`, or `requirements-tpu.lock` / `requirements-cuda.lock`, the same pins plus the
accelerator's build of the same jax (libtpu, the CUDA plugin).
"""

_BUILD = """
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{interpreter}",
    python_version = "PY3",
    stub_shebang = "#!{interpreter}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)

exports_files(["venv/bin/python"])
"""

def _fail_on(result, what):
    if result.return_code != 0:
        fail("ctr venv: {} failed (exit {}):\n{}\n{}".format(what, result.return_code, result.stdout, result.stderr))

def _ctr_venv_impl(rctx):
    base = rctx.os.environ.get("CTR_PYTHON") or rctx.which("python3.11") or rctx.which("python3")
    if not base:
        fail("ctr venv: no python3.11 or python3 on PATH; install Python 3.11 or set CTR_PYTHON")
    version = rctx.execute([base, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    _fail_on(version, "asking {} for its version".format(base))
    if version.stdout.strip() != "3.11":
        fail("ctr venv: {} is Python {}; ctr pins packages for Python 3.11 (set CTR_PYTHON)".format(
            base,
            version.stdout.strip(),
        ))
    accelerator = rctx.os.environ.get("CTR_ACCELERATOR") or "cpu"
    locks = {"cpu": rctx.attr.lock, "tpu": rctx.attr.tpu_lock, "cuda": rctx.attr.cuda_lock}
    if accelerator not in locks:
        fail("ctr venv: CTR_ACCELERATOR={} is not one of cpu, tpu, cuda (rerun tools/setup.sh TARGET)".format(
            accelerator,
        ))
    lock = rctx.path(locks[accelerator])
    rctx.report_progress("creating the {} virtualenv".format(accelerator))
    _fail_on(rctx.execute([base, "-m", "venv", "venv"]), "python -m venv")
    python = rctx.path("venv/bin/python")
    rctx.report_progress("pip install -r requirements.lock (first build only, a few minutes)")
    _fail_on(
        rctx.execute(
            [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(lock)],
            timeout = 3600,
            quiet = False,
        ),
        "pip install -r {}".format(lock),
    )
    rctx.file("BUILD.bazel", _BUILD.format(interpreter = str(python)))

ctr_venv = repository_rule(
    implementation = _ctr_venv_impl,
    attrs = {
        "lock": attr.label(mandatory = True, allow_single_file = True),
        "tpu_lock": attr.label(mandatory = True, allow_single_file = True),
        "cuda_lock": attr.label(mandatory = True, allow_single_file = True),
    },
    environ = ["CTR_PYTHON", "CTR_ACCELERATOR"],
    local = False,
)
