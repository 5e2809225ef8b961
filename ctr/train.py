r"""Entry point: ``bazel run //ctr:train -- --gin_file=configs/<name>.gin [--gin_param='a.b = 1' ...]``.

Relative paths (``--gin_file``, ``train.run_dir``, data directories) are taken from the directory the command
was run from (``bazel run`` sets ``BUILD_WORKING_DIRECTORY``). ``include`` lines inside configs resolve against
the repository too, so a config can be run from anywhere. Every binding is checked before any work starts: an
unknown configurable or parameter stops the run with gin's message naming it.

Multi-host (Cloud TPU VM: every host runs the same command): ``--distributed`` calls
``jax.distributed.initialize()``, which finds the coordinator itself on TPU; elsewhere pass
``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
PARAMS = flags.DEFINE_multi_string("gin_param", [], "Single gin bindings, applied after the files.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (multi-host).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, non-TPU).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, non-TPU).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host, non-TPU).")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_config(gin_files: list[str], gin_params: list[str]) -> None:
    """Parses configs and bindings, failing on any unknown configurable or parameter."""
    import gin

    import ctr.registration  # noqa: F401  (registers every configurable before parsing)

    _search_repo_first(gin)
    missing = [f for f in gin_files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"gin file(s) not found (relative to {os.getcwd()}): {missing}")
    gin.parse_config_files_and_bindings(gin_files, gin_params, finalize_config=False)


def _search_repo_first(gin) -> None:
    """Resolves ``include`` lines against the repository before the current directory.

    gin 0.5.0 tries the current directory first, and its Python-path reader then crashes (TypeError) on any
    include whose folder is a namespace package, e.g. ``configs/base`` when run outside the repository. Putting
    the repository first makes ``include 'configs/...'`` work from any directory.
    """
    prefixes = gin.config._LOCATION_PREFIXES  # no public API orders the search path
    if REPO_ROOT not in prefixes:
        prefixes.insert(0, REPO_ROOT)


def default_run_dir(gin_files: list[str]) -> str:
    stem = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "run"
    return os.path.join("runs", stem)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TF log every save at INFO
    if "BUILD_WORKING_DIRECTORY" in os.environ:
        os.chdir(os.environ["BUILD_WORKING_DIRECTORY"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import gin

    try:
        parse_config(FLAGS.value, PARAMS.value)
    except (ValueError, FileNotFoundError, SyntaxError) as e:
        print(f"ctr: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        run_dir = gin.query_parameter("train.run_dir")
    except ValueError:
        run_dir = default_run_dir(FLAGS.value)

    if DISTRIBUTED.value or COORDINATOR.value:
        import jax

        jax.distributed.initialize(
            coordinator_address=COORDINATOR.value,
            num_processes=NUM_PROCESSES.value,
            process_id=PROCESS_ID.value,
        )
    from ctr import trainer

    with gin.unlock_config():
        gin.bind_parameter("train.run_dir", run_dir)
    gin.finalize()
    try:
        trainer.train()
    except trainer.TrainingDiverged as e:
        logging.error("%s", e)
        print(f"ctr: training diverged: {e}", file=sys.stderr)
        return 3
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
