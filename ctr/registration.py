"""Imports every module that declares gin configurables, so configs can name them before parsing.

Data, embedding and model modules register here as they are added; the trainer imports the rest.
"""
from ctr import checkpointing, optimizers, sharding, trainer  # noqa: F401
from ctr import models  # noqa: F401  (every registered model)
from ctr.data import dataset  # noqa: F401
from embeddings import per_feature, sparse_optim  # noqa: F401
