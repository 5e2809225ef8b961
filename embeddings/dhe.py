"""Deep Hash Embedding (Kang et al. 2021, "Learning to Embed Categorical Features without Embedding Tables for
Recommendation"): an id's embedding is computed by an MLP from a dense hash encoding; there is no table.

Encoding (deterministic, no parameters, no storage): ``k`` strongly universal hash functions
(:func:`embeddings.hashing.dhe_hash`, salted per feature) map the 63-bit id to ``k`` values in ``[0, 2**16)``,
which are turned into real numbers:

- ``"uniform"``: ``2 * (v + 0.5) / 2**16 - 1``, uniform in ``(-1, 1)``;
- ``"gaussian"``: Box-Muller on consecutive pairs of those uniforms, standard normal (``k`` even).

The paper hashes into ``m = 10**6`` buckets; 16 output bits keep every hash exact in uint32 arithmetic (JAX
runs without 64-bit integers, so the host hands the fingerprint over as two uint32 words and the device splits
them into 16-bit limbs). Two distinct ids share an encoding only if all ``k`` coordinates collide, which at
``k = 1024`` has probability ``2**-16384``: the encoding is a unique identifier, for ids never seen in
training too.

Decoder: ``Dense -> [LayerNorm] -> activation [-> minus its mean over units]`` per hidden layer (``centred``), then a
linear ``Dense`` to the feature's width (Flax default init: LeCun-normal kernels, zero biases). The paper uses
batch normalisation and Mish; the collection's ``combine`` has no train/eval switch or mutable statistics, so
normalisation here is ``"layer"`` or ``"none"``. Each feature gets its own network (as in the paper) unless
``shared=True``, where features of equal width share one network and are told apart by their hash salts (feature
multiplexing, as in Unified Embedding).

Cost: the encoding is ``[..., k]`` per id (``k = 1024``, batch 4096, 26 features: 436 MB float32), produced by
one fused elementwise op and consumed by the first matmul; ``dtype="bfloat16"`` halves it. Its compute,
``~2 x network parameters`` FLOPs per id, is what DHE trades for table memory.

Deduplication (``distinct_fraction``): an id's embedding depends on the id alone, so a feature read by behaviour
sequences (50 events per example, few distinct categories) needs the network once per *distinct* id of a batch,
not once per occurrence. With ``distinct_fraction`` set, every feature with a sequence among its inputs encodes
and runs its network on ``ceil(distinct_fraction x its ids in the batch)`` slots for its distinct ids (found on
the device by one sort, :func:`kernels.dedupe.unique_words`; at least ``min_slots``, and a feature with fewer
ids runs per occurrence) and gathers the outputs back: the same values (the network is row-wise) for that
share of the FLOPs. Shapes are static, so the fraction bounds every batch:
``host_ids`` raises, naming the feature, when a batch has more distinct ids (each host checks ``distinct x
processes <= slots``, which suffices); should a batch get past it some other way, the outputs are NaN, never
silently wrong. A fraction, not a count, because in a larger batch (evaluation's) histories overlap more.
Features without sequences (mostly distinct per batch: user, ad) run per occurrence.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from embeddings import hashing
from embeddings.specs import FeatureSpec
from embeddings.tables import Lookup, TableConfig
from kernels import dedupe

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "mish": jax.nn.mish,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "swish": jax.nn.swish,
    "tanh": jnp.tanh,
}
NORMALIZATIONS = ("layer", "none")
TRANSFORMS = ("uniform", "gaussian")
_HASH_LEVELS = 2.0**16
_EXACT_FLOAT_INT = 2**24  # the distinct-id indices travel as float32 "rows" (autodiff needs floats): exact below


def encode(words: jax.Array, salt: int, k: int, transform: str, dtype: str = "float32") -> jax.Array:
    """The dense hash encoding ``[..., k]`` of ids given as ``uint32 [..., 2]`` words."""
    a, b = hashing.dhe_coefficients(salt, k)
    values = hashing.dhe_hash(words, jnp.asarray(a), jnp.asarray(b), xp=jnp)
    u = (values.astype(jnp.float32) + 0.5) / _HASH_LEVELS  # uniform in (0, 1), never 0: log is safe
    if transform == "uniform":
        return (2.0 * u - 1.0).astype(dtype)
    radius = jnp.sqrt(-2.0 * jnp.log(u[..., 0::2]))
    angle = 2.0 * jnp.pi * u[..., 1::2]
    normal = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=-1)
    return normal.reshape(*u.shape).astype(dtype)


class DHENetwork(nn.Module):
    """The decoder MLP: ``[..., k] -> [..., out_dim]``."""

    hidden: tuple[int, ...]
    out_dim: int
    activation: str = "mish"
    normalization: str = "layer"
    dtype: str = "float32"
    centred: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x)
            if self.normalization == "layer":
                x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
            x = act(x)
            if self.centred:
                x = x - x.mean(axis=-1, keepdims=True)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)


def network_parameters(k: int, hidden: Sequence[int], out_dim: int, normalization: str) -> int:
    """Parameters of one :class:`DHENetwork` (weights, biases, LayerNorm scales and offsets)."""
    widths = [k, *hidden, out_dim]
    dense = sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))
    return dense + (2 * sum(hidden) if normalization == "layer" else 0)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DeepHashEmbedding:
    """The DHE family.

    Attributes:
      k: hash functions per id (width of the encoding); even for ``"gaussian"``.
      transform: ``"uniform"`` or ``"gaussian"``.
      hidden: hidden-layer widths of each network (with ``budget_bytes``, only their count is used).
      activation: one of :data:`ACTIVATIONS`.
      normalization: ``"layer"`` or ``"none"``.
      shared: one network per width shared by the family's features, instead of one per feature.
      budget_bytes: if set, all hidden layers get one common width, the largest whose float32 network
        parameters (all networks) fit this budget.
      dtype: dtype of the encoding and the network's computation (parameters stay float32).
      centred: subtract each hidden layer's mean over its units after the activation. Mish and ReLU outputs
        share a positive mean, which the next layer turns into per-unit offsets and the output layer into one
        vector common to every id's embedding (with ``shared``, to every feature's); dot-product interactions
        (DHEN, DLRM) then read mostly that constant.
      distinct_fraction: run the networks of features read by sequences once per distinct id of the batch,
        with room for this fraction of their ids being distinct (see the module docstring); None: once per
        occurrence.
      min_slots: fewest distinct-id slots: a small batch (the init probe's one example, a serving request) may
        be all distinct, and deduplicating it would save little.
    """

    k: int = 1024
    transform: str = "uniform"
    hidden: tuple[int, ...] = (512, 256)
    activation: str = "mish"
    normalization: str = "layer"
    shared: bool = False
    budget_bytes: int | None = None
    dtype: str = "float32"
    centred: bool = False
    distinct_fraction: float | None = None
    min_slots: int = 4096

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(self.hidden))  # gin may give a list; keep the config hashable
        if self.transform not in TRANSFORMS:
            raise ValueError(f"DeepHashEmbedding.transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.transform == "gaussian" and self.k % 2:
            raise ValueError(f"the gaussian DHE transform pairs hashes: k must be even, got {self.k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"DeepHashEmbedding.activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"DeepHashEmbedding.normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}")
        if self.distinct_fraction is not None and not 0 < self.distinct_fraction < 1:
            raise ValueError(f"DeepHashEmbedding.distinct_fraction must be in (0, 1), got {self.distinct_fraction}")

    def build(self, key: str, specs: Sequence[FeatureSpec], row_alignment: int) -> DHEPart:
        del row_alignment  # no tables
        networks = {_network_name(key, s, self.shared): s.dim for s in specs}
        hidden = self.hidden
        if self.budget_bytes is not None:
            hidden = (self._width_for_budget(networks.values()),) * len(self.hidden)
        return DHEPart(family=key, config=self, hidden=hidden, specs=tuple(specs))

    def _width_for_budget(self, out_dims: Sequence[int]) -> int:
        """The largest common hidden width whose networks fit ``budget_bytes`` (binary search: params grow with
        the width)."""

        def params(width: int) -> int:
            return sum(network_parameters(self.k, (width,) * len(self.hidden), d, self.normalization) for d in out_dims)

        budget = self.budget_bytes // 4
        if params(1) > budget:
            raise ValueError(f"DHE budget {self.budget_bytes} B cannot hold even width-1 networks")
        lo, hi = 1, budget + 1
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid)
        return lo


def _network_name(family: str, spec: FeatureSpec, shared: bool) -> str:
    return f"{family}_d{spec.dim}" if shared else f"{family}_{spec.name}"


def _distinct_key(spec: FeatureSpec) -> str:
    """The rows key of a deduplicated feature's distinct encodings (no batch key has a ``#``)."""
    return f"{spec.name}#distinct"


@dataclasses.dataclass(frozen=True)
class DHEPart:
    """The features one DHE family serves.

    Attributes:
      family: the family's key in the collection config.
      config: the family config.
      hidden: resolved hidden widths of every network.
      specs: the features served.
    """

    family: str
    config: DeepHashEmbedding
    hidden: tuple[int, ...]
    specs: tuple[FeatureSpec, ...]
    tables: tuple[TableConfig, ...] = ()
    lookups: tuple[Lookup, ...] = ()

    def host_ids(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``uint32 [..., 2]`` fingerprint words per input (see :func:`embeddings.hashing.words_np`).

        Raises:
          ValueError: a deduplicated feature has more distinct ids in ``batch`` than ``distinct_fraction`` allows.
        """
        processes = jax.process_count()
        for spec in self.specs:
            # The device sees the global batch (this host's rows are 1 / processes of it): its slot count.
            shapes = [(processes * np.shape(batch[source])[0], *np.shape(batch[source])[1:]) for source in spec.inputs]
            size = self._dedupe_size(shapes)
            if size is None:
                continue
            distinct = len(np.unique(np.concatenate([np.ravel(batch[source]) for source in spec.inputs])))
            if distinct * processes > size:
                raise ValueError(
                    f"DHE feature {spec.name}: {distinct:,} distinct ids in this host's batch (x {processes} "
                    f"processes) exceed the {size:,} slots of DeepHashEmbedding.distinct_fraction = "
                    f"{self.config.distinct_fraction}: raise it"
                )
        return {source: hashing.words_np(batch[source]) for spec in self.specs for source in spec.inputs}

    def host_ids_tf(self, batch: Mapping, index_tables: Mapping) -> dict:
        """TensorFlow twin of :meth:`host_ids` (no vocabulary tables: ``index_tables`` is unused; no distinct-id
        check: an over-full batch gives NaN outputs, see the module docstring)."""
        del index_tables
        return {source: hashing.words_tf(batch[source]) for spec in self.specs for source in spec.inputs}

    def _dedupe_size(self, shapes: Sequence[tuple[int, ...]]) -> int | None:
        """Distinct-id slots of a feature whose inputs have ``shapes`` (ids, ``[B]`` or ``[B, L]``); None: per
        occurrence (also for a symbolic batch size, as in the batch-polymorphic serving export)."""
        f = self.config.distinct_fraction
        num_ids = sum(math.prod(s) for s in shapes)
        if f is None or all(len(s) < 2 for s in shapes) or not isinstance(num_ids, int):
            return None
        size = max(math.ceil(f * num_ids), self.config.min_slots)
        if size >= num_ids:
            return None
        if size >= _EXACT_FLOAT_INT:
            raise ValueError(f"DHE: {size:,} distinct-id slots in one batch is past the float32 index range: "
                             f"lower DeepHashEmbedding.distinct_fraction or the batch size")
        return size

    def encode(self, ids: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """This family's "rows" (no parameters, outside autodiff): per input, the hash encodings ``[..., k]``;
        for a deduplicated feature instead its distinct ids' encodings ``[slots, k]`` (under
        :func:`_distinct_key`) and per input the index of each id among them, as float32 ``[...]``."""
        c = self.config
        out = {}
        for spec in self.specs:
            salt = hashing.salt(spec.name)
            size = self._dedupe_size([ids[source].shape[:-1] for source in spec.inputs])
            if size is None:
                out.update({source: encode(ids[source], salt, c.k, c.transform, c.dtype) for source in spec.inputs})
                continue
            words = jnp.concatenate([ids[source].reshape(-1, 2) for source in spec.inputs])
            unique, inverse, count = dedupe.unique_words(words, size)
            encoded = encode(unique, salt, c.k, c.transform, c.dtype)
            out[_distinct_key(spec)] = jnp.where(count <= size, encoded, jnp.nan)  # over-full: NaN, not wrong
            start = 0
            for source in spec.inputs:
                shape = ids[source].shape[:-1]
                out[source] = inverse[start : start + math.prod(shape)].reshape(shape).astype(jnp.float32)
                start += math.prod(shape)
        return out

    def embed(self, rows: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Runs the networks on the encodings (inside the caller's Flax ``@nn.compact`` scope)."""
        c = self.config
        networks: dict[str, DHENetwork] = {}
        out = {}
        for spec in self.specs:
            name = _network_name(self.family, spec, c.shared)
            if name not in networks:
                networks[name] = DHENetwork(self.hidden, spec.dim, c.activation, c.normalization, c.dtype, c.centred,
                                            name=name)
            if _distinct_key(spec) in rows:
                distinct = networks[name](rows[_distinct_key(spec)])  # [slots, dim]
                for source in spec.inputs:
                    out[source] = jnp.take(distinct, jax.lax.stop_gradient(rows[source]).astype(jnp.int32), axis=0)
                continue
            for source in spec.inputs:
                out[source] = networks[name](rows[source])
        return out

    def num_parameters(self) -> int:
        dims = {_network_name(self.family, s, self.config.shared): s.dim for s in self.specs}
        return sum(network_parameters(self.config.k, self.hidden, d, self.config.normalization) for d in dims.values())
