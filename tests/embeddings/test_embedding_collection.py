"""The collection contract as the trainer uses it: host_ids -> read_rows -> grad w.r.t. rows -> sparse_update."""
import glob
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import embeddings
from ctr.data import criteo
from embedding_testlib import SCHEMA, Head, device_batch, random_batch
from embeddings import table_placement, sparse_optim
from embeddings.dhe import DeepHashEmbedding
from embeddings.per_feature import PerFeature
from embeddings.specs import build_collection
from embeddings.unified import Unified

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AUTO = jax.sharding.AxisType.Auto


def _mixed(lookup=None, dhe=True):
    families = {
        "ue": Unified(budget_rows=4096, num_tables=2, dim_per_chunk=4),
        "pf": PerFeature(num_buckets=64),
    }
    family_of = {"site": "pf"}
    if dhe:
        families["dhe"] = DeepHashEmbedding(k=32, hidden=(16,))
        family_of["user"] = "dhe"
    return build_collection(
        SCHEMA, families=families, default_family="ue", family_of=family_of, dims={"item": 8}, default_dim=4,
        row_alignment=256, lookup=lookup,
    )


def _train_step(collection, optimizer):
    """The trainer's step: rows outside autodiff, loss differentiated w.r.t. (dense params, rows)."""
    head = Head(collection)
    tx = optax.adam(1e-2)

    def step(tables, slots, params, opt_state, batch, ids, t):
        rows = collection.read_rows(tables, ids)

        def loss_fn(params, rows):
            logits, _ = head.apply({"params": params}, rows, batch)
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, batch["label"]))

        loss, (g_params, g_rows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, rows)
        updates, opt_state = tx.update(g_params, opt_state, params)
        tables, slots = collection.sparse_update(tables, slots, ids, g_rows, optimizer, t)
        return tables, slots, optax.apply_updates(params, updates), opt_state, loss

    def init(rng, batch, ids):
        tables = collection.init(rng)
        params = head.init(rng, collection.read_rows(tables, ids), batch)["params"]
        return tables, {n: optimizer.init(t) for n, t in tables.items()}, params, tx.init(params)

    return init, step


def test_row_gradients_equal_table_gradients():
    """Per table, the deduplicated row gradients equal jax.grad of the same loss w.r.t. the whole table
    through jnp.take (Unified chunks and shared sequence lookups included)."""
    col = _mixed(dhe=False)
    batch, head = random_batch(32), Head(col)
    ids, dev = col.host_ids(batch), device_batch(batch)
    tables = col.init(jax.random.key(0))
    params = jax.jit(head.init)(jax.random.key(1), col.read_rows(tables, ids), dev)

    def loss(rows):
        return jnp.sum(head.apply(params, rows, dev)[0] ** 2)

    @jax.jit
    def both(tables):
        g_rows = jax.grad(loss)(col.read_rows(tables, ids))
        g_tables = jax.grad(lambda t: loss(col.read_rows(t, ids)))(tables)
        return g_rows, g_tables

    g_rows, g_tables = both(tables)
    for name, cfg in col.tables.items():
        mine = [lk for lk in col.lookups if lk.table == name]
        rows = jnp.concatenate([jnp.asarray(ids[lk.key]).reshape(-1) for lk in mine])
        grads = jnp.concatenate([g_rows[lk.key].reshape(-1, cfg.dim) for lk in mine])
        unique, summed, _ = sparse_optim.dedupe_row_grads(rows, grads, cfg.num_rows)
        scattered = jnp.zeros((cfg.num_rows, cfg.dim)).at[unique].add(summed, mode="drop")
        np.testing.assert_allclose(scattered, g_tables[name], rtol=1e-5, atol=1e-7)


PLAIN = _mixed()
OPTIMIZER = sparse_optim.SparseAdam(learning_rate=0.01)
_init, _step = _train_step(PLAIN, OPTIMIZER)
PLAIN_INIT, PLAIN_STEP = jax.jit(_init), jax.jit(_step, donate_argnums=(0, 1))


def test_train_step_learns_and_touches_only_batch_rows():
    batch = random_batch(64)
    ids, dev = PLAIN.host_ids(batch), device_batch(batch)
    tables, slots, params, opt_state = PLAIN_INIT(jax.random.key(0), dev, ids)
    before = jax.tree.map(np.asarray, tables)
    losses = []
    for t in range(30):
        tables, slots, params, opt_state, loss = PLAIN_STEP(tables, slots, params, opt_state, dev, ids, jnp.int32(t))
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    for name in PLAIN.tables:
        touched = np.zeros(PLAIN.tables[name].num_rows, bool)
        for lk in PLAIN.lookups:
            if lk.table == name:
                touched[ids[lk.key].reshape(-1)] = True
        changed = np.any(np.asarray(tables[name]) != before[name], axis=1)
        assert not np.any(changed & ~touched)  # rows outside the batch are never written
        assert changed.sum() >= 0.9 * touched.sum()  # (a row read only at masked sequence steps has 0 gradient)
    assert any(k.startswith("dhe_") for k in params)  # DHE networks train as dense parameters


@pytest.mark.parametrize("path", table_placement.PATHS)
def test_sharded_collection_equals_unsharded(path):
    """with_mesh + its shardings: read_rows and sparse_update of every table (DHE keys ignored) as unsharded."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO, AUTO))
    sharded = _mixed(table_placement.LookupOptions(path=path)).with_mesh(mesh)
    assert {s.spec for s in sharded.table_shardings().values()} == {jax.sharding.PartitionSpec(("data", "model"), None)}
    ids = PLAIN.host_ids(random_batch(64))
    tables = PLAIN.init(jax.random.key(0))
    slots = {name: OPTIMIZER.init(t) for name, t in tables.items()}

    def step(collection, tables, slots):
        rows = collection.read_rows(tables, ids)
        grads = {k: jnp.cos(r.astype(jnp.float32) * 7.0) for k, r in rows.items()}  # any row gradient
        return rows, *collection.sparse_update(tables, slots, ids, grads, OPTIMIZER, jnp.int32(0))

    want = jax.jit(lambda t, s: step(PLAIN, t, s))(tables, slots)
    got = jax.jit(lambda t, s: step(sharded, t, s))(
        jax.device_put(tables, sharded.table_shardings()), jax.device_put(slots, sharded.slot_shardings(slots))
    )
    for key in want[0]:
        np.testing.assert_array_equal(got[0][key], want[0][key])
    for g, w in zip(jax.tree.leaves(got[1:]), jax.tree.leaves(want[1:])):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-7)


def test_with_mesh_needs_evenly_split_tables():
    mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AUTO, AUTO))
    col = build_collection(SCHEMA, families={"pf": PerFeature(num_buckets=10)}, default_dim=4, row_alignment=4)
    with pytest.raises(ValueError, match="row_alignment"):
        col.with_mesh(mesh)
    with pytest.raises(ValueError, match="no mesh"):
        col.table_shardings()
    routed = build_collection(
        SCHEMA, families={"pf": PerFeature(num_buckets=10)}, default_dim=4,
        lookup=table_placement.LookupOptions(path="shard_map"),
    )
    with pytest.raises(ValueError, match="with_mesh"):
        routed.read_rows(routed.init(jax.random.key(0)), routed.host_ids(random_batch(8)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "configs", "embeddings", "*.gin"))))
def test_gin_configs_build_collections(path):
    """Each config selects its family by gin alone (bindings of other modules are skipped here)."""
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([path], None, skip_unknown=True)
        col = embeddings.build_collection(criteo.feature_schema())
    finally:
        gin.clear_config()
    assert {s.name for s in col.specs} == set(criteo.CAT_FIELDS)
    families = {type(p).__name__ for p in col.parts}
    expected = {
        "per_feature.gin": {"TablePart"}, "hashed.gin": {"TablePart"}, "unified.gin": {"TablePart"},
        "dhe.gin": {"DHEPart"}, "mixed.gin": {"TablePart", "DHEPart"},
    }[os.path.basename(path)]
    assert families == expected
