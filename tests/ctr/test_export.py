"""SavedModel export against ctr's own evaluation: raw rows in the real layouts, served in a process without JAX.

Each trained case trains a tiny run for a few steps (8 CPU devices, conftest.py), exports it, and builds ~1,000
raw rows of its dataset from the synthetic generators (half from the training file, half from another seed:
missing and never-seen values included). The reference is the training pipeline: the dataset's numpy parser
(and for TaobaoAds its join), the prepared vocabulary, ``collection.host_ids`` and the trainer's ``CTRModule`` on
the restored state. The SavedModels' side runs in one child process that cannot import JAX
(``serve_saved_model.py``). Trained cases (restore from a checkpoint, each pure family):

- criteo / DCNv2 / per-feature vocabulary tables (data prepared with ``min_count``, integer buckets);
- avazu / DLRM / hashed tables, row-sharded over all 8 devices while training;
- taobao / CETNet: a DCNv2 tower on Unified Embedding, a DHEN tower on DHE (each its own collection), fused.

The first case exports through the command (``python -m ctr.export``), the second through the end-of-training
hook (``export_at_end.enabled``), the third through :func:`ctr.export.export`.

The model matrix (``MATRIX``): every model (DCNv2, DLRM, DHEN, InterFormer standalone, CETNet with each tower on
its own collection) on TaobaoAds prepared with a vocabulary, each on one collection that mixes all four families
per feature (vocabulary tables, hashed tables, Unified Embedding, DHE; sequences on a vocabulary table, on
Unified Embedding's chunks and on DHE). These are not trained (a training step's compile would cost more than
all the rest): the state is the run's own layout with every parameter and table entry drawn at random, biases
and norms included, so that every row and weight moves the logits (checked: the logits spread). What they check
is the conversion and the preprocessing; restoring a trained checkpoint is the trained cases' part.
"""
import dataclasses
import os
import pickle
import re
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest

from ctr import errors
from ctr import export as export_lib
from ctr import prepare as prepare_lib
from ctr import serving
from ctr import train as train_cli
from ctr import train_state as train_state_lib
from ctr import trainer
from ctr.data import avazu, criteo, raw, synthetic, taobao
from ctr.data import row_accounting
from ctr.data import rows as rows_lib
from ctr.data import splits
from ctr.data import vocab as vocab_lib
from ctr.data import schema as schema_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(HERE, "tiny.gin")
SERVE = os.path.join(HERE, "serve_saved_model.py")
ROWS = 1000
TAOBAO_LEN = 10
COMMON = ["train.num_steps = 8", "train.log_every = 4", 'train.final_eval_splits = ("test",)',
          "Checkpointer.every_steps = 0"]  # fmt: skip
TINY_DHE = ["DeepHashEmbedding.k = 32", "DeepHashEmbedding.hidden = (16,)", "DeepHashEmbedding.shared = True"]

CASES = {
    "criteo-dcnv2-vocab": dict(dataset="criteo", prepared=True, export="cli", bindings=[
        "train.model_name = 'dcnv2'", "train.embedding_fn = @build_collection",
        'build_collection.families = {"per_feature": @PerFeature()}', "build_collection.default_dim = 8",
        "PerFeature.vocabularies = @vocabularies()",
        "dense_optimizer.cooldown = 0.5"]),  # a schedule the restore target must rebuild without the run's length
    "avazu-dlrm-hashed-sharded": dict(dataset="avazu", export="hook", bindings=[
        "train.dataset_fn = @synthetic_avazu", "synthetic_avazu.num_rows = 6000",
        "train.model_name = 'dlrm'", "DLRM.dim = 8", "DLRM.bottom_mlp = (16,)", "DLRM.top_mlp = (16,)",
        "train.embedding_fn = @build_collection", 'build_collection.families = {"hashed": @PerFeature()}',
        "build_collection.default_dim = 8", "PerFeature.num_buckets = 300",
        'logical_rules.table_rows = ("data", "model")', "export_at_end.enabled = True",
        "dense_optimizer.ema_decay = 0.9"]),  # the dense parameters' moving average is what is evaluated
    "taobao-cetnet-towers": dict(dataset="taobao", bindings=[
        "train.dataset_fn = @synthetic_taobao", "synthetic_taobao.num_users = 300",
        f"synthetic_taobao.max_len = {TAOBAO_LEN}", "train.batch_size = 128",
        # DCNv2 and DHEN towers: with an InterFormer tower, training this case took a third of this file's time
        # (InterFormer, standalone and as a tower, is in the matrix).
        "train.model_name = 'cetnet'", 'CETNet.towers = (("dcnv2", "dcnv2"), ("dhen", "dhen"))',
        "CETNet.learn_prior = True",  # as the shipped CETNet configs
        "dcnv2/DCNv2.mlp = (16,)", "dhen/DHENModel.dim = 8", "dhen/DHENModel.head = (16,)",
        "train.embedding_fn = @tower_collections",
        'tower_collections.towers = {"dcnv2": @dcnv2/build_collection, "dhen": @dhen/build_collection}',
        'dcnv2/build_collection.families = {"unified": @Unified()}',
        "dcnv2/build_collection.default_dim = 8", 'dhen/build_collection.families = {"dhe": @DeepHashEmbedding()}',
        "dhen/build_collection.default_dim = 8",
        "Unified.budget_rows = 4096", "Unified.num_tables = 2", "Unified.dim_per_chunk = 4", *TINY_DHE]),
}

MATRIX_SIZES = ["hashed/PerFeature.num_buckets = 300", "Unified.budget_rows = 2048", "Unified.num_tables = 2",
                "Unified.dim_per_chunk = 4", *TINY_DHE]  # fmt: skip
# Every family in one collection: sequences share cate_id's vocabulary table and brand's Unified chunks; btag_his
# is hashed by DHE.
MIXED = [
    "train.embedding_fn = @build_collection", "build_collection.default_dim = 8",
    'build_collection.families = {"vocab": @vocab/PerFeature(), "hashed": @hashed/PerFeature(), '
    '"unified": @Unified(), "dhe": @DeepHashEmbedding()}',
    'build_collection.default_family = "hashed"',
    'build_collection.family_of = {"cate_id": "vocab", "pid": "vocab", "cms_segid": "vocab", "brand": "unified", '
    '"customer": "unified", "adgroup_id": "dhe", "btag_his": "dhe"}',
    "vocab/PerFeature.vocabularies = @vocabularies()", 'vocabularies.features = ("cate_id", "pid", "cms_segid")',
    *MATRIX_SIZES,
]
TINY_INTERFORMER = ["InterFormer.dim = 8", "InterFormer.num_layers = 1", "InterFormer.head = (16,)"]
TINY_DHEN = ["DHENModel.dim = 8", "DHENModel.head = (16,)"]
MATRIX = {
    "dcnv2": MIXED + ["train.model_name = 'dcnv2'", "DCNv2.mlp = (16,)"],
    "dlrm": MIXED + ["train.model_name = 'dlrm'", "DLRM.dim = 8", "DLRM.bottom_mlp = (16,)", "DLRM.top_mlp = (16,)"],
    "dhen": MIXED + ["train.model_name = 'dhen'", *TINY_DHEN],
    "interformer": MIXED + ["train.model_name = 'interformer'", *TINY_INTERFORMER],
    # Each tower its own collection, both mixed, families assigned differently (the towers' tables and DHE
    # networks are their own).
    "cetnet": MIXED + [
        "train.model_name = 'cetnet'", *TINY_INTERFORMER, *TINY_DHEN,
        "train.embedding_fn = @tower_collections",
        'tower_collections.towers = {"interformer": @interformer/build_collection, "dhen": @dhen/build_collection}',
        'dhen/build_collection.families = {"vocab": @dhen_vocab/PerFeature(), "hashed": @hashed/PerFeature(), '
        '"unified": @Unified(), "dhe": @DeepHashEmbedding()}',
        'dhen/build_collection.default_family = "unified"',
        'dhen/build_collection.family_of = {"userid": "dhe", "cate_id": "vocab", "brand": "hashed", '
        '"btag_his": "vocab"}',
        "dhen_vocab/PerFeature.vocabularies = @dhen_vocab/vocabularies()",
        'dhen_vocab/vocabularies.features = ("cate_id", "btag_his")'],
}
# Serialized for more platforms than this machine has: lowering for CUDA and TPU needs no such device.
MATRIX_PLATFORMS = {"cetnet": ("cpu", "cuda", "tpu")}
ALL = [*CASES, *(f"matrix-{model}" for model in MATRIX)]


# -- raw rows of each dataset, as serving inputs and as the training pipeline's host batch --------------------


def _criteo_rows(data_dir, int_buckets):
    seen = os.path.join(data_dir, "criteo_synthetic_6000_0.txt")
    unseen = os.path.join(data_dir, "criteo_unseen.txt")
    synthetic.criteo.write_synthetic(unseen, ROWS // 2, seed=11)  # other value tables: most values never seen
    lines = open(seen).read().splitlines()[: ROWS // 2] + open(unseen).read().splitlines()
    blob = ("\n".join(lines) + "\n").encode()
    block = raw.Block("rows", np.frombuffer(blob, np.uint8), 1, len(lines), False, len(blob))
    rows, rejected = criteo.parse_block(block, int_buckets)
    assert not rejected
    fields = [line.split("\t") for line in lines]
    columns = {name: np.array([f[i] for f in fields], object) for i, name in enumerate(criteo.COLUMNS)}
    del columns["label"]
    return columns, lines, rows_lib.to_batch(criteo.feature_schema(int_buckets), rows.arrays())


def _avazu_rows(data_dir):
    seen = os.path.join(data_dir, "avazu_synthetic_6000_0.csv")
    unseen = os.path.join(data_dir, "avazu_unseen.csv")
    synthetic.avazu.write_synthetic(unseen, ROWS // 2, seed=11, start_date="141025")
    lines = open(seen).read().splitlines()[1 : ROWS // 2 + 1] + open(unseen).read().splitlines()[1:]
    blob = ("\n".join(lines) + "\n").encode()
    block = raw.Block("rows", np.frombuffer(blob, np.uint8), 1, len(lines), False, len(blob))
    rows, rejected = avazu.parse_block(block)
    assert not rejected
    fields = [line.split(",") for line in lines]
    columns = {name: np.array([f[i] for f in fields], object) for i, name in enumerate(avazu.COLUMNS)}
    del columns["id"], columns["click"]
    return columns, lines, rows_lib.to_batch(avazu.feature_schema(), rows.arrays())


def _taobao_rows(raw_dir):
    """Serving inputs by the plain-Python join of ``ctr.serving`` (independent of the reader), and the reader's
    joined batch."""
    source = taobao.open_raw(raw_dir, processing=taobao.Processing(max_len=TAOBAO_LEN), options=raw.ReadOptions(accounting=row_accounting.RowAccounting()))
    rows = rows_lib.Rows.concat(list(source.rows))
    return serving.taobao_requests(raw_dir, TAOBAO_LEN), None, rows_lib.to_batch(source.schema, rows.arrays())


# -- the cases: train, export, reference ----------------------------------------------------------------------


def _train_and_export(name, case, root):
    data_dir = str(root / "data")
    bindings = [f'synthetic_criteo.data_dir = "{data_dir}"', f'synthetic_avazu.data_dir = "{data_dir}"',
                f'synthetic_taobao.data_dir = "{data_dir}"', *COMMON]  # fmt: skip
    if case.get("prepared"):
        raw_dir, out_dir = root / "raw", str(root / "prepared")
        os.makedirs(raw_dir)
        os.makedirs(data_dir)
        synthetic.criteo.write_synthetic(os.path.join(data_dir, "criteo_synthetic_6000_0.txt"), 6000, seed=0)
        os.symlink(os.path.join(data_dir, "criteo_synthetic_6000_0.txt"), raw_dir / "train.txt")
        gin.clear_config()
        gin.parse_config(["criteo.Processing.int_buckets = True", "criteo.Processing.min_count = 2"])
        prepare_lib.prepare("criteo", str(raw_dir), out_dir, splits.SplitSpec(), emit=lambda *_: None)
        bindings += ["train.dataset_fn = @prepared", f'prepared.data_dir = "{out_dir}"',
                     f'vocabularies.data_dir = "{out_dir}"']  # fmt: skip
    gin.clear_config()
    train_cli.parse_config([TINY], bindings + case["bindings"])
    run_dir = str(root / "run")
    results = trainer.train(run_dir=run_dir)
    export_lib.parse_run_config(run_dir)
    restored = export_lib.restore(run_dir)
    if case.get("export") == "hook":  # export_at_end.enabled: the trainer exported to <run_dir>/export
        path = os.path.join(run_dir, "export", str(results["steps"]))
    elif case.get("export") == "cli":
        done = subprocess.run([sys.executable, "-m", "ctr.export", f"--run_dir={run_dir}",
                               f"--export_dir={root / 'export'}"], capture_output=True, text=True, cwd=REPO)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        path = str(root / "export" / str(results["steps"]))
        assert f"Exported {path}" in done.stdout and "signature parse_lines(lines: string[B])" in done.stdout
    else:
        path = export_lib.export(run_dir, str(root / "export"), restored=restored)
    gin.clear_config()
    return run_dir, path, restored, results


def _reference(restored, batch):
    """The trainer's eval forward pass (the collection as trained, numpy host ids) on one host batch."""
    schema = restored.schema
    if restored.vocab is not None:  # what prepare did to the ids it stored
        vocab_of = vocab_lib.vocab_features(schema)
        batch = dict(batch)
        for name in schema.categorical:
            batch[name] = restored.vocab.apply(vocab_of[name], batch[name])
        for seq in schema.sequences:
            batch[seq.name] = np.where(batch[seq.mask_key], restored.vocab.apply(vocab_of[seq.name], batch[seq.name]), 0)
    module = train_state_lib.CTRModule(collection=restored.collection, network=restored.module.network)
    ids = restored.collection.host_ids(batch)
    dev = train_state_lib.device_batch(schema, batch)

    @jax.jit
    def forward(params, tables, dev, ids):
        rows = restored.collection.read_rows(tables, ids)
        return module.apply({"params": params}, rows, dev, train=False)

    out = forward(restored.params, restored.tables, dev, ids)
    logits = np.asarray(restored.module.network.logits(out), np.float32)
    return {"ids": ids, "dev": dev, "logits": logits, "outputs": jax.tree.map(np.asarray, out)}


def _prepare_taobao(root):
    """TaobaoAds raw files prepared with a vocabulary (the matrix's data); returns the prepared directory."""
    raw_dir, out_dir = str(root / "raw"), str(root / "prepared")
    synthetic.taobao.write_synthetic(raw_dir, num_users=300, seed=0)
    gin.clear_config()
    gin.parse_config([f"taobao.Processing.max_len = {TAOBAO_LEN}", "taobao.Processing.min_count = 2"])
    prepare_lib.prepare("taobao", raw_dir, out_dir, splits.SplitSpec(), emit=lambda *_: None)
    gin.clear_config()
    return out_dir


def _random_restored(seed):
    """The run of the parsed config in its own state layout (``export.rebuild``), every parameter and table
    entry drawn at random: kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), biases and the rest
    ~ N(0, 0.2^2), tables ~ U(-0.5, 0.5) (ten times the init range, so that rows move the logits)."""
    run = export_lib.rebuild()
    abstract = jax.eval_shape(run.init_state, jax.random.key(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif name == "scale":
            value = 1 + 0.2 * rng.normal(size=leaf.shape)
        else:
            value = 0.2 * rng.normal(size=leaf.shape)
        return value.astype(leaf.dtype)

    state = abstract.replace(
        step=np.int32(0), params=jax.tree_util.tree_map_with_path(draw, abstract.params),
        tables={k: rng.uniform(-0.5, 0.5, t.shape).astype(t.dtype) for k, t in abstract.tables.items()},
        table_slots=jax.tree.map(lambda t: np.zeros(t.shape, t.dtype), abstract.table_slots),
    )  # fmt: skip
    return export_lib.from_state(run, state, 0)


def _take(columns, rows):
    return {k: v[rows] for k, v in columns.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Per case: the export, the reference, and the child process's answers to every request."""
    cases, requests = {}, []

    def ask(path, signature, inputs):
        requests.append((path, signature, inputs))
        return len(requests) - 1

    for name, case in CASES.items():
        root = tmp_path_factory.mktemp(name)
        run_dir, path, restored, results = _train_and_export(name, case, root)
        data_dir = str(root / "data")
        if case["dataset"] == "criteo":
            columns, lines, batch = _criteo_rows(data_dir, any(c.endswith("_bucket") for c in restored.schema.categorical))
        elif case["dataset"] == "avazu":
            columns, lines, batch = _avazu_rows(data_dir)
        else:
            raw_dir = str(root / "taobao_unseen")
            synthetic.taobao.write_synthetic(raw_dir, num_users=50, seed=11)
            columns, lines, batch = _taobao_rows(raw_dir)
        n = len(batch[schema_lib.LABEL])
        q = {"full": ask(path, "serving_default", columns), "ids": ask(path, "row_ids", columns),
             "one": ask(path, "serving_default", _take(columns, slice(0, 1))),
             "seven": ask(path, "serving_default", _take(columns, slice(3, 10)))}  # fmt: skip
        if lines is not None:
            q["lines"] = ask(path, "parse_lines", {"lines": np.array(lines, object)})
        export_lib.parse_run_config(run_dir)  # models read gin when applied (CETNet's scoped towers)
        ref = _reference(restored, batch)
        gin.clear_config()
        cases[name] = dict(run_dir=run_dir, path=path, restored=restored, results=results, columns=columns,
                           batch=batch, n=n, q=q, ref=ref)  # fmt: skip
    # The matrix: the trained TaobaoAds case's raw rows, on data prepared with a vocabulary.
    root = tmp_path_factory.mktemp("matrix")
    prepared_dir = _prepare_taobao(root)
    taobao_case = cases["taobao-cetnet-towers"]
    columns, batch = taobao_case["columns"], taobao_case["batch"]
    for seed, (model, bindings) in enumerate(MATRIX.items()):
        gin.clear_config()
        data = [f'prepared.data_dir = "{prepared_dir}"', f'vocabularies.data_dir = "{prepared_dir}"',
                "train.dataset_fn = @prepared"]  # fmt: skip
        train_cli.parse_config([TINY], data + bindings)
        restored = _random_restored(seed)
        path = export_lib.export("", str(root / model), restored=restored, verbose=False,
                                 platforms=MATRIX_PLATFORMS.get(model, export_lib.DEFAULT_PLATFORMS))  # fmt: skip
        q = {"full": ask(path, "serving_default", columns), "ids": ask(path, "row_ids", columns)}
        ref = _reference(restored, batch)
        gin.clear_config()
        cases[f"matrix-{model}"] = dict(path=path, restored=restored, results={"steps": 0}, columns=columns,
                                        batch=batch, n=taobao_case["n"], q=q, ref=ref)  # fmt: skip
    bad = _bad_requests(cases)
    for label, (case_name, signature, inputs) in bad.items():
        cases[case_name]["q"][label] = ask(cases[case_name]["path"], signature, inputs)
    tmp = tmp_path_factory.mktemp("serve")
    with open(tmp / "requests.pkl", "wb") as f:
        pickle.dump(requests, f)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, SERVE, str(tmp / "requests.pkl"), str(tmp / "answers.pkl")], check=True, env=env)
    with open(tmp / "answers.pkl", "rb") as f:
        answers = pickle.load(f)
    for case in cases.values():
        case["a"] = {label: answers[i] for label, i in case["q"].items()}
    return cases


def _bad_requests(cases):
    criteo_cols = cases["criteo-dcnv2-vocab"]["columns"]
    first = _take(criteo_cols, slice(0, 4))
    taobao_cols = _take(cases["taobao-cetnet-towers"]["columns"], slice(0, 4))
    out = {
        "missing": {k: v for k, v in first.items() if k != "C5"},
        "dtype": {**first, "I3": np.array([1, 2, 3, 4], np.int64)},
        "rank": {**first, "C7": first["C7"][:, None]},
        "lengths": {**first, "C9": first["C9"][:3]},
        "not_a_number": {**first, "I4": np.array(["1", "x7", "", "2"], object)},
    }
    bad = {f"bad_{k}": ("criteo-dcnv2-vocab", "serving_default", v) for k, v in out.items()}
    bad["bad_lines"] = ("criteo-dcnv2-vocab", "parse_lines", {"lines": np.array(["1\t2\t3", "0" + "\t" * 39], object)})
    long = dict(taobao_cols, history_length=np.array([1, TAOBAO_LEN + 1, 0, 2], np.int64))
    bad["bad_history"] = ("taobao-cetnet-towers", "serving_default", long)
    bad["bad_history_dtype"] = ("taobao-cetnet-towers", "serving_default",
                                dict(taobao_cols, history_length=taobao_cols["history_length"].astype(np.int32)))
    bad["bad_history_rank"] = ("taobao-cetnet-towers", "serving_default",
                               dict(taobao_cols, history_length=taobao_cols["history_length"][:, None]))
    bad["bad_seq_len"] = ("taobao-cetnet-towers", "serving_default", dict(taobao_cols, cate_his=taobao_cols["cate_his"][:, 1:]))
    return bad


# -- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_served_probabilities_equal_the_eval_step(served, name):
    case = served[name]
    answer, ref = case["a"]["full"], case["ref"]
    assert isinstance(answer, dict), answer
    p_ref = 1 / (1 + np.exp(-ref["logits"].astype(np.float64)))
    assert answer["probability"].shape == (case["n"],) and answer["probability"].dtype == np.float32
    assert np.max(np.abs(answer["probability"] - p_ref)) <= 1e-5
    np.testing.assert_allclose(answer["logit"], ref["logits"], atol=1e-4)
    if name.startswith("matrix-"):  # random weights: the rows and weights move the logits (the check is not void)
        assert np.std(ref["logits"]) > 0.1, np.std(ref["logits"])
    for label, rows in (("one", slice(0, 1)), ("seven", slice(3, 10))):
        if label not in case["a"]:  # batches 1 and 7: the trained cases
            continue
        assert np.max(np.abs(case["a"][label]["probability"] - p_ref[rows])) <= 1e-5
    if "tower_logits" in ref["outputs"]:  # CETNet: every tower and the fusion weights
        for tower, logits in ref["outputs"]["tower_logits"].items():
            assert np.max(np.abs(answer[f"{tower}_probability"] - 1 / (1 + np.exp(-logits)))) <= 1e-5
        np.testing.assert_allclose(answer["fusion_weights"], ref["outputs"]["weights"], atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_row_ids_equal_the_training_pipeline_bit_for_bit(served, name):
    case = served[name]
    got, ref = case["a"]["ids"], case["ref"]
    assert sorted(k[4:] for k in got if k.startswith("ids/")) == sorted(ref["ids"])
    for key, want in ref["ids"].items():
        assert got[f"ids/{key}"].dtype == want.dtype, key
        np.testing.assert_array_equal(got[f"ids/{key}"], want, err_msg=key)
    for key in export_lib.device_keys(case["restored"].schema):
        np.testing.assert_allclose(got[key], ref["dev"][key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["dataset"] != "taobao"])
def test_parse_lines_equals_serving_default(served, name):
    a = served[name]["a"]
    np.testing.assert_array_equal(a["lines"]["probability"], a["full"]["probability"])


def test_restored_state_is_the_trained_state(served):
    """The reference's restore: its eval of the test split reproduces the trainer's final test logloss."""
    for name in ("avazu-dlrm-hashed-sharded", "criteo-dcnv2-vocab"):
        case = served[name]
        restored, results = case["restored"], case["results"]
        assert results["devices"] == 8
        export_lib.parse_run_config(case["run_dir"])
        dataset = export_lib._train_argument("dataset_fn")()
        test = next(dataset.eval_batches("test", dataset.num_rows("test")))[0]
        ref = _reference(restored, test)  # applying the vocabulary again to prepared ids changes nothing
        gin.clear_config()
        labels = test[schema_lib.LABEL].astype(np.float64)
        assert _logloss(labels, ref["logits"]) == pytest.approx(results["test"]["logloss"], abs=1e-5), name
        if name == "avazu-dlrm-hashed-sharded":  # trained with a moving average: not the last step's parameters
            raw = _checkpoint_params(case["run_dir"])
            export_lib.parse_run_config(case["run_dir"])
            last = _reference(dataclasses.replace(restored, params=raw), test)
            gin.clear_config()
            assert abs(_logloss(labels, last["logits"]) - results["test"]["logloss"]) > 1e-4


def _logloss(labels, logits):
    z = logits.astype(np.float64)
    return np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z))))


def _checkpoint_params(run_dir):
    """The dense parameters of the run's last checkpoint as trained (not what export takes of them)."""
    export_lib.parse_run_config(run_dir)
    _, state, _ = export_lib.restore_state(run_dir)
    gin.clear_config()
    return jax.tree.map(np.asarray, state.params)


def test_bad_input_fails_with_invalid_argument_naming_the_column(served):
    a = served["criteo-dcnv2-vocab"]["a"]
    expect = {"bad_missing": ("TypeError", "C5"), "bad_dtype": ("InvalidArgumentError", "string"),
              "bad_rank": ("InvalidArgumentError", "input C7: expected shape [batch]"), "bad_lengths": ("InvalidArgumentError", "input C9"),
              "bad_not_a_number": ("InvalidArgumentError", "input I4"),
              "bad_lines": ("InvalidArgumentError", "expected 40 fields")}  # fmt: skip
    for label, (kind, text) in expect.items():
        answer = a[label]
        assert isinstance(answer, tuple) and answer[1] == kind and text in answer[2], (label, answer[:2], answer[2][:500])
    a = served["taobao-cetnet-towers"]["a"]
    for label, text in (("bad_history", "input history_length"), ("bad_seq_len", "input cate_his"),
                        ("bad_history_rank", "input history_length: expected shape [batch]")):  # fmt: skip
        assert a[label][1] == "InvalidArgumentError" and text in a[label][2], (label, a[label])


def test_wrong_dtype_fails_with_invalid_argument_giving_the_input_position(served):
    """A wrong dtype is refused by TensorFlow's signature dispatch before any op of the graph runs, so no check
    of ours can name the input; its message gives the input's position among the signature's inputs in name
    order (TensorFlow flattens them by sorted name), which identifies it."""
    for case, label, column in (("criteo-dcnv2-vocab", "bad_dtype", "I3"),
                                ("taobao-cetnet-towers", "bad_history_dtype", "history_length")):  # fmt: skip
        answer = served[case]["a"][label]
        assert isinstance(answer, tuple) and answer[1] == "InvalidArgumentError", (label, answer)
        found = re.search(r"input #(\d+)\(zero-based\) was expected to be a \w+ tensor but is a \w+ tensor", answer[2])
        assert found, answer[2]
        assert sorted(served[case]["columns"])[int(found.group(1))] == column


def test_export_command_reports_a_run_without_checkpoints(tmp_path):
    """The command reports a UserError in one line, exit 2 (one subprocess: both errors take that path)."""
    with pytest.raises(errors.UserError, match="no config.gin"):
        export_lib.parse_run_config(str(tmp_path / "nope"))
    (tmp_path / "config.gin").write_text("")
    args = [f"--run_dir={tmp_path}", f"--export_dir={tmp_path / 'out'}"]
    done = subprocess.run([sys.executable, "-m", "ctr.export", *args], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "no checkpoint" in done.stderr, done.stderr[-800:]
    assert "ctr.export: error:" in done.stderr, done.stderr[-800:]


def _graph(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto.meta_graphs[0].graph_def


def test_the_model_is_serialized_for_the_platforms_asked_for(served):
    """The matrix's CETNet (InterFormer and DHEN towers, every family) was exported for CPU, CUDA and TPU on this
    CPU-only machine; its CPU lowering is what served it above. One XlaCallModule per export (parse_lines calls
    serving_default's function)."""
    for name, case in served.items():
        graph = _graph(case["path"])
        calls = [n for f in graph.library.function for n in f.node_def if n.op == "XlaCallModule"]
        want = MATRIX_PLATFORMS.get(name[len("matrix-"):], ()) if name.startswith("matrix-") else ()
        assert len(calls) == 1, (name, len(calls))
        got = [p.decode() for p in calls[0].attr["platforms"].list.s]
        assert got == [p.upper() for p in want or export_lib.DEFAULT_PLATFORMS], (name, got)


def test_tables_are_variables_and_saved_model_pb_stays_small(served):
    for name, case in served.items():
        path = case["path"]
        graph = _graph(path)
        consts = [n for f in graph.library.function for n in f.node_def if n.op == "Const"] + [
            n for n in graph.node if n.op == "Const"]  # fmt: skip
        largest = max(len(n.attr["value"].tensor.tensor_content) for n in consts)
        table_bytes = sum(t.nbytes for t in case["restored"].tables.values())
        variables = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(path, "variables"))
                        for f in fs)  # fmt: skip
        assert largest < 64 << 10, name  # no table (or vocabulary) was frozen into the graph
        assert variables >= table_bytes, name
        assert os.path.getsize(os.path.join(path, "saved_model.pb")) < 8 << 20, name
        assert os.path.basename(path) == str(case["results"]["steps"])  # TF Serving version = training step
