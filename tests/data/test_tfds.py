"""TFDS builders and tfds_dataset: raw files -> TFDS -> the very examples and order of the numpy shards."""
import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ctr import prepare
from ctr.data import prepared, splits, synthetic, taobao, tfds_builders, tfds_input
from ctr.data import schema as schema_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _criteo_raw(raw_dir):
    """Synthetic Criteo with one bad row (kept out under max_bad_rows=1)."""
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 1500, seed=5)
    lines = (raw_dir / "train.txt").read_text().splitlines()
    lines[7] = "7" + lines[7][1:]  # bad label
    (raw_dir / "train.txt").write_text("\n".join(lines) + "\n")


# dataset, raw writer, split spec, seed, max_bad_rows, gin bindings of its Processing.
CASES = {
    "criteo": (_criteo_raw, splits.SplitSpec(), 3, 1, {"criteo.Processing.min_count": 3}),
    "avazu": (lambda d: synthetic.avazu.write_synthetic(str(d / "train.csv"), 1200, seed=1, days=3),
              splits.SplitSpec("time"), 0, 0, {}),  # fmt: skip
    "taobao": (lambda d: synthetic.taobao.write_synthetic(str(d), num_users=60, seed=2),
               splits.SplitSpec("time", test_day=taobao.TEST_DAY, valid="test"), 1, 0,
               {"taobao.Processing.min_count": 2}),  # fmt: skip
}


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request, tmp_path_factory):
    """(dataset, numpy prepared dir, TFDS builder) of one dataset, both made from the same raw files with the
    same options by their own entry points."""
    dataset = request.param
    write, spec, seed, max_bad_rows, bindings = CASES[dataset]
    root = tmp_path_factory.mktemp(dataset)
    (root / "raw").mkdir()
    write(root / "raw")
    gin.clear_config()
    with gin.unlock_config():
        for key, value in bindings.items():
            gin.bind_parameter(key, value)
    try:
        prepare.prepare(dataset, str(root / "raw"), str(root / "numpy"), spec, seed, max_bad_rows, 100_000)
        processing = prepare.DATASETS[dataset].Processing()
    finally:
        gin.clear_config()
    lines = []
    builder = tfds_builders.prepare(dataset, str(root / "raw"), str(root / "tfds"), spec, seed, max_bad_rows,
                                    100_000, emit=lines.append, processing=processing)  # fmt: skip
    assert any(line.startswith("writing TFDS train: ") and line.endswith("(done)") for line in lines), lines
    return dataset, str(root / "numpy"), builder


def _numpy_split(data_dir, split):
    data = prepared.prepared(data_dir)
    return next(data.eval_batches(split, data.num_rows(split)))[0], data.schema


def test_every_example_equals_the_numpy_row(built):
    """TFDS's own per-example decoding (tfds.data_source) against the numpy shards, split by split, row by row."""
    dataset, numpy_dir, builder = built
    metadata = prepared.read_metadata(numpy_dir)
    expected_splits = {"train", "test"} | (set() if metadata["valid_is_test"] else {"validation"})
    assert set(builder.info.splits) == expected_splits
    for ours, theirs in tfds_builders.SPLIT_NAMES.items():
        if theirs not in expected_splits:
            continue
        batch, schema = _numpy_split(numpy_dir, ours)
        source = tfds.data_source(builder.name + "/" + builder.builder_config.name, split=theirs,
                                  data_dir=os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir))))  # fmt: skip
        assert len(source) == len(batch["label"]) == metadata["splits"][ours]["rows"] > 0
        for i, example in enumerate(source):
            assert example["label"] == batch["label"][i]
            if schema.dense:
                np.testing.assert_array_equal(example["dense"], batch["dense"][i])
            for name in schema.categorical:
                assert example[name] == batch[name][i], (ours, i, name)
            for seq in schema.sequences:
                np.testing.assert_array_equal(example[seq.name], batch[seq.name][i])
                np.testing.assert_array_equal(example[tfds_builders.HISTORY_MASK], batch[seq.mask_key][i])
            if schema.sequences:
                assert example[tfds_builders.HISTORY_LENGTH] == batch[schema.sequences[0].mask_key][i].sum()
            if schema.group_key:
                assert example["group"] == batch["group"][i]
    if dataset == "taobao":  # the sequences are not all padding, nor all full
        lengths = batch[schema.sequences[0].mask_key].sum(axis=1)
        assert lengths.min() < 50 and lengths.max() > 0


def _entries(record):
    """{key: bytes of its map entry} of a serialized tf.train.Example, and the keys in record order."""

    def varint(i):
        value = shift = 0
        while True:
            value |= (record[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not record[i - 1] & 0x80:
                return value, i

    assert record[0] == 0x0A
    length, i = varint(1)
    assert i + length == len(record)
    entries = {}
    while i < len(record):
        start = i
        assert record[i] == 0x0A
        length, i = varint(i + 1)
        end = i + length
        assert record[i] == 0x0A
        key_length, i = varint(i + 1)
        entries[record[i : i + key_length].decode()] = record[start:end]
        i = end
    return entries


def test_records_equal_tfds_own_encoder_byte_for_byte(built):
    """The bulk serializer against TFDS's encoder and serializer, record by record: the same map entries,
    byte for byte, and the same framing; written in sorted key order (protobuf's deterministic order)."""
    from tensorflow_datasets.core import example_serializer

    _, numpy_dir, builder = built
    features = builder.info.features
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    data = prepared.prepared(numpy_dir)
    for split, theirs in tfds_builders.SPLIT_NAMES.items():
        if theirs not in builder.info.splits:
            continue
        source = builder.as_data_source(split=theirs, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
        records = source.data_source.__getitems__(list(range(len(source))))
        examples = list(builder._generate_examples(data, split))
        assert len(examples) == len(records) > 0
        for (i, example), ours in zip(examples, records):
            reference = serializer.serialize_example(features.encode_example(example))
            mine = _entries(ours)
            assert list(mine) == sorted(mine), i
            assert mine == _entries(reference) and len(ours) == len(reference) and ours[:4] == reference[:4], (split, i)


def test_encoder_edge_values_equal_tfds_own():
    """Values the datasets rarely hold: negative and 64-bit ints (10-byte varints), bools, int32, float
    specials, a [0] tensor, sizes around the 1-byte length limit."""
    from tensorflow_datasets.core import example_serializer

    from ctr.data import tfds_records

    features = tfds.features.FeaturesDict({
        "a": tfds.features.Scalar(np.int64), "b": tfds.features.Tensor(shape=(3,), dtype=np.bool_),
        "c": tfds.features.Tensor(shape=(31,), dtype=np.float32), "d": tfds.features.Scalar(np.int32),
        "e": tfds.features.Tensor(shape=(0,), dtype=np.int64), "f": tfds.features.Tensor(shape=(70,), dtype=np.int64),
    })  # fmt: skip
    rng = np.random.default_rng(0)
    n = 200
    columns = {
        "a": np.concatenate([[0, 1, -1, 127, 128, 2**63 - 1, -(2**63)], rng.integers(-(2**63), 2**63 - 1, n - 7)]),
        "b": rng.random((n, 3)) < 0.5,
        "c": np.where(rng.random((n, 31)) < 0.1, np.float32(np.nan), rng.normal(size=(n, 31))).astype(np.float32),
        "d": rng.integers(-(2**31), 2**31 - 1, n).astype(np.int32),
        "e": np.zeros((n, 0), np.int64),
        "f": rng.integers(0, 2**62, (n, 70)) >> rng.integers(0, 62, (n, 70)),
    }
    columns["c"][:2, 0] = [-0.0, np.inf]
    buf, offsets = tfds_records.ExampleEncoder(features).encode(columns)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    for i in range(n):
        reference = serializer.serialize_example(features.encode_example({k: v[i] for k, v in columns.items()}))
        ours = buf[offsets[i] : offsets[i + 1]]
        assert _entries(ours) == _entries(reference) and len(ours) == len(reference), i
    with pytest.raises(ValueError, match="'s'.*not a fixed-shape"):
        tfds_records.ExampleEncoder(tfds.features.FeaturesDict({"s": tfds.features.Text()}))


def test_write_shards_splits_records_in_order(tmp_path):
    from array_record.python import array_record_data_source

    from ctr.data import tfds_records

    records = [bytes([i % 251]) * (i % 7 + 1) for i in range(50)]
    lengths = [len(r) for r in records]
    chunks = [(b"".join(records[a:b]), np.cumsum([0, *lengths[a:b]])) for a, b in ((0, 13), (13, 40), (40, 50))]
    paths = [str(tmp_path / f"s{i}") for i in range(3)]
    assert tfds_records.write_shards(paths, [17, 17, 16], iter(chunks)) == sum(lengths)
    read = [array_record_data_source.ArrayRecordDataSource([p]) for p in paths]
    assert [len(r) for r in read] == [17, 17, 16]
    assert [r[i] for r in read for i in range(len(r))] == records
    with pytest.raises(ValueError, match="fewer records than the 51 planned"):
        tfds_records.write_shards(paths, [17, 17, 17], iter(chunks))
    with pytest.raises(ValueError, match="more records than the 49 planned"):
        tfds_records.write_shards(paths, [17, 17, 15], iter(chunks))


def test_vocabularies_equal_the_numpy_prepares(built):
    """vocabularies(tfds_name=...) on the TFDS build = vocabularies() on the numpy shards, through gin."""
    _, numpy_dir, builder = built
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
    name = f"{builder.name}/{builder.builder_config.name}"
    if not prepared.read_metadata(numpy_dir)["vocab"]:
        with pytest.raises(ValueError, match="built without a vocabulary"):
            prepared.vocabularies(data_dir, tfds_name=name)
        return
    expected = prepared.vocabularies(numpy_dir)
    gin.clear_config()
    try:
        gin.parse_config([f'vocabularies.data_dir = "{data_dir}"', f'vocabularies.tfds_name = "{name}"'])
        got = prepared.vocabularies()
    finally:
        gin.clear_config()
    assert set(got) == set(expected) and all(len(v) for v in expected.values())
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
        assert got[key].dtype == np.int64


def test_metadata_has_the_row_accounting_and_options(built):
    dataset, numpy_dir, builder = built
    with open(os.path.join(numpy_dir, prepared.ACCOUNTING)) as f:
        accounting = json.load(f)
    # Read back from the directory, as a user of the dataset would.
    stored = tfds.builder_from_directory(builder.data_dir).info.metadata["ctr"]
    assert stored["accounting"] == accounting
    numpy_meta = prepared.read_metadata(numpy_dir)
    for key in ("schema", "split", "processing", "vocab", "valid_is_test"):
        assert stored[key] == numpy_meta[key], key
    if dataset == "criteo":
        assert accounting["rows_rejected"] == {"criteo": {"bad_label": 1}}
        assert stored["processing"]["min_count"] == 3 and stored["vocab"]["min_count"] == 3
    info = builder.info
    assert info.homepage.startswith("https://") and "@" in info.citation
    assert info.features["label"].doc.desc and all(
        info.features[k].doc.desc for k in info.features.keys()
    )  # every feature documented
    assert "manual_dir" in type(builder).MANUAL_DOWNLOAD_INSTRUCTIONS


def test_batches_and_order_equal_the_numpy_shards(built):
    """tfds_dataset's batch-first decoding and (seed, step) order against prepared(): eval batches, training
    batches across an epoch boundary, a resumed start and per-host slices."""
    _, numpy_dir, builder = built
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
    ours = tfds_input.tfds_dataset(f"{builder.name}/{builder.builder_config.name}", data_dir)
    theirs = prepared.prepared(numpy_dir)
    assert ours.schema == theirs.schema
    for split in splits.NAMES:
        assert ours.num_rows(split) == theirs.num_rows(split)
        for (a, ra), (b, rb) in zip(ours.eval_batches(split, 96, 1, 2), theirs.eval_batches(split, 96, 1, 2)):
            _same_batch(a, b)
            assert ra == rb
    batch = 64
    steps = theirs.steps_per_epoch(batch)
    for start in (0, steps - 1):
        for process in (0, 1):
            pairs = zip(ours.train_batches(batch, start, 7, process, 2), theirs.train_batches(batch, start, 7, process, 2))
            for _, (a, b) in zip(range(3), pairs):
                _same_batch(a, b)


def _same_batch(a, b):
    assert set(a) == set(b)
    for key in b:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_mismatches_are_clear_errors(built, tmp_path):
    dataset, _, builder = built
    data_dir = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
    name = f"{builder.name}/{builder.builder_config.name}"
    with pytest.raises(tfds_input.NotBuilt, match="no such TFDS dataset.*--format=tfds"):
        tfds_input.tfds_dataset(f"{builder.name}/random-00000000", data_dir)
    with pytest.raises(tfds_input.Mismatch, match=r"builder version 1\.0\.0, the config expects 2\.0\.0"):
        tfds_input.tfds_dataset(name, data_dir, version="2.0.0")
    field = {"criteo": "int_buckets", "avazu": "min_count", "taobao": "max_len"}[dataset]
    with pytest.raises(tfds_input.Mismatch, match=rf"Processing\.{field} = .*, the config expects 7"):
        tfds_input.tfds_dataset(name, data_dir, processing={field: 7})
    with pytest.raises(tfds_input.NotBuilt, match="split 'nope'.*tfds_dataset.train_split"):
        tfds_input.tfds_dataset(name, data_dir, train_split="nope")
    # Features that are not what this code reads for the stored schema (e.g. built by an edited builder).
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    variant = copy / os.path.relpath(builder.data_dir, data_dir)
    features = json.loads((variant / "features.json").read_text())
    features["featuresDict"]["features"].pop("label")
    (variant / "features.json").write_text(json.dumps(features))
    with pytest.raises(tfds_input.Mismatch, match=r"features do not match .*label: stored absent"):
        tfds_input.tfds_dataset(name, str(copy))


def test_cli_builds_tfds_with_the_numpy_progress(tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    synthetic.avazu.write_synthetic(str(raw_dir / "train.csv"), 400, seed=3)
    env = dict(os.environ, BUILD_WORKING_DIRECTORY=str(tmp_path), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "ctr.prepare", "--format=tfds", "--dataset=avazu", "--raw_dir=raw", "--out_dir=tfds",
           "--seed=4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "rows/s" in done.stderr and "rows written" in done.stderr and "writing TFDS train:" in done.stderr
    config = tfds_builders.config_for("avazu", splits.SplitSpec(), seed=4)
    assert f'tfds_dataset.name = "ctr_avazu/{config.name}"' in done.stderr
    assert config.name.startswith("random-") and tfds_builders.config_for("avazu", splits.SplitSpec()).name == "random"
    data = tfds_input.tfds_dataset(f"ctr_avazu/{config.name}", str(tmp_path / "tfds"))
    assert sum(data.num_rows(s) for s in splits.NAMES) == 400
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already built" in again.stderr.strip().splitlines()[-1]


def test_cli_bad_row_is_one_line_and_leaves_no_staging(tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    synthetic.criteo.write_synthetic(str(raw_dir / "train.txt"), 50, seed=1)
    lines = (raw_dir / "train.txt").read_text().splitlines()
    lines[9] = "7" + lines[9][1:]
    (raw_dir / "train.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-m", "ctr.prepare", "--format=tfds", "--dataset=criteo", f"--raw_dir={raw_dir}",
         f"--out_dir={tmp_path / 'tfds'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"ctr.prepare: error: {raw_dir}/train.txt:10: field label: label must be 0 or 1, got b'7'"
    )
    left = [os.path.relpath(os.path.join(d, n), tmp_path / "tfds") for d, ds, fs in os.walk(tmp_path / "tfds")
            for n in ds + fs]  # fmt: skip
    assert not any("staging" in p or p.endswith(".array_record") or "incomplete" in p for p in left), left
    assert not (tmp_path / "tfds" / "ctr_criteo" / "random").exists()


def test_build_equals_tfds_own_writers_tfrecord_build(tmp_path):
    """The bulk-written build, read by tfds.data_source, equals a TFRecord build by TFDS's own per-example
    writer (the fallback for other file formats) read by as_dataset, example by example; the split info (shard
    lengths, sizes) is sound. (TFDS's as_dataset / tfds.load does not read ArrayRecord.)"""
    (tmp_path / "raw").mkdir()
    synthetic.avazu.write_synthetic(str(tmp_path / "raw" / "train.csv"), 300, seed=6)
    config = tfds_builders.config_for("avazu", splits.SplitSpec())
    download = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw"),
                                            compute_stats=tfds.download.ComputeStatsMode.SKIP)  # fmt: skip
    fast = tfds_builders.CtrAvazu(config=config, data_dir=str(tmp_path / "fast"), emit=lambda line: None)
    fast.download_and_prepare(download_config=download)
    slow = tfds_builders.CtrAvazu(config=config, data_dir=str(tmp_path / "slow"), emit=lambda line: None,
                                  file_format="tfrecord")  # fmt: skip
    slow.download_and_prepare(download_config=download)
    assert {s: i.num_examples for s, i in fast.info.splits.items()} == {
        s: i.num_examples for s, i in slow.info.splits.items()
    }
    for split, info in fast.info.splits.items():
        assert sum(info.shard_lengths) == info.num_examples and info.num_bytes > 0
        ours = list(tfds.data_source(f"ctr_avazu/{config.name}", split=split, data_dir=str(tmp_path / "fast")))
        theirs = list(tfds.as_numpy(slow.as_dataset(split=split)))  # tf.data over the TFRecord shards
        assert len(ours) == len(theirs) == info.num_examples
        for a, b in zip(ours, theirs):
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in b)
