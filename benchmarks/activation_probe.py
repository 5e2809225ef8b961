r"""Why a model (or one ensemble tower) does not learn: the activations of a trained run's checkpoint, or of its
initial state, on one evaluation batch.

For every Flax module call whose path contains ``--match`` (all when empty) it prints the output's shape, its
rms, its spread over the batch (the std over examples of each unit, averaged over units) and the fraction of
units never positive on the batch (a ReLU after such a unit is dead). A layer whose spread is small against its
rms carries an input-independent vector: downstream of it the model sees nearly one input. It also prints the
spread of the logits (and of each tower's, for an ensemble). Runs on the first local device.

    PYTHONPATH=. python benchmarks/activation_probe.py --run_dir=<run> --match=network/dhen
    PYTHONPATH=. python benchmarks/activation_probe.py --run_dir=<run> --init_seeds=1,2,3   # at initialisation
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ctr import export  # noqa: E402
from ctr.data import schema as schema_lib  # noqa: E402
from ctr.train_state import device_batch  # noqa: E402

RUN_DIR = flags.DEFINE_string("run_dir", None, "A training run directory (its config.gin and checkpoints).", required=True)
STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
INIT_SEEDS = flags.DEFINE_list("init_seeds", [], "Probe the initial state of these PRNG seeds instead of a checkpoint.")
SPLIT = flags.DEFINE_string("split", "test", "Split the batch is read from.")
BATCH = flags.DEFINE_integer("batch_size", 4096, "Examples in the probed batch.")
MATCH = flags.DEFINE_multi_string("match", [], "Only module paths containing one of these (default: all).")


def layer_stats(outputs: np.ndarray) -> tuple[float, float, float]:
    """``(rms, spread over examples, fraction of units never positive)`` of ``outputs [B, ...]``."""
    x = outputs.reshape(outputs.shape[0], -1).astype(np.float64)
    return float(np.sqrt((x**2).mean())), float(x.std(0).mean()), float((x.max(0) <= 0).mean())


def probe(restored: export.Restored, host_batch: dict) -> None:
    ids = restored.serving_collection.host_ids(host_batch)
    rows = restored.module.collection.read_rows(restored.tables, ids)
    outputs, state = restored.module.apply(
        {"params": restored.params}, rows, device_batch(restored.schema, host_batch), train=False,
        capture_intermediates=True, mutable=["intermediates"],
    )  # fmt: skip
    network = restored.module.network
    logits = {"(model)": network.logits(outputs)}
    parts = getattr(network, "parts", None)
    if parts:
        logits.update({name: value for name, (value, _) in parts(outputs).items()})
    for name, value in logits.items():
        value = np.asarray(value, np.float64)
        print(f"  logits {name}: mean {value.mean():+.4f}, std over examples {value.std():.4f}")
    print(f"  {'module output':78s} {'shape':>16s} {'rms':>8s} {'spread':>8s} {'never>0':>8s}")
    for path, value in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        value = np.asarray(value)
        if value.ndim < 2 or value.shape[0] != len(host_batch[schema_lib.LABEL]):
            continue  # deduplicated ids (one row per distinct id), scalars
        if MATCH.value and not any(m in name for m in MATCH.value):
            continue
        rms, spread, dead = layer_stats(value)
        print(f"  {name:78s} {str(value.shape):>16s} {rms:8.4f} {spread:8.4f} {dead:8.3f}")


def main(argv: list[str]) -> None:
    del argv
    export.parse_run_config(RUN_DIR.value)
    run = export.rebuild()
    host_batch, _ = next(iter(run.dataset.eval_batches(SPLIT.value, BATCH.value, 0, 1)))
    if INIT_SEEDS.value:
        for seed in INIT_SEEDS.value:
            print(f"initial state, PRNG seed {seed}:")
            probe(export.from_state(run, run.init_state(jax.random.key(int(seed))), 0), host_batch)
        return
    restored = export.restore(RUN_DIR.value, STEP.value)
    print(f"checkpoint step {restored.step} of {RUN_DIR.value}:")
    probe(restored, host_batch)


if __name__ == "__main__":
    app.run(main)
