r"""Model quality on synthetic TaobaoAds: DCNv2, DHEN, InterFormer and CETNet, over click mechanisms and seeds.

The data is :func:`ctr.data.synthetic.datasets.synthetic_taobao`: the four raw TaobaoAds files, generated with clicks that
depend on the user's last 50 behaviours through one of several mechanisms (``--mechanisms``: ``presence`` of
the ad's category/brand, ``cate_share``, ``brand_recency``; see :func:`ctr.data.synthetic.taobao.write_synthetic`) plus
user and per-ad effects (``--ad_prior``: the per-ad effect's std), joined by the real reader and split by day
(the last day is the test split). Each (mechanism, seed) pair draws its own data and trains with its own seed.

Each model is trained by the real trainer (``ctr.trainer.train``) from ``configs/taobao_<model>.gin``, with only
the data, batch size, step budget and evaluation bound on top (``--embeddings=shipped``, the default, keeps the
configs' embeddings, with per-feature tables of ``--table_rows`` hashed rows instead of the prepared
vocabulary's, which synthetic data has not got; ``--embeddings=hashed16`` is the earlier protocol: hashed
16-wide tables of 20,000 rows, each CETNet tower its own). ``--steps=0`` is one pass over the training split.
Reported per mechanism: test AUC, gAUC (per-user AUC weighted by clicks) and logloss per model as mean ± std
over the seeds, beside the test logloss of predicting the training click rate for every impression (the base
rate); for CETNet also each tower's own metrics and its mean fusion weight on the test split; and the test AUC
of the generator's true click logits, the ceiling of any model.

    PYTHONPATH=. python benchmarks/models_taobao.py --mechanisms=cate_share,brand_recency --seeds=0,1,2
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

MODELS = flags.DEFINE_list("models", ["dcnv2", "dhen", "interformer", "cetnet"], "Registered models to compare.")
MECHANISMS = flags.DEFINE_list("mechanisms", ["presence"], "Click mechanisms of the synthetic generator.")
SEEDS = flags.DEFINE_list("seeds", ["0"], "Data and training seeds (one data draw and one run per seed).")
AD_PRIOR = flags.DEFINE_float("ad_prior", 0.3, "Std of the generator's per-ad click effect (1.0: a strong prior).")
STEPS = flags.DEFINE_integer("steps", 0, "Training steps per model (0: one pass over the training split).")
BATCH = flags.DEFINE_integer("batch_size", 4096, "Global batch size.")
USERS = flags.DEFINE_integer("num_users", 20_000, "Synthetic users (about 20 impressions each).")
EMBEDDINGS = flags.DEFINE_enum("embeddings", "shipped", ["shipped", "hashed16"], "Embedding setup (see above).")
TABLE_ROWS = flags.DEFINE_integer("table_rows", 100_000, "Hashed rows per feature with --embeddings=shipped.")
OUT = flags.DEFINE_string("out", None, "Directory for the data and the runs (default: a temporary directory).")
OVERRIDES = flags.DEFINE_multi_string("binding", [], "Extra gin bindings applied to every model.")


def embedding_bindings(model: str) -> list[str]:
    if EMBEDDINGS.value == "shipped":  # the configs size tables from a prepared vocabulary
        return ["PerFeature.vocabularies = None", f"PerFeature.num_buckets = {TABLE_ROWS.value}"]
    towers = ('{"interformer": @interformer/per_feature_tables, "dhen": @dhen/per_feature_tables}')
    return [
        *(["train.embedding_fn = @tower_collections", f"tower_collections.towers = {towers}"]
          if model == "cetnet" else ["train.embedding_fn = @per_feature_tables"]),  # fmt: skip
        "per_feature_tables.dim = 16",
        "per_feature_tables.num_buckets = 20000",
    ]


def train_one(model: str, data: list[str], steps: int, seed: int, run_dir: str) -> dict:
    import gin

    from ctr import train as train_cli
    from ctr import trainer

    gin.clear_config()
    train_cli.parse_config(
        [os.path.join(train_cli.REPO_ROOT, "configs", f"taobao_{model}.gin")],
        [
            *data,
            f"train.batch_size = {BATCH.value}",
            f"train.eval_batch_size = {max(4 * BATCH.value, 16384)}",
            f"train.num_steps = {steps}",
            f"train.seed = {seed}",
            f"train.log_every = {max(1, steps // 10)}",
            'train.final_eval_splits = ("test",)',
            "train.progress = False",
            "Checkpointer.every_steps = 0",
            *embedding_bindings(model),
            *OVERRIDES.value,
        ],
    )
    return trainer.train(run_dir=run_dir)


def main(argv: list[str]) -> None:
    del argv
    import numpy as np

    from ctr import metrics
    from ctr.data.synthetic import datasets as synthetic_datasets

    root = OUT.value or tempfile.mkdtemp(prefix="models_taobao_")
    data_dir = os.path.join(root, "data")
    rows = []
    for mechanism in MECHANISMS.value:
        for seed in map(int, SEEDS.value):
            gen = dict(num_users=USERS.value, seed=seed, mechanism=mechanism, ad_prior=AD_PRIOR.value)
            data_splits = synthetic_datasets.synthetic_taobao(data_dir=data_dir, **gen).splits
            labels, test_labels = data_splits["train"]["label"], data_splits["test"]["label"]
            oracle_path = os.path.join(synthetic_datasets.synthetic_taobao_raw_dir(data_dir, **gen), "oracle.npz")
            oracle = dict(np.load(oracle_path)) if os.path.exists(oracle_path) else None  # older data: none
            oracle_auc = metrics.auc(oracle["label"], oracle["logit"]) if oracle else float("nan")
            # The base rate as a predictor: the training click rate for every test impression, scored on test.
            rate = float(np.mean(labels))
            base_logloss = metrics.logloss(test_labels, np.full(len(test_labels), np.log(rate / (1 - rate))))
            steps = STEPS.value or -(-len(labels) // BATCH.value)
            data = ["train.dataset_fn = @synthetic_taobao", f'synthetic_taobao.data_dir = "{data_dir}"',
                    *(f"synthetic_taobao.{k} = {v!r}" for k, v in gen.items())]  # fmt: skip
            for model in MODELS.value:
                run_dir = os.path.join(root, f"run_{model}_{mechanism}_{seed}_{steps}")
                shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the trainer would resume
                result = train_one(model, data, steps, seed, run_dir)
                row = dict(model=model, mechanism=mechanism, seed=seed, steps=steps, base_logloss=base_logloss,
                           oracle_auc=oracle_auc,
                           **{k: result["test"][k]
                              for k in ("auc", "gauc", "logloss", "mean_prediction", "positive_rate")},
                           **{k: v for k, v in result["test"].items() if k.startswith("tower/")},
                           train_wall_s=result["train_wall_s"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nsynthetic TaobaoAds, {USERS.value} users, ad prior {AD_PRIOR.value}, batch {BATCH.value}, "
          f"embeddings {EMBEDDINGS.value}, seeds {','.join(SEEDS.value)} (mean ± std over seeds)")
    print(f"{'mechanism':<14} {'model':<12} {'test AUC':>15} {'gAUC':>15} {'logloss':>15} {'base':>7} {'train s':>8}")
    for mechanism in MECHANISMS.value:
        oracle = np.array([r["oracle_auc"] for r in rows if r["mechanism"] == mechanism])
        print(f"{mechanism:<14} {'(true logit)':<12} {oracle.mean():.4f} ± {oracle.std():.4f}")
        for model in MODELS.value:
            rs = [r for r in rows if r["mechanism"] == mechanism and r["model"] == model]

            def ms(key: str) -> str:
                v = np.array([r[key] for r in rs])
                return f"{v.mean():.4f} ± {v.std():.4f}"

            print(f"{mechanism:<14} {model:<12} {ms('auc'):>15} {ms('gauc'):>15} {ms('logloss'):>15} "
                  f"{np.mean([r['base_logloss'] for r in rs]):>7.4f} {np.mean([r['train_wall_s'] for r in rs]):>8.1f}")
            for tower in sorted({k.split("/")[1] for r in rs for k in r if k.startswith("tower/")}):
                t = f"tower/{tower}/"  # an ensemble's member: its own metrics and mean fusion weight
                print(f"{'':<14} {'  ' + tower:<12} {ms(t + 'auc'):>15} {ms(t + 'gauc'):>15} {ms(t + 'logloss'):>15} "
                      f"  weight {ms(t + 'weight')}")
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(f"results: {os.path.join(root, 'results.json')}")


if __name__ == "__main__":
    app.run(main)
