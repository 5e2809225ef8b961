"""Sequence capacity: with the shipped configs' widths, InterFormer and CETNet learn a click that only the
behaviour sequence explains (``capacity_testlib``), and a model that does not read the sequences cannot."""
import numpy as np

from capacity_testlib import TaskModel, auc, config_model, train_and_eval

STEPS = 100


def test_interformer_learns_a_sequence_only_click():
    with config_model("taobao_interformer") as (network, dim):
        result = train_and_eval(TaskModel(network, dim), STEPS)
    print(f"InterFormer test AUC {result['auc']:.4f}")
    assert result["auc"] > 0.95, result["auc"]


def test_cetnet_and_its_interformer_tower_learn_a_sequence_only_click():
    with config_model("taobao_cetnet") as (network, dim):
        towers = tuple(name for name, _ in network.towers)
        result = train_and_eval(TaskModel(network, dim, towers=towers), STEPS)
    outputs, labels = result["outputs"], result["labels"]
    tower_aucs = {name: auc(labels, np.asarray(outputs["tower_logits"][name])) for name in towers}
    weights = np.asarray(outputs["weights"]).mean(axis=0)
    print(f"CETNet test AUC {result['auc']:.4f}, towers {tower_aucs}, mean fusion weights {weights.round(3)}")
    assert result["auc"] > 0.95, result["auc"]
    assert tower_aucs["interformer"] > 0.95


def test_without_sequences_the_click_cannot_be_learnt():
    # The same InterFormer, shown no histories: the task's other features carry nothing, so it must stay at
    # chance (3 standard errors of an AUC on 4,000 examples are about 0.03).
    with config_model("taobao_interformer") as (network, dim):
        result = train_and_eval(TaskModel(network, dim, sequences=False), STEPS)
    print(f"InterFormer without sequences: test AUC {result['auc']:.4f}")
    assert abs(result["auc"] - 0.5) < 0.03, result["auc"]
