"""prepare -> prepared round trip, splits, vocabulary, row accounting, resume and multi-host determinism, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ctr import errors, prepare
from ctr.data import criteo, dataset, prepared, raw, row_accounting, splits, synthetic, taobao, vocab
from ctr.data import rows as rows_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def criteo_raw(tmp_path_factory):
    raw_dir = tmp_path_factory.mktemp("criteo_raw")
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 3000, seed=5)
    return str(raw_dir)


@pytest.fixture(scope="module")
def criteo_prepared(criteo_raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("criteo_prepared"))
    prepare.prepare("criteo", criteo_raw, out, splits.SplitSpec(), seed=3, shard_bytes=200_000)
    return out


def _key(batch, schema):
    """Rows as comparable tuples (label, dense, ids...)."""
    cols = [batch["label"][:, None], batch["dense"].view(np.int32)] + [batch[f][:, None] for f in schema.categorical]
    return [tuple(r) for r in np.concatenate([c.astype(np.int64) for c in cols], axis=1).tolist()]


def test_round_trip_every_row_once(criteo_raw, criteo_prepared):
    data = prepared.prepared(criteo_prepared)
    parts = criteo.read(criteo.input_files(criteo_raw), row_accounting.RowAccounting(), int_buckets=True)
    reference = rows_lib.Rows.concat(list(parts))
    schema = data.schema
    assert schema == criteo.feature_schema(int_buckets=True)
    expected = sorted(_key(rows_lib.to_batch(schema, reference.arrays()), schema))
    got = []
    for split in splits.NAMES:
        for batch, real in data.eval_batches(split, 256):
            got += _key({k: v[:real] for k, v in batch.items()}, schema)
    assert sorted(got) == expected
    sizes = [data.num_rows(s) for s in splits.NAMES]
    assert sum(sizes) == 3000 and 0.75 < sizes[0] / 3000 < 0.85
    metadata = prepared.read_metadata(criteo_prepared)
    assert len(metadata["splits"]["train"]["shards"]) > 1  # several shuffle buckets, several shards


def test_accounting_is_stored(criteo_prepared):
    with open(os.path.join(criteo_prepared, "accounting.json")) as f:
        accounting = json.load(f)
    assert accounting["rows_read"] == {"criteo": 3000}
    assert sum(accounting["rows_written"].values()) == 3000 and accounting["rows_rejected"] == {}


def test_train_order_is_a_function_of_seed_and_step(criteo_prepared):
    data = prepared.prepared(criteo_prepared)
    steps = data.steps_per_epoch(128)
    run = data.train_batches(128, 0, seed=7)
    uninterrupted = [next(run) for _ in range(steps + 3)]  # crosses an epoch boundary
    resumed = data.train_batches(128, steps - 2, seed=7)
    for expected in uninterrupted[steps - 2 :]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    epoch0 = {r for b in uninterrupted[:steps] for r in _key(b, data.schema)}
    assert len(epoch0) == steps * 128  # no row twice within an epoch
    other_seed = next(data.train_batches(128, 0, seed=8))
    assert _key(other_seed, data.schema) != _key(uninterrupted[0], data.schema)


@pytest.mark.parametrize("block_rows", [1, 16])
def test_hosts_split_each_global_batch(criteo_prepared, block_rows):
    data = prepared.prepared(criteo_prepared, block_rows=block_rows)
    whole = next(data.train_batches(256, 5, seed=1))
    parts = [next(data.train_batches(256, 5, seed=1, process_index=p, process_count=4)) for p in range(4)]
    assert all(len(p["label"]) == 64 for p in parts)
    assert sorted(sum((_key(p, data.schema) for p in parts), [])) == sorted(_key(whole, data.schema))


def test_eval_batches_pad_with_row_zero(criteo_prepared):
    data = prepared.prepared(criteo_prepared)
    n = data.num_rows("valid")
    batches = list(data.eval_batches("valid", 128, process_index=1, process_count=2))
    assert all(len(b["label"]) == 64 for b, _ in batches)
    assert sum(real for _, real in batches) == sum(min(64, max(0, n - b * 128 - 64)) for b in range(len(batches)))
    first = next(data.eval_batches("valid", 128))[0]
    last, real = list(data.eval_batches("valid", 128))[-1]
    for key in first:
        np.testing.assert_array_equal(last[key][real:], np.repeat(first[key][:1], 128 - real, axis=0))


def test_matches_in_memory_dataset_order(criteo_prepared):
    # Same rows in the same split, same (seed, step) -> the same examples as the in-memory Dataset gives.
    data = prepared.prepared(criteo_prepared)
    splits_ = {s: next(data.eval_batches(s, data.num_rows(s)))[0] for s in splits.NAMES}
    memory = dataset.InMemoryDataset(data.schema, splits_)
    got, expected = next(data.train_batches(64, 3, seed=2)), next(memory.train_batches(64, 3, seed=2))
    assert sorted(_key(got, data.schema)) == sorted(_key(expected, data.schema))


def test_out_dir_must_be_empty(criteo_raw, criteo_prepared):
    with pytest.raises(FileExistsError):
        prepare.prepare("criteo", criteo_raw, criteo_prepared, splits.SplitSpec())


def test_vocabulary_maps_rare_values_to_oov(tmp_path, criteo_raw):
    import gin

    with gin.unlock_config():
        gin.bind_parameter("criteo.Processing.min_count", 5)
    try:
        prepare.prepare("criteo", criteo_raw, str(tmp_path), splits.SplitSpec(), shard_bytes=200_000)
    finally:
        gin.clear_config()
    data = prepared.prepared(str(tmp_path))
    voc = vocab.Vocabulary.load(str(tmp_path))
    train = next(data.eval_batches("train", data.num_rows("train")))[0]
    kept = prepared.vocabularies(str(tmp_path))
    for name in ["C1", "C3", "I1_bucket"]:
        values, counts = np.unique(train[name], return_counts=True)
        oov = voc.oov_id(name)
        assert (counts[values != oov] >= 5).all()  # every kept value is frequent in train
        np.testing.assert_array_equal(kept[name], np.sort(values[values != oov]))
    assert 1 < len(kept["C3"]) < 3000
    some = prepared.vocabularies(str(tmp_path), features=("C3", "I1_bucket"))  # a family serving only these
    assert list(some) == ["C3", "I1_bucket"]
    np.testing.assert_array_equal(some["C3"], kept["C3"])
    with pytest.raises(errors.ConfigError, match=r"vocabularies.features: \['C99'\] have no vocabulary"):
        prepared.vocabularies(str(tmp_path), features=("C3", "C99"))
    # A .npy that disagrees with vocab.json is refused, naming the file.
    np.save(tmp_path / "vocab" / "C3.npy", kept["C3"][:-1])
    with pytest.raises(ValueError, match=rf"vocab/C3\.npy: {len(kept['C3']) - 1} kept values, vocab.json says "
                                         rf"{len(kept['C3']) + 1} rows"):
        vocab.Vocabulary.load(str(tmp_path))


def test_time_split_holds_out_the_last_day(tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    synthetic.avazu.write_synthetic(str(raw_dir / "train.csv"), 600, seed=1, days=3)
    out = str(tmp_path / "out")
    metadata = prepare.prepare("avazu", str(raw_dir), out, splits.SplitSpec("time"), shard_bytes=50_000)
    assert metadata["split"]["test_day"] == 20141023
    rows = {s: metadata["splits"][s]["rows"] for s in splits.NAMES}
    assert rows["train"] == 400 and rows["valid"] + rows["test"] == 200 and 60 < rows["valid"] < 140


def test_taobao_splits_by_day_with_valid_as_test(tmp_path):
    raw_dir = str(tmp_path / "raw")
    synthetic.taobao.write_synthetic(raw_dir, num_users=150, seed=2)
    out = str(tmp_path / "out")
    spec = splits.SplitSpec("time", test_day=taobao.TEST_DAY, valid="test")
    prepare.prepare("taobao", raw_dir, out, spec, shard_bytes=1_000_000)
    data = prepared.prepared(out)
    assert data.schema == taobao.feature_schema()
    test = next(data.eval_batches("test", data.num_rows("test")))[0]
    valid = next(data.eval_batches("valid", data.num_rows("valid")))[0]
    for key in test:
        np.testing.assert_array_equal(valid[key], test[key])
    batch = next(data.train_batches(32, 0, seed=0))
    assert batch["cate_his"].shape == (32, 50) and batch["cate_his_mask"].dtype == bool
    assert (batch["cate_his"][~batch["cate_his_mask"]] == 0).all()
    source = taobao.open_raw(raw_dir, processing=taobao.Processing(),
                             options=raw.ReadOptions(accounting=row_accounting.RowAccounting()))
    days = np.concatenate([r.day for r in source.rows])
    assert data.num_rows("test") == int((days == taobao.TEST_DAY).sum())


def test_bad_rows_under_a_budget_are_in_the_accounting(tmp_path, criteo_raw):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    lines = open(os.path.join(criteo_raw, "train.txt")).read().splitlines()[:400]
    lines[10] = "7" + lines[10][1:]
    lines[20] = lines[20].rsplit("\t", 1)[0]
    (raw_dir / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(raw.ParseError, match=r"train.txt:11: field label"):
        prepare.prepare("criteo", str(raw_dir), str(tmp_path / "strict"), splits.SplitSpec())
    metadata = prepare.prepare("criteo", str(raw_dir), str(tmp_path / "lenient"), splits.SplitSpec(), max_bad_rows=2)
    accounting = metadata["accounting"]
    assert accounting["rows_read"] == {"criteo": 400}
    assert accounting["rows_rejected"] == {"criteo": {"bad_label": 1, "wrong_field_count": 1}}
    assert sum(accounting["rows_written"].values()) == 398


def test_cli_resolves_paths_from_the_working_directory(tmp_path, criteo_raw):
    gin_file = tmp_path / "data.gin"
    gin_file.write_text("criteo.Processing.int_buckets = False\ntrain.dataset_fn = @prepared\n")
    env = dict(os.environ, BUILD_WORKING_DIRECTORY=str(tmp_path), PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-m", "ctr.prepare", "--dataset=criteo", f"--raw_dir={criteo_raw}", "--out_dir=out",
         "--gin_file=data.gin", "--split=time", "--valid=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "rows/s" in result.stderr and "rows written" in result.stderr
    data = prepared.prepared(str(tmp_path / "out"))
    assert data.schema == criteo.feature_schema(int_buckets=False)
    metadata = prepared.read_metadata(str(tmp_path / "out"))
    assert metadata["split"]["test_day"] == 6 and data.num_rows("valid") > 0  # day 1 of 7 is valid
    failed = subprocess.run(
        [sys.executable, "-m", "ctr.prepare", "--dataset=criteo", f"--raw_dir={tmp_path}/nothing", "--out_dir=out2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2 and failed.stderr.startswith("ctr.prepare: error: ")
    assert "no Criteo files" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and not (tmp_path / "out2").exists()
