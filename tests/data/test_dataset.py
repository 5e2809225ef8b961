"""The synthetic datasets for all three layouts: raw files -> real readers -> splits, behind one interface."""
import numpy as np
import pytest

from ctr.data import schema as schema_lib
from ctr.data.synthetic import datasets as synthetic_datasets


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (synthetic_datasets.synthetic_criteo, {"num_rows": 2000, "int_buckets": True}),
        (synthetic_datasets.synthetic_avazu, {"num_rows": 2000}),
        (synthetic_datasets.synthetic_taobao, {"num_users": 120}),
    ],
)
def test_synthetic_datasets_serve_the_trainer_interface(tmp_path, make, kwargs):
    data = make(data_dir=str(tmp_path), seed=1, **kwargs)
    again = make(data_dir=str(tmp_path), seed=1, **kwargs)  # reuses the generated raw files
    keys = set(data.schema.batch_keys())
    batch = next(data.train_batches(64, 0, seed=0))
    assert set(batch) == keys and len(batch[schema_lib.LABEL]) == 64
    resumed = next(again.train_batches(64, 1, seed=0))
    second = list(zip(range(2), data.train_batches(64, 0, seed=0)))[1][1]
    for key in keys:
        np.testing.assert_array_equal(resumed[key], second[key])
    assert data.num_rows("train") > data.num_rows("test") > 0 and data.num_rows("valid") > 0
    for split in ("valid", "test"):
        batches = list(data.eval_batches(split, 128))
        assert sum(real for _, real in batches) == data.num_rows(split)
    assert 0.02 < np.mean(batch[schema_lib.LABEL]) < 0.7


def test_taobao_batches_carry_sequences_and_groups(tmp_path):
    data = synthetic_datasets.synthetic_taobao(data_dir=str(tmp_path), num_users=120, max_len=8)
    batch = next(data.train_batches(32, 0, seed=0))
    assert batch["btag_his"].shape == (32, 8) and batch["btag_his_mask"].shape == (32, 8)
    assert batch[schema_lib.GROUP].dtype == np.int64
    # Right-aligned: once a row's mask turns on it stays on.
    mask = batch["cate_his_mask"]
    assert (np.diff(mask.astype(int), axis=1) >= 0).all()
