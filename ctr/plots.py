"""PNG plots of a run's curves, drawn from its metrics.jsonl at the end of training."""
from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # no display on training hosts
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> list[str]:
    """Writes ``plots/train_loss.png`` and ``plots/eval.png`` (AUC and log loss per eval); returns the paths."""
    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def series(key):
        points = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series("train/loss"), label="train loss (window mean)")
    steps, loss = series("valid/logloss")
    if steps:
        ax.plot(steps, loss, "o-", label="valid logloss")
    written.append(_save(fig, ax, "binary cross-entropy", os.path.join(out_dir, "train_loss.png")))

    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("valid", "test"):
        steps, auc = series(f"{split}/auc")
        if steps:
            ax.plot(steps, auc, "o-", label=f"{split} AUC")
    written.append(_save(fig, ax, "AUC", os.path.join(out_dir, "eval.png")))
    return written


def _save(fig, ax, ylabel: str, path: str) -> str:
    """Labels, legend (when there is a curve: a run without evaluation has no AUC curve) and grid; writes ``path``."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ax.get_lines():
        ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
