"""Synthetic data for every dataset, in one place: raw files in each dataset's real layout, with learnable signal.

- :mod:`ctr.data.synthetic.criteo`, :mod:`~ctr.data.synthetic.avazu`, :mod:`~ctr.data.synthetic.taobao`:
  ``write_synthetic`` writes raw files that the real readers (and ``ctr.prepare``) read;
- :mod:`ctr.data.synthetic.datasets`: the gin datasets ``synthetic_criteo``, ``synthetic_avazu`` and
  ``synthetic_taobao`` (generated once into a directory, read back, split in memory) behind the quick start,
  the tests and the benchmarks.
"""
from ctr.data.synthetic import avazu, criteo, taobao  # noqa: F401  (synthetic.<dataset>.write_synthetic)
