"""Lazy arrays and the streaming orbax writer: nothing is read before it is written, the checkpoint reads back as the
same arrays, at most one array is in memory at a time (conversion included: one stack), a stack is read into one
allocation, and arrays are stored in chunks of at most CHUNK_BYTES."""
from __future__ import annotations

import gc
import tracemalloc
import weakref
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from amskv_jax import lazy
from amskv_jax.checkpoint import load_checkpoint, save_checkpoint
from amskv_jax.lazy import LazyArray, save_arrays
from convert.from_torch import open_checkpoints
from convert.mapping import lazy_params

TINY = Path(__file__).parent / "fixtures" / "tiny"


def _unreadable(shape) -> LazyArray:
    def source():
        raise AssertionError("read before it was needed")

    return LazyArray(shape, np.float32, source)


def test_mapping_reads_nothing():
    sd = {"head.weight": _unreadable((5, 3)), "head.bias": _unreadable((5,))}
    target = {"head": {"kernel": np.zeros((3, 5)), "bias": np.zeros(5)}}
    params = lazy_params(sd, target)
    assert params["head"]["kernel"].shape == (3, 5) and params["head"]["bias"].shape == (5,)
    with pytest.raises(AssertionError, match="read before"):
        params["head"]["kernel"].materialise()


def test_materialise_applies_the_layout_and_the_cast_in_one_copy():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    lazy = LazyArray.of(values).map(lambda x: x.T, (3, 2)).astype(ml_dtypes.bfloat16)
    out = lazy.materialise()
    assert out.dtype == ml_dtypes.bfloat16 and out.flags.c_contiguous and out.flags.owndata
    np.testing.assert_array_equal(out.astype(np.float32), values.T)
    np.testing.assert_array_equal(np.asarray(lazy).astype(np.float32), values.T)


def test_save_arrays_round_trips_and_holds_one_array_at_a_time(tmp_path):
    n, size = 8, 2**20  # eight 4 MiB arrays
    tree = {"var": {f"w{i}": LazyArray((size,), np.float32, lambda i=i: np.full(size, i, np.float32))
                    for i in range(n)},
            "plain": np.arange(4, dtype=np.int32)}
    tracemalloc.start()
    save_arrays(tmp_path / "params", tree)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3 * 4 * size  # one array and its source; materialising them all first would be 8
    with ocp.StandardCheckpointer() as checkpointer:
        back = checkpointer.restore(tmp_path / "params")
    np.testing.assert_array_equal(back["plain"], np.arange(4, dtype=np.int32))
    for i in range(n):
        assert back["var"][f"w{i}"].dtype == np.float32
        np.testing.assert_array_equal(back["var"][f"w{i}"], np.full(size, i, np.float32))


def test_a_stack_is_read_into_one_allocation_in_the_target_dtype():
    parts = [LazyArray.of(np.full((256, 512), i, np.float32)).map(lambda x: x.T, (512, 256)) for i in range(4)]
    stack = LazyArray.stack(parts).astype(ml_dtypes.bfloat16)
    assert stack.shape == (4, 512, 256) and stack.dtype == ml_dtypes.bfloat16
    tracemalloc.start()
    out = stack.materialise()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.1 * out.nbytes  # np.stack in float32, then a cast copy, would be 3x
    np.testing.assert_array_equal(out.astype(np.float32), np.stack([np.full((512, 256), i) for i in range(4)]))
    np.testing.assert_array_equal(np.asarray(stack.map(lambda x: x[::-1], stack.shape)).astype(np.float32),
                                  out[::-1].astype(np.float32))


def test_save_arrays_stores_chunks_of_at_most_chunk_bytes_and_writes_every_one(tmp_path, monkeypatch):
    monkeypatch.setattr(lazy, "CHUNK_BYTES", 64 * 2**10)
    values = np.arange(3 * 1000 * 100, dtype=np.float32).reshape(3, 1000, 100)  # 1.2 MB: about 20 chunks
    save_arrays(tmp_path / "params", {"w": LazyArray.of(values), "scalar": np.float32(3)})
    with ocp.StandardCheckpointer() as checkpointer:
        chunk = checkpointer.metadata(tmp_path / "params").item_metadata["w"].storage.chunk_shape
        back = checkpointer.restore(tmp_path / "params")
    assert 4 * np.prod(chunk) <= 64 * 2**10 and tuple(chunk) != values.shape
    np.testing.assert_array_equal(back["w"], values)
    assert back["scalar"] == 3


def test_conversion_never_holds_two_materialised_arrays(tmp_path, monkeypatch):
    """Writing the params and then the manifest's checksums: when an array is materialised, none before it is still
    alive (so at most one per-block stack, the largest arrays, is in memory at a time)."""
    live: list[weakref.ref] = []
    most = []
    materialise = LazyArray.materialise

    def counting(self):
        out = materialise(self)
        live[:] = [ref for ref in live if ref() is not None] + [weakref.ref(out)]
        if len(live) > 1:  # an array that only a reference cycle still holds is garbage, not held: collect it
            gc.collect()
            live[:] = [ref for ref in live if ref() is not None]
        most.append(len(live))
        return out

    monkeypatch.setattr(LazyArray, "materialise", counting)
    config, params = open_checkpoints(TINY / "var.pth", TINY / "vae_f16.safetensors", log=lambda *_: None)
    assert isinstance(params["var"]["params"]["blocks"]["ffn"]["fc1"]["kernel"], lazy._Stack)
    save_checkpoint(tmp_path / "out", config, params)
    n = len(jax.tree.leaves(params))
    assert len(most) == 2 * n  # every array once for the params, once for the manifest
    assert max(most) == 1
    _, loaded = load_checkpoint(tmp_path / "out")
    np.testing.assert_array_equal(loaded["var"]["params"]["blocks"]["ffn"]["fc1"]["kernel"],
                                  np.asarray(params["var"]["params"]["blocks"]["ffn"]["fc1"]["kernel"]))
