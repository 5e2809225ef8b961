"""Embeddings for ctr: feature specs -> a collection of families (per-feature tables / hashing trick, Unified
Embedding, DHE) with sharded lookups and sparse optimizers. See ``embeddings/README.md``.

Importing the package registers every gin configurable of it (``build_collection``, ``per_feature_tables``,
``PerFeature``, ``Unified``, ``DeepHashEmbedding``, ``LookupOptions``, the sparse optimizers, ``tower_collections``).
"""
from embeddings import dhe, per_feature, sparse_optim, specs, towers, unified  # noqa: F401  (gin registration)
from embeddings.collection import EmbeddingCollection
from embeddings.dhe import DeepHashEmbedding
from embeddings.per_feature import PerFeature, per_feature_tables
from embeddings.table_placement import LookupOptions
from embeddings.specs import FeatureSpec, build_collection
from embeddings.unified import Unified

__all__ = [
    "DHE",
    "EmbeddingCollection",
    "FeatureSpec",
    "LookupOptions",
    "PerFeature",
    "Unified",
    "build_collection",
    "per_feature_tables",
]
