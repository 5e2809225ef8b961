"""The built-in synthetic datasets (gin: ``@synthetic_criteo``, ``@synthetic_avazu``, ``@synthetic_taobao``).

Each writes raw files in its dataset's real layout once (the generators of :mod:`ctr.data.synthetic`), reads
them back with the real reader and splits them as that dataset is split, in memory.
"""
from __future__ import annotations

import logging
import os
import shutil

import gin
import numpy as np

from ctr.data import avazu, criteo, raw, row_accounting, taobao
from ctr.data import rows as rows_lib
from ctr.data import splits as splits_lib
from ctr.data.dataset import InMemoryDataset, split_random
from ctr.data.splits import TEST, VALID
from ctr.data.synthetic import avazu as synthetic_avazu_lib
from ctr.data.synthetic import criteo as synthetic_criteo_lib
from ctr.data.synthetic import taobao as synthetic_taobao_lib


@gin.configurable
def synthetic_criteo(
    data_dir: str = gin.REQUIRED,
    num_rows: int = 400_000,
    seed: int = 0,
    int_buckets: bool = False,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> InMemoryDataset:
    """The built-in synthetic dataset in the raw Criteo layout (see :func:`ctr.data.synthetic.criteo.write_synthetic`).

    The raw file is generated once into ``data_dir`` (reused when present), parsed by the real Criteo parser
    and split at random 8:1:1.

    Args:
      data_dir: directory for the generated file (relative paths are taken from the run directory).
      num_rows: rows to generate.
      seed: generator and split seed.
      int_buckets: also use the integer columns as bucketised categorical features.
      split_fractions: train/valid/test fractions.
    """
    path = _generated(
        data_dir, f"criteo_synthetic_{num_rows}_{seed}.txt",
        lambda p: synthetic_criteo_lib.write_synthetic(p, num_rows, seed),
    )
    rows = criteo.read([path], row_accounting.RowAccounting(), int_buckets=int_buckets)
    return _split_at_random(criteo.feature_schema(int_buckets=int_buckets), rows, split_fractions, seed)


@gin.configurable
def synthetic_avazu(
    data_dir: str = gin.REQUIRED,
    num_rows: int = 400_000,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> InMemoryDataset:
    """Synthetic data in the raw Avazu layout (:func:`ctr.data.synthetic.avazu.write_synthetic`), generated once into
    ``data_dir``, parsed by the real Avazu parser and split at random 8:1:1."""
    path = _generated(
        data_dir, f"avazu_synthetic_{num_rows}_{seed}.csv",
        lambda p: synthetic_avazu_lib.write_synthetic(p, num_rows, seed),
    )
    rows = avazu.read([path], row_accounting.RowAccounting())
    return _split_at_random(avazu.feature_schema(), rows, split_fractions, seed)


def _split_at_random(schema, row_blocks, split_fractions, seed) -> InMemoryDataset:
    rows = rows_lib.Rows.concat(list(row_blocks))
    batch = rows_lib.to_batch(schema, rows.arrays())
    return InMemoryDataset(schema=schema, splits=split_random(batch, split_fractions, seed))


@gin.configurable
def synthetic_taobao(
    data_dir: str = gin.REQUIRED,
    num_users: int = 5_000,
    impressions_per_user: float = 20.0,
    seed: int = 0,
    max_len: int = taobao.MAX_LEN,
    mechanism: str = "presence",
    ad_prior: float = 0.3,
) -> InMemoryDataset:
    """Synthetic data in the four raw TaobaoAds files (:func:`ctr.data.synthetic.taobao.write_synthetic`: clicks depend
    on the behaviour sequences through ``mechanism``, plus user effects and per-ad effects of std ``ad_prior``),
    generated once into ``data_dir``, joined by the real reader and split by day as TaobaoAds is: 2017-05-13 is
    test, and valid is the test day (the BARS protocol)."""
    raw_dir = _generated(
        data_dir, _taobao_name(num_users, seed, mechanism, ad_prior),
        lambda p: synthetic_taobao_lib.write_synthetic(
            p, num_users, impressions_per_user, seed, mechanism=mechanism, ad_prior=ad_prior
        ),
    )  # fmt: skip
    source = taobao.open_raw(
        raw_dir,
        processing=taobao.Processing(max_len=max_len),
        options=raw.ReadOptions(accounting=row_accounting.RowAccounting()),
    )
    rows = rows_lib.Rows.concat(list(source.rows))
    spec = splits_lib.SplitSpec("time", valid="test")
    split = splits_lib.assign(spec, rows.day, np.arange(len(rows)), seed, taobao.TEST_DAY)
    parts = {
        name: rows_lib.to_batch(source.schema, rows.take(split == i).arrays())
        for i, name in enumerate(splits_lib.NAMES)
    }
    parts[VALID] = parts[TEST]
    return InMemoryDataset(schema=source.schema, splits=parts)


def synthetic_taobao_raw_dir(data_dir: str, num_users: int, seed: int, mechanism: str, ad_prior: float) -> str:
    """Where :func:`synthetic_taobao` writes its raw files (and the generator's ``oracle.npz``)."""
    return os.path.join(data_dir, _taobao_name(num_users, seed, mechanism, ad_prior))


def _taobao_name(num_users: int, seed: int, mechanism: str, ad_prior: float) -> str:
    # The default mechanism keeps the directory name of the data generated before mechanisms existed.
    variant = "" if (mechanism, ad_prior) == ("presence", 0.3) else f"_{mechanism}_prior{ad_prior:g}"
    return f"taobao_synthetic_{num_users}_{seed}{variant}"


def _generated(data_dir: str, name: str, write) -> str:
    """``data_dir/name``, written by ``write(path)`` unless present (atomically, so a crash leaves nothing)."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        logging.info("generating %s", path)
        tmp = f"{path}.partial{os.getpid()}"  # hosts sharing a filesystem may generate at once
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        write(tmp)
        os.replace(tmp, path)
    return path
