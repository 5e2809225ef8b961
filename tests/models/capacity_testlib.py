"""A sequence-only click task and an in-memory training loop, for the sequence capacity tests.

The task (TaobaoAds-shaped, ids drawn by :func:`make_task`): an ad (``cate_id``, ``brand``, ``adgroup_id``), a
user (``userid``, ``pid``), a dense price, and three behaviour histories of up to ``SEQ_LEN`` events
(``cate_his``, ``brand_his``, ``btag_his``; ``cate_his`` and ``brand_his`` read the tables of ``cate_id`` and
``brand``, as ctr's TaobaoAds schema does). The click is 1 exactly when the ad's category is among the user's
last ``RECENT`` real events. Every other feature is independent noise and the ad's category is uniform whatever
the label, so a model that does not read the histories cannot beat AUC 0.5; a negative's category may still
appear in the older events, so "seen anywhere" (what mean-pooling sees) is not the rule either.

Training is plain optax on in-memory arrays (one Adam over the tables and the network), not ctr's trainer, so a
test can afford a few hundred steps; the tables start uniform in +-0.05 as ctr's do.
"""
from __future__ import annotations

import contextlib
import pathlib
import re
from typing import Any, Iterator

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ctr.models import registry
from ctr.model_io import ModelInputs

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
SEQ_LEN = 10
RECENT = 5
NUM_CATES = 100
ROWS = {"cate": NUM_CATES + 1, "brand": 300, "adgroup_id": 1000, "userid": 1000, "pid": 2, "btag": 5}
FEATURE_TABLES = {"userid": "userid", "adgroup_id": "adgroup_id", "pid": "pid", "cate_id": "cate", "brand": "brand"}
SEQUENCE_TABLES = {"cate_his": "cate", "brand_his": "brand", "btag_his": "btag"}


def make_task(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` examples of the task: ids per feature ``[n]``, histories ``[n, SEQ_LEN]`` (left-padded with id 0,
    most recent last), ``mask [n, SEQ_LEN]``, ``dense [n, 1]``, ``label [n]`` (half of them 1)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(RECENT, SEQ_LEN + 1, n)
    mask = np.arange(SEQ_LEN)[None] >= (SEQ_LEN - lengths)[:, None]
    cate_his = np.where(mask, rng.integers(1, NUM_CATES + 1, (n, SEQ_LEN)), 0)
    label = rng.random(n) < 0.5
    recent = cate_his[:, -RECENT:]
    # Positives: one of the recent categories. Negatives: a category drawn uniformly among those not recent
    # (rejection sampling, vectorised: redraw the rows that hit a recent one).
    cate_id = recent[np.arange(n), rng.integers(0, RECENT, n)]
    redraw = ~label
    while redraw.any():
        cate_id[redraw] = rng.integers(1, NUM_CATES + 1, redraw.sum())
        redraw = ~label & (cate_id[:, None] == recent).any(axis=1)
    return dict(
        cate_id=cate_id,
        brand=rng.integers(1, ROWS["brand"], n),
        adgroup_id=rng.integers(0, ROWS["adgroup_id"], n),
        userid=rng.integers(0, ROWS["userid"], n),
        pid=rng.integers(0, ROWS["pid"], n),
        dense=rng.normal(4.0, 1.0, (n, 1)).astype(np.float32),
        cate_his=cate_his,
        brand_his=np.where(mask, rng.integers(1, ROWS["brand"], (n, SEQ_LEN)), 0),
        btag_his=np.where(mask, rng.choice(4, (n, SEQ_LEN), p=[0.85, 0.07, 0.05, 0.03]) + 1, 0),
        mask=mask,
        label=label.astype(np.float32),
    )


@contextlib.contextmanager
def config_model(config: str) -> Iterator[tuple[nn.Module, int]]:
    """The model of ``configs/<config>.gin`` built from its model bindings, and its embedding width.

    Only the file's own lines are parsed (not its includes: data and embedding bindings need a prepared
    dataset); the width is its ``build_collection.default_dim`` (the InterFormer tower's, for CETNet). The
    bindings stay parsed inside the context, because submodules (DHEN, CETNet's towers) read gin when traced.
    """
    text = (CONFIGS / f"{config}.gin").read_text()
    model_name = re.search(r"^train\.model_name = '(\w+)'$", text, re.M).group(1)
    dims = re.findall(r"^(?:\w+/)?build_collection\.default_dim = (\d+)$", text, re.M)
    bindings = "\n".join(line for line in text.splitlines() if not line.startswith("include"))
    gin.clear_config()
    try:
        gin.parse_config(bindings, skip_unknown=True)
        yield registry.get(model_name)(), int(dims[0])
    finally:
        gin.clear_config()


class TaskModel(nn.Module):
    """Tables + ``network``: task arrays -> the network's outputs. With ``towers``, each tower of an ensemble
    gets tables of its own (``ModelInputs.towers``), as CETNet's configs give it; without ``sequences`` the
    network sees no histories."""

    network: nn.Module
    dim: int
    sequences: bool = True
    towers: tuple[str, ...] = ()

    def embed(self, batch: dict[str, jax.Array], prefix: str) -> ModelInputs:
        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -0.05, 0.05)

        tables = {t: nn.Embed(r, self.dim, embedding_init=init, name=f"{prefix}{t}") for t, r in ROWS.items()}
        features = {f: tables[t](batch[f]) for f, t in FEATURE_TABLES.items()}
        seqs = {s: tables[t](batch[s]) for s, t in SEQUENCE_TABLES.items()} if self.sequences else {}
        masks = {s: batch["mask"] for s in seqs}
        return ModelInputs(features, batch["dense"], seqs, masks)

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], *, train: bool = False) -> Any:
        if self.towers:
            per_tower = {t: self.embed(batch, f"{t}_") for t in self.towers}
            inputs = ModelInputs({}, None, {}, {}, towers=per_tower)
        else:
            inputs = self.embed(batch, "")
        return self.network(inputs, train=train)


def logits_of(outputs: Any) -> jax.Array:
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties broken arbitrarily: the scores here are continuous)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train_and_eval(
    model: TaskModel, steps: int, batch: int = 256, learning_rate: float = 3e-3, seed: int = 0, n_test: int = 4000
) -> dict[str, Any]:
    """Trains ``model`` for ``steps`` Adam steps on fresh examples; returns the test split's outputs and AUC."""
    train_data = make_task(steps * batch, seed)
    test_data = make_task(n_test, seed + 1)
    first = {k: v[:batch] for k, v in train_data.items()}
    params = model.init({"params": jax.random.key(seed), "dropout": jax.random.key(seed + 1)}, first)
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)
    network = model.network

    def loss_fn(p, b, key):
        outputs = model.apply(p, b, train=True, rngs={"dropout": key})
        if hasattr(network, "loss"):
            return network.loss(outputs, b["label"])
        return optax.sigmoid_binary_cross_entropy(outputs, b["label"]).mean()

    @jax.jit
    def step(p, o, b, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, b, key)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    key = jax.random.key(seed + 2)
    for i in range(steps):
        batch_i = {k: v[i * batch : (i + 1) * batch] for k, v in train_data.items()}
        params, opt_state, _ = step(params, opt_state, batch_i, jax.random.fold_in(key, i))
    outputs = jax.jit(lambda p, b: model.apply(p, b))(params, test_data)
    scores = np.asarray(logits_of(outputs))
    return {"outputs": outputs, "labels": test_data["label"], "auc": auc(test_data["label"], scores)}
