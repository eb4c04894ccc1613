"""Arrays read on demand, and an orbax writer that holds one of them in memory at a time.

A d30 checkpoint is 8 GB of float32; converting it by reading every tensor, mapping, casting and then saving held two
to three copies of it. A `LazyArray` is a shape, a dtype and a function that produces the values: conversion builds a
tree of them over the memory-mapped input file, where reading, transposing (and, for stacked parameters, stacking)
and casting all happen in `LazyArray.materialise`, and `save_arrays` writes such a tree into an orbax checkpoint one
array at a time. Peak memory is then the input file's pages that the kernel keeps mapped plus the largest array (and
its source view while it is cast).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """An array of `shape` and `dtype` whose values come from `source()` when materialised.

    `source()` returns values of `shape` in any dtype and memory layout, possibly a read-only view into a memory-mapped
    file; `materialise` casts them to `dtype` in one C-ordered copy. `map` and `astype` compose without reading.
    `np.asarray(lazy)` materialises, so code written for numpy arrays reads a LazyArray too.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    source: Callable[[], np.ndarray]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @classmethod
    def of(cls, array) -> LazyArray:
        """An array already in memory (numpy, or anything `np.asarray` converts)."""
        array = np.asarray(array)
        return cls(array.shape, array.dtype, lambda: array)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def materialise(self) -> np.ndarray:
        """The values as a new C-ordered array of `dtype` (one copy, the cast included)."""
        values = self.source()
        if values.shape != self.shape:
            raise ValueError(f"lazy array source gave shape {values.shape}, expected {self.shape}")
        return np.array(values, dtype=self.dtype, order="C")

    def __array__(self, dtype=None, copy=None):
        values = self.materialise()
        return values if dtype is None else values.astype(dtype, copy=False)

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> LazyArray:
        """`fn` applied to the source values when materialised (`fn` must give `shape`; it keeps views views)."""
        return LazyArray(shape, self.dtype, lambda: fn(self.source()))

    def astype(self, dtype) -> LazyArray:
        """The same values, cast to `dtype` when materialised."""
        return LazyArray(self.shape, dtype, self.source)


class _SequentialHandler(ocp.type_handlers.NumpyHandler):
    """Writes LazyArrays exactly as orbax writes numpy arrays (same files and metadata, type "np.ndarray", so
    `StandardCheckpointer.restore` reads them back as numpy arrays), materialising one array at a time: orbax's own
    numpy handler deep-copies every array and then writes them all concurrently."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)

        async def write_one_by_one():
            for value, info, arg in zip(values, infos, args):
                await self._background_serialize([value.materialise()], [info], [arg])

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_one_by_one(), name="lazy_arrays")]


def save_arrays(directory: str | Path, tree) -> None:
    """Write `tree` (leaves: LazyArray, numpy or jax arrays) as an orbax checkpoint at `directory`, which
    `ocp.StandardCheckpointer().restore` reads back as numpy arrays; at most one array is materialised at a time."""
    lazy = jax.tree.map(lambda x: x if isinstance(x, LazyArray) else LazyArray.of(x), tree)
    # jax.Array's handler is never used (every leaf is a LazyArray); without one orbax warns on every save
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyArray, _SequentialHandler()), (jax.Array, ocp.type_handlers.ArrayHandler())
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(lazy))
