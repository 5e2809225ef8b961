"""Every dataset x model config: its model bindings parse and build a model of the dataset's layout."""
import pathlib
import re

import gin
import jax
import pytest

from ctr.models import registry
from models_testlib import make_inputs

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
MODELS = ("dcnv2", "dlrm", "dhen", "interformer", "cetnet")
PATHS = sorted(p for p in CONFIGS.glob("*_*.gin") if p.stem.split("_", 1)[1] in MODELS)
LAYOUTS = {  # what each dataset's embedded inputs look like: (dense features, behaviour sequences)
    "criteo": dict(dense=True, sequences=False),
    "avazu": dict(dense=False, sequences=False),
    "taobao": dict(dense=True, sequences=True),
}


def test_every_dataset_model_pair_has_a_config():
    assert {p.stem for p in PATHS} == {f"{d}_{m}" for d in LAYOUTS for m in MODELS}


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_config_builds_its_model(path):
    dataset, model_name = path.stem.split("_", 1)
    text = path.read_text()
    assert re.search(rf"^train\.model_name = '{model_name}'$", text, re.M)
    # Trainer, data and embedding bindings belong to other packages (tests/ctr/test_train_cli.py parses every
    # config strictly, includes and all); here, the model bindings must build the model.
    bindings = "\n".join(line for line in text.splitlines() if not line.startswith("include"))
    gin.clear_config()
    try:
        gin.parse_config(bindings, skip_unknown=True)
        model = registry.get(model_name)()
        inputs = make_inputs(feature_dims=(16,) * 4, seq_dims={"cate_his": 16, "brand_his": 16, "btag_his": 16},
                             **LAYOUTS[dataset])  # fmt: skip
        shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    finally:
        gin.clear_config()
    assert jax.tree.leaves(shapes)
