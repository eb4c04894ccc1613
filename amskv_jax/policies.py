"""Cache policies: each decides which earlier scales a layer's queries read, and so the cache layout.

A policy is a frozen, hashable dataclass with one method, `reads(layer, si, depth, patch_nums)`, returning the
earlier scales that scale si's queries read from the cache at that layer. `layout(config)` turns it into the static
`CacheLayout` (per-layer capacities, write segments, read masks) that the model and kernels consume.
"""
from __future__ import annotations

import abc
import dataclasses

from amskv_jax.cache import CacheLayout, build_layout
from amskv_jax.config import VARConfig


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """Base class: subclasses override `reads` (and `validate` for their settings)."""

    @abc.abstractmethod
    def reads(self, layer: int, si: int, depth: int, patch_nums: tuple[int, ...]) -> tuple[int, ...]:
        """The earlier scales (each < si) whose K/V scale si's queries read at `layer`."""

    def validate(self, depth: int, patch_nums: tuple[int, ...]) -> None:
        """Raise ValueError for settings that do not fit a model of this depth and ladder."""

    def layout(self, config: VARConfig) -> CacheLayout:
        self.validate(config.depth, config.patch_nums)
        return build_layout(
            lambda layer, si: self.reads(layer, si, config.depth, config.patch_nums),
            config.depth,
            config.patch_nums,
            policy=repr(self),
        )


@dataclasses.dataclass(frozen=True)
class FullCache(Policy):
    """Every earlier scale stays: the reference's behaviour."""

    def reads(self, layer, si, depth, patch_nums):
        return tuple(range(si))
