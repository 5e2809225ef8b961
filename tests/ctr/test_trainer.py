"""The trainer end to end on 8 CPU devices: outputs, every registered model, NaN handling."""
import json
import os
import sys

import gin
import jax
import numpy as np
import pytest

from ctr import checkpointing, run_writer, train as train_cli, trainer
from ctr.data import dataset as dataset_lib
from ctr.data.synthetic import datasets as synthetic_datasets

TINY = os.path.join(os.path.dirname(__file__), "tiny.gin")


@pytest.fixture
def tiny(tmp_path):
    """Parses tiny.gin with a data dir under tmp_path; yields a function adding bindings."""
    gin.clear_config()

    def configure(*bindings):
        train_cli.parse_config([TINY], [f'synthetic_criteo.data_dir = "{tmp_path}/data"', *bindings])

    yield configure
    gin.clear_config()


def test_run_writes_results_metrics_plots_and_tensorboard(tiny, tmp_path):
    tiny("train.eval_every = 20")
    run_dir = str(tmp_path / "run")
    results = trainer.train(run_dir=run_dir)
    assert jax.device_count() == 8
    for name in ("results.json", "metrics.jsonl", "config.gin", "operative_config.gin",
                 "plots/train_loss.png", "plots/eval.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    on_disk = json.load(open(os.path.join(run_dir, "results.json")))
    assert on_disk["test"]["auc"] == pytest.approx(results["test"]["auc"])
    assert results["examples_seen"] == 40 * 256
    # 26 features stacked in one 8-wide table, rows aligned to 256 (build_collection.row_alignment).
    assert results["num_params"]["embedding"] == -(-26 * 500 // 256) * 256 * 8
    assert results["test"]["num_examples"] == 600  # the whole split, padding excluded
    assert results["test"]["auc"] > 0.6  # learns the synthetic signal in 40 steps (~0.66)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(5, 41, 5))
    assert any("valid/auc" in r and r["step"] == 20 for r in rows)
    assert "DCNv2.mlp = (32, 16)" in open(os.path.join(run_dir, "operative_config.gin")).read()
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["20", "30", "40"]  # keep=3


def test_run_writer_without_tensorflow_keeps_metrics(tmp_path, monkeypatch, caplog):
    """Accelerator images often lack TF: the run still writes metrics.jsonl, says so, and writes no events."""
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    writer = run_writer.RunWriter(str(tmp_path))
    writer.log(3, {"train/loss": 0.5})
    writer._jsonl.close()
    assert "no TensorBoard events" in caplog.text
    assert [json.loads(line)["train/loss"] for line in open(tmp_path / "metrics.jsonl")] == [0.5]
    assert not (tmp_path / "tensorboard").exists()


def test_cetnet_towers_train_with_their_own_tables(tiny, tmp_path):
    """The ensemble path through the trainer: per-tower collections, dict outputs, the ensemble's own loss.

    (One step of every registered model on its own is tests/models/test_model_contract.py.)"""
    tiny('train.model_name = "cetnet"', "train.num_steps = 2", "train.log_every = 1",
         'train.final_eval_splits = ("test",)',
         "train.embedding_fn = @tower_collections",
         'tower_collections.towers = {"interformer": @interformer/per_feature_tables, '
         '"dhen": @dhen/per_feature_tables}',
         "interformer/per_feature_tables.dim = 4",
         "interformer/InterFormer.num_layers = 1", "interformer/InterFormer.dim = 8",
         "interformer/InterFormer.head = (8,)", "dhen/DHENModel.dim = 8", "dhen/DHENModel.head = (8,)")
    run_dir = str(tmp_path / "cetnet")
    results = trainer.train(run_dir=run_dir)
    assert results["steps"] == 2 and np.isfinite(results["test"]["logloss"])
    rows = -(-26 * 500 // 256) * 256
    assert results["num_params"]["embedding"] == rows * 4 + rows * 8  # each tower its own tables
    # Each tower's own metrics and mean fusion weight (the weights of an example sum to one).
    test = json.load(open(os.path.join(run_dir, "results.json")))["test"]
    assert test["tower/interformer/weight"] + test["tower/dhen/weight"] == pytest.approx(1.0, abs=1e-6)
    assert all(0.0 < test[f"tower/{t}/auc"] < 1.0 and test[f"tower/{t}/logloss"] > 0 for t in ("interformer", "dhen"))


class _PoisonedDataset(dataset_lib.InMemoryDataset):
    """Dense features become NaN from step ``poison_step`` on."""

    poison_step = 12

    def train_batches(self, global_batch, start_step, seed, process_index=0, process_count=1):
        for step, batch in enumerate(super().train_batches(global_batch, start_step, seed, process_index,
                                                           process_count), start=start_step):
            if step >= self.poison_step:
                batch = dict(batch, dense=np.full_like(batch["dense"], np.nan))
            yield batch


@pytest.mark.parametrize(
    "every_steps, kept",
    [(5, r"The last good checkpoint is kept: \S*/nan/checkpoints/10\."), (0, "No checkpoint was written yet")],
)
def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tiny, tmp_path, every_steps, kept):
    tiny(f"Checkpointer.every_steps = {every_steps}")
    clean = synthetic_datasets.synthetic_criteo()
    poisoned = _PoisonedDataset(clean.schema, clean.splits)
    run_dir = str(tmp_path / "nan")
    with pytest.raises(trainer.TrainingDiverged, match=r"between steps 11 and 15; stopping\. " + kept):
        trainer.train(run_dir=run_dir, dataset_fn=lambda: poisoned)
    ckpt = checkpointing.Checkpointer(os.path.join(run_dir, "checkpoints"))
    assert ckpt.latest_step() == (10 if every_steps else None)  # the named checkpoint exists (and no other)
    assert not os.path.exists(os.path.join(run_dir, "results.json"))


def test_metrics_of_a_resumed_run_drop_what_it_writes_again(tmp_path):
    lines = [{"step": 5, "train/loss": 0.7}, {"step": 10, "train/loss": 0.6}, {"step": 10, "valid/auc": 0.6},
             {"step": 15, "train/loss": 0.5}, {"step": 20, "train/loss": 0.4},
             {"step": 20, "test/auc": 0.7}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"

    def resume_at(step):
        path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 25, "train/lo')  # torn last line
        run_writer.RunWriter(str(tmp_path), step, num_steps=20)._jsonl.close()
        return [json.loads(line) for line in open(path)]

    assert resume_at(10) == lines[:3]  # the checkpoint at 10 came after its log and evaluation
    assert resume_at(20) == lines[:5]  # resumed at the end: only the final evaluation runs again
    assert resume_at(0) == []
