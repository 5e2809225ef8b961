"""Split protocols: which rows are train, valid and test.

- ``random`` (Criteo, Avazu default): each row independently, by a hash of (seed, row ordinal), with the given
  fractions (8:1:1). A row's split depends only on its ordinal, so it can be decided while streaming.
- ``time`` (TaobaoAds default, the time-ordered option for the others): rows of the test day (default: the last
  day) are held out; rows after it too. ``valid`` is either a random half of the test day (``"half"``, as
  DLRM does with the last Criteo day), the test day itself (``"test"``: BARS TaobaoAd_x1 has no separate
  validation set), or another day (e.g. ``"20170512"``), which then leaves train.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ctr import errors

TRAIN, VALID, TEST = "train", "valid", "test"
NAMES = (TRAIN, VALID, TEST)
_U64 = np.uint64


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """How to split.

    Attributes:
      kind: ``random`` or ``time``.
      fractions: train/valid/test fractions of ``random``.
      test_day: ``time``: the first held-out day key (YYYYMMDD, or day index); None = the last day seen.
      valid: ``time``: ``half``, ``test`` or a day key (as a string).
    """

    kind: str = "random"
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    test_day: int | None = None
    valid: str = "half"

    def __post_init__(self):
        if self.kind not in ("random", "time"):
            raise ValueError(f"unknown split kind {self.kind!r} (random or time)")
        if self.kind == "random" and (abs(sum(self.fractions) - 1.0) > 1e-6 or min(self.fractions) < 0):
            raise ValueError(f"split fractions {self.fractions} must be >= 0 and sum to 1")
        if self.kind == "time" and self.valid not in ("half", "test") and not self.valid.isdigit():
            raise ValueError(f"valid must be 'half', 'test' or a day, got {self.valid!r}")
        if self.kind == "time" and self.valid.isdigit() and self.test_day is not None:
            _check_valid_day(int(self.valid), self.test_day)

    @property
    def valid_is_test(self) -> bool:
        """The valid split is the test split (stored once)."""
        return self.kind == "time" and self.valid == "test"


def uniform(ordinal: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A uniform [0, 1) float64 per row from (seed, stream, ordinal): SplitMix64, no state."""
    x = np.asarray(ordinal, np.int64).astype(_U64) + _U64((seed * 0x9E3779B1 + stream * 0x85EBCA77) & (2**64 - 1))
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    x ^= x >> _U64(31)
    return (x >> _U64(11)).astype(np.float64) / float(2**53)


def assign(spec: SplitSpec, day: np.ndarray, ordinal: np.ndarray, seed: int, last_day: int) -> np.ndarray:
    """Split index (into :data:`NAMES`) of each row.

    Args:
      spec: the protocol.
      day: ``[n]`` day keys.
      ordinal: ``[n]`` row ordinals (position in the input).
      seed: split seed.
      last_day: the largest day key of the whole input (the default test day).

    Returns:
      ``[n]`` int8: 0 train, 1 valid, 2 test. With ``valid == "test"`` no row gets 1 (valid reads test).
    """
    if spec.kind == "random":
        u = uniform(ordinal, seed, stream=1)
        return (u >= spec.fractions[0]).astype(np.int8) + (u >= spec.fractions[0] + spec.fractions[1])
    test_day = last_day if spec.test_day is None else spec.test_day
    split = np.where(day >= test_day, 2, 0).astype(np.int8)
    if spec.valid == "half":
        split[(split == 2) & (uniform(ordinal, seed, stream=2) < 0.5)] = 1
    elif spec.valid != "test":
        valid_day = int(spec.valid)
        _check_valid_day(valid_day, test_day)
        split[day == valid_day] = 1
    return split


def _check_valid_day(valid_day: int, test_day: int) -> None:
    if valid_day >= test_day:
        raise errors.ConfigError(f"--valid={valid_day}: the valid day is not before the test day {test_day}")
