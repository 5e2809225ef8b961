"""Synthetic data in the four raw TaobaoAds files, with a click signal that lives in the behaviour sequences."""
from __future__ import annotations

import gzip
import os

import numpy as np

from ctr.data import rows as rows_lib
from ctr.data.taobao import (AD_COLUMNS, BEHAVIOR_COLUMNS, BEHAVIOR_DTYPE, BTAGS, MAX_LEN, PROFILE_FEATURES,
                             SAMPLE_COLUMNS, USER_COLUMNS, UTC8, histories)


_FIRST_BEHAVIOR_DAY = np.datetime64("2017-04-22")
_FIRST_SAMPLE_DAY = np.datetime64("2017-05-06")


MECHANISMS = ("presence", "cate_share", "brand_recency")


def write_synthetic(
    raw_dir: str,
    num_users: int = 2_000,
    impressions_per_user: float = 20.0,
    seed: int = 0,
    gzip_files: bool = False,
    mechanism: str = "presence",
    ad_prior: float = 0.3,
) -> None:
    """Writes the four raw TaobaoAds files into ``raw_dir``, with learnable clicks.

    Users each favour a few categories and behave mostly in them (22 days of behaviours up to 2017-05-13);
    impressions (8 days, 2017-05-06..13, the last being the test day) show ads of a favourite category 40% of
    the time. The click logit is a per-user effect (std 0.3) plus a per-ad effect (std ``ad_prior``) plus the
    sequence signal of ``mechanism``, computed from the user's last 50 behaviours strictly before the
    impression (a model without sequences only sees the user and ad effects):

    - ``presence``: the ad's category (+1.6), and also its brand (+1.0), appear among them;
    - ``cate_share``: +5 times the share of them in the ad's category (a count, not a yes/no: what mean-pooled
      histories see best);
    - ``brand_recency``: the ad's brand among the last 5 behaviours (+2.2), with a weaker +0.5 for its category
      among the 50 (order matters: pooling over 50 blurs it).

    Each mechanism's intercept puts the click rate near 10%. 10% of users have no profile, ``pvalue_level`` is
    often empty, 10% of brands are NULL, and the profile header's last name carries the trailing space of the
    real file.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"write_synthetic: unknown mechanism {mechanism!r}; known: {MECHANISMS}")
    rng = np.random.default_rng(seed)
    os.makedirs(raw_dir, exist_ok=True)
    num_cates, num_brands = 300, 1_000
    num_ads = max(50, num_users // 2)
    user_ids = rng.choice(np.arange(1, 20 * num_users + 1), num_users, replace=False)
    ad_ids = rng.choice(np.arange(1, 20 * num_ads + 1), num_ads, replace=False)
    ad_cate = np.minimum((num_cates * rng.random(num_ads) ** 2).astype(np.int64), num_cates - 1) + 1
    brand_of_cate = rng.integers(1, num_brands + 1, (num_cates + 1, 4))
    ad_brand = brand_of_cate[ad_cate, rng.integers(0, 4, num_ads)]
    ad_brand_null = rng.random(num_ads) < 0.1
    favourites = rng.choice(ad_cate, (num_users, 3))  # categories that have ads
    user_effect = rng.normal(0, 0.3, num_users)
    ad_effect = rng.normal(0, ad_prior, num_ads)

    # Behaviours: mostly in favourite categories, uniformly over 22 days (unix seconds, UTC+8 days).
    per_user = rng.poisson(60, num_users)
    b_user = np.repeat(np.arange(num_users), per_user)
    n_b = len(b_user)
    b_cate = np.where(rng.random(n_b) < 0.75, favourites[b_user, rng.integers(0, 3, n_b)],
                      rng.integers(1, num_cates + 1, n_b))  # fmt: skip
    b_brand = brand_of_cate[b_cate, rng.integers(0, 4, n_b)]
    b_brand_null = rng.random(n_b) < 0.1
    b_btag = rng.choice(len(BTAGS), n_b, p=[0.85, 0.07, 0.05, 0.03])
    b_ts = _unix(_FIRST_BEHAVIOR_DAY) + rng.integers(0, 22 * 86_400, n_b)

    # Impressions over the last 8 days.
    per_user_imp = rng.poisson(impressions_per_user, num_users)
    i_user = np.repeat(np.arange(num_users), per_user_imp)
    n_i = len(i_user)
    i_ts = _unix(_FIRST_SAMPLE_DAY) + rng.integers(0, 8 * 86_400, n_i)
    ads_by_cate = {c: np.flatnonzero(ad_cate == c) for c in np.unique(ad_cate)}
    i_ad = rng.integers(0, num_ads, n_i)
    liked = rng.random(n_i) < 0.4
    for i in np.flatnonzero(liked):
        i_ad[i] = rng.choice(ads_by_cate[favourites[i_user[i], rng.integers(0, 3)]])

    # The signal: the ad's cate / brand among the last 50 behaviours strictly before the impression.
    order = np.lexsort((b_ts, b_user))
    sorted_b = np.zeros(n_b, BEHAVIOR_DTYPE)
    sorted_b["user"], sorted_b["ts"] = b_user[order], b_ts[order]
    index, length = histories(sorted_b, i_user, i_ts, MAX_LEN)
    real = rows_lib.sequence_mask(length, MAX_LEN)  # most recent last
    cate_match = (b_cate[order][index] == ad_cate[i_ad][:, None]) & real
    brand_match = ((b_brand[order][index] == ad_brand[i_ad][:, None]) & ~b_brand_null[order][index] & real
                   & ~ad_brand_null[i_ad][:, None])  # fmt: skip
    if mechanism == "presence":
        signal = -2.6 + 1.6 * cate_match.any(axis=1) + 1.0 * brand_match.any(axis=1)
    elif mechanism == "cate_share":
        signal = -2.9 + 5.0 * cate_match.sum(axis=1) / np.maximum(length, 1)
    else:
        signal = -2.7 + 2.2 * brand_match[:, -5:].any(axis=1) + 0.5 * cate_match.any(axis=1)
    logit = signal + user_effect[i_user] + ad_effect[i_ad]
    clk = (rng.random(n_i) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    _write_oracle(raw_dir, logit, clk, i_ts >= _unix(_FIRST_SAMPLE_DAY + 7))

    def brand_text(brand: np.ndarray, null: np.ndarray) -> list[str]:
        return ["NULL" if n else str(b) for b, n in zip(brand.tolist(), null.tolist())]

    sample = zip(user_ids[i_user].tolist(), i_ts.tolist(), ad_ids[i_ad].tolist(),
                 [f"430548_100{p}" for p in rng.integers(7, 9, n_i).tolist()], (1 - clk).tolist(), clk.tolist())
    _write_csv(raw_dir, "raw_sample", SAMPLE_COLUMNS, sample, gzip_files)
    price = np.round(np.exp(rng.normal(4, 1, num_ads)), 2)
    ads = zip(ad_ids.tolist(), ad_cate.tolist(), rng.integers(1, 10 * num_ads, num_ads).tolist(),
              rng.integers(1, 5 * num_ads, num_ads).tolist(), brand_text(ad_brand, ad_brand_null), price.tolist())
    _write_csv(raw_dir, "ad_feature", AD_COLUMNS, ads, gzip_files)
    with_profile = np.flatnonzero(rng.random(num_users) >= 0.1)
    profile = rng.integers(0, 4, (len(with_profile), len(PROFILE_FEATURES)))
    known = (rng.random(len(with_profile)) < 0.5).tolist()
    pvalue = [str(v) if keep else "" for v, keep in zip(profile[:, 4].tolist(), known)]
    users = [(u, *p[:4], pv, *p[5:]) for u, p, pv in zip(user_ids[with_profile].tolist(), profile.tolist(), pvalue)]
    _write_csv(raw_dir, "user_profile", USER_COLUMNS[:-1] + (USER_COLUMNS[-1] + " ",), users, gzip_files)
    shuffled = rng.permutation(n_b)  # the real log is not sorted
    behaviors = zip(user_ids[b_user[shuffled]].tolist(), b_ts[shuffled].tolist(),
                    [BTAGS[t] for t in b_btag[shuffled].tolist()], b_cate[shuffled].tolist(),
                    brand_text(b_brand[shuffled], b_brand_null[shuffled]))  # fmt: skip
    _write_csv(raw_dir, "behavior_log", BEHAVIOR_COLUMNS, behaviors, gzip_files)


def _write_oracle(raw_dir: str, logit: np.ndarray, clk: np.ndarray, test: np.ndarray) -> None:
    """``oracle.npz``: the test day's labels and true click logits (their AUC is the ceiling of any model; not a
    TaobaoAds file, the reader ignores it)."""
    np.savez(os.path.join(raw_dir, "oracle.npz"), label=clk[test], logit=logit[test])


def _unix(day: np.datetime64) -> int:
    """Unix seconds of 00:00 China time (UTC+8) on ``day``."""
    return int(day.astype("datetime64[s]").astype(np.int64)) - UTC8


def _write_csv(raw_dir: str, name: str, header: tuple[str, ...], rows, gzip_file: bool) -> None:
    path = os.path.join(raw_dir, name + ".csv" + (".gz" if gzip_file else ""))
    opener = gzip.open if gzip_file else open
    with opener(path, "wt", encoding="ascii") as out:
        out.write(",".join(header) + "\n")
        out.write("".join(",".join(map(str, row)) + "\n" for row in rows))
