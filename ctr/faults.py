"""Bounded failure of a multi-host run: a lost process, a stuck process, and preemption agreed at boundaries.

- **Lost process** (:class:`Heartbeats`, ``--heartbeat_timeout_s``): every process bumps a counter of its own in
  the coordination service's key-value store every ``timeout / 5`` seconds and watches the others'. A process
  whose counter has not moved for ``timeout`` seconds is lost (killed, crashed, its host gone): the others print
  one line naming it and exit :data:`EXIT_LOST_PROCESS`, instead of waiting in a collective that will never
  complete. JAX's own detection (``jax.distributed.initialize(heartbeat_timeout_seconds=...)``, which aborts the
  process from C++ with a message naming the task) is set to twice the timeout as a backstop. When process 0
  dies, the coordination service dies with it and JAX aborts every other process at once (SIGABRT, "the JAX
  distributed service detected fatal errors"), usually before a heartbeat can fail here (measured on CPU); a
  service that stops answering otherwise is reported as the lost coordinator.
- **Stuck process** (:class:`Watchdog`): a thread that expects a completed step within ``floor_s`` plus
  ``multiple`` times the slowest of the recent steps (long phases, the first step's compilation, evaluations
  and checkpoint saves, get ``slow_phase_s``). Past it, the process prints where it is (phase, step, and the
  stack of every thread via :mod:`faulthandler`) and exits :data:`EXIT_STUCK` with ``os._exit``, so that a job
  scheduler restarts the job. A process waiting in a collective on a stuck peer is stuck too, so every process
  of the job exits; the rerun resumes from the last complete checkpoint. Time the whole process did not run
  (stopped by SIGSTOP or Ctrl-Z, a suspended VM: seen as the watchdog's own thread waking far too late) is no
  step's time.
- **Preemption** (:func:`ctr.preemption.any_process`): processes agree on SIGTERM only at the loop's regular boundaries (log,
  evaluation and checkpoint steps, the same steps on every host), with one small all-gather per boundary
  instead of one per step. A process that got SIGTERM keeps training to the next boundary, where every process
  saves the same step and stops.

Exit codes (docs/ERRORS.md): :data:`EXIT_LOST_PROCESS` (4), :data:`EXIT_STUCK` (5). ``inject_fault`` (gin,
tests only) makes one process hang, get SIGTERM or be SIGKILLed at a given step.
"""
from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Iterator

import gin
import jax

from ctr import errors

EXIT_LOST_PROCESS = 4  # another process of the job was lost (or the coordinator)
EXIT_STUCK = 5  # this process's step did not complete within the watchdog's bound
# The watchdog's thread waking this much later than its period means the process did not run (stopped, suspended);
# a thread that is merely starved on a busy machine is late by far less.
FROZEN_S = 5.0
COMMAND = "ctr.train"
_KEY = "ctr/heartbeat/"


def _say(message: str) -> None:
    print(f"{COMMAND}: process {jax.process_index()} of {jax.process_count()}: {message}", file=sys.stderr,
          flush=True)  # fmt: skip


# -- lost processes -------------------------------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                           heartbeat_timeout_s: float) -> Heartbeats:  # fmt: skip
    """``jax.distributed.initialize`` (arguments as its own; all None on Cloud TPU VMs) and the heartbeats.

    JAX's preemption service is turned off: it installs its own SIGTERM handler, and preemption is handled by
    :func:`ctr.preemption.any_process` instead.
    """
    if heartbeat_timeout_s <= 0:
        raise errors.ConfigError(f"--heartbeat_timeout_s: must be > 0, got {heartbeat_timeout_s:g}")
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id,
                               heartbeat_timeout_seconds=max(int(2 * heartbeat_timeout_s), 2))  # fmt: skip
    heartbeats = Heartbeats(heartbeat_timeout_s)
    heartbeats.start()
    return heartbeats


class Heartbeats:
    """This process's heartbeat and its watch over the others' (see module docstring). ``timeout_s``: seconds
    without a heartbeat after which a process is lost."""

    def __init__(self, timeout_s: float):
        from jax._src import distributed  # the coordination service client jax.distributed.initialize made

        self.timeout_s = timeout_s
        self._client = distributed.global_state.client
        self._me, self._n = jax.process_index(), jax.process_count()
        self._period = min(1.0, timeout_s / 5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ctr-heartbeats")

    def start(self) -> None:
        if self._n > 1:
            self._thread.start()

    def _run(self) -> None:
        count, start = 0, time.monotonic()
        seen = {p: (None, start) for p in range(self._n) if p != self._me}  # last value, when it last changed
        while not self._stop.wait(self._period):
            try:
                count += 1
                self._client.key_value_set(f"{_KEY}{self._me}", str(count), allow_overwrite=True)
                values = {p: self._get(p) for p in seen}
            except Exception as e:  # noqa: BLE001  (the client raises several types for a lost service)
                first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                if self._stop.is_set() or (self._me != 0 and 0 not in seen):  # ending, or process 0 is done
                    return
                if self._me == 0:
                    self._lost(f"the coordination service in this process stopped answering ({first})")
                else:
                    self._lost(f"lost the coordinator (process 0): {first}")
                return
            now = time.monotonic()
            for p, value in values.items():
                if value == "done":  # finished its run: no longer watched
                    seen.pop(p)
                elif value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout_s:
                    self._lost(f"lost process {p}: no heartbeat for {now - seen[p][1]:.0f} s "
                               f"(--heartbeat_timeout_s={self.timeout_s:g})")  # fmt: skip

    def _get(self, process: int) -> str | None:
        """The heartbeat counter of ``process``, None before its first heartbeat."""
        try:
            return self._client.key_value_try_get(f"{_KEY}{process}")
        except Exception as e:  # noqa: BLE001
            if "NOT_FOUND" in str(e):
                return None
            raise

    def _lost(self, why: str) -> None:
        if self._stop.is_set():
            return
        _say(f"{why}; exiting (status {EXIT_LOST_PROCESS}). Run the same command on every host again to resume "
             "from the last complete checkpoint")  # fmt: skip
        os._exit(EXIT_LOST_PROCESS)

    def await_verdict(self) -> None:
        """After an error in this process (e.g. a collective that failed because a peer died): waits long enough
        for a lost peer to be noticed (which exits with its message); returns if none was."""
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 3 * self._period)

    def finish(self) -> None:
        """This process's run ended normally: others stop watching it."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self._client.key_value_set(f"{_KEY}{self._me}", "done", allow_overwrite=True)


@contextlib.contextmanager
def lost_process_guard(heartbeats: Heartbeats | None, expected: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Around a multi-host run. An unexpected error (not a :class:`ctr.errors.UserError` nor one of
    ``expected``, e.g. a collective that failed because a peer died) first gives the heartbeats time to name a
    lost peer. Then, and at a normal end, this process is marked done, so that peers still finishing do not take
    it for lost."""
    if heartbeats is None:
        yield
        return
    try:
        yield
    except Exception as e:
        if not isinstance(e, (errors.UserError, *expected)):
            heartbeats.await_verdict()
        heartbeats.finish()
        raise
    except BaseException:  # SIGTERM outside the loop (ctr.train.Terminated), KeyboardInterrupt
        heartbeats.finish()
        raise
    heartbeats.finish()


# -- stuck processes -----------------------------------------------------------------------------------------------
@gin.configurable
class Watchdog:
    """Exits the process when a step does not complete in time (see module docstring).

    The loop dispatches steps asynchronously and waits for the device only every ``steps_per_sync`` steps
    (the loss read-back), so one loop iteration can take that many steps' time: the bound is
    ``floor_s + multiple * steps_per_sync * (mean time per step over the last window steps)``.

    Args:
      steps_per_sync: steps between the loop's host syncs (the trainer passes ``train.log_every``).
      multiple: bound in multiples of the recent time between syncs (0 = no watchdog).
      floor_s: seconds added to that bound (so that noise on fast steps does not trip it).
      slow_phase_s: bound of the first step (compilation), evaluations and checkpoint saves (0 = unbounded).
      window: recent steps whose times count.
    """

    def __init__(self, steps_per_sync: int = 1, multiple: float = 20.0, floor_s: float = 120.0,
                 slow_phase_s: float = 3600.0, window: int = 200):  # fmt: skip
        for name, value in (("multiple", multiple), ("floor_s", floor_s), ("slow_phase_s", slow_phase_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise errors.ConfigError(f"Watchdog.{name}: expected a number >= 0, got {value!r}")
        errors.check_int("Watchdog.window", window, 1)
        self.steps_per_sync, self.multiple, self.floor_s, self.slow_phase_s = (
            max(1, steps_per_sync), multiple, floor_s, slow_phase_s)  # fmt: skip
        self._times: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self._step, self._phase, self._since, self._timed = 0, "first step", time.monotonic(), False
        self._period = max(0.05, min(1.0, floor_s / 10))  # how often the thread checks
        self._checked = self._since
        self._fault = inject_fault()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ctr-watchdog")

    def __enter__(self) -> Watchdog:
        if self.multiple > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def step_done(self, step: int) -> None:
        """The loop finished (dispatched) ``step``; also runs a fault injected for this step (tests)."""
        now = time.monotonic()
        with self._lock:
            if self._timed:
                self._times.append(now - self._since)
            self._step, self._phase, self._since, self._timed = step, "train", now, True
        self._fault.at(step)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A slow phase (evaluation, checkpoint): bounded by ``slow_phase_s``; not counted as a step time."""
        with self._lock:
            previous, self._phase, self._since = self._phase, name, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._since, self._timed = previous, time.monotonic(), False

    def bound_s(self) -> float | None:
        """Seconds the current phase may take (None: unbounded)."""
        if self._phase != "train" or not self._times:
            return self.slow_phase_s or None
        return self.floor_s + self.multiple * self.steps_per_sync * sum(self._times) / len(self._times)

    def overdue(self) -> str | None:
        """What to report when the current phase has run past its bound, else None. The watchdog's thread calls
        it every ``period`` seconds; a longer gap than ``period + FROZEN_S`` since the last call is time the
        process was stopped, taken out of the current phase's time."""
        now = time.monotonic()
        with self._lock:
            frozen = now - self._checked - self._period
            self._checked = now
            if frozen > FROZEN_S:
                self._since += frozen
            bound, waited, phase, step = self.bound_s(), now - self._since, self._phase, self._step
        if bound is None or waited <= bound:
            return None
        where = "in the first step (compilation)" if phase == "first step" else (
            f"in step {step + 1}" if phase == "train" else f"in the {phase} at step {step}")  # fmt: skip
        return (f"watchdog: no progress for {waited:.0f} s {where} (bound {bound:.0f} s: Watchdog.floor_s = "
                f"{self.floor_s:g} + Watchdog.multiple = {self.multiple:g} x {self.steps_per_sync} recent steps' "
                f"time, or Watchdog.slow_phase_s); the stacks of this process follow; exiting (status "
                f"{EXIT_STUCK}) so that the job can be restarted from the last complete checkpoint")  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            message = self.overdue()
            if message is None or self._stop.is_set():
                continue
            _say(message)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(EXIT_STUCK)


# -- injected faults (tests) ---------------------------------------------------------------------------------------
_ACTIONS = ("none", "hang", "sigterm", "sigkill")


@gin.configurable
class inject_fault:  # noqa: N801  (named as its gin binding reads)
    """Test only: at the end of ``step`` on ``process``, ``action``: ``"hang"`` (sleep ``hang_s``),
    ``"sigterm"`` or ``"sigkill"`` (sent to itself)."""

    def __init__(self, process: int = 0, step: int = -1, action: str = "none", hang_s: float = 3600.0):
        if action not in _ACTIONS:
            raise errors.ConfigError(f"inject_fault.action: expected one of {_ACTIONS}, got {action!r}")
        self.process, self.step, self.action, self.hang_s = process, step, action, hang_s

    def at(self, step: int) -> None:
        if self.action == "none" or step != self.step or jax.process_index() != self.process:
            return
        _say(f"injected fault at step {step}: {self.action}")
        if self.action == "hang":
            time.sleep(self.hang_s)
        else:
            os.kill(os.getpid(), signal.SIGTERM if self.action == "sigterm" else signal.SIGKILL)
