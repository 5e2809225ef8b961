"""Test AUC versus embedding parameter bytes, per embedding family, on the synthetic Criteo-layout data.

Families and sizes (``S`` = bytes of the full per-feature tables):

- full per-feature tables: one row per training-set value of each feature plus one out-of-vocabulary row, no
  collisions (``PerFeature`` indexed by each feature's training vocabulary);
- hashing trick (``PerFeature`` with each feature's bucket count scaled to the budget), Unified Embedding
  (``Unified``, 16-wide features as two 8-wide chunks on one shared table) and DHE (``DeepHashEmbedding``, one network per
  feature, widths from the budget) at ``S``, ``S/4`` and ``S/16``.

Every run trains the same DCNv2 for one epoch with the same data order (sparse Adagrad for tables, Adam for dense
parameters, DHE networks included), then scores the test split with exact AUC. DHE runs with ``k=64`` hashes
instead of the paper's 1024 (at these budgets a 1024-wide first layer would leave the per-feature networks a
few units wide) and ReLU instead of Mish (Mish and its gradient double the networks' time on a CPU); both are
flags. Writes ``pareto.png`` and ``pareto.md`` to ``--out_dir`` and prints the table.

    PYTHONPATH=. python benchmarks/embedding_pareto.py
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Mapping

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ctr import metrics  # noqa: E402
from ctr.data import dataset as dataset_lib  # noqa: E402
from ctr.data.synthetic import datasets as synthetic_datasets  # noqa: E402
from ctr.data import schema as schema_lib  # noqa: E402
from ctr.models.dcnv2 import DCNv2  # noqa: E402
from embeddings import DeepHashEmbedding, EmbeddingCollection, PerFeature, Unified, build_collection, sparse_optim  # noqa: E402

DIM = 16
FRACTIONS = (1.0, 1 / 4, 1 / 16)


def full_tables(schema: schema_lib.FeatureSchema, train: Mapping[str, np.ndarray]) -> EmbeddingCollection:
    """One row per training-set value of each feature plus one OOV row (``PerFeature`` with vocabularies)."""
    vocabularies = {name: np.unique(train[name]) for name in schema.categorical}
    return build_collection(schema, families={"full": PerFeature(vocabularies=vocabularies)}, default_dim=DIM)


class Model(nn.Module):
    collection: EmbeddingCollection

    @nn.compact
    def __call__(self, rows, batch, train: bool):
        inputs = self.collection.combine(rows, batch)
        return DCNv2(num_cross_layers=2, cross_rank=64, mlp=(256, 128))(inputs, train=train)


def train_and_test(collection: EmbeddingCollection, data: dataset_lib.InMemoryDataset, batch_size: int, epochs: int,
                   seed: int = 0) -> dict[str, float]:
    """One run: init, ``epochs`` of training, exact test AUC / logloss."""
    model, tx = Model(collection), optax.adam(1e-3)
    sparse = sparse_optim.SparseAdagrad(learning_rate=0.05)

    def device_part(batch):
        return {k: jnp.asarray(batch[k]) for k in (schema_lib.LABEL, schema_lib.DENSE)}

    @jax.jit
    def init(rng, batch, ids):
        tables = collection.init(rng)
        params = model.init(rng, collection.read_rows(tables, ids), batch, train=False)["params"]
        return tables, {n: sparse.init(t) for n, t in tables.items()}, params, tx.init(params)

    @jax.jit
    def step(state, batch, ids, t):
        tables, slots, params, opt_state = state
        rows = collection.read_rows(tables, ids)

        def loss_fn(params, rows):
            logits = model.apply({"params": params}, rows, batch, train=True)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch[schema_lib.LABEL]))

        _, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        updates, opt_state = tx.update(g_params, opt_state, params)
        tables, slots = collection.sparse_update(tables, slots, ids, g_rows, sparse, t)
        return tables, slots, optax.apply_updates(params, updates), opt_state

    @jax.jit
    def logits_of(state, batch, ids):
        tables, _, params, _ = state
        return model.apply({"params": params}, collection.read_rows(tables, ids), batch, train=False)

    probe = next(data.eval_batches(dataset_lib.TRAIN, batch_size))[0]
    state = init(jax.random.key(seed), device_part(probe), collection.host_ids(probe))
    steps = epochs * data.steps_per_epoch(batch_size)
    start = time.time()
    for t, batch in zip(range(steps), data.train_batches(batch_size, 0, seed)):
        state = step(state, device_part(batch), collection.host_ids(batch), jnp.int32(t))
    labels, logits = [], []
    for batch, real in data.eval_batches(dataset_lib.TEST, 4096):
        out = logits_of(state, device_part(batch), collection.host_ids(batch))
        labels.append(batch[schema_lib.LABEL][:real])
        logits.append(np.asarray(out)[:real])
    labels, logits = np.concatenate(labels), np.concatenate(logits)
    return {"auc": metrics.auc(labels, logits), "logloss": metrics.logloss(labels, logits),
            "train_s": time.time() - start}


def candidates(schema, train, full_bytes: int, dhe_k: int, dhe_activation: str):
    """(family, size label, collection) for every point of the plot."""
    yield "per-feature (full)", "1", full_tables(schema, train)
    vocab = {name: len(np.unique(train[name])) + 1 for name in schema.categorical}
    for fraction in FRACTIONS:
        budget = int(full_bytes * fraction)
        label = "1" if fraction == 1 else f"1/{round(1 / fraction)}"
        hashed = PerFeature(buckets_per_feature=tuple(vocab.items()), budget_bytes=budget)
        yield "hashing trick", label, build_collection(schema, families={"hashed": hashed}, default_dim=DIM)
        unified = Unified(budget_bytes=budget, num_tables=1, dim_per_chunk=8)
        yield "unified embedding", label, build_collection(schema, families={"ue": unified}, default_dim=DIM)
        # Two hidden layers per feature network, their width from the budget.
        dhe = DeepHashEmbedding(k=dhe_k, hidden=(256, 256), activation=dhe_activation, budget_bytes=budget)
        yield "DHE", label, build_collection(schema, families={"dhe": dhe}, default_dim=DIM)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r["family"] for r in results):
        points = sorted((r["bytes"], r["auc"]) for r in results if r["family"] == family)
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="*" if len(points) == 1 else "o", markersize=12 if len(points) == 1 else 6,
                linestyle="-" if len(points) > 1 else "none", label=family)
    ax.set_xscale("log")
    ax.set_xlabel("embedding parameters (bytes, float32; DHE: network weights)")
    ax.set_ylabel("test AUC")
    ax.set_title("Synthetic Criteo layout: AUC vs embedding size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="runs/data")
    parser.add_argument("--num_rows", type=int, default=200_000)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dhe_k", type=int, default=64)
    parser.add_argument("--dhe_activation", default="relu")
    parser.add_argument("--out_dir", default="runs/embedding_pareto")
    args = parser.parse_args()

    start = time.time()
    data = synthetic_datasets.synthetic_criteo(data_dir=args.data_dir, num_rows=args.num_rows)
    train = data.splits[dataset_lib.TRAIN]
    full = full_tables(data.schema, train)
    full_bytes = full.parameter_bytes()
    print(f"{data.num_rows('train'):,} train / {data.num_rows('test'):,} test rows; full per-feature tables "
          f"{full_bytes / 1e6:.2f} MB ({full.num_parameters():,} parameters)", flush=True)

    results = []
    for family, label, collection in candidates(data.schema, train, full_bytes, args.dhe_k, args.dhe_activation):
        result = train_and_test(collection, data, args.batch_size, args.epochs)
        results.append({"family": family, "size": label, "bytes": collection.parameter_bytes(), **result})
        print(f"  {family:>20} {label:>4}: {results[-1]['bytes'] / 1e6:6.2f} MB  AUC {result['auc']:.4f}  "
              f"({result['train_s']:.0f} s)", flush=True)

    table = ["| family | size (x full) | embedding MB | test AUC | test logloss | train+eval s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    table += [f"| {r['family']} | {r['size']} | {r['bytes'] / 1e6:.3f} | {r['auc']:.4f} | {r['logloss']:.4f} | "
              f"{r['train_s']:.0f} |" for r in results]
    os.makedirs(args.out_dir, exist_ok=True)
    plot(results, os.path.join(args.out_dir, "pareto.png"))
    with open(os.path.join(args.out_dir, "pareto.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nplot: {os.path.join(args.out_dir, 'pareto.png')}; total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
