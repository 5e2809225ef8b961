"""Per-tower collections (CETNet): each tower's embeddings equal its own collection's, and stay its own."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedding_testlib import SCHEMA, device_batch, random_batch
from embeddings import sparse_optim
from embeddings.dhe import DeepHashEmbedding
from embeddings.per_feature import PerFeature
from embeddings.specs import build_collection
from embeddings.towers import TowerCollections
from embeddings.unified import Unified


def _towers():
    a = build_collection(SCHEMA, families={"emb": Unified(budget_rows=1024, num_tables=2, dim_per_chunk=4)},
                         default_dim=8)
    # Same family key "emb" in both towers: names must not collide (tables or DHE networks).
    b = build_collection(SCHEMA, families={"emb": PerFeature(num_buckets=64), "dhe": DeepHashEmbedding(k=16, hidden=(8,))},
                         default_family="emb", family_of={"user": "dhe"}, default_dim=4)
    return a, b, TowerCollections(SCHEMA, (("a", a), ("b", b)))


class _Embed(nn.Module):
    collection: object

    @nn.compact
    def __call__(self, rows, batch):
        return self.collection.combine(rows, batch)


def test_each_tower_sees_exactly_its_own_collection():
    a, b, towers = _towers()
    assert set(towers.tables) == {f"a/{n}" for n in a.tables} | {f"b/{n}" for n in b.tables}
    assert towers.num_parameters() == a.num_parameters() + b.num_parameters()
    batch = random_batch(16)
    dev = device_batch(batch)
    tables = towers.init(jax.random.key(0))
    ids = towers.host_ids(batch)
    rows = towers.read_rows(tables, ids)
    module = _Embed(towers)
    params = module.init(jax.random.key(1), rows, dev)
    inputs = module.apply(params, rows, dev)
    assert set(inputs.towers) == {"a", "b"} and not inputs.features
    assert inputs.batch_size == 16
    assert set(params["params"]) == {"b_embedding"}  # only tower b has a DHE network

    for name, single in (("a", a), ("b", b)):
        local_tables = {k.split("/", 1)[1]: v for k, v in tables.items() if k.startswith(name + "/")}
        local_ids = single.host_ids(batch)
        local_rows = single.read_rows(local_tables, local_ids)
        local_params = params["params"].get(f"{name}_embedding", {})
        expect = _Embed(single).apply({"params": local_params}, local_rows, dev)
        got = inputs.towers[name]
        for feature in SCHEMA.categorical:
            np.testing.assert_array_equal(got.features[feature], expect.features[feature])
        for seq in SCHEMA.sequences:
            np.testing.assert_array_equal(got.sequences[seq.name], expect.sequences[seq.name])
    assert inputs.towers["a"].features["item"].shape[-1] == 8
    assert inputs.towers["b"].features["item"].shape[-1] == 4


def test_sparse_update_touches_only_the_tower_that_got_gradients():
    _, _, towers = _towers()
    batch = random_batch(16)
    tables = towers.init(jax.random.key(0))
    optimizer = sparse_optim.SparseAdagrad(learning_rate=0.1)
    slots = {n: optimizer.init(t) for n, t in tables.items()}
    ids = towers.host_ids(batch)
    rows = towers.read_rows(tables, ids)
    grads = {k: (jnp.ones_like(v) if k.startswith("a/") else jnp.zeros_like(v)) for k, v in rows.items()}
    new_tables, new_slots = towers.sparse_update(tables, slots, ids, grads, optimizer, jnp.int32(0))
    assert set(new_tables) == set(tables) and set(new_slots) == set(slots)
    for name in tables:
        changed = not np.array_equal(new_tables[name], tables[name])
        assert changed == name.startswith("a/"), name


def test_tower_names_must_be_plain():
    a, b, _ = _towers()
    with pytest.raises(ValueError, match="tower names"):
        TowerCollections(SCHEMA, (("x/y", a),))
