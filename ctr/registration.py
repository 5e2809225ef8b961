"""Imports every module that declares gin configurables, so configs can name them before parsing."""
import embeddings  # noqa: F401  (build_collection, families, lookup options, sparse optimizers, towers)
from ctr import checkpointing, export, optimizers, sharding, trainer  # noqa: F401
from ctr import models  # noqa: F401  (every registered model)
from ctr.data import dataset, prepared  # noqa: F401
