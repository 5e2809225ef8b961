"""Embedding-lookup kernels for ctr.

Public entry points live in their modules (this package re-exports nothing, so `kernels.lookup` stays the
module):

- `kernels.lookup.lookup`: row gather and pooled (sum/mean) gather with a custom gradient, dispatching to the
  Pallas TPU kernel, the Pallas GPU (Triton) kernel or the XLA gather.
- `kernels.lookup.lookup_row_grads`: the same gradient in sparse form, for sparse embedding optimizers.
- `kernels.dedupe.dedupe_row_grads`: distinct rows with their summed gradients (used by both of the above's
  consumers: `lookup_row_grads` and the sparse table updates in `embeddings/`).
- `kernels.lookup_reference.lookup_reference`: the plain-jnp definition every backend is tested against.
"""
