"""Feature specs: which family embeds each feature and how wide, resolved from gin into a collection.

A config names the families once and assigns features to them; everything unnamed takes the defaults::

    build_collection.families = {"unified": @Unified(), "dhe": @DeepHashEmbedding()}
    build_collection.default_family = "unified"
    build_collection.family_of = {"C3": "dhe", "C12": "dhe"}
    build_collection.default_dim = 16
    build_collection.dims = {"C3": 32}

A sequence feature tied to an item feature (TaobaoAds ``cate_his`` -> ``cate_id``) shares that feature's spec,
so it reads the same rows (or the same DHE network and hash functions); it cannot be assigned on its own. A
sequence without an item feature gets a spec of its own under its own name.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import gin

from ctr.data import schema as schema_lib
from embeddings.collection import EmbeddingCollection, Family
from embeddings.table_placement import LookupOptions


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """One embedding and the batch keys it embeds.

    Attributes:
      name: the categorical feature (or, for a sequence with no item feature, the sequence); it also names the
        hash salts, so sequences sharing the spec hash exactly like the feature.
      family: key of the family serving it.
      dim: embedding width.
      inputs: batch keys embedded with it: the feature itself (if categorical), then the sequences sharing it.
    """

    name: str
    family: str
    dim: int
    inputs: tuple[str, ...]


def resolve_specs(
    schema: schema_lib.FeatureSchema,
    family_names: tuple[str, ...],
    default_family: str | None = None,
    family_of: Mapping[str, str] | None = None,
    default_dim: int = 16,
    dims: Mapping[str, int] | None = None,
) -> tuple[FeatureSpec, ...]:
    """The specs of ``schema``, in schema order (categorical features, then standalone sequences)."""
    family_of, dims = dict(family_of or {}), dict(dims or {})
    if default_family is None:
        if len(family_names) != 1:
            raise ValueError(f"several families {family_names}: name the default_family")
        default_family = family_names[0]
    shared = {s.name: s.item_feature for s in schema.sequences if s.item_feature is not None}
    own_names = list(schema.categorical) + [s.name for s in schema.sequences if s.item_feature is None]
    for what, mapping in (("family_of", family_of), ("dims", dims)):
        bad = [n for n in mapping if n in shared]
        if bad:
            raise ValueError(f"{what} names sequences that share their item feature's embedding: {bad}")
        unknown = sorted(set(mapping) - set(own_names))
        if unknown:
            raise ValueError(f"{what} names features not in the {schema.name} schema: {unknown}")
    for family in {default_family, *family_of.values()}:
        if family not in family_names:
            raise ValueError(f"unknown embedding family {family!r}; configured: {family_names}")
    specs = []
    for name in own_names:
        inputs = (name,) + tuple(seq for seq, item in shared.items() if item == name)
        specs.append(FeatureSpec(name, family_of.get(name, default_family), dims.get(name, default_dim), inputs))
    return tuple(specs)


@gin.configurable
def build_collection(
    schema: schema_lib.FeatureSchema,
    families: Mapping[str, Family] = gin.REQUIRED,
    default_family: str | None = None,
    family_of: Mapping[str, str] | None = None,
    default_dim: int = 16,
    dims: Mapping[str, int] | None = None,
    row_alignment: int = 256,
    lookup: LookupOptions | None = None,
) -> EmbeddingCollection:
    """The embedding collection of ``schema`` (the trainer's ``embedding_fn``).

    Args:
      schema: dataset schema.
      families: family key -> family config (``@PerFeature()``, ``@Unified()``, ``@DeepHashEmbedding()``).
      default_family: family of features not in ``family_of`` (may be omitted with one family).
      family_of: feature -> family key.
      default_dim: width of features not in ``dims``.
      dims: feature -> width.
      row_alignment: every table's row count is a multiple of this, so tables split evenly over any device
        count dividing it (256 covers 1..256 devices in powers of two) and keep one shape on every mesh.
      lookup: how rows are read and updated on a mesh (default: ``LookupOptions()`` as configured in gin).
    """
    names = tuple(families)
    specs = resolve_specs(schema, names, default_family, family_of, default_dim, dims)
    parts = tuple(
        families[key].build(key, [s for s in specs if s.family == key], row_alignment)
        for key in names
        if any(s.family == key for s in specs)
    )
    return EmbeddingCollection(schema=schema, specs=specs, parts=parts, lookup=lookup or LookupOptions())
