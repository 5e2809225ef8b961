"""Stopping every process at the same step when one of them is told to stop (SIGTERM: a TPU VM preemption)."""
from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignal:
    """Turns SIGTERM (TPU VM preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def any_process(flag: bool) -> bool:
    """True when ``flag`` is set on any process (all processes must stop at the same step). A collective: call
    it at the same steps on every process (the loop's regular boundaries), not every step."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))
