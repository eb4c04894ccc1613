"""Arrays read on demand, and an orbax writer that holds one of them in memory at a time.

A d30 checkpoint is 8 GB of float32; converting it by reading every tensor, mapping, casting and then saving held two
to three copies of it. A `LazyArray` is a shape, a dtype and a function that produces the values: conversion builds a
tree of them over the memory-mapped input file, where reading, transposing, stacking per-block parameters along
depth and casting all happen in `LazyArray.materialise`, into one new array, and `save_arrays` writes such a tree into
an orbax checkpoint one array at a time and, within an array, one chunk of at most `CHUNK_BYTES` at a time. Peak
memory is then the input file's pages that the kernel keeps mapped plus the largest array and a few chunks.

Why chunks: tensorstore compresses and writes every chunk of an array concurrently, and orbax makes an array up to
2 GB one chunk, so writing an array whole held its compressed copy as well (a second array's worth), and the freed
buffers stayed in the allocator's per-thread arenas, one array's worth per arena (bench/RESULTS.md §7a).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts


# Largest chunk `save_arrays` stores (bytes): tensorstore's buffers while writing an array stay near a few chunks.
CHUNK_BYTES = 8 * 2**20


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """An array of `shape` and `dtype` whose values come from `source()` when materialised.

    `source()` returns values of `shape` in any dtype and memory layout, possibly a read-only view into a memory-mapped
    file; `materialise` casts them to `dtype` in one C-ordered copy. `map`, `astype` and `stack` compose without
    reading. `np.asarray(lazy)` materialises, so code written for numpy arrays reads a LazyArray too.
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

    @staticmethod
    def stack(parts: Sequence[LazyArray]) -> LazyArray:
        """`np.stack(parts)` [len(parts), *shape], in the parts' dtype: materialised into one new array, each part
        read and cast straight into its row (no stacked copy in the source dtype first)."""
        parts = tuple(parts)
        shape = (len(parts), *parts[0].shape)
        return _Stack(shape, parts[0].dtype, lambda: np.stack([p.source() for p in parts]), parts)

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
        """The values as a new C-ordered array of `dtype` (one allocation, the cast included)."""
        out = np.empty(self.shape, self.dtype)
        self.read_into(out)
        return out

    def read_into(self, out: np.ndarray) -> None:
        """Write the values into `out` (of `shape`, any dtype and layout; cast on the way, no temporary copy)."""
        values = self.source()
        if values.shape != self.shape:
            raise ValueError(f"lazy array source gave shape {values.shape}, expected {self.shape}")
        out[...] = values

    def __array__(self, dtype=None, copy=None):
        values = self.materialise()
        return values if dtype is None else values.astype(dtype, copy=False)

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]) -> LazyArray:
        """`fn` applied to the source values when materialised (`fn` must give `shape`; it keeps views views)."""
        return LazyArray(shape, self.dtype, lambda: fn(self.source()))

    def astype(self, dtype) -> LazyArray:
        """The same values, cast to `dtype` when materialised."""
        return dataclasses.replace(self, dtype=dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class _Stack(LazyArray):
    """`LazyArray.stack`: `parts` read row by row into the materialised array."""

    parts: tuple[LazyArray, ...] = ()

    def read_into(self, out: np.ndarray) -> None:
        for part, row in zip(self.parts, out):
            part.read_into(row)


class _SequentialHandler(ocp.type_handlers.NumpyHandler):
    """Writes LazyArrays exactly as orbax writes numpy arrays (same metadata, type "np.ndarray", so
    `StandardCheckpointer.restore` reads them back as numpy arrays), materialising one array at a time and writing
    it one chunk of at most CHUNK_BYTES at a time: orbax's own numpy handler deep-copies every array and then writes
    them all, and all their chunks, concurrently."""

    async def serialize(self, values, infos, args=None):
        args = [dataclasses.replace(arg, chunk_byte_size=CHUNK_BYTES) for arg in args or [ocp.SaveArgs()] * len(values)]

        async def write_one_by_one():
            for value, info, arg in zip(values, infos, args):
                await self._background_serialize([value.materialise()], [info], [arg])

        return [ocp.future.CommitFutureAwaitingContractedSignals(write_one_by_one(), name="lazy_arrays")]

    async def _open_and_write(self, value: np.ndarray, tspec, ts_context) -> None:
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        chunk = [max(c, 1) for c in store.chunk_layout.write_chunk.shape or value.shape]  # None: a 0-d array
        for start in itertools.product(*(range(0, n, c) for n, c in zip(value.shape, chunk))):
            box = tuple(slice(s, s + c) for s, c in zip(start, chunk))
            await store[box].write(value[box])


COMMIT_MARKER, COMMIT_TEXT = "commit_success.txt", "Checkpoint commit was successful."


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
    # orbax's marker names the directory it wrote to (often a temporary one): keep this machine's paths out of it
    marker = Path(directory) / COMMIT_MARKER
    if marker.is_file():
        marker.write_text(COMMIT_TEXT)
