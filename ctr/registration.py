"""Imports every module that declares gin configurables, so configs can name them before parsing."""
import embeddings  # noqa: F401  (build_collection, families, lookup options, sparse optimizers, towers)
from ctr import checkpointing, export, mesh, optimizers, trainer  # noqa: F401
from ctr import models  # noqa: F401  (every registered model)
from ctr.data import prepared, tfds_input  # noqa: F401
from ctr.data.synthetic import datasets  # noqa: F401  (synthetic_criteo, synthetic_avazu, synthetic_taobao)
