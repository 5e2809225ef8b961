"""The TFDS features of ctr's builders, documented: one feature per batch key (the sequences' masks as one shared
``history_mask``), with each dataset's homepage and citation (:mod:`ctr.data.tfds_builders` uses them)."""
from __future__ import annotations

import numpy as np

from ctr import tf_import

tf_import.tensorflow()  # TF without its CUDA-probe noise, before TFDS imports it
import tensorflow_datasets as tfds  # noqa: E402

from ctr.data import avazu, taobao  # noqa: E402
from ctr.data import schema as schema_lib  # noqa: E402

HISTORY_LENGTH = "history_length"
HISTORY_MASK = "history_mask"

CITATIONS = {
    "criteo": """@misc{criteo_dac_2014,
  title = {Display Advertising Challenge},
  author = {{Criteo Labs}},
  year = {2014},
  howpublished = {\\url{https://www.kaggle.com/c/criteo-display-ad-challenge}}
}""",
    "avazu": """@misc{avazu_ctr_2014,
  title = {Click-Through Rate Prediction},
  author = {{Avazu}},
  year = {2014},
  howpublished = {\\url{https://www.kaggle.com/c/avazu-ctr-prediction}}
}""",
    "taobao": """@misc{tianchi_56_2018,
  title = {Ad Display/Click Data on Taobao.com},
  author = {{Alibaba Group}},
  year = {2018},
  howpublished = {\\url{https://tianchi.aliyun.com/dataset/56}}
}
@inproceedings{zhou2018din,
  title = {Deep Interest Network for Click-Through Rate Prediction},
  author = {Zhou, Guorui and Zhu, Xiaoqiang and Song, Chenru and Fan, Ying and Zhu, Han and Ma, Xiao and
            Yan, Yanghui and Jin, Junqi and Li, Han and Gai, Kun},
  booktitle = {KDD},
  year = {2018}
}""",
}
HOMEPAGES = {
    "criteo": "https://www.kaggle.com/c/criteo-display-ad-challenge",
    "avazu": "https://www.kaggle.com/c/avazu-ctr-prediction",
    "taobao": "https://tianchi.aliyun.com/dataset/56",
}


def _id_doc(schema: schema_lib.FeatureSchema, name: str, vocab: bool) -> str:
    """What a categorical feature's int64 holds."""
    if schema.name == "criteo" and name.endswith("_bucket"):
        what = (f"BARS bucket of integer column {name[:-7]}: floor(ln(x)^2) for x > 2, else x (missing: the empty "
                "string)")  # fmt: skip
    elif schema.name == "criteo":
        what = f"hashed categorical column {name} (8 hex digits; missing: the empty string)"
    elif schema.name == "avazu" and name in avazu.TIME_FEATURES:
        what = {"hour": "hour of day 0-23", "weekday": "weekday, Monday = 0", "weekend": "1 on Saturday and Sunday"}
        what = f"{what[name]}, from the raw `hour` field YYMMDDHH"
    elif schema.name == "taobao" and name in taobao.AD_FEATURES:
        what = f"the ad's {name} (ad_feature.csv; NULL brand: the empty string)"
    elif schema.name == "taobao" and name in taobao.PROFILE_FEATURES:
        what = f"the user's {name} (user_profile.csv; no profile or empty: the empty string)"
    else:
        what = f"raw field {name}"
    if vocab:
        return f"Vocabulary index of {what}; values seen fewer than min_count times in train are the OOV id."
    return f"Fingerprint (63-bit FarmHash Fingerprint64 of field and value, ctr.data.fingerprint) of {what}."


def features_for(schema: schema_lib.FeatureSchema, vocab: bool) -> tfds.features.FeaturesDict:
    """The TFDS features of a prepared example of ``schema`` (``vocab``: ids are vocabulary indices)."""
    features: dict[str, tfds.features.FeatureConnector] = {
        schema_lib.LABEL: tfds.features.ClassLabel(names=["no_click", "click"], doc="1 = the ad was clicked."),
    }
    if schema.dense:
        doc = {"criteo": "log(1 + max(x, 0)) of the integer columns (missing: 0)",
               "taobao": "log(1 + price) of the ad"}[schema.name]  # fmt: skip
        features[schema_lib.DENSE] = tfds.features.Tensor(
            shape=(len(schema.dense),), dtype=np.float32, doc=f"{doc}, columns {', '.join(schema.dense)}."
        )
    for name in schema.categorical:
        features[name] = tfds.features.Scalar(dtype=np.int64, doc=_id_doc(schema, name, vocab))
    for seq in schema.sequences:
        shares = f" (ids of `{seq.item_feature}`, sharing its embedding)" if seq.item_feature else ""
        what = "ids" if vocab else "fingerprints"
        features[seq.name] = tfds.features.Tensor(
            shape=(seq.max_len,), dtype=np.int64,
            doc=f"{seq.name.split('_')[0]} {what} of the user's last {seq.max_len} behaviours strictly before the "
                f"impression{shares}, oldest first, right-aligned; padding (id 0) on the left.",
        )  # fmt: skip
    if schema.sequences:
        max_len = schema.sequences[0].max_len
        features[HISTORY_LENGTH] = tfds.features.Scalar(
            dtype=np.int32, doc=f"Real behaviours in every sequence (0..{max_len}): the right-most ones."
        )
        features[HISTORY_MASK] = tfds.features.Tensor(
            shape=(max_len,), dtype=np.bool_,
            doc="True at the real behaviours of every sequence (the batch's `<sequence>_mask`).",
        )  # fmt: skip
    if schema.group_key is not None:
        features[schema_lib.GROUP] = tfds.features.Scalar(
            dtype=np.int64, doc=f"gAUC group: the {schema.group_key} (raw id)."
        )
    return tfds.features.FeaturesDict(features)


