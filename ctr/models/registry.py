"""Models by name. Each model module registers its Flax module class with :func:`register`."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

_MODELS: dict[str, type[nn.Module]] = {}


def register(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = cls
        return cls

    return wrap


def get(name: str) -> type[nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_MODELS)}")
    return _MODELS[name]


def names() -> list[str]:
    return sorted(_MODELS)
