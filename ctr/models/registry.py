"""Models by name. Each model module registers its Flax module class with :func:`register`.

A registered class keeps the :class:`ctr.model_io.Network` contract: ``__call__(inputs, *, train)``, ``loss`` and
``logits`` (plain-logit models inherit the last two from :class:`ctr.model_io.BinaryLogits`).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        missing = [m for m in ("loss", "logits") if not callable(getattr(cls, m, None))]
        if missing:
            raise TypeError(f"model {name!r} ({cls.__name__}) lacks {missing} of ctr.model_io.Network "
                            "(inherit ctr.model_io.BinaryLogits when the output is the [B] logits)")
        _MODELS[name] = cls
        return cls

    return wrap


def get(name: str) -> type[nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name]


def names() -> list[str]:
    return sorted(_MODELS)
