"""The name -> constructor table behind `models.backbones.build_backbone`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(*names: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"backbone {name!r} registered twice")
            _REGISTRY[name] = factory
        return factory

    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(
    name: str, embedding_size: int = 512, image_size: tuple[int, int] = (112, 112), **kwargs: object
) -> nn.Module:
    """Build a registered backbone. Unknown names raise KeyError listing the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    return _REGISTRY[name](embedding_size=int(embedding_size), image_size=tuple(image_size), **kwargs)
