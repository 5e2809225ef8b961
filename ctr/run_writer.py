"""What a run writes for people (process 0 only): metrics.jsonl, TensorBoard events, the gin configs,
results.json, plots, the progress bar and the final summary line."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import gin

from ctr import paths, plots, tf_import


class RunWriter:
    """metrics.jsonl, TensorBoard events, the gin configs, results.json and plots of one run (process 0).

    Files are written in a local directory: the run directory itself, or, when that is on an object store (which
    cannot append to an object, and which TensorBoard's writer would reach through TensorFlow's own GCS client), a
    staging directory whose files :meth:`sync` copies there at every checkpoint and at the end. Lines logged after
    the last checkpoint are dropped on resume anyway, so a killed run loses nothing by syncing only then.

    Args:
      run_dir: the run directory.
      start_step: the step the run starts (or resumes) at: lines of ``metrics.jsonl`` a resumed run writes
        again are dropped (see :func:`drop_lines_after`); None keeps the file as it is.
      num_steps: the run's last step.
    """

    def __init__(self, run_dir: str, start_step: int | None = None, num_steps: int | None = None):
        self.run_dir = run_dir
        self._staging = None
        if paths.is_remote(run_dir):
            self._staging = tempfile.TemporaryDirectory(prefix="ctr-run-")
            self.local_dir = self._staging.name
            remote_metrics = paths.join(run_dir, "metrics.jsonl")
            if start_step is not None and paths.exists(remote_metrics):
                paths.copy_file(remote_metrics, os.path.join(self.local_dir, "metrics.jsonl"))
        else:
            self.local_dir = run_dir
        path = os.path.join(self.local_dir, "metrics.jsonl")
        if start_step is not None and os.path.exists(path):  # lines of a run killed after its last checkpoint
            drop_lines_after(path, start_step, num_steps)
        self._jsonl = open(path, "a", encoding="utf-8")
        try:
            tf = tf_import.tensorflow()  # for tf.summary only
        except ImportError:  # e.g. an accelerator image without TF: training does not need it
            logging.warning("tensorflow is not installed: no TensorBoard events; metrics.jsonl has every value")
            self._tf = self._tb = None
        else:
            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(self.local_dir, "tensorboard"))

    def write_config(self) -> None:
        with open(os.path.join(self.local_dir, "config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.config_str())
        self.sync()

    def log(self, step: int, values: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is None:
            return
        with self._tb.as_default(step=step):
            for key, value in values.items():
                self._tf.summary.scalar(key, value)

    def sync(self) -> None:
        """Copies the staged files to the run directory on the object store (a no-op for a local one)."""
        if self._staging is None:
            return
        if self._tb is not None:
            self._tb.flush()
        paths.copy_tree(self.local_dir, self.run_dir)

    def finish(self, results: dict[str, Any], splits: tuple[str, ...]) -> None:
        """Logs the final evaluation of ``splits``, writes results.json, the operative config and the plots, and
        prints the summary."""
        steps = results["steps"]
        self.log(steps, {f"{s}/{k}": v for s in splits for k, v in results[s].items()})
        with open(os.path.join(self.local_dir, "operative_config.gin"), "w", encoding="utf-8") as f:
            f.write(gin.operative_config_str())
        with open(os.path.join(self.local_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        self._jsonl.close()
        if self._tb is not None:
            self._tb.flush()
        plots.plot_run(self.local_dir)
        self.sync()
        if self._staging is not None:
            self._staging.cleanup()
        summary = "  ".join(
            f"{s}: auc {results[s]['auc']:.4f} logloss {results[s]['logloss']:.4f}"
            + (f" gauc {results[s]['gauc']:.4f}" if "gauc" in results[s] else "")
            for s in splits
        )
        print(f"Finished {steps} steps in {results['train_wall_s']:.1f}s of training. {summary}", flush=True)
        print(f"Results: {paths.join(self.run_dir, 'results.json')}", flush=True)


def drop_lines_after(path: str, step: int, num_steps: int | None) -> None:
    """Keeps the metrics.jsonl lines a run resumed at ``step`` will not write again: those up to ``step``, but not
    the final evaluation when it resumes from its last step (it evaluates again). A torn last line goes too."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
                continue
            final = entry["step"] == num_steps and not any(k.startswith("train/") for k in entry)
            if entry["step"] <= step and not final:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".partial", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)


class ProgressBar:
    """tqdm bar showing examples/s and the running loss (a no-op when disabled)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self._bar = None
        self._last = start
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, loss: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(step - self._last)
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_per_s=f"{rate:,.0f}", refresh=False)
        self._last = step

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
