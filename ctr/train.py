r"""Entry point: ``bazel run //ctr:train -- --gin_file=configs/<name>.gin [--gin_param='a.b = 1' ...]``.

Relative paths (``--gin_file``, ``train.run_dir``, data directories) are taken from the directory the command
was run from (``bazel run`` sets ``BUILD_WORKING_DIRECTORY``). ``include`` lines inside configs resolve against
the repository too, so a config can be run from anywhere. Every binding is checked before any work starts: an
unknown configurable or parameter stops the run with gin's message naming it; the ``train`` bindings' types and
ranges, the model name and the batch's split over the devices are checked before any data is read. Exit codes
(docs/ERRORS.md): 0 done (or stopped by SIGTERM, resumable), 1 unexpected error (traceback), 2 a user error (one
line naming the flag, binding or file), 3 the loss diverged.

Multi-host (Cloud TPU VM: every host runs the same command): ``--distributed`` calls
``jax.distributed.initialize()``, which finds the coordinator itself on TPU; elsewhere pass
``--coordinator_address``, ``--num_processes`` and ``--process_id``.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from absl import app, flags, logging

from ctr import config, errors

FLAGS = flags.DEFINE_multi_string("gin_file", [], "Gin config file(s), applied in order.")
PARAMS = flags.DEFINE_multi_string("gin_param", [], "Single gin bindings, applied after the files.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (multi-host).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, non-TPU).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, non-TPU).")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host, non-TPU).")
HEARTBEAT_TIMEOUT = flags.DEFINE_float(
    "heartbeat_timeout_s", 30.0, "Multi-host: seconds without a heartbeat after which a process counts as lost and "
    "the others exit (status 4) naming it (ctr/faults.py).")  # fmt: skip

COMMAND = "ctr.train"
REPO_ROOT = config.REPO_ROOT


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves and stops by itself). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""


def parse_config(gin_files: list[str], gin_params: list[str]) -> None:
    """Parses configs and bindings, failing on any unknown configurable or parameter.

    Raises:
      errors.ConfigError: naming the missing file or the bad binding (gin's message, one line).
    """
    import ctr.registration  # noqa: F401  (registers every configurable before parsing)

    config.parse(gin_files, gin_params)


def default_run_dir(gin_files: list[str]) -> str:
    stem = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "run"
    return os.path.join("runs", stem)


def run_command(gin_files: list[str], gin_params: list[str], distributed: bool = False,
                coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None, heartbeat_timeout_s: float = 30.0) -> int:  # fmt: skip
    """Parses the config and trains; returns the exit code (see the module docstring)."""
    import gin

    with _terminate_on_sigterm():
        try:
            parse_config(gin_files, gin_params)
        except errors.ConfigError as e:
            return errors.report(COMMAND, e, "configuration error")
        try:
            run_dir = gin.query_parameter("train.run_dir")
        except ValueError:
            run_dir = default_run_dir(gin_files)
        try:
            from ctr import faults

            heartbeats = None
            if distributed or coordinator_address:
                heartbeats = faults.initialize_distributed(coordinator_address, num_processes, process_id,
                                                           heartbeat_timeout_s)  # fmt: skip
            from ctr import trainer

            with gin.unlock_config():
                gin.bind_parameter("train.run_dir", run_dir)
            gin.finalize()
            try:
                with faults.lost_process_guard(heartbeats, expected=(trainer.TrainingDiverged,)):
                    trainer.train()
            except trainer.TrainingDiverged as e:
                logging.error("%s", e)
                print(f"{COMMAND}: training diverged: {errors.one_line(e)}", file=sys.stderr, flush=True)
                return errors.EXIT_DIVERGED
        except errors.UserError as e:
            return errors.report(COMMAND, e)
        except RuntimeError as e:
            if not str(e).startswith("Required bindings for"):  # gin, when a configurable is called
                raise
            return errors.report(COMMAND, e, "configuration error")
        except Terminated:
            print(f"{COMMAND}: stopped by SIGTERM outside the training loop (start-up or final evaluation); "
                  "checkpoints are as they were: run the same command again to resume", file=sys.stderr, flush=True)
            return errors.EXIT_OK
    return errors.EXIT_OK


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` (the training loop installs its own handler while it runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        return errors.report(COMMAND, f"unexpected arguments: {argv[1:]}", "usage error")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TF log every save at INFO
    if "BUILD_WORKING_DIRECTORY" in os.environ:
        os.chdir(os.environ["BUILD_WORKING_DIRECTORY"])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return run_command(FLAGS.value, PARAMS.value, DISTRIBUTED.value, COORDINATOR.value, NUM_PROCESSES.value,
                       PROCESS_ID.value, HEARTBEAT_TIMEOUT.value)  # fmt: skip


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flags parser, but a bad flag is one line and exit 2 (absl: the usage text, exit 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(errors.report(COMMAND, e, "usage error"))


def run() -> None:
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
