"""Synthetic data in the raw Avazu layout (``train.csv`` with header), with learnable structure."""
from __future__ import annotations

import gzip

import numpy as np

from ctr.data.avazu import COLUMNS, RAW_CATEGORICAL


def write_synthetic(path: str, num_rows: int, seed: int = 0, days: int = 10, start_date: str = "141021") -> None:
    """Writes ``num_rows`` raw Avazu lines (with header) to ``path`` whose clicks a CTR model can learn.

    Rows are spread evenly over ``days`` days from ``start_date`` (YYMMDD) in time order, as in the real file.
    The click logit sums a per-value effect of every categorical column (Zipf-like value frequencies,
    vocabularies from 2 to ~20k values), a cross between ``site_id`` and ``device_model`` that only feature
    interactions capture, and an hour-of-day and weekend effect. ``.gz`` paths are written gzip-compressed.
    """
    rng = np.random.default_rng(seed)
    n_cat = len(RAW_CATEGORICAL)
    vocab = np.exp(rng.uniform(np.log(2), np.log(20_000), n_cat)).astype(np.int64)
    zipf = rng.uniform(1.5, 4.0, n_cat)
    effects = [rng.normal(0.0, s, v) for s, v in zip(rng.uniform(0.1, 0.5, n_cat), vocab)]
    cross_a, cross_b = RAW_CATEGORICAL.index("site_id"), RAW_CATEGORICAL.index("device_model")
    factors = {f: rng.normal(0.0, 0.6, (vocab[f], 3)) for f in (cross_a, cross_b)}
    hour_effect = 0.4 * np.sin(np.arange(24) / 24 * 2 * np.pi)
    hex_fields = {"site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_id",
                  "device_ip", "device_model"}  # fmt: skip
    salt = rng.integers(1, 2**31, n_cat)
    row_rng = np.random.default_rng([seed, 1])
    idx = np.empty((num_rows, n_cat), np.int64)
    for f in range(n_cat):
        idx[:, f] = np.minimum((vocab[f] * row_rng.random(num_rows) ** zipf[f]).astype(np.int64), vocab[f] - 1)
    position = np.arange(num_rows) * days * 24 // max(num_rows, 1)  # hours since the start, in time order
    start = np.datetime64(f"20{start_date[:2]}-{start_date[2:4]}-{start_date[4:]}")
    dates = start + (position // 24).astype("timedelta64[D]")
    weekday = (dates.astype(np.int64) + 3) % 7
    logit = -1.6 + hour_effect[position % 24] + 0.3 * (weekday >= 5)
    for f in range(n_cat):
        logit += effects[f][idx[:, f]]
    logit += np.sum(factors[cross_a][idx[:, cross_a]] * factors[cross_b][idx[:, cross_b]], axis=1)
    click = (row_rng.random(num_rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    month_start = dates.astype("datetime64[M]")
    yymmddhh = (
        (month_start.astype("datetime64[Y]").astype(np.int64) + 70) % 100 * 1_000_000
        + (month_start.astype(np.int64) % 12 + 1) * 10_000
        + ((dates - month_start).astype(np.int64) + 1) * 100
        + position % 24
    )
    columns = [
        row_rng.integers(0, 2**63, num_rows, dtype=np.uint64).astype(str).tolist(),
        click.astype(str).tolist(),
        [f"{h:08d}" for h in yymmddhh.tolist()],
    ]
    for f, name in enumerate(RAW_CATEGORICAL):
        if name in hex_fields:
            columns.append([f"{h:08x}" for h in ((idx[:, f] * 2654435761 + salt[f]) & 0xFFFFFFFF).tolist()])
        else:
            columns.append((idx[:, f] + (1000 if name.startswith("C") else 0)).astype(str).tolist())
    lines = [",".join(row) for row in zip(*columns)]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="ascii") as out:
        out.write(",".join(COLUMNS) + "\n")
        out.write("\n".join(lines) + "\n")
