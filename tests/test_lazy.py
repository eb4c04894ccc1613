"""Lazy arrays and the streaming orbax writer: nothing is read before it is written, the checkpoint reads back as the
same arrays, and at most one array is in memory at a time."""
from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from amskv_jax.lazy import LazyArray, save_arrays
from convert.mapping import lazy_params


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
