"""Feature specs and the three families: layouts, salts, budgets, DHE determinism and unseen ids."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedding_testlib import SCHEMA, Head, device_batch, random_batch
from embeddings import dhe as dhe_lib
from embeddings import hashing
from embeddings.dhe import DeepHashEmbedding
from embeddings.per_feature import PerFeature, per_feature_tables
from embeddings.specs import build_collection, resolve_specs
from embeddings.unified import Unified


# -- specs --------------------------------------------------------------------------------------------------------
def test_specs_defaults_overrides_and_sequence_sharing():
    specs = resolve_specs(SCHEMA, ("a", "b"), "a", family_of={"cate": "b"}, default_dim=8, dims={"user": 24})
    by_name = {s.name: s for s in specs}
    assert [s.name for s in specs] == ["user", "item", "cate", "site", "btag_his"]
    assert by_name["user"].dim == 24 and by_name["item"].dim == 8
    assert by_name["cate"].family == "b" and by_name["site"].family == "a"
    assert by_name["item"].inputs == ("item", "item_his")  # the sequence shares its item feature's spec
    assert by_name["btag_his"].inputs == ("btag_his",)  # a standalone sequence has its own


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family_of={"nope": "a"}), "not in the toy schema"),
        (dict(dims={"item_his": 4}), "share their item feature"),
        (dict(family_of={"user": "zzz"}), "unknown embedding family"),
        (dict(default_family=None), "name the default_family"),
    ],
)
def test_specs_reject_bad_configs(kwargs, message):
    args = dict(default_family="a") | kwargs
    with pytest.raises(ValueError, match=message):
        resolve_specs(SCHEMA, ("a", "b"), **args)


# -- per-feature / hashing trick ------------------------------------------------------------------------------
def test_per_feature_layout_and_ids():
    family = PerFeature(num_buckets=100, buckets_per_feature={"user": 1000})
    col = build_collection(SCHEMA, families={"pf": family}, dims={"site": 4}, default_dim=8, row_alignment=64)
    assert set(col.tables) == {"pf_d4", "pf_d8"}
    assert col.tables["pf_d8"].num_rows == 1344  # user 1000 + item, cate, btag_his 100 each = 1300, aligned to 64
    assert col.tables["pf_d4"].num_rows == 128  # site 100
    lk = {l.key: l for l in col.lookups}
    assert (lk["item_his"].offset, lk["item_his"].salt) == (lk["item"].offset, lk["item"].salt)
    assert lk["btag_his"].offset not in {lk[k].offset for k in ("user", "item", "cate")}
    batch = random_batch(32)
    ids = col.host_ids(batch)
    for key, l in lk.items():
        assert ids[key].dtype == np.int32 and ids[key].shape == batch[l.source].shape
        assert np.all((ids[key] >= l.offset) & (ids[key] < l.offset + l.num_buckets))
    # The same fingerprint in the item feature and the item sequence reads the same row.
    seq_ids = col.host_ids({**batch, "item_his": np.repeat(batch["item"][:, None], 5, axis=1)})["item_his"]
    np.testing.assert_array_equal(seq_ids, np.repeat(ids["item"][:, None], 5, axis=1))


def test_per_feature_budget_scales_every_feature():
    full = PerFeature(num_buckets=4000, buckets_per_feature={"user": 40_000})
    budget = 400_000
    col = build_collection(SCHEMA, families={"h": dataclasses.replace(full, budget_bytes=budget)}, default_dim=16)
    assert col.parameter_bytes() <= budget
    assert col.parameter_bytes() > 0.9 * budget
    buckets = {l.key: l.num_buckets for l in col.lookups}
    assert 9 < buckets["user"] / buckets["item"] <= 10.01  # proportions kept


def test_vocabulary_tables_give_every_kept_value_its_own_row():
    """With vocabularies, distinct kept values read distinct rows (counted), every other value the OOV row, and
    the item sequence reads its item feature's rows; a budget below the vocabulary falls back to hashing."""
    batch = random_batch(4096, vocab=3000)
    kept = {name: np.unique(batch[name])[::2] for name in ("user", "item")}  # half the values kept
    family = PerFeature(num_buckets=100, vocabularies=kept)
    col = build_collection(SCHEMA, families={"pf": family}, default_dim=8, row_alignment=64)
    lk = {l.key: l for l in col.lookups}
    ids = col.host_ids(batch)
    for name in ("user", "item"):
        assert lk[name].num_buckets == len(kept[name]) + 1
        is_kept = np.isin(batch[name], kept[name])
        rows = ids[name] - lk[name].offset
        # Independent reference: position in the sorted kept values by a Python dict.
        position = {int(v): i for i, v in enumerate(kept[name])}
        want = np.array([position.get(int(v), len(kept[name])) for v in batch[name]])
        np.testing.assert_array_equal(rows, want)
        assert len(np.unique(rows[is_kept])) == len(np.unique(batch[name][is_kept]))  # no collisions
        assert np.all(rows[~is_kept] == len(kept[name]))
    his = np.repeat(batch["item"][:, None], 3, axis=1)
    np.testing.assert_array_equal(col.host_ids({**batch, "item_his": his})["item_his"], np.repeat(ids["item"][:, None], 3, 1))
    # A table smaller than its vocabulary is hashed (the hashing trick), with the requested rows.
    small = PerFeature(num_buckets=100, buckets_per_feature={"user": 50}, vocabularies=kept)
    lk_small = {l.key: l for l in build_collection(SCHEMA, families={"pf": small}, default_dim=8).lookups}
    assert lk_small["user"].vocabulary is None and lk_small["user"].num_buckets == 50
    assert lk_small["item"].vocabulary is not None
    with pytest.raises(ValueError, match="does not serve"):
        build_collection(SCHEMA, families={"pf": PerFeature(vocabularies={"nope": kept["user"]})}, default_dim=8)


def test_vocabulary_index_in_tensorflow_equals_numpy():
    from ctr.data import vocab

    rng = np.random.default_rng(0)
    kept = np.unique(rng.integers(0, 2**62, 500, dtype=np.int64))
    ids = np.concatenate([kept[::3], rng.integers(0, 2**62, 200, dtype=np.int64)])[:364].reshape(-1, 7)
    np.testing.assert_array_equal(vocab.index_tf(kept, ids).numpy(), vocab.index(kept, ids))


def test_vocabulary_tables_from_files_and_oov_mapping_equal_numpy(tmp_path):
    """The exported model's tables (read from asset files) and ``apply_tf`` (OOV mapping) against numpy."""
    from ctr.data import vocab

    rng = np.random.default_rng(1)
    kept = np.unique(rng.integers(0, 2**63 - 1, 300, dtype=np.int64))
    ids = np.concatenate([kept[::2], rng.integers(0, 2**63 - 1, 150, dtype=np.int64), [0]])
    table = vocab.index_table_tf(kept, str(tmp_path / "kept.txt"))
    np.testing.assert_array_equal(vocab.index_tf(kept, ids, table).numpy(), vocab.index(kept, ids))
    v = vocab.Vocabulary(min_count=2, kept={"user": kept, "none": np.zeros(0, np.int64)})
    np.testing.assert_array_equal(v.apply_tf("user", ids, table).numpy(), v.apply("user", ids))
    np.testing.assert_array_equal(v.apply_tf("none", ids).numpy(), v.apply("none", ids))


def test_per_feature_tables_shortcut():
    col = per_feature_tables(SCHEMA, dim=4, num_buckets=10)
    assert list(col.tables) == ["per_feature_d4"] and col.tables["per_feature_d4"].dim == 4


# -- Unified Embedding ---------------------------------------------------------------------------------------
def _unified(num_tables=3, **kw):
    family = Unified(budget_rows=6 * 1024, num_tables=num_tables, dim_per_chunk=4)
    return build_collection(
        SCHEMA, families={"ue": family}, dims={"user": 12, "item": 8, "cate": 4, "site": 8}, default_dim=4,
        row_alignment=256, **kw,
    )


def test_unified_chunks_round_robin_and_salts():
    col = _unified()
    assert {n: (t.num_rows, t.dim) for n, t in col.tables.items()} == {f"ue_{t}": (2048, 4) for t in range(3)}
    lk = {l.key: l for l in col.lookups}
    # Chunks in feature order: user 3, item 2, cate 1, site 2, btag_his 1 -> tables dealt 0,1,2,0,1,2,0,1,2.
    order = ["user#0", "user#1", "user#2", "item#0", "item#1", "cate#0", "site#0", "site#1", "btag_his#0"]
    assert [lk[k].table for k in order] == [f"ue_{j % 3}" for j in range(9)]
    assert len({lk[k].salt for k in order}) == 9  # one salt per (feature, chunk)
    assert lk["user#1"].salt == hashing.salt("user", 1)
    # The item sequence probes exactly like the item feature.
    for c in range(2):
        a, b = lk[f"item#{c}"], lk[f"item_his#{c}"]
        assert (a.table, a.salt, a.offset, a.num_buckets) == (b.table, b.salt, b.offset, b.num_buckets)
    # Widths: chunks concatenated.
    _, rows, inputs = _embed(col, random_batch(16))
    assert {k: v.shape[-1] for k, v in inputs.features.items()} == {"user": 12, "item": 8, "cate": 4, "site": 8}
    np.testing.assert_array_equal(inputs.features["user"][:, 4:8], rows["user#1"])


def test_unified_features_share_tables_but_not_rows():
    col = _unified(num_tables=1)
    fp = np.random.default_rng(0).integers(0, 2**63 - 1, 2000, dtype=np.int64)
    ids = col.host_ids({name: fp for name in ["user", "item", "cate", "site"]} | {
        "item_his": fp[:, None], "btag_his": fp[:, None]})
    assert len({col.lookups[0].table for _ in col.lookups}) == 1
    # Same fingerprint, different features (or chunks): independent rows, agreeing ~1/6144 of the time.
    assert np.mean(ids["user#0"] == ids["item#0"]) < 0.01
    assert np.mean(ids["user#0"] == ids["user#1"]) < 0.01


@pytest.mark.parametrize("budget", [100_000, 1_000_000, 2_500_000])
def test_unified_budget_is_respected(budget):
    family = Unified(budget_bytes=budget, num_tables=4, dim_per_chunk=8)
    col = build_collection(SCHEMA, families={"ue": family}, default_dim=16, row_alignment=256)
    assert col.parameter_bytes() <= budget
    assert col.parameter_bytes() > budget - 4 * 256 * 8 * 4  # loses at most one alignment step per table


def test_unified_rejects_bad_configs():
    with pytest.raises(ValueError, match="multiple of dim_per_chunk"):
        build_collection(SCHEMA, families={"ue": Unified(budget_rows=4096, dim_per_chunk=8)}, default_dim=12)
    with pytest.raises(ValueError, match="exactly one"):
        build_collection(SCHEMA, families={"ue": Unified()}, default_dim=8)
    with pytest.raises(ValueError, match="too small"):
        build_collection(SCHEMA, families={"ue": Unified(budget_rows=100, dim_per_chunk=8)}, default_dim=8)


# -- DHE -----------------------------------------------------------------------------------------------------
def _dhe(**kw):
    family = DeepHashEmbedding(k=32, hidden=(16, 8), **kw)
    return build_collection(SCHEMA, families={"dhe": family}, default_dim=4)


def _embedder(col):
    """``batch -> (Flax variables, rows, model inputs)``, jitted once per collection (eager Flax is slow)."""
    head = Head(col)
    tables = jax.jit(col.init)(jax.random.key(0))
    read_rows, init, apply = jax.jit(col.read_rows), jax.jit(head.init), jax.jit(head.apply)

    def embed(batch):
        rows = read_rows(tables, col.host_ids(batch))
        variables = init(jax.random.key(1), rows, device_batch(batch))
        return variables, rows, apply(variables, rows, device_batch(batch))[1]

    return embed


def _embed(col, batch):
    return _embedder(col)(batch)


def test_dhe_encoding_is_deterministic_and_in_range():
    words = jnp.asarray(hashing.words_np(random_batch(256)["user"]))
    encode = jax.jit(dhe_lib.encode, static_argnums=(1, 2, 3))
    for transform in ("uniform", "gaussian"):
        a = encode(words, hashing.salt("user"), 1024, transform)
        b = encode(jnp.asarray(np.array(words)), hashing.salt("user"), 1024, transform)
        np.testing.assert_array_equal(a, b)
        assert a.shape == (256, 1024) and np.all(np.isfinite(a))
        if transform == "uniform":
            assert float(jnp.min(a)) > -1 and float(jnp.max(a)) < 1
        else:
            assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02


def test_dhe_is_deterministic_and_handles_unseen_ids():
    col = _dhe()
    assert col.tables == {} and col.lookups == ()
    embed = _embedder(col)
    batch = random_batch(64)
    variables, rows, inputs = embed(batch)
    # A second, independently built collection gives the same ids and encodings.
    col2 = _dhe()
    rows2 = jax.jit(col2.read_rows)({}, col2.host_ids(batch))
    for k in rows:
        np.testing.assert_array_equal(rows[k], rows2[k])
    # Unseen ids (fresh fingerprints, the extremes included) embed to finite, distinct vectors.
    fresh = np.array([0, 1, 2**63 - 2, 123456789] + list(np.random.default_rng(9).integers(0, 2**63 - 1, 60)))
    unseen = {**batch, "user": fresh}
    _, _, out = embed(unseen)
    user = np.asarray(out.features["user"])
    assert user.shape == (64, 4) and np.all(np.isfinite(user))
    assert len({tuple(np.round(r, 6)) for r in user}) == 64
    # Sequences of the item feature go through the item network: equal ids, equal vectors.
    same = {**batch, "item_his": np.repeat(batch["item"][:, None], 5, axis=1)}
    _, _, out = embed(same)
    np.testing.assert_allclose(out.sequences["item_his"][:, 2], out.features["item"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shared, normalization", [(False, "layer"), (True, "none")])
def test_dhe_parameter_count_matches_flax(shared, normalization):
    col = _dhe(shared=shared, normalization=normalization)
    variables, _, _ = _embed(col, random_batch(8))
    dhe_params = {k: v for k, v in variables["params"].items() if k.startswith("dhe_")}
    counted = sum(x.size for x in jax.tree.leaves(dhe_params))
    assert counted == col.num_parameters()
    expected_networks = 1 if shared else 5  # 4 features + the standalone sequence; all width 4
    assert len(dhe_params) == expected_networks


@pytest.mark.parametrize("activation", ["mish", "relu"])
def test_dhe_centred_has_no_vector_common_to_every_id(activation):
    """Mish and ReLU outputs have a positive mean, so an uncentred network gives every id's embedding one shared
    vector (the cause of a DHEN tower's collapse, benchmarks/RESULTS.md); centring the hidden layers removes it."""
    words = jnp.asarray(hashing.words_np(np.random.default_rng(3).integers(0, 2**63 - 1, 2000)))
    x = dhe_lib.encode(words, hashing.salt("user"), 256, "uniform")

    def common_share(centred):
        net = dhe_lib.DHENetwork((128, 128), 16, activation, "layer", centred=centred)
        e = np.asarray(net.apply(net.init(jax.random.key(0), x), x), np.float64)
        common = e.mean(axis=0)
        return (common**2).sum() / ((e - common) ** 2).sum(axis=1).mean()

    assert common_share(False) > 0.05
    assert common_share(True) < 0.01


def test_dhe_budget_picks_the_widest_fitting_network():
    budget = 200_000
    col = build_collection(SCHEMA, families={"dhe": DeepHashEmbedding(k=64, hidden=(0, 0), budget_bytes=budget)}, default_dim=8)
    width = col.parts[0].hidden[0]
    assert col.parameter_bytes() <= budget
    wider = 5 * dhe_lib.network_parameters(64, (width + 1,) * 2, 8, "layer") * 4
    assert wider > budget


def test_mixed_families_in_one_collection():
    families = {"ue": Unified(budget_rows=2048, dim_per_chunk=4), "dhe": DeepHashEmbedding(k=16, hidden=(8,)), "pf": PerFeature(50)}
    col = build_collection(
        SCHEMA, families=families, default_family="ue", family_of={"user": "dhe", "site": "pf"}, dims={"item": 8},
        default_dim=4, row_alignment=128,
    )
    assert [p.family for p in col.parts] == ["ue", "dhe", "pf"]
    _, rows, inputs = _embed(col, random_batch(16))
    assert {k: v.shape for k, v in inputs.features.items()} == {
        "user": (16, 4), "item": (16, 8), "cate": (16, 4), "site": (16, 4)}
    assert inputs.sequences["item_his"].shape == (16, 5, 8) and inputs.sequences["btag_his"].shape == (16, 5, 4)
    assert rows["user"].shape == (16, 16)  # DHE's "rows" are its encodings


def test_unique_words_matches_numpy_unique():
    from kernels import dedupe

    fps = random_batch(64, seed=3, vocab=40)["item_his"].ravel()
    words = hashing.words_np(fps)
    unique, inverse, count = jax.jit(dedupe.unique_words, static_argnums=1)(jnp.asarray(words), 64)
    expected, expected_inverse = np.unique(fps, return_inverse=True)  # fingerprints >= 0: (high, low) order
    assert int(count) == len(expected) <= 40
    np.testing.assert_array_equal(np.asarray(unique[: len(expected)]), hashing.words_np(expected))
    np.testing.assert_array_equal(np.asarray(unique[len(expected) :]), 0)
    np.testing.assert_array_equal(np.asarray(inverse), expected_inverse.ravel())


def test_dhe_deduplicated_equals_per_occurrence():
    """distinct_fraction runs the networks of features read by sequences once per distinct id: the same
    embeddings and parameter gradients as once per occurrence (the old computation)."""
    batch = random_batch(64, seed=5, vocab=50)  # item: 64 + 64 x 5 ids, btag_his 64 x 5; at most 50 distinct
    cols = {f: _dhe(shared=True, distinct_fraction=f, min_slots=16) for f in (None, 0.2)}
    deduped_rows = jax.jit(cols[0.2].read_rows)({}, cols[0.2].host_ids(batch))
    assert {k for k in deduped_rows if k.endswith("#distinct")} == {"item#distinct", "btag_his#distinct"}
    assert deduped_rows["item#distinct"].shape == (77, 32)  # the network's input: ceil(0.2 x 384) rows, not 384
    variables, _, reference = _embed(cols[None], batch)
    dev = device_batch(batch)
    grads, outputs = {}, {}
    for f, col in cols.items():
        head = Head(col)
        rows = jax.jit(col.read_rows)({}, col.host_ids(batch))

        def loss(params, rows=rows, head=head):
            logits, inputs = head.apply({"params": params}, rows, dev)
            return jnp.mean(logits**2), inputs

        (_, outputs[f]), grads[f] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    for name in SCHEMA.categorical:
        np.testing.assert_allclose(outputs[0.2].features[name], reference.features[name], rtol=1e-5, atol=1e-6)
    for seq in SCHEMA.sequences:
        np.testing.assert_allclose(outputs[0.2].sequences[seq.name], reference.sequences[seq.name], rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads[0.2], grads[None])


def test_dhe_distinct_fraction_bounds_every_batch(monkeypatch):
    col = _dhe(distinct_fraction=0.05, min_slots=16)
    batch = random_batch(64, seed=5, vocab=50)  # ~47 distinct items in 384 ids: more than 20 slots
    with pytest.raises(ValueError, match=r"DHE feature item: \d+ distinct ids .* 20 slots of .*distinct_fraction"):
        col.host_ids(batch)
    # Past the host check (ids built by hand), an over-full batch embeds to NaN, never to wrong vectors.
    ids = {k: hashing.words_np(batch[k]) for k in ("user", "item", "cate", "site", "item_his", "btag_his")}
    rows = jax.jit(col.read_rows)({}, ids)
    assert np.all(np.isnan(rows["item#distinct"]))
    with pytest.raises(ValueError, match="distinct_fraction must be in"):
        DeepHashEmbedding(distinct_fraction=1.0)
    # With P processes the device deduplicates the global batch (P x the host's rows): a host passes when P x its
    # distinct ids fit the global batch's slots, which guarantees the global distinct ids fit.
    ids = {"item": np.concatenate([batch["item"], batch["item_his"].ravel()]), "btag_his": batch["btag_his"].ravel()}
    # The smallest fraction (in whole %) that gives both deduplicated features 2 x their distinct ids in slots.
    fits = max(math.ceil(100 * 2 * len(np.unique(v)) / (2 * v.size)) for v in ids.values()) / 100
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    _dhe(distinct_fraction=fits, min_slots=16).host_ids(batch)
    with pytest.raises(ValueError, match=r"DHE feature \w+: .*\(x 2 processes\)"):
        _dhe(distinct_fraction=fits - 0.01, min_slots=16).host_ids(batch)
    monkeypatch.undo()
    # A batch with fewer ids than min_slots runs per occurrence (no check, no slots).
    small = _dhe(distinct_fraction=0.05, min_slots=400)
    assert not any(k.endswith("#distinct") for k in jax.jit(small.read_rows)({}, small.host_ids(batch)))
